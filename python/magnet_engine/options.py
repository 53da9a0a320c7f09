"""Option handling of the public API (`MAGNeT`'s setters and per-call options): each check
raises `InvalidOptionError` naming what was expected and found, and changes nothing.

The rules themselves live in the engine (`DecodingParams.validate`, `HybridOptions.validate`,
`generate.check_prefix`, `generate.decodes_long_form`, `generate.check_engine`,
`precision.choose_precision`); what is here is the API's own layer over them: durations and
the long-form stride in seconds, audiocraft's `generation_params` mapping, the precision of
the reference engine.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing as tp

import torch

from magnet_engine.engine import generate
from magnet_engine.engine.config import DecodingParams, ModelConfig
from magnet_engine.engine.precision import AUTO, CHOICES, PrecisionChoice, choose_precision
from magnet_engine.engine.schedule import duration_frames
from magnet_engine.errors import InvalidOptionError

# Long-form: the default stride is this fraction of the window (18 s of a 30 s window, as
# audiocraft's MusicGen; 6 s of a 10 s window, each window then sees 4 s of the last).
DEFAULT_STRIDE_FRACTION = 0.6
MAX_LONGFORM_SECONDS = 600.0    # bounds the canvas a typo could ask for; a server caps lower


def is_real(value) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def plain_number(value: tp.Union[int, float]) -> tp.Union[int, float]:
    """Python int / float kept as given (audiocraft keeps 10 as 10); numpy scalars -> float."""
    return value if type(value) in (int, float) else float(value)


def resolve_device(device: tp.Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def precision_for(engine: str, precision: tp.Optional[str], device: torch.device,
                  cfg: ModelConfig) -> PrecisionChoice:
    """The fast runtime's precision (`engine.precision.choose_precision`); the reference loop
    runs fp32 whatever is asked, as before."""
    generate.check_engine(engine)
    if engine == "reference":
        if precision is not None and precision not in CHOICES:
            raise InvalidOptionError(f"precision must be one of {list(CHOICES)}, found {precision!r}")
        return PrecisionChoice("fp32", precision or AUTO, "fp32: the reference loop runs fp32")
    return choose_precision(precision, device, cfg.dim, cfg.ffn_dim)


def check_params(params: DecodingParams, cfg: ModelConfig) -> DecodingParams:
    """A call's own decoding options (instead of the instance's)."""
    if not isinstance(params, DecodingParams):
        raise InvalidOptionError(f"params must be a DecodingParams, found {type(params).__name__}")
    return params.validate(cfg.n_q, card=cfg.card)


def generation_params(params: DecodingParams) -> tp.Mapping[str, tp.Any]:
    """audiocraft's `generation_params`: the decoding options under the keyword names of its
    `lm.generate`, read-only."""
    return types.MappingProxyType({
        "use_sampling": params.use_sampling, "temp": params.temperature, "top_k": params.top_k,
        "top_p": params.top_p, "max_cfg_coef": params.max_cfg_coef, "min_cfg_coef": params.min_cfg_coef,
        "decoding_steps": list(params.decoding_steps), "span_arrangement": params.span_arrangement})


def params_from_mapping(value: tp.Mapping[str, tp.Any], cfg: ModelConfig) -> DecodingParams:
    """A whole `generation_params` mapping (which may also name `anneal_temp` and
    `span_scoring`) -> validated DecodingParams; unnamed options take their defaults."""
    if not isinstance(value, tp.Mapping):
        raise InvalidOptionError(f"generation_params must be a mapping, found {type(value).__name__}")
    fields = {"temp": "temperature"}
    known = {f.name for f in dataclasses.fields(DecodingParams)} - {"temperature"} | set(fields)
    unknown = sorted(set(value) - known)
    if unknown:
        raise InvalidOptionError(f"unknown generation_params key(s) {unknown}; known: {sorted(known)}")
    return DecodingParams(**{fields.get(k, k): v for k, v in value.items()}).validate(cfg.n_q)


def check_max_duration(value, cfg: ModelConfig, frame_rate: float) -> tp.Union[int, float]:
    """`max_duration`: at most the trained segment, at least one span."""
    trained = cfg.segment_duration
    if not is_real(value) or not 0 < value <= trained + 1e-9:
        raise InvalidOptionError(f"max_duration must be a number of seconds in (0, {trained:g}] (the model's "
                                 f"trained length), found {value!r}")
    if duration_frames(value, frame_rate) < max(cfg.span_len, 1):
        raise InvalidOptionError(f"max_duration {value} s is shorter than one span of {cfg.span_len} frames")
    return plain_number(value)


def check_duration(duration, cfg: ModelConfig, frame_rate: float, max_duration: float,
                   limit: tp.Optional[float] = None) -> float:
    """A duration in seconds against the longest this model generates (and `limit`, e.g. a
    server's cap). A plain MAGNeT generates past `max_duration` window by window (long-form,
    up to MAX_LONGFORM_SECONDS); a hybrid one stays within it."""
    longest = MAX_LONGFORM_SECONDS if generate.decodes_long_form(cfg) else max_duration
    limit = longest if limit is None else min(limit, longest)
    if not is_real(duration):
        raise InvalidOptionError(f"duration must be a number of seconds, found {duration!r}")
    if duration <= 0 or duration > limit + 1e-9:
        raise InvalidOptionError(f"duration must be in (0, {limit:g}] s (the longest this model generates, "
                                 f"or the configured limit), found {duration}")
    if duration_frames(duration, frame_rate) < max(cfg.span_len, 1):
        raise InvalidOptionError(f"duration {duration} s is shorter than one span of {cfg.span_len} frames")
    return float(duration)


def check_extend_stride(value, max_duration: float) -> tp.Optional[tp.Union[int, float]]:
    """audiocraft's `extend_stride`: None (the default fraction) or seconds in (0, max_duration)."""
    if value is not None and (not is_real(value) or not 0 < value < max_duration):
        raise InvalidOptionError(f"extend_stride must be None or a number of seconds in (0, max_duration="
                                 f"{max_duration}), found {value!r}")
    return None if value is None else plain_number(value)


def stride_frames(extend_stride: tp.Optional[float], max_duration: float, frame_rate: float) -> int:
    """Frames between long-form windows: `extend_stride`, or DEFAULT_STRIDE_FRACTION of the window."""
    stride = extend_stride if extend_stride is not None else DEFAULT_STRIDE_FRACTION * max_duration
    return int(round(stride * frame_rate))
