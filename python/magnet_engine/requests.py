"""Request checks of the public API: what a generate call is given (descriptions, per-window
texts, seeds, prompt codes, waveform clips, infill regions), checked before any model runs.
Each raises `InvalidInputError` (`RegionError`, `InvalidOptionError` for seeds) naming what
was expected and found.
"""
from __future__ import annotations

import math
import typing as tp

import torch

from magnet_engine.engine.conditioning import check_descriptions
from magnet_engine.engine.config import MAX_SEED, SEED_LIMIT, ModelConfig
from magnet_engine.errors import InvalidInputError, InvalidOptionError, RegionError

Texts = tp.List[tp.Optional[str]]


def window_texts(descriptions) -> tp.Tuple[Texts, tp.Optional[tp.List[Texts]]]:
    """Descriptions whose rows may be lists of one text per long-form window ->
    (the first window's texts, every row's per-window texts or None when none is a list)."""
    if isinstance(descriptions, (str, bytes)) or not isinstance(descriptions, tp.Sequence) or not any(
            isinstance(d, (list, tuple)) for d in descriptions):
        return check_descriptions(descriptions), None
    rows = [list(d) if isinstance(d, (list, tuple)) else None for d in descriptions]
    counts = {len(r) for r in rows if r is not None}
    if None in rows or len(counts) != 1 or 0 in counts:
        raise InvalidInputError("per-window descriptions: every row must be a non-empty list, all of one length "
                                "(one text per window)")
    per_window = [check_descriptions(r) for r in rows]
    return [r[0] for r in per_window], per_window


def clip_descriptions(descriptions, batch: int) -> Texts:
    """One description (or None) per clip of a batch; None: every row unconditioned."""
    descriptions = check_descriptions([None] * batch if descriptions is None else descriptions)
    if len(descriptions) != batch:
        raise InvalidInputError(f"{len(descriptions)} descriptions for a batch of {batch} clips")
    return descriptions


def row_seeds(seed, batch: int) -> tp.List[int]:
    """One seed per row: an int seeds row b with seed + b; a list gives each row its own.
    A row's draws depend only on its seed, so batching never changes a row's sample.
    None draws the rows' seeds from torch's default generator, so that, as with audiocraft,
    torch.manual_seed(n) before a call reproduces it."""
    if seed is None:
        seed = torch.randint(0, MAX_SEED, (batch,), dtype=torch.int64).tolist()
    if isinstance(seed, (list, tuple)):
        seeds = list(seed)
    else:
        seeds = [seed + b for b in range(batch)] if isinstance(seed, int) and not isinstance(seed, bool) else None
    if seeds is None or len(seeds) != batch or any(
            isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < SEED_LIMIT - batch for s in seeds):
        raise InvalidOptionError(f"seed must be an int >= 0 or a list of {batch} such ints, found {seed!r}")
    return seeds


def check_prompt_codes(codes: torch.Tensor, batch: int, cfg: ModelConfig, frames: int,
                       duration: float) -> torch.Tensor:
    """Prompt codes [batch, K, P] of a `frames`-frame (`duration` s) generation: integers in
    the codebook, shorter than the generation."""
    k = cfg.n_q
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[:2] != (batch, k) \
            or codes.dtype not in (torch.int64, torch.int32):
        raise InvalidInputError(f"prompt codes must be an integer tensor [{batch}, {k}, P], "
                                f"found {getattr(codes, 'dtype', type(codes))} {tuple(getattr(codes, 'shape', ()))}")
    if codes.shape[-1] >= frames:
        raise InvalidInputError(f"prompt has {codes.shape[-1]} frames; it must be shorter than the "
                                f"{frames} frames of a {duration} s generation")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.card):
        raise InvalidInputError(f"prompt codes must lie in [0, {cfg.card - 1}], found "
                                f"[{int(codes.min())}, {int(codes.max())}]")
    return codes


def check_clip(audio, sample_rate, what: str, rate_name: str,
               max_seconds: tp.Optional[float] = None) -> torch.Tensor:
    """A waveform clip (a continuation prompt, an infill clip) -> [B, C, samples]: a float
    tensor [B, C, samples] or [C, samples] of finite samples at a positive int rate, at most
    `max_seconds` long."""
    if not isinstance(audio, torch.Tensor) or audio.dim() not in (2, 3) or not audio.is_floating_point() \
            or audio.shape[-1] == 0:
        raise InvalidInputError(f"{what} must be a float waveform [B, C, samples] or [C, samples]; found "
                                f"{type(audio).__name__} {tuple(getattr(audio, 'shape', ()))}")
    if audio.dim() == 2:
        audio = audio[None]
    if not torch.isfinite(audio).all():
        raise InvalidInputError(f"{what} holds NaN or inf samples")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise InvalidInputError(f"{rate_name} must be a positive int, found {sample_rate!r}")
    if max_seconds is not None and audio.shape[-1] / sample_rate > max_seconds + 1e-9:
        raise InvalidInputError(f"the clip is {audio.shape[-1] / sample_rate:g} s, longer than the model's "
                                f"{max_seconds:g} s window: cut it to the part to edit (infill does not "
                                "window a clip)")
    return audio


def region_frames(regions, frames: int, frame_rate: float) -> tp.List[tp.Tuple[int, int]]:
    """Infill regions, (start, end) pairs of seconds within a `frames`-frame clip -> frame
    intervals [start, end), bounds rounded outward to codec frames."""
    if isinstance(regions, (str, bytes)) or not isinstance(regions, tp.Sequence) or not regions:
        raise RegionError(f"regions must be a non-empty list of (start, end) seconds, found {regions!r}")
    clip = frames / frame_rate
    spans = []
    for region in regions:
        if not isinstance(region, tp.Sequence) or len(region) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in region):
            raise RegionError(f"a region is a (start, end) pair of seconds, found {region!r}")
        start, end = region
        if not 0 <= start < end or end > clip + 1e-9:
            raise RegionError(f"region ({start}, {end}) s must satisfy 0 <= start < end <= {clip:g} s "
                              "(the clip's length)")
        spans.append((int(math.floor(start * frame_rate)), min(int(math.ceil(end * frame_rate)), frames)))
    return spans


def check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidInputError(f"num_samples must be an int >= 1, found {num_samples!r}")
    return num_samples
