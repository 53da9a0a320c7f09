"""audiocraft-shaped views of a loaded model, for code written against audiocraft's MAGNeT.

`MAGNeT.compression_model` and `MAGNeT.lm` are these views: they give the attribute names,
types and call signatures of audiocraft's `CompressionModel` and `LMModel` over our codec
and LM, and hold no state of their own. The engine itself never goes through them.
"""
from __future__ import annotations

import types
import typing as tp

import torch

from magnet_engine.engine.codec import Codec
from magnet_engine.engine.conditioning import TextConditioner
from magnet_engine.engine.config import without_resolvers
from magnet_engine.engine.model import MagnetLM
from magnet_engine.errors import InvalidInputError

def training_config(xp_cfg, device: torch.device, frame_rate: int) -> tp.Any:
    """The checkpoint's full training config (xp.cfg as `parse_yaml_config` returns it) as
    audiocraft's MAGNeT loader leaves it in `lm.cfg`: device and dtype of this run,
    transformer_lm's compression_model_framerate, segment_duration and span_len filled in, two
    training-only conditioner args dropped; then read-only and in struct mode (a missing key
    raises). Every resolver call (`${oc.env:USER}` is in every real export's dora section) is
    replaced by the refusal marker first: reading a field never runs a resolver."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(without_resolvers(xp_cfg), resolve=False)
    conditioners = tree.get("conditioners")
    args = conditioners.get("args") if isinstance(conditioners, dict) else None
    if isinstance(args, dict):
        for name in ("merge_text_conditions_p", "drop_desc_p"):
            args.pop(name, None)
    cfg = OmegaConf.create(tree)
    cfg.device = str(device)
    cfg.dtype = "float32" if cfg.device == "cpu" else "float16"
    cfg.transformer_lm.compression_model_framerate = frame_rate
    for key, source in (("segment_duration", "dataset.segment_duration"), ("span_len", "masking.span_len")):
        value = OmegaConf.select(cfg, source)
        if value is not None:
            cfg.transformer_lm[key] = value
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


class CompressionModelView:
    """audiocraft's `CompressionModel` interface over our EnCodec: codes [B, K, T] <-> wav [B, C, S]."""

    def __init__(self, codec: Codec):
        self._codec = codec

    @property
    def sample_rate(self) -> int:
        return self._codec.sample_rate

    @property
    def channels(self) -> int:
        return self._codec.channels

    @property
    def frame_rate(self) -> tp.Union[int, float]:
        # audiocraft's own EnCodec stores sample_rate // hop (an int); its transformers
        # wrapper computes sample_rate / hop (a float). Same value, the type of each.
        if self._codec.source == "audiocraft":
            return self._codec.sample_rate // self._codec.hop_length
        return self._codec.sample_rate / self._codec.hop_length

    @property
    def cardinality(self) -> int:
        return self._codec.cardinality

    @property
    def num_codebooks(self) -> int:
        return self._codec.n_q

    @property
    def total_codebooks(self) -> int:
        return self._codec.n_q

    def encode(self, x: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """wav [B, C, S] at `sample_rate` -> (codes [B, K, ceil(S / hop)], scale None)."""
        return self._codec.encode(x), None

    def decode(self, codes: torch.Tensor, scale: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes [B, K, T] -> wav [B, C, T · hop]. `scale` is for renormalizing codecs, which
        encode refuses, so only None is meaningful here."""
        if scale is not None:
            raise InvalidInputError("scale must be None: this codec does not renormalize its input")
        return self._codec.decode(codes)

    def decode_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> latent [B, D, T]."""
        return self._codec.decode_latent(codes)


class ConditionProviderView:
    """audiocraft's `ConditioningProvider` shape: `conditioners` by attribute name."""

    def __init__(self, conditioner: TextConditioner):
        self.conditioners = types.MappingProxyType({"description": conditioner})


class LMView:
    """audiocraft's `LMModel` attributes over our MagnetLM; `module` is the MagnetLM itself."""

    def __init__(self, module: MagnetLM, cfg, conditioner: TextConditioner):
        self.module = module
        self.cfg = cfg          # the full training config, read-only (None if built without one)
        self.condition_provider = ConditionProviderView(conditioner)

    @property
    def n_q(self) -> int:
        return self.module.cfg.n_q

    @property
    def num_codebooks(self) -> int:
        return self.module.cfg.n_q

    @property
    def card(self) -> int:
        return self.module.cfg.card

    @property
    def special_token_id(self) -> int:
        """The mask token: one past the last code."""
        return self.module.cfg.mask_id

    def parameters(self, recurse: bool = True) -> tp.Iterator[torch.nn.Parameter]:
        return self.module.parameters(recurse)
