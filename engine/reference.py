"""The plain MAGNeT decoding loop: a direct, slow transcription of docs/model.md §5–§8.

This is the correctness oracle of the fast runtime (`decoding.py`), written to be read.
It reproduces the original implementation step for step, host syncs and wasted work
included: the whole [2B, T] batch is forwarded every step, every position is sampled,
the schedule is computed with the same fp32 ops, and spans are chosen with `topk`, whose
tie order the published outputs depend on.

Randomness comes from `sampler`; the default draws like the original (`torch.multinomial`
on the global generator, or `generator`). Tests pass the fast runtime's keyed sampler to
check that, given the same draws, both loops produce the same tokens.
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import torch

from magnet_engine.engine.config import DecodingParams, ModelConfig
from magnet_engine.engine.errors import InvalidOptionError
from magnet_engine.engine.hybrid import ARParams, HybridPlan, build_delayed, sample_heads
from magnet_engine.engine.model import MagnetLM, causal_self_attention, masked_self_attention

DONT_REMASK = -1e4

# sampler(probs [B, T, C] fp32 (modifiable), stage, step) -> tokens [B, T] int64
Sampler = tp.Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclasses.dataclass
class StepTrace:
    """What one LM forward saw; mirrors the fixtures' per-step trace."""
    stage: int
    step: int
    mask_p: float
    cfg_coef: float
    temperature: float
    num_masked: int            # spans (chunks or tokens) asked to be masked
    num_masked_tokens: int     # mask ids in the stage's row, whole batch
    masked: torch.Tensor       # [B, T] bool


def multinomial_sampler(top_k: int, top_p: float, generator: tp.Optional[torch.Generator] = None) -> Sampler:
    """The original sampling: nucleus if top_p > 0, else top-k if top_k > 0, else categorical.

    Top-k renormalises `probs` in place, so the caller's p̂ then comes from the truncated
    distribution; nucleus works on a sorted copy, so p̂ comes from the full one (docs/model.md §8).
    """
    def draw(probs: torch.Tensor) -> torch.Tensor:
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, num_samples=1, generator=generator).reshape(probs.shape[:-1])

    def sample(probs: torch.Tensor, stage: int, step: int) -> torch.Tensor:
        if top_p > 0.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            drop = torch.cumsum(sorted_p, dim=-1) - sorted_p > top_p
            sorted_p *= (~drop).float()
            sorted_p.div_(sorted_p.sum(dim=-1, keepdim=True))
            return torch.gather(order, -1, draw(sorted_p)[..., None])[..., 0]
        if top_k > 0:
            kth = torch.topk(probs, top_k, dim=-1).values[..., [-1]]
            probs *= (probs >= kth).float()
            probs.div_(probs.sum(dim=-1, keepdim=True))
        return draw(probs)

    return sample


def span_cover(starts: torch.Tensor, t: int, span_len: int) -> torch.Tensor:
    """[T] bool: union of the frames [j, j + L) over span starts j."""
    mask = torch.zeros(t, dtype=torch.bool, device=starts.device)
    for shift in range(span_len):
        mask[(starts + shift).clamp(max=t - 1)] = True
    return mask


def least_probable_spans(scores: torch.Tensor, num_masked: int, span_len: int) -> torch.Tensor:
    """stride1 masking of one row (docs/model.md §7): token scores [T] -> [T] bool mask.

    Overlapping spans are ranked by summed score; a binary search picks how many of the
    top spans to take so the covered frame count is as close as possible to num_masked.
    """
    t = scores.shape[-1]
    span_scores = scores.unfold(0, span_len, 1).sum(dim=-1)
    # The original's argsort is unstable, so its tie order is machine-dependent (docs/model.md §7, §14);
    # a stable sort (lowest start first) makes the oracle deterministic.
    order = torch.sort(span_scores, descending=True, stable=True).indices
    target = max(num_masked, span_len)
    lo, hi = target // span_len, target - span_len + 1
    mid = round(0.5 * (lo + hi))
    if mid in (lo, hi):
        return span_cover(order[:mid], t, span_len)
    while lo < mid < hi:
        mask = span_cover(order[:mid], t, span_len)
        if int(mask.sum()) > target:
            hi = mid
        else:
            lo = mid
        mid = round(0.5 * (lo + hi))
    return mask


