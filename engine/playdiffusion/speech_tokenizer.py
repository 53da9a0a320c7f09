"""Speech units: XLS-R layer-35 features and nearest-centroid k-means (docs/model.md §13.3).

    wave [N] @ 16 kHz -> (odd N: one 1.0 pad sample) -> Wav2Vec2 (stable layer norm, 35
    layers, final encoder norm removed) -> features [T, D] -> argmin_j ||x - c_j||² -> units [T]

The encoder is transformers' `Wav2Vec2Model` with fairseq2's checkpoint keys mapped onto it.
Its final `encoder.layer_norm` is replaced by an identity: upstream drops it, and the
checkpoint's `encoder.layer_norm.*` (same name) must not fill it (docs/model.md §13.3).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from magnet_engine.engine.errors import CheckpointError, InvalidInputError

SAMPLE_RATE = 16000
NUM_LAYERS = 35  # upstream truncates the 48-layer xlsr2_1b_v2 at max_layer=35
XLSR2_1B_HEADS = 16

# fairseq2 0.4 names and the transformers Wav2Vec2 names they load into, in matching order:
# prefixes, or whole names where they end in "$"; {i} is a layer index, {p} one of q, k, v.
# Both directions are built from this one table (loading; random_weights writing the files).
_KEY_PAIRS = [
    ("encoder_frontend.feature_extractor.layers.{i}.conv.", "feature_extractor.conv_layers.{i}.conv."),
    ("encoder_frontend.feature_extractor.layers.{i}.layer_norm.", "feature_extractor.conv_layers.{i}.layer_norm."),
    ("encoder_frontend.post_extract_layer_norm.", "feature_projection.layer_norm."),
    ("encoder_frontend.model_dim_proj.", "feature_projection.projection."),
    ("encoder_frontend.pos_encoder.conv.weight_g$", "encoder.pos_conv_embed.conv.parametrizations.weight.original0$"),
    ("encoder_frontend.pos_encoder.conv.weight_v$", "encoder.pos_conv_embed.conv.parametrizations.weight.original1$"),
    ("encoder_frontend.pos_encoder.conv.bias$", "encoder.pos_conv_embed.conv.bias$"),
    ("encoder.layers.{i}.self_attn_layer_norm.", "encoder.layers.{i}.layer_norm."),
    ("encoder.layers.{i}.self_attn.output_proj.", "encoder.layers.{i}.attention.out_proj."),
    ("encoder.layers.{i}.self_attn.{p}_proj.", "encoder.layers.{i}.attention.{p}_proj."),
    ("encoder.layers.{i}.ffn_layer_norm.", "encoder.layers.{i}.final_layer_norm."),
    ("encoder.layers.{i}.ffn.inner_proj.", "encoder.layers.{i}.feed_forward.intermediate_dense."),
    ("encoder.layers.{i}.ffn.output_proj.", "encoder.layers.{i}.feed_forward.output_dense."),
]


def _regex_map(to_hf: bool) -> list[tuple[str, str]]:
    """(pattern, replacement) pairs renaming keys fairseq2 -> transformers, or back."""
    out = []
    for fairseq2, hf in _KEY_PAIRS:
        src, dst = (fairseq2, hf) if to_hf else (hf, fairseq2)
        exact = src.endswith("$")
        src, dst = src.rstrip("$"), dst.rstrip("$")
        pattern = re.escape(src).replace(r"\{i\}", r"(\d+)").replace(r"\{p\}", r"([qkv])")
        out.append(("^" + pattern + ("$" if exact else ""), dst.replace("{i}", r"\1").replace("{p}", r"\2")))
    return out


_TO_HF, _TO_FAIRSEQ2 = _regex_map(True), _regex_map(False)


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, repl in table:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def fairseq2_key(hf_key: str) -> str:
    """The fairseq2 0.4 checkpoint name of a transformers Wav2Vec2 parameter."""
    key = _rename(hf_key, _TO_FAIRSEQ2)
    if key is None:
        raise KeyError(f"no fairseq2 name for {hf_key!r}")
    return key


# Pre-training heads and the removed final norm: present in the file, unused at inference.
_UNUSED = re.compile(r"^(final_proj|final_target_proj|masker|quantizer)\.|^encoder\.layer_norm\.")


def _hf_key(key: str) -> str | None:
    return _rename(key, _TO_HF)


def wav2vec2_config(state: dict, overrides: dict):
    """The HF config of the file's encoder: sizes from the tensor shapes, heads from the
    sidecar overrides (the tiny fixtures) or xlsr2_1b_v2's 16."""
    from transformers import Wav2Vec2Config

    convs = sorted({int(m.group(1)) for k in state
                    if (m := re.match(r"encoder_frontend\.feature_extractor\.layers\.(\d+)\.conv\.weight$", k))})
    if not convs:
        raise CheckpointError("XLS-R checkpoint: no fairseq2 'encoder_frontend.feature_extractor' keys found")
    shapes = [state[f"encoder_frontend.feature_extractor.layers.{i}.conv.weight"].shape for i in convs]
    strides = [int(d[2]) for d in overrides.get("feature_extractor_layer_descs", [])] or [5, 2, 2, 2, 2, 2, 2]
    if len(strides) != len(shapes):
        raise CheckpointError(f"XLS-R checkpoint: {len(shapes)} conv layers, config describes {len(strides)}")
    model_dim = state["encoder_frontend.model_dim_proj.weight"].shape[0]
    pos_v = state["encoder_frontend.pos_encoder.conv.weight_v"]
    ffn = state["encoder.layers.0.ffn.inner_proj.weight"].shape[0]
    return Wav2Vec2Config(
        hidden_size=model_dim, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=int(overrides.get("num_encoder_attn_heads", XLSR2_1B_HEADS)),
        intermediate_size=ffn, feat_extract_norm="layer", conv_bias=True,
        conv_dim=[int(s[0]) for s in shapes], conv_kernel=[int(s[2]) for s in shapes], conv_stride=strides,
        num_conv_pos_embeddings=int(pos_v.shape[2]), num_conv_pos_embedding_groups=model_dim // int(pos_v.shape[1]),
        do_stable_layer_norm=True, feat_extract_activation="gelu", hidden_act="gelu", layer_norm_eps=1e-5,
        mask_time_prob=0.0, mask_feature_prob=0.0, apply_spec_augment=False,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
    )


