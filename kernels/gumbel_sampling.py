"""PlayDiffusion's sampling epilogue (docs/model.md §13.9 steps 3-6): top-k, Gumbel-max
at an annealed temperature (or argmax), and the re-masking score with annealed Gumbel noise,
for one unmasking step. CFG is not here: PlayDiffusion mixes it on the hidden states, so the
head runs once and its logits arrive already guided.

Contract
--------
    gumbel_topk_sample(logits, sample_u, score_u, temperature, diversity, *, top_k, impl=None)
        -> (tokens, scores)

- `logits`: [N, C] fp32 (N target positions, C = A units). `sample_u`: [N, C] fp32 uniforms in
  [0, 1) for the Gumbel-max draw, or None for the greedy step. `score_u`: [N] fp32 uniforms for
  the confidence noise (drawn even on the greedy step). `temperature`, `diversity`: 0-d fp32
  (the caller has applied max(τ, 1e-3)). The uniforms come from the caller so that one stream
  (torch's generator, or recorded draws) reproduces upstream's `uniform_` call order exactly.
- Returns `tokens` [N] int64 in [0, C) and `scores` [N] fp32, higher = less confident:

    kept    = the top_k entries of each row, exactly k as torch.topk picks them; others -inf
    G(u)    = -log(-log(u + 1e-10) + 1e-10)
    tokens  = argmax(kept / temperature + G(sample_u))        (argmax(kept) when greedy)
    p       = softmax(kept)[tokens]                           (no temperature)
    scores  = -(diversity * G(score_u) + log(p + 1e-10))

Torch ops (what the function calls, as kernels/sampling.py's):
    magnet_engine::gumbel_topk_sample(logits, sample_u, score_u, temperature, diversity, top_k)
    magnet_engine::gumbel_topk_sample_triton(...)   (the same arguments)
Opaque to torch.compile, so a compiled step keeps the eager arithmetic (inductor never
re-derives the softmax or the logs the tokens and scores depend on).

Implementations (dispatch: Triton on CUDA, torch elsewhere; "cpp" runs the torch path):
- torch: written op for op as upstream, so a CPU run with the same uniforms reproduces
  upstream's tokens bit for bit. No host sync, no data-dependent branch.
- Triton: one program per row, the whole row in registers (C <= 16384). The k-th largest
  logit is found by bisection on the order-preserving integer image of the fp32 bits (32
  passes), so every entry equal to it is kept: it differs from torch.topk only when the k-th
  value is tied. exp/log are Triton's: a token can differ only where two perturbed logits are
  within an ulp, and scores agree to a few ulps.
"""
from __future__ import annotations

import typing as tp

import torch
from torch.library import wrap_triton

from magnet_engine.kernels import backend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch path does not need it
    triton = None