@torch.no_grad()
def generate_tokens(lm: MagnetLM, cond: torch.Tensor, frames: int, params: DecodingParams,
                    prompt: tp.Optional[torch.Tensor] = None, sampler: tp.Optional[Sampler] = None,
                    generator: tp.Optional[torch.Generator] = None,
                    callback: tp.Optional[tp.Callable[[int, int], None]] = None,
                    trace: tp.Optional[tp.List[StepTrace]] = None, rescorer=None, *,
                    canvas: tp.Optional[torch.Tensor] = None, fixed: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """Masked decoding of all stages.

    cond: [2B, S, D] condition rows, conditional first then null (CFG); frames: T;
    prompt: [B, K, P] codes kept fixed (P < T) — the prefix case of `fixed` [K, T] bool
    (cells never decoded, same for every row) with their codes in `canvas` [B, K, >= T].
    Returns codes [B, K, T'] with T' = L·⌊T/L⌋ in 'nonoverlap' mode (L > 1), T otherwise.
    rescorer: a bound external-model rescorer (`rescoring.BoundRescorer`): its confidence
    is mixed into p̂ before span scoring.
    """
    cfg = lm.cfg
    if cfg.pattern != "parallel":
        raise InvalidOptionError(f"the reference loop decodes the parallel layout; this checkpoint's is {cfg.pattern!r}")
    batch = cond.shape[0] // 2
    if prompt is not None:
        if canvas is not None or fixed is not None:
            raise InvalidOptionError("give either a prompt or canvas and fixed, not both")
        fixed = torch.arange(frames, device=cond.device)[None].expand(cfg.n_q, -1) < prompt.shape[-1]
        canvas = prompt
    if (canvas is None) != (fixed is None):
        raise InvalidOptionError("canvas and fixed go together: the fixed cells' codes and where they are")
    codes = torch.full((batch, cfg.n_q, frames), cfg.mask_id, dtype=torch.long, device=cond.device)
    if fixed is not None:
        fixed = fixed.to(cond.device)
        width = min(canvas.shape[-1], frames)
        codes[..., :width] = torch.where(fixed[:, :width], canvas[..., :width].to(cond.device), cfg.mask_id)
        fixed = fixed[:, :frames]
    sampler = sampler or multinomial_sampler(params.top_k, params.top_p, generator)
    total = sum(params.decoding_steps)
    done = 0
    for stage, n_steps in enumerate(params.decoding_steps):
        codes = _generate_stage(lm, codes, cond, stage, n_steps, params, fixed, sampler, trace, rescorer)
        for _ in range(n_steps):
            done += 1
            if callback is not None:
                callback(done, total)
    return codes


def _generate_stage(lm: MagnetLM, codes: torch.Tensor, cond: torch.Tensor, stage: int, n_steps: int,
                    params: DecodingParams, fixed: tp.Optional[torch.Tensor], sampler: Sampler,
                    trace: tp.Optional[tp.List[StepTrace]], rescorer=None) -> torch.Tensor:
    """One stage. fixed: [K, T] bool cells never decoded; `codes` holds their values."""
    cfg = lm.cfg
    mask_id, span_len = cfg.mask_id, cfg.span_len
    batch, _, t = codes.shape
    device = codes.device
    keep = torch.zeros(t, dtype=torch.bool, device=device) if fixed is None else fixed[stage]   # [T]
    kept_codes = codes[:, stage].clone()
    chunked = span_len > 1 and params.span_arrangement == "nonoverlap"
    stride1 = span_len > 1 and params.span_arrangement == "stride1"

    y = torch.full((batch, t), mask_id, dtype=torch.long, device=device)
    if chunked:
        n_chunks = t // span_len
        t = span_len * n_chunks                 # the tail frames are dropped for good
        codes, y, keep, kept_codes = codes[..., :t], y[..., :t], keep[:t], kept_codes[..., :t]
        fixed_spans = keep.reshape(n_chunks, span_len).all(dim=-1)    # a chunk is fixed iff all its frames are
    else:
        fixed_spans = keep
    scores = torch.zeros(batch, fixed_spans.shape[0], device=device).masked_fill(fixed_spans, DONT_REMASK)
    to_generate = int((~fixed_spans).sum())

    for step, (tau, steps_left) in enumerate(zip(torch.linspace(0, 1, n_steps, device=device),
                                                 reversed(range(n_steps)))):
        mask_p = torch.cos(tau * math.pi * 0.5)
        num_masked = max(int((mask_p * to_generate).item()), 1)

        if stride1:
            span_mask = torch.stack([least_probable_spans(scores[b], num_masked, span_len) for b in range(batch)])
            y[span_mask] = mask_id
        else:
            chosen = scores.topk(num_masked, dim=-1).indices
            span_mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, chosen, True)
            y[torch.repeat_interleave(span_mask, span_len, dim=-1) if chunked else span_mask] = mask_id
        y = torch.where(keep, kept_codes, y)     # the fixed cells are restored
        codes[:, stage] = y

        rescore = rescorer is not None and rescorer.active(step, n_steps)
        logits_all = lm.stage_logits(torch.cat([codes, codes]), cond, stage)  # [2B, T, C]
        greedy_fill = rescore and rescorer.options.fill == "greedy" and stage + 1 < cfg.n_q
        if greedy_fill:   # the other heads on this step's input (the same forward again)
            above = lm.head_logits(lm.hidden(torch.cat([codes, codes]), cond, stage), range(stage + 1, cfg.n_q))
        cond_logits, uncond_logits = logits_all.split(batch)
        cfg_coef = float(mask_p) * params.max_cfg_coef + (1 - float(mask_p)) * params.min_cfg_coef
        logits = uncond_logits + (cond_logits - uncond_logits) * cfg_coef
        temp = params.temperature * (steps_left / n_steps) if params.anneal_temp else params.temperature
        probs = torch.softmax(logits / max(temp, 1e-2), dim=-1)
        if trace is not None:
            trace.append(StepTrace(stage, step, float(mask_p), cfg_coef, temp, num_masked,
                                   int((y == mask_id).sum()), (y == mask_id).clone()))
        if params.use_sampling:
            sampled = sampler(probs, stage, step)
        else:
            sampled = torch.argmax(logits, dim=-1)

        masked = y == mask_id
        y = torch.where(masked, sampled, y)
        codes[:, stage] = y
        p_hat = torch.gather(probs, -1, sampled[..., None])[..., 0]   # [B, T]
        if rescore:   # docs/model.md §12: mix the external model's confidence in before span scoring
            coef_t = torch.tensor(cfg_coef, dtype=torch.float32, device=device)
            if rescorer.options.temperature == "raw":
                p_hat = rescorer.raw_probability(cond_logits, uncond_logits.reshape(-1, cfg.card), coef_t, sampled)
            view = codes
            if greedy_fill:
                above_c, above_u = above.split(batch)                            # [B, K', T, C] each
                view = codes.clone()
                view[:, stage + 1:] = (above_u + (above_c - above_u) * cfg_coef).argmax(dim=-1)
            temp_t = torch.tensor(max(temp, 1e-2), dtype=torch.float32, device=device)
            p_hat = rescorer.mix(p_hat, rescorer.probabilities(view, stage, temp_t))

        if chunked:
            chunk_p = p_hat.reshape(batch, -1, span_len)
            if params.span_scoring == "max":
                scores = 1 - chunk_p.max(dim=-1).values
            else:
                scores = (-torch.log(chunk_p)).sum(dim=-1)
            scores = scores.masked_fill(~span_mask, DONT_REMASK)
        else:
            scores = (-torch.log(p_hat)).masked_fill(~masked, DONT_REMASK)
    return codes


