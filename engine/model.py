"""The MAGNeT transformer LM, lean: embeddings, pre-norm layers, final norm, stage heads.

Parameter names equal the checkpoint's keys (docs/model.md §2.2), so a published `best_state` loads
with a strict `load_state_dict` once the conditioner's `output_proj` keys are taken out.

    h = Σ_k Emb_k[codes_k] + PE                          # [B, T, D]
    for each layer:  h += SA(LN1 h, band)  h += XA(LN_cross h, c)  h += W2 gelu(W1 LN2 h)
    logits_s = LN_out(h) @ Wout_sᵀ                       # [B, T, card], only head s

Self-attention is full at stage 0 and restricted to |i − j| <= W frames at stages > 0
(docs/model.md §4). Attention is pluggable (`SelfAttention`): the plain path here masks a dense
[T, T] bias, the fast runtime passes the banded kernel. Cross-attention keys/values depend
only on the condition, so they can be computed once per call (`cross_kv`).

The same network also runs over a static key/value cache (`forward_cached`): rows at given
positions write their keys/values into a preallocated `KVCache` and attend over the whole
cache under a boolean mask. That one call is the autoregressive step of MusicGen-style
decoding (mask: key position <= query position), the causal prefill, and the hybrid tail
(queries for the tail rows only, the prefix's keys/values kept from the AR phase).
"""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from magnet_engine.engine.config import ModelConfig
from magnet_engine.engine.precision import Int8Linear, fused_linear

