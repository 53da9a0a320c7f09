"""The fast masked-decoding runtime: the hot loop of MAGNeT on preallocated buffers.

Same algorithm as `reference.py` (its oracle), minus the waste (spec §10):
  * the schedule (spans to mask, CFG coefficient, temperature) is built on the host before
    the loop (`schedule.py`) and lives in device tensors: the loop never waits on the device;
  * cross-attention K/V of the text are computed once per call, for the conditional rows
    only: the null rows' cross-attention output is exactly zero (bias-free projections of
    all-zero embeddings), so it is skipped;
  * both CFG halves carry identical codes, so layer 0's self-attention runs once on B rows;
  * stages > 0 use the banded attention kernel (O(T·W)), stage 0 flash-attn / SDPA;
  * in 'nonoverlap' mode exactly m_i chunks are masked at step i (m_i known on the host), so
    the output norm, the stage head and the sampling run only on those m_i·L frames,
    gathered with a static count (no data-dependent shapes, no sync);
  * sampling and re-masking are single fused kernels (`kernels/`), drawing randomness from
    a keyed counter-based RNG (seed, step, position), so a step is reproducible.
Every saving is exact: in fp32 the tokens equal the reference loop's given the same draws.
"""
from __future__ import annotations

import typing as tp

import torch

from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.model import MagnetLM, cast_transformer_
from magnet_engine.engine.schedule import spans_to_generate, stage_schedule
from magnet_engine.errors import InvalidOptionError, NumericalError
from magnet_engine.kernels import attention as attn_kernels
from magnet_engine.kernels import masking, sampling

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_BUFFERS = 8   # (batch, frames) buffer sets kept per runtime