# ----------------------------------------------------------------- hybrid oracles
@torch.no_grad()
def reference_ar_generate(lm: MagnetLM, cond: torch.Tensor, steps: int, seq_len: int, params: ARParams,
                          seeds: tp.Optional[tp.Sequence[int]] = None, impl: tp.Optional[str] = "torch",
                          logits_out: tp.Optional[tp.List[torch.Tensor]] = None) -> torch.Tensor:
    """The oracle of `ARRuntime`: every step recomputes the whole prefix with full causal
    attention (no cache), fp32, same sampling keys. Returns the sequence [B, K, seq_len]."""
    cfg = lm.cfg
    batch = cond.shape[0] // 2
    dev = cond.device
    seeds = [0] * batch if seeds is None else list(seeds)
    seq = torch.full((batch, cfg.n_q, seq_len), cfg.card, dtype=torch.long, device=dev)
    coef = torch.tensor(float(params.cfg_coef), device=dev)
    temp = torch.tensor(max(float(params.temperature), 1e-2), device=dev)
    seed_rows = torch.tensor(seeds, dtype=torch.long, device=dev).repeat_interleave(cfg.n_q)
    frames = seq_len - cfg.max_delay - 1
    for p in range(steps):
        prefix = seq[:, :, :p + 1]
        hidden = lm.hidden(torch.cat([prefix, prefix]), cond, 0, attend=causal_self_attention)
        logits = lm.head_logits(hidden[:, -1:])[:, :, 0]
        if logits_out is not None:
            logits_out.append(logits.clone())
        row_ids = p * cfg.n_q + torch.arange(cfg.n_q, device=dev).repeat(batch)
        tokens, _ = sample_heads(logits, batch, params, coef, temp, seed_rows, row_ids, impl)
        for k, d in enumerate(cfg.delays):
            if 0 <= p - d < frames:
                seq[:, k, p + 1] = tokens[:, k]
    return seq



def stage_attention_mask(cfg: ModelConfig, plan: HybridPlan, stage: int, window: tp.Optional[int],
                         device) -> torch.Tensor:
    """[seq_len, seq_len] bool (True = may attend) of a masked step at `stage`, every row.

    Tail rows: all keys at stage 0, |i − j + 1| <= W above. Prefix rows (i < F) with cached
    prefix attention: causal (j <= i), as in the AR phase they come from."""
    rows = torch.arange(plan.seq_len, device=device)
    i, j = rows[:, None], rows[None, :]
    mask = torch.ones(plan.seq_len, plan.seq_len, dtype=torch.bool, device=device)
    if window is not None:
        mask = (i - j + 1).abs() <= window
    if plan.prefix_attention == "cached":
        mask = torch.where(i < plan.prefix_frames, j <= i, mask)
    return mask



def reference_tail_hidden(lm: MagnetLM, codes: torch.Tensor, cond: torch.Tensor, plan: HybridPlan,
                          stage: int) -> torch.Tensor:
    """The oracle of the cached tail: every row of the delay-layout canvas recomputed from
    scratch under `stage_attention_mask` (prefix rows causal) -> LN_out output [2B, seq_len, D]."""
    seq = build_delayed(codes, lm.cfg.delays, lm.cfg.card)
    mask = stage_attention_mask(lm.cfg, plan, stage, lm.window(stage), codes.device)
    return lm.hidden(torch.cat([seq, seq]), cond, 0, attend=masked_self_attention(mask))