MAX_TRITON_CARD = 16384


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from uniforms, as upstream spells it (eps 1e-10 inside both logs)."""
    return -torch.log(-torch.log(u + 1e-10) + 1e-10)


if triton is not None:

    @triton.jit
    def _gumbel(u):
        return -tl.log(-tl.log(u + 1e-10) + 1e-10)

    @triton.jit
    def _gumbel_topk_kernel(logits_ptr, sample_u_ptr, score_u_ptr, temp_ptr, div_ptr, tokens_ptr, scores_ptr,
                            C, top_k, HAS_SAMPLE: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        inside = cols < C
        logits = tl.load(logits_ptr + row * C + cols, mask=inside, other=float("-inf"))
        # Order-preserving int32 image of fp32: negative floats have their magnitude bits flipped.
        bits = logits.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = tl.where(inside, key, -2147483647 - 1)
        lo = tl.min(tl.where(inside, key, 2147483647), axis=0).to(tl.int64)
        hi = tl.max(key, axis=0).to(tl.int64)
        for _ in range(33):  # largest v with count(key >= v) >= k
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum(((key.to(tl.int64) >= mid) & inside).to(tl.int32), axis=0) >= top_k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        kept = (key.to(tl.int64) >= lo) & inside
        filtered = tl.where(kept, logits, float("-inf"))
        l_max = tl.max(filtered, axis=0)
        z = tl.sum(tl.where(kept, tl.exp(filtered - l_max), 0.0), axis=0)
        if HAS_SAMPLE:
            u = tl.load(sample_u_ptr + row * C + cols, mask=inside, other=0.5)
            race = tl.where(kept, filtered / tl.load(temp_ptr) + _gumbel(u), float("-inf"))
            token = tl.argmax(race, axis=0)
        else:
            token = tl.argmax(filtered, axis=0)
        l_tok = tl.sum(tl.where(cols == token, filtered, 0.0), axis=0)
        p = tl.exp(l_tok - l_max) / z
        score = -(tl.load(div_ptr) * _gumbel(tl.load(score_u_ptr + row)) + tl.log(p + 1e-10))
        tl.store(tokens_ptr + row, token.to(tl.int64))
        tl.store(scores_ptr + row, score)


def _gumbel_topk_triton(logits: torch.Tensor, sample_u: tp.Optional[torch.Tensor], score_u: torch.Tensor,
                        temperature: torch.Tensor, diversity: torch.Tensor, top_k: int
                        ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    n, card = logits.shape
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    scores = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        launch = wrap_triton(_gumbel_topk_kernel) if torch.compiler.is_compiling() else _gumbel_topk_kernel
        launch[(n,)](logits, logits if sample_u is None else sample_u, score_u, temperature, diversity,
                     tokens, scores, card, top_k, HAS_SAMPLE=sample_u is not None,
                     BLOCK_C=triton.next_power_of_2(card))
    return tokens, scores


def _gumbel_topk_torch(logits: torch.Tensor, sample_u: tp.Optional[torch.Tensor], score_u: torch.Tensor,
                      temperature: torch.Tensor, diversity: torch.Tensor, top_k: int
                      ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    values, index = logits.topk(top_k, dim=-1)
    kept = torch.full_like(logits, float("-inf")).scatter_(-1, index, values)
    if sample_u is None:
        tokens = kept.argmax(dim=-1)
    else:
        tokens = (kept / temperature + gumbel(sample_u)).argmax(dim=-1)
    p = kept.softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
    scores = -(diversity * gumbel(score_u) + torch.log(p + 1e-10))
    return tokens, scores


def _gumbel_topk_fake(logits, sample_u, score_u, temperature, diversity, top_k):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.int64), logits.new_empty(n, dtype=torch.float32)


_gumbel_topk_op = torch.library.custom_op("magnet_engine::gumbel_topk_sample", _gumbel_topk_torch, mutates_args=())
_gumbel_topk_op.register_fake(_gumbel_topk_fake)

if triton is not None:
    _gumbel_topk_triton_op = backend.register_triton_op(
        "magnet_engine::gumbel_topk_sample_triton", _gumbel_topk_kernel, _gumbel_topk_triton, mutates_args=(),
        fake=_gumbel_topk_fake)


def _use_triton(impl, device: torch.device, card: int) -> bool:
    """None / an engine-resolved Impls: Triton on CUDA (rows up to MAX_TRITON_CARD), torch
    elsewhere (C++ has no twin: the torch path is upstream's exact arithmetic on the CPU)."""
    if isinstance(impl, backend.Impls):
        impl = impl.requested
    if impl not in (None, "triton", "torch", "cpp"):
        raise ValueError(f"gumbel_topk_sample: impl must be one of {backend.IMPLS} or None, found {impl!r}")
    if impl == "triton":
        if not (backend.triton_available() and (device.type == "cuda" or backend.triton_interpreted())):
            raise RuntimeError(f"gumbel_topk_sample: Triton needs a CUDA tensor or TRITON_INTERPRET=1 "
                               f"(device {device})")
        if card > MAX_TRITON_CARD:
            raise ValueError(f"gumbel_topk_sample: the Triton kernel holds rows of <= {MAX_TRITON_CARD}, found {card}")
        return True
    return impl is None and device.type == "cuda" and backend.triton_available() and card <= MAX_TRITON_CARD


def gumbel_topk_sample(
    logits: torch.Tensor,
    sample_u: torch.Tensor | None,
    score_u: torch.Tensor,
    temperature: torch.Tensor,
    diversity: torch.Tensor,
    *,
    top_k: int,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, C] fp32, sample_u [N, C] | None, score_u [N], temperature / diversity 0-d fp32
    -> (tokens [N] int64, scores [N] fp32); see the module docstring."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"gumbel_topk_sample: logits must be [N, C] fp32, found {logits.dtype} {tuple(logits.shape)}")
    n, card = logits.shape
    if sample_u is not None and (sample_u.shape != logits.shape or sample_u.dtype != torch.float32):
        raise ValueError(f"gumbel_topk_sample: sample_u must be [{n}, {card}] fp32, found "
                         f"{sample_u.dtype} {tuple(sample_u.shape)}")
    if score_u.shape != (n,) or score_u.dtype != torch.float32:
        raise ValueError(f"gumbel_topk_sample: score_u must be [{n}] fp32, found {score_u.dtype} {tuple(score_u.shape)}")
    for name, value in (("temperature", temperature), ("diversity", diversity)):
        if value.dim() != 0 or value.dtype != torch.float32:
            raise ValueError(f"gumbel_topk_sample: {name} must be a 0-d fp32 tensor, found {value.dtype} "
                             f"of shape {tuple(value.shape)}")
    if not 1 <= top_k <= card:
        raise ValueError(f"gumbel_topk_sample: top_k must be in [1, {card}], found {top_k}")
    args = (logits.contiguous(), None if sample_u is None else sample_u.contiguous(), score_u.contiguous(),
            temperature, diversity, top_k)
    if _use_triton(impl, logits.device, card):
        return backend.call(_gumbel_topk_triton_op, _gumbel_topk_triton, *args)
    return backend.call(_gumbel_topk_op, _gumbel_topk_torch, *args)