# (q, k, v: [B, H, T, d], window or None) -> [B, H, T, d]
SelfAttention = tp.Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tp.Optional[int]], torch.Tensor]
# over a KV cache: a [t, T_max] bool mask, or (q [R, H, t, d], k, v [R, H, T_max, d]) -> [R, H, t, d]
CachedAttention = tp.Union[torch.Tensor, tp.Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float = 10000.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Non-interleaved sinusoidal positions, [..., T, 1] -> [..., T, dim].

    Same ops as audiocraft's `create_sin_embedding` so fp32 results are bitwise equal;
    note the divisor (dim/2 − 1), not dim/2.
    """
    half = dim // 2
    adim = torch.arange(half, device=positions.device, dtype=dtype).view(1, 1, -1)
    max_period_t = torch.full([], max_period, device=positions.device, dtype=dtype)
    phase = positions / (max_period_t ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def band_bias(t: int, window: int, device, dtype=torch.float32) -> torch.Tensor:
    """[T, T] additive bias: 0 where |i − j| <= window, −inf elsewhere."""
    pos = torch.arange(t, device=device)
    valid = (pos[:, None] - pos[None, :]).abs() <= window
    return torch.where(valid, torch.zeros((), device=device, dtype=dtype),
                       torch.full((), float("-inf"), device=device, dtype=dtype))


def dense_self_attention(q, k, v, window: tp.Optional[int]) -> torch.Tensor:
    """The plain oracle: SDPA with a dense band bias (or none at stage 0)."""
    mask = None if window is None else band_bias(q.shape[-2], window, q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def causal_self_attention(q, k, v, window: tp.Optional[int]) -> torch.Tensor:
    """Full causal recomputation (MusicGen's training-time attention); `window` unused."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def masked_self_attention(mask: torch.Tensor) -> SelfAttention:
    """Self-attention under an explicit [T, T] bool mask (True = may attend); window unused."""
    def attend(q, k, v, window):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attend


class KVCache:
    """Static self-attention keys/values of every layer: 2 x [rows, H, T_max, d] each.

    Allocated once per (rows, T_max) and overwritten in place; slots past what a call
    wrote hold stale values, which the attention mask never lets a query see. They start
    at zero, not `empty`: a masked slot still enters SDPA as 0 · v, and 0 · NaN is NaN.
    """

    def __init__(self, num_layers: int, rows: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: tp.Union[str, torch.device]):
        shape = (rows, num_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    """Packed-projection multi-head attention (rows of in_proj_weight: q | k | v)."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if bias else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.in_proj_int8: tp.Optional[Int8Linear] = None   # set by `quantize_` (precision 'int8')

    def quantize_(self, release: tp.Callable[[torch.Tensor], None]) -> None:
        """int8 projections in place of the packed fp32 weight (engine/precision.py); the
        fp32 parameters are dropped, `release` called on each as it goes."""
        self.in_proj_int8 = Int8Linear.from_weight(self.in_proj_weight, self.in_proj_bias)
        release(self.in_proj_weight)
        self.in_proj_weight = self.in_proj_bias = None
        out = self.out_proj
        self.out_proj = Int8Linear.from_weight(out.weight, out.bias)
        release(out.weight)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the projections take (mixed precision: an fp32 residual meets low-precision matmuls)."""
        return torch.float32 if self.in_proj_int8 is not None else self.in_proj_weight.dtype

    def _project(self, x: torch.Tensor, part: slice, norm: tp.Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """norm(x) @ rows `part` of the packed q|k|v projection (+ bias), in the projection's
        dtype (an int8 projection takes the norm into its activation quantization)."""
        if self.in_proj_int8 is not None:
            return self.in_proj_int8(x.to(self.input_dtype), part, norm=norm)
        x = (x if norm is None else norm(x)).to(self.input_dtype)
        bias = self.in_proj_bias
        return F.linear(x, self.in_proj_weight[part], None if bias is None else bias[part])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)  # [B, H, T, d]

    def _merge(self, x: torch.Tensor, residual: tp.Optional[torch.Tensor]) -> torch.Tensor:
        b, h, t, d = x.shape
        return fused_linear(self.out_proj, x.transpose(1, 2).reshape(b, t, h * d), residual=residual)

    # The attention calls below take the layer's input x, the pre-norm and the residual: they
    # return residual + Attn(norm(x)) (each optional), so an int8 layer fuses both into its
    # projections' passes (engine/precision.py `fused_linear`).
    def self_attend(self, x: torch.Tensor, window: tp.Optional[int], attend: SelfAttention,
                    norm: tp.Optional[nn.LayerNorm] = None, residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, dim = x.shape
        qkv = self._project(x, slice(None), norm).view(b, t, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d]
        return self._merge(attend(q, k, v, window), residual)

    def self_attend_cached(self, x: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                           cache_v: torch.Tensor, attend: CachedAttention, norm: tp.Optional[nn.LayerNorm] = None,
                           residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [R, t, D] at `positions` [t] (int64, on x's device): write their keys/values into
        the cache [R, H, T_max, d] at those positions, then attend over the whole cache:
        `attend` is a [t, T_max] bool mask (True = may attend) or a callable (q, k, v) -> out.
        No host value is read: graph-capturable."""
        b, t, _ = x.shape
        qkv = self._project(x, slice(None), norm).view(b, t, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        cache_k.index_copy_(2, positions, k.to(cache_k.dtype))
        cache_v.index_copy_(2, positions, v.to(cache_v.dtype))
        if isinstance(attend, torch.Tensor):
            return self._merge(F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=attend), residual)
        return self._merge(attend(q, cache_k, cache_v), residual)

    def kv(self, memory: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of the condition: [B, S, D] -> 2 x [B, H, S, d]."""
        k = self._project(memory, slice(self.dim, 2 * self.dim))
        v = self._project(memory, slice(2 * self.dim, None))
        return self._heads(k), self._heads(v)

    def cross_attend(self, x: torch.Tensor, kv: tp.Tuple[torch.Tensor, torch.Tensor],
                     mask: tp.Optional[torch.Tensor] = None, norm: tp.Optional[nn.LayerNorm] = None,
                     residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask: None, or [B, 1, 1, S] bool (True = may attend) for keys that are not the row's
        own text (rows of unequal text lengths sharing one key buffer, engine/slots.py)."""
        q = self._project(x, slice(0, self.dim), norm)
        # No mask by default: the padding of a batch's own texts holds zero vectors and still
        # takes softmax mass, as in the reference (docs/model.md §3).
        return self._merge(F.scaled_dot_product_attention(self._heads(q), *kv, attn_mask=mask), residual)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.self_attn = Attention(d, cfg.num_heads, cfg.bias_attn)
        self.cross_attention = Attention(d, cfg.num_heads, cfg.bias_attn)
        self.linear1 = nn.Linear(d, cfg.ffn_dim, bias=cfg.bias_ff)
        self.linear2 = nn.Linear(cfg.ffn_dim, d, bias=cfg.bias_ff)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm_cross = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor, window: tp.Optional[int], cross_kv, attend: SelfAttention) -> torch.Tensor:
        x = self.self_attn.self_attend(x, window, attend, self.norm1, residual=x)
        x = self.cross_attention.cross_attend(x, cross_kv, norm=self.norm_cross, residual=x)
        return self.ffn(x)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """x + W2 gelu(W1 LN2 x)."""
        return fused_linear(self.linear2, fused_linear(self.linear1, x, self.norm2, gelu=True), residual=x)

    def cross_and_ffn(self, x: torch.Tensor, cross_kv, cross_mask: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-attention then FFN. When `cross_kv` holds fewer rows than x, the remaining
        rows are CFG null rows, whose cross-attention output is exactly zero (bias-free
        projections of all-zero embeddings, docs/model.md §3): it is skipped for them.
        cross_mask: see `Attention.cross_attend`, one row per row of `cross_kv`."""
        b = cross_kv[0].shape[0]
        if b < x.shape[0]:
            xc = self.cross_attention.cross_attend(x[:b], cross_kv, cross_mask, self.norm_cross, residual=x[:b])
            x = torch.cat([xc, x[b:]])
        else:
            x = self.cross_attention.cross_attend(x, cross_kv, cross_mask, self.norm_cross, residual=x)
        return self.ffn(x)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))


class MagnetLM(nn.Module):
    """The LM of a MAGNeT checkpoint. `stage_logits` is the documented low-level call."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q))
        self.transformer = Transformer(cfg)
        self.out_norm = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.linears = nn.ModuleList(nn.Linear(cfg.dim, cfg.card, bias=cfg.bias_proj) for _ in range(cfg.n_q))

    def window(self, stage: int) -> tp.Optional[int]:
        """Self-attention window of a stage: None (full) at stage 0 or when W = −1."""
        w = self.cfg.subcodes_context
        return None if stage == 0 or w < 0 else w

    def embed(self, codes: torch.Tensor, positions: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes [B, K, T] (mask id = card allowed) -> [B, T, D]; positions [T] (default 0..T-1)."""
        _, k, t = codes.shape
        x = sum(self.emb[i](codes[:, i]) for i in range(k))
        if positions is None:
            positions = torch.arange(t, device=codes.device)
        return x + sin_embedding(positions.view(1, -1, 1), self.cfg.dim, self.cfg.max_period, dtype=x.dtype)

    def cross_kv(self, cond: torch.Tensor) -> tp.List[tp.Tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention (K, V) of the condition [B, S, D]; reusable across steps."""
        return [layer.cross_attention.kv(cond) for layer in self.transformer.layers]

    def cfg_cross_kv(self, cond: torch.Tensor, dtype: tp.Optional[torch.dtype] = None):
        """Cross K/V of CFG condition rows [2B, S, D] (conditional, then null): of the B
        conditional rows alone when the null rows' cross-attention output is exactly zero
        (bias-free projections of all-zero rows, docs/model.md §3; see `Layer.cross_and_ffn`)."""
        cond = cond if dtype is None else cond.to(dtype)
        return self.cross_kv(cond if self.cfg.bias_attn else cond[:cond.shape[0] // 2])

    def hidden(self, codes: torch.Tensor, cond: torch.Tensor, stage: int,
               attend: SelfAttention = dense_self_attention, cross_kv=None) -> torch.Tensor:
        """codes [B, K, T], cond [B, S, D] -> LN_out output [B, T, D]."""
        if cross_kv is None:
            cross_kv = self.cross_kv(cond)
        x = self.embed(codes)
        window = self.window(stage)
        for layer, kv in zip(self.transformer.layers, cross_kv):
            x = layer(x, window, kv, attend)
        return self.out_norm(x)

    def new_cache(self, rows: int, max_len: int, dtype: tp.Optional[torch.dtype] = None) -> KVCache:
        attn = self.transformer.layers[0].self_attn
        return KVCache(self.cfg.num_layers, rows, self.cfg.num_heads, max_len, self.cfg.head_dim,
                       dtype or attn.input_dtype, self.out_norm.weight.device)

    def forward_cached(self, codes: torch.Tensor, positions: torch.Tensor, cross_kv, cache: KVCache,
                       attend: CachedAttention, dtype: tp.Optional[torch.dtype] = None,
                       rows: tp.Optional[int] = None) -> torch.Tensor:
        """Rows at `positions` through every layer over the static cache.

        codes: [B, K, t] for B distinct rows; the first `rows` cache rows run (default all:
        R = B, or 2B for CFG, whose halves see the same codes, conditional rows first; B runs
        the conditional rows alone, for a CFG coefficient of exactly 1). Layer 0's input is the
        same for every half, so its self-attention runs once and its keys/values are copied.
        cross_kv holds as many rows as carry a real condition (fewer: the rest are null rows,
        see `Layer.cross_and_ffn`). positions: [t] int64; attend: see `self_attend_cached`.
        Returns the last layer's output [rows, t, D] before `out_norm`, in the transformer's dtype.
        """
        x = self.embed(codes, positions)
        if dtype is not None:
            x = x.to(dtype)
        rows = cache.rows if rows is None else rows
        b = x.shape[0]
        for i, (layer, kv, ck, cv) in enumerate(zip(self.transformer.layers, cross_kv, cache.keys, cache.values)):
            if i == 0:
                x = layer.self_attn.self_attend_cached(x, positions, ck[:b], cv[:b], attend, layer.norm1, residual=x)
                for start in range(b, rows, b):   # the other CFG halves: same keys/values
                    ck[start:start + b].index_copy_(2, positions, ck[:b].index_select(2, positions))
                    cv[start:start + b].index_copy_(2, positions, cv[:b].index_select(2, positions))
                x = x.repeat(rows // b, 1, 1) if rows != b else x
            else:
                x = layer.self_attn.self_attend_cached(x, positions, ck[:rows], cv[:rows], attend, layer.norm1,
                                                       residual=x)
            x = layer.cross_and_ffn(x, (kv[0][:rows], kv[1][:rows]))
        return x

    def head_logits(self, hidden: torch.Tensor, heads: tp.Optional[tp.Sequence[int]] = None) -> torch.Tensor:
        """LN_out output [R, t, D] -> logits [R, K', t, card] of the given heads (default all)."""
        heads = range(self.cfg.n_q) if heads is None else heads
        return torch.stack([self.linears[k](hidden) for k in heads], dim=1)

    def stage_logits(self, codes: torch.Tensor, cond: torch.Tensor, stage: int,
                     attend: SelfAttention = dense_self_attention) -> torch.Tensor:
        """Logits of codebook `stage`'s head for given codes and condition tensors.

        codes: [B, K, T] int64 in [0, card] (card = mask id); cond: [B, S, D] (the output
        of conditioning, CFG rows included if wanted). Returns [B, T, card] float.
        """
        return self.linears[stage](self.hidden(codes, cond, stage, attend))


def weight_bytes(module: nn.Module, seen: tp.Optional[tp.Set[int]] = None) -> int:
    """Bytes of a module's parameters and buffers, each tensor counted once however often it
    is shared; `seen` (data pointers) carries that across modules and is updated."""
    seen = set() if seen is None else seen
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