class SpeechTokenizer(nn.Module):
    def __init__(self, encoder: nn.Module, centroids: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("centroids", centroids)  # [A, D]

    @property
    def dtype(self) -> torch.dtype:
        return self.centroids.dtype

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """wave: [N] float @ 16 kHz -> layer-35 features [1, T, D] in the tokenizer's dtype.

        An odd N gets one 1.0 sample (fairseq2's Collater, pad_to_multiple=2); the frames the
        conv stack makes from it are masked as padding, and still emitted (docs/model.md §13.3)."""
        if wave.dim() != 1 or wave.numel() == 0:
            raise InvalidInputError(f"speech tokenizer: expected a non-empty mono wave [N], found {tuple(wave.shape)}")
        n = wave.numel()
        wave = wave.to(self.dtype)
        mask = None
        if n % 2:
            wave = torch.cat([wave, wave.new_ones(1)])
            mask = torch.ones(1, n + 1, dtype=torch.long, device=wave.device)
            mask[0, n] = 0
        out = self.encoder(wave[None], attention_mask=mask)
        return out.last_hidden_state

    def quantize(self, features: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [...] int64: argmax of −(|x|² − 2x·c + |c|²), computed in the features' dtype."""
        flat = features.reshape(-1, features.shape[-1])
        c = self.centroids.to(flat.dtype)
        dist = -(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ c.t() + c.t().pow(2).sum(0, keepdim=True))
        return dist.max(1).indices.view(features.shape[:-1])

    @torch.inference_mode()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """wave: [N] @ 16 kHz -> units [1, T] int64."""
        return self.quantize(self.features(wave))


def load_speech_tokenizer(state: dict, centroids: torch.Tensor, overrides: dict | None = None,
                          dtype: torch.dtype = torch.float32) -> SpeechTokenizer:
    """fairseq2 state dict (+ k-means [A, D]) -> SpeechTokenizer; unknown keys are refused."""
    from transformers import Wav2Vec2Model

    if not isinstance(state, dict):
        raise CheckpointError("XLS-R checkpoint: expected a state dict")
    cfg = wav2vec2_config(state, overrides or {})
    mapped, unknown = {}, []
    for key, value in state.items():
        hf = _hf_key(key)
        if hf is not None:
            layer = re.match(r"encoder\.layers\.(\d+)\.", hf)
            if layer is None or int(layer.group(1)) < NUM_LAYERS:  # layers past 35 are never built
                mapped[hf] = value
        elif not _UNUSED.match(key):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"XLS-R checkpoint: unexpected keys {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    model = Wav2Vec2Model(cfg)
    model.encoder.layer_norm = nn.Identity()
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"XLS-R checkpoint does not match a {NUM_LAYERS}-layer xlsr2 encoder: {e}") from None
    if centroids.shape[1] != cfg.hidden_size:
        raise CheckpointError(f"k-means width {centroids.shape[1]} != XLS-R model_dim {cfg.hidden_size}")
    return SpeechTokenizer(model.eval(), centroids.clone()).to(dtype)