class Runtime:
    """Holds a model prepared for fast decoding, and buffers reused across calls.

    compile: run the transformer forward through torch.compile (off by default).
    precision: 'fp32' | 'bf16' | 'fp16' — the transformer's weights and activations, its
    residual stream included (`lm`'s transformer is cast in place); embeddings, the output norm, the heads,
    the CFG mix, softmax and sampling stay fp32. (The reference's CUDA autocast keeps the
    residual stream fp32 as well; here it is low precision, judged by the tests' error bounds.)
    """

    def __init__(self, lm: MagnetLM, precision: str = "fp32", impl: tp.Optional[str] = None,
                 compile: bool = False):
        if precision not in PRECISIONS:
            raise InvalidOptionError(f"precision must be one of {sorted(PRECISIONS)}, found {precision!r}")
        self.lm = lm
        self.cfg = lm.cfg
        self.dtype = PRECISIONS[precision]
        self.impl = impl
        self.device = next(lm.parameters()).device
        self._buffers: tp.Dict[tp.Tuple[int, int], tp.Dict[str, torch.Tensor]] = {}
        cast_transformer_(lm, self.dtype)   # in place: the runtime owns `lm` (pass a copy to keep an fp32 one)
        if compile:
            # One graph per (stage window, shape); the first call of each compiles (start-up
            # cost traded for latency). Opaque extension calls (the C++ kernels) run eagerly
            # between graph pieces.
            self._forward_hidden = torch.compile(self._forward_hidden, dynamic=False)

    # ---------------------------------------------------------------- buffers
    def _get_buffers(self, batch: int, frames: int) -> tp.Dict[str, torch.Tensor]:
        """Buffers of one (batch, frames) shape; the MAX_BUFFERS most recently used shapes are
        kept, so a service that sees many shapes holds bounded memory."""
        key = (batch, frames)
        bufs = self._buffers.pop(key, None)
        if bufs is None:
            dev = self.device
            bufs = {
                "codes": torch.empty(batch, self.cfg.n_q, frames, dtype=torch.long, device=dev),
                "prob": torch.empty(batch, frames, dtype=torch.float32, device=dev),
            }
        self._buffers[key] = bufs                      # most recently used last
        while len(self._buffers) > MAX_BUFFERS:
            self._buffers.pop(next(iter(self._buffers)))
        return bufs

    # ----------------------------------------------------------------- model
    def _attend(self, q, k, v, window):
        return attn_kernels.attention(q, k, v, window, impl=self.impl if self.impl != "cpp" else None)

    def _forward_hidden(self, codes: torch.Tensor, cross_kv, stage: int, cond_only: bool = False) -> torch.Tensor:
        """codes [B, K, T] -> final-layer output [2B, T, D] (cond rows first), pre out_norm;
        [B, T, D] of the conditional rows alone with cond_only (CFG coefficient exactly 1)."""
        lm = self.lm
        window = lm.window(stage)
        layers = lm.transformer.layers
        x = lm.embed(codes).to(self.dtype)                                   # [B, T, D]
        if cond_only:
            cross_kv = [(k[:x.shape[0]], v[:x.shape[0]]) for k, v in cross_kv]
        first = layers[0]
        x = x + first.self_attn.self_attend(first.norm1(x), window, self._attend)  # same for both halves
        if not cond_only:
            x = torch.cat([x, x])
        x = first.cross_and_ffn(x, cross_kv[0])
        for layer, kv in zip(layers[1:], cross_kv[1:]):
            x = x + layer.self_attn.self_attend(layer.norm1(x), window, self._attend)
            x = layer.cross_and_ffn(x, kv)
        return x

    # ------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, cond: torch.Tensor, frames: int, params: DecodingParams,
                 prompt: tp.Optional[torch.Tensor] = None, seeds: tp.Optional[tp.Sequence[int]] = None,
                 callback: tp.Optional[tp.Callable[[int, int], None]] = None, *,
                 prompt_lens: tp.Optional[tp.Sequence[int]] = None,
                 forward: tp.Optional[FrameForward] = None, rescorer=None) -> torch.Tensor:
        """cond [2B, S, D] (conditional rows, then null rows) -> codes [B, K, T'].

        seeds: one int per row (default 0 for every row); prompt: [B, K, P] fixed codes.
        prompt_lens: frames of the prompt fixed in each codebook (default P for all; the
        hybrid staircase gives codebook k fewer), cells past a codebook's length hold the
        mask id. forward: (codes, stage, cond_only) -> per-frame hidden [2B or B, T', D]
        (default: this runtime's transformer with `cond` as the condition). rescorer: a
        bound external-model rescorer (`rescoring.BoundRescorer`) or None.
        """
        cfg, lm, dev = self.cfg, self.lm, self.device
        batch = cond.shape[0] // 2
        p_len = 0 if prompt is None else prompt.shape[-1]
        lens = tuple(prompt_lens) if prompt_lens is not None else (p_len,) * cfg.n_q
        if len(lens) != cfg.n_q or any(not 0 <= n <= p_len for n in lens):
            raise InvalidOptionError(f"prompt_lens must be {cfg.n_q} frame counts in [0, {p_len}], found {lens}")
        layout = masking.mode(cfg.span_len, params.span_arrangement)
        chunked = layout == "chunk"
        kept = spans_to_generate(frames, 0, cfg.span_len, chunked)[0]
        span_len = cfg.span_len if layout != "token" else 1

        bufs = self._get_buffers(batch, frames)
        codes = bufs["codes"][..., :kept]
        codes.fill_(cfg.mask_id)
        if prompt is not None:
            codes[..., :p_len] = prompt
        prob = bufs["prob"][:, :kept]

        if forward is None:
            if cfg.pattern != "parallel":   # its rows are not frames: only the hybrid tail forward fits
                raise InvalidOptionError(f"a {cfg.pattern}-layout checkpoint decodes through hybrid.HybridRuntime "
                                         "(an AR prefix, then the masked tail), not plain masked decoding")
            cross_kv = lm.cfg_cross_kv(cond, self.dtype)
            forward = lambda codes, stage, cond_only: self._forward_hidden(codes, cross_kv, stage, cond_only)  # noqa: E731
        # RNG key of position (b, t): (seeds[b], step, t), so a row's draws never depend on
        # which other rows share its batch.
        seeds = [0] * batch if seeds is None else list(seeds)
        if len(seeds) != batch:
            raise InvalidOptionError(f"expected {batch} seeds (one per row), found {len(seeds)}")
        seed_t = torch.tensor(seeds, dtype=torch.long, device=dev)[:, None]             # [B, 1]
        total, done = sum(params.decoding_steps), 0
        offsets = torch.arange(total, dtype=torch.long, device=dev)         # RNG offset = global step
        # A NaN p̂ is re-masked (NaN scores rank first) and later overwritten, so it is
        # remembered here, on the device, and reported once after the loop.
        nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        for stage, n_steps in enumerate(params.decoding_steps):
            stage_prompt = lens[stage]
            to_gen = spans_to_generate(frames, stage_prompt, cfg.span_len, chunked)[2]
            sched = stage_schedule(n_steps, to_gen, params)
            coefs = torch.tensor(sched.cfg_coef, dtype=torch.float32, device=dev)
            temps = torch.tensor(sched.temperature, dtype=torch.float32, device=dev)
            num_masked = torch.tensor(sched.num_masked, dtype=torch.long, device=dev)
            row = codes[:, stage]
            scores = masking.initial_span_scores(batch, kept, span_len=cfg.span_len,
                                                 arrangement=params.span_arrangement, prompt_len=stage_prompt,
                                                 device=dev)
            head = lm.linears[stage]
            for i in range(n_steps):
                span_mask = masking.remask(row, scores, num_masked[i], span_len=cfg.span_len,
                                           arrangement=params.span_arrangement, prompt_len=stage_prompt,
                                           mask_id=cfg.mask_id, impl=self.impl)
                with_cfg = sched.cfg_coef[i] != 1.0       # coefficient exactly 1: ℓ = cond logits
                rescore = rescorer is not None and rescorer.active(i, n_steps)
                hidden = forward(codes, stage, not with_cfg)                          # [2B or B, T', D]
                if rescore and rescorer.options.fill == "greedy":
                    guesses = self._greedy_guesses(hidden, stage, coefs[i], batch, with_cfg)
                if layout == "stride1":
                    pos = torch.arange(kept, device=dev).expand(batch, -1)             # every frame
                    h = hidden
                else:                                                                 # exactly m_i spans
                    pos = _masked_positions(span_mask, sched.num_masked[i] * span_len, span_len)  # [B, M]
                    rows = hidden.shape[0] // batch
                    h = torch.gather(hidden, 1, pos.repeat(rows, 1)[..., None].expand(-1, -1, hidden.shape[-1]))
                logits = head(lm.out_norm(h.float()))                                 # [2B or B, M, C]
                uncond = logits[batch:].reshape(-1, cfg.card) if with_cfg else None
                tokens, p_hat = sampling.sample_tokens(
                    logits[:batch].reshape(-1, cfg.card), uncond, coefs[i], temps[i],
                    use_sampling=params.use_sampling, top_k=params.top_k, top_p=params.top_p,
                    seed=seed_t.expand_as(pos).reshape(-1), offset=offsets[done], row_ids=pos.reshape(-1),
                    impl=self.impl)
                tokens, p_hat = tokens.view(batch, -1), p_hat.view(batch, -1)
                current = torch.gather(row, 1, pos)
                row.scatter_(1, pos, torch.where(current == cfg.mask_id, tokens, current))
                nonfinite |= ~torch.isfinite(p_hat).all()
                if rescore:
                    if rescorer.options.temperature == "raw":   # p_magnet at temperature 1
                        p_hat = rescorer.raw_probability(logits[:batch], uncond, coefs[i], tokens)
                    prob.scatter_(1, pos, p_hat)
                    view = codes if rescorer.options.fill != "greedy" else _fill_above(codes, guesses, stage)
                    prob.copy_(rescorer.mix(prob, rescorer.probabilities(view, stage, temps[i])))
                else:
                    prob.scatter_(1, pos, p_hat)
                scores = masking.span_scores(prob, span_mask, span_len=cfg.span_len,
                                             arrangement=params.span_arrangement, scoring=params.span_scoring)
                done += 1
                if callback is not None:
                    callback(done, total)
        if bool(nonfinite):
            raise NumericalError("non-finite probabilities during decoding (NaN/inf logits): check the "
                                 "checkpoint weights and the precision setting")
        return codes.clone()

    def _greedy_guesses(self, hidden: torch.Tensor, stage: int, coef: torch.Tensor, batch: int,
                        with_cfg: bool) -> tp.Optional[torch.Tensor]:
        """Argmax of the CFG-mixed logits of every head above `stage`, all frames: [B, K-s-1, T']."""
        heads = list(range(stage + 1, self.cfg.n_q))
        if not heads:
            return None
        logits = self.lm.head_logits(self.lm.out_norm(hidden.float()), heads)   # [2B or B, K', T', C]
        if with_cfg:
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + (cond - uncond) * coef
        return logits[:batch].argmax(dim=-1)


# (codes [B, K, T'], stage, cond_only) -> per-frame hidden [2B or B, T', D], pre out_norm
FrameForward = tp.Callable[[torch.Tensor, int, bool], torch.Tensor]


def _fill_above(codes: torch.Tensor, guesses: tp.Optional[torch.Tensor], stage: int) -> torch.Tensor:
    """A copy of the canvas with the codebooks above `stage` set to MAGNeT's greedy guesses."""
    if guesses is None:
        return codes
    filled = codes.clone()
    filled[:, stage + 1:] = guesses
    return filled


def _masked_positions(span_mask: torch.Tensor, count: int, span_len: int) -> torch.Tensor:
    """Frame indices [B, count] of the masked spans, ascending, without a host sync.

    span_mask: [B, n] bool with exactly count / span_len spans set in every row.
    """
    n = span_mask.shape[1]
    key = span_mask.float() * (n + 1) - torch.arange(n, device=span_mask.device)   # masked first, by index
    spans = key.topk(count // span_len, dim=1).indices.sort(dim=1).values
    return (spans[..., None] * span_len + torch.arange(span_len, device=span_mask.device)).reshape(
        span_mask.shape[0], -1)

