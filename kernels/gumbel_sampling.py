"""PlayDiffusion's sampling epilogue (spec/playdiffusion.md §4.7 steps 5-9): top-k, Gumbel-max
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

Only a torch implementation exists: it is written op for op as upstream, so a CPU run with the
same uniforms reproduces upstream's tokens bit for bit; it has no host sync and no data-dependent
branch, so a step that calls it can be captured as a CUDA graph.
"""
from __future__ import annotations

import torch

from magnet_engine.kernels import backend


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from uniforms, as upstream spells it (eps 1e-10 inside both logs)."""
    return -torch.log(-torch.log(u + 1e-10) + 1e-10)


def _gumbel_topk_torch(logits, sample_u, score_u, temperature, diversity, top_k):
    values, index = logits.topk(top_k, dim=-1)
    kept = torch.full_like(logits, float("-inf")).scatter_(-1, index, values)
    if sample_u is None:
        tokens = kept.argmax(dim=-1)
    else:
        tokens = (kept / temperature + gumbel(sample_u)).argmax(dim=-1)
    p = kept.softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
    scores = -(diversity * gumbel(score_u) + torch.log(p + 1e-10))
    return tokens, scores


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
    backend.choose("gumbel_topk_sample", logits.device, impl, available=("torch",))
    return _gumbel_topk_torch(logits, sample_u, score_u, temperature, diversity, top_k)
