"""The fast masked-decoding runtime: the hot loop of MAGNeT as one step on static buffers.

Same algorithm as `reference.py` (its oracle), minus the waste (docs/model.md §14):
  * the schedule (spans to mask, CFG coefficient, temperature) is built on the host before
    the loop (`schedule.py`) and copied once into device tables; a step reads its row
    through a device cursor (the global step index, also the RNG offset), so a step issues
    work and never waits on the host;
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

The step (`Runtime._step`) reads and writes only the buffers of a `DecodeState`; its shape
is fixed by a `StepShape` (stage, gathered frames, CFG on/off), so it can be compiled whole
(`compile=True`: `torch.compile(fullgraph=True)`) and, on CUDA, captured once per shape as a
CUDA graph and replayed (`cuda_graphs=True`; graphs are kept across calls, bounded).
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import torch

from magnet_engine.engine import events as ev
from magnet_engine.engine import graphs
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.errors import InvalidOptionError, NumericalError
from magnet_engine.engine.model import MagnetLM, SelfAttention
from magnet_engine.engine.precision import PRECISIONS, cast_for_precision, check_precision
from magnet_engine.engine.schedule import kept_frames, span_fixed, stage_schedules
from magnet_engine.kernels import attention as attn_kernels
from magnet_engine.kernels import backend, masking, sampling

MAX_STATES = 8      # (batch, frames, text length, layout) buffer sets kept per runtime


# (codes [B, K, T'], stage, cond_only) -> per-frame hidden [2B or B, T', D], pre out_norm
FrameForward = tp.Callable[[torch.Tensor, int, bool], torch.Tensor]


class ConfidenceHook(tp.Protocol):
    """Changes the confidences that span scoring ranks (rescoring with an external model).

    `active` is asked on the host (it decides the step's shape); `confidence` runs inside the
    step, after the stage's samples are written: it returns the new prob [B, T']."""

    def active(self, step: int, steps: int) -> bool: ...

    def confidence(self, ctx: "StepContext") -> torch.Tensor: ...


@dataclasses.dataclass
class StepContext:
    """What a confidence hook may read in a step (all device tensors, no copies)."""
    lm: MagnetLM
    codes: torch.Tensor        # [B, K, T'] after this step's samples are written
    stage: int
    hidden: torch.Tensor       # [2B or B, T', D] the transformer output, pre out_norm
    cond_logits: torch.Tensor  # [B, M, C] the stage head at the sampled positions
    uncond_logits: tp.Optional[torch.Tensor]   # [B·M, C] or None (CFG coefficient 1)
    cfg_coef: torch.Tensor     # 0-d fp32
    temperature: torch.Tensor  # 0-d fp32
    tokens: torch.Tensor       # [B, M] sampled at `positions`
    positions: torch.Tensor    # [B, M] frame indices
    prob: torch.Tensor         # [B, T'] p̂ of every frame (this step's samples scattered in)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What fixes a step's tensor shapes and control flow (host values): one graph each."""
    stage: int
    count: int          # frames gathered for the head: m_i·L ('nonoverlap'), or T'
    with_cfg: bool      # False when the step's CFG coefficient is exactly 1
    fixed: bool         # this stage has fixed cells (prompt, hybrid prefix, infill context): restored after re-masking
    hooked: bool        # the confidence hook runs in this step


@dataclasses.dataclass
class DecodeState:
    """Every buffer a step reads or writes, allocated before the loop; reused across calls of
    the same (batch, frames, text length, layout) so captured graphs stay valid."""
    codes: torch.Tensor        # [B, K, T'] the canvas (mask id = card)
    fixed: torch.Tensor        # [K, T'] bool: cells never decoded (same for every row)
    fixed_codes: torch.Tensor  # [B, K, T'] the initial canvas: the fixed cells' codes, mask id elsewhere
    prob: torch.Tensor         # [B, T'] p̂ of the current stage
    scores: torch.Tensor       # [B, n] span scores (higher: re-masked first)
    seeds: torch.Tensor        # [B, 1] int64, one RNG seed per row
    cursor: torch.Tensor       # 0-d int64: global step index = RNG offset
    coefs: torch.Tensor        # [S] fp32 per-step CFG coefficient
    temps: torch.Tensor        # [S] fp32 per-step temperature
    num_masked: torch.Tensor   # [S] int64 per-step spans to mask
    init_scores: torch.Tensor  # [K, n] scores at each stage's start (the fixed cells are the same in every row)
    nonfinite: torch.Tensor    # 0-d bool: a NaN/inf p̂ was seen (reported after the loop)
    cross_kv: tp.List[tp.Tuple[torch.Tensor, torch.Tensor]]
    layout: str


class Runtime:
    """Holds a model prepared for fast decoding, and buffers (and graphs) reused across calls.

    precision: one of PRECISIONS (matmul dtype, residual dtype); the embeddings, the output
    norm, the heads, the CFG mix, softmax and sampling stay fp32. compile: the whole step
    through `torch.compile(fullgraph=True)`. cuda_graphs: capture each step shape once as a
    CUDA graph (CUDA only) and replay it; steps with a frame-forward override (the hybrid tail)
    or an active confidence hook run eagerly.
    """

    def __init__(self, lm: MagnetLM, precision: str = "fp32", impl: tp.Optional[str] = None,
                 compile: bool = False, cuda_graphs: bool = False):
        check_precision(precision)
        self.precision = precision
        self.matmul_dtype, self.dtype = PRECISIONS[precision]
        self.lm = cast_for_precision(lm, precision)
        self.cfg = lm.cfg
        self.device = next(lm.parameters()).device
        # the kernel choice, made once: a traced step then holds no import or lookup
        self.impl = backend.resolve(self.device, impl)
        graphs.check_device(cuda_graphs, self.device)
        self.cuda_graphs = cuda_graphs
        self._states: graphs.StateCache[DecodeState] = graphs.StateCache(MAX_STATES)
        self._step_fn = self._step
        if compile:
            # a step shape whose gathered count alone changes recompiles once, then the count
            # is symbolic (automatic dynamic shapes): a few graphs per stage, not one per step
            self._step_fn = graphs.compile_step(self._step)

    # ------------------------------------------------------------------ state
    def state(self, batch: int, frames: int, text_len: int, arrangement: str, total_steps: int) -> DecodeState:
        """The buffers of one shape; the MAX_STATES most recently used are kept (with their
        graphs), so a service that sees many shapes holds bounded memory."""
        def make() -> DecodeState:
            dev, cfg = self.device, self.cfg
            n = masking.num_spans(frames, cfg.span_len, arrangement)
            kv_rows = batch if not cfg.bias_attn else 2 * batch
            kv = [(torch.zeros(kv_rows, cfg.num_heads, text_len, cfg.head_dim, dtype=self.matmul_dtype, device=dev),
                   torch.zeros(kv_rows, cfg.num_heads, text_len, cfg.head_dim, dtype=self.matmul_dtype, device=dev))
                  for _ in range(cfg.num_layers)]
            return DecodeState(
                codes=torch.full((batch, cfg.n_q, frames), cfg.mask_id, dtype=torch.long, device=dev),
                fixed=torch.zeros(cfg.n_q, frames, dtype=torch.bool, device=dev),
                fixed_codes=torch.full((batch, cfg.n_q, frames), cfg.mask_id, dtype=torch.long, device=dev),
                prob=torch.zeros(batch, frames, dtype=torch.float32, device=dev),
                scores=torch.zeros(batch, n, dtype=torch.float32, device=dev),
                seeds=torch.zeros(batch, 1, dtype=torch.long, device=dev),
                cursor=torch.zeros((), dtype=torch.long, device=dev),
                coefs=torch.zeros(total_steps, dtype=torch.float32, device=dev),
                temps=torch.zeros(total_steps, dtype=torch.float32, device=dev),
                num_masked=torch.zeros(total_steps, dtype=torch.long, device=dev),
                init_scores=torch.zeros(cfg.n_q, n, dtype=torch.float32, device=dev),
                nonfinite=torch.zeros((), dtype=torch.bool, device=dev),
                cross_kv=kv, layout=masking.mode(cfg.span_len, arrangement))
        return self._states.get((batch, frames, text_len, arrangement, total_steps), make)

    # ----------------------------------------------------------------- model
    def _attend(self, q, k, v, window):
        return attn_kernels.attention(q, k, v, window, impl=self.impl)

    def _forward_hidden(self, codes: torch.Tensor, cross_kv, stage: int, cond_only: bool = False) -> torch.Tensor:
        """codes [B, K, T] -> final-layer output [2B, T, D] (cond rows first), pre out_norm;
        [B, T, D] of the conditional rows alone with cond_only (CFG coefficient exactly 1)."""
        return transformer_hidden(self.lm, codes, cross_kv, self.dtype, self.lm.window(stage), self._attend, cond_only)

    @torch.no_grad()
    def stage_logits(self, codes: torch.Tensor, cond: torch.Tensor, stage: int) -> torch.Tensor:
        """The logits a step of `stage` samples from, at every frame, in this runtime's
        precision: codes [B, K, T], cond [2B, S, D] -> [2B, T, card] fp32 (conditional rows
        first). For inspection: quality benchmarks and tests, not the hot loop."""
        cross_kv = self.lm.cfg_cross_kv(cond.to(self.device), self.matmul_dtype)
        hidden = self._forward_hidden(codes.to(self.device), cross_kv, stage)
        return self.lm.linears[stage](self.lm.out_norm(hidden.float()))

    # ------------------------------------------------------------------ step
    def _step(self, st: DecodeState, shape: StepShape, params: DecodingParams,
              forward: tp.Optional[FrameForward], hook: tp.Optional[ConfidenceHook]) -> None:
        """One decoding step of stage `shape.stage`: re-mask, forward, sample, score.

        Reads and writes only `st`'s buffers; every per-step value comes from the device
        tables through `st.cursor`. No host sync, no host-to-device copy."""
        cfg, lm = self.cfg, self.lm
        stage, batch = shape.stage, st.codes.shape[0]
        span_len = cfg.span_len
        codes, row, prob = st.codes, st.codes[:, shape.stage], st.prob
        at = st.cursor.view(1)
        coef = st.coefs.index_select(0, at).view(())
        temp = st.temps.index_select(0, at).view(())
        num_masked = st.num_masked.index_select(0, at).view(())
        span_mask = masking.remask(row, st.scores, num_masked, span_len=span_len,
                                   arrangement=params.span_arrangement, prompt_len=0,
                                   mask_id=cfg.mask_id, impl=self.impl)
        if shape.fixed:   # the reference's "mask, then restore the fixed cells"
            row.copy_(torch.where(st.fixed[stage], st.fixed_codes[:, stage], row))
            if st.layout != "chunk":   # the frame-level masked set, recomputed after the restore
                span_mask = row == cfg.mask_id
        if forward is None:
            hidden = self._forward_hidden(codes, st.cross_kv, stage, not shape.with_cfg)  # [2B or B, T', D]
        else:
            hidden = forward(codes, stage, not shape.with_cfg)
        if st.layout == "stride1":                                            # every frame
            pos = torch.arange(shape.count, device=codes.device).expand(batch, -1)
            h = hidden
        else:                                                                 # exactly m_i spans
            pos = _masked_positions(span_mask, shape.count, span_len if st.layout == "chunk" else 1)  # [B, M]
            rows = hidden.shape[0] // batch
            h = torch.gather(hidden, 1, pos.repeat(rows, 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = lm.linears[stage](lm.out_norm(h.float()))                    # [2B or B, M, C]
        uncond = logits[batch:].reshape(-1, cfg.card) if shape.with_cfg else None
        tokens, p_hat = sampling.sample_tokens(
            logits[:batch].reshape(-1, cfg.card), uncond, coef, temp,
            use_sampling=params.use_sampling, top_k=params.top_k, top_p=params.top_p,
            seed=st.seeds.expand_as(pos).reshape(-1), offset=st.cursor, row_ids=pos.reshape(-1),
            impl=self.impl)
        tokens, p_hat = tokens.view(batch, -1), p_hat.view(batch, -1)
        current = torch.gather(row, 1, pos)
        row.scatter_(1, pos, torch.where(current == cfg.mask_id, tokens, current))
        st.nonfinite.logical_or_(~torch.isfinite(p_hat).all())
        prob.scatter_(1, pos, p_hat)
        if shape.hooked:
            prob.copy_(hook.confidence(StepContext(lm, codes, stage, hidden, logits[:batch], uncond, coef, temp,
                                                   tokens, pos, prob)))
        st.scores.copy_(masking.span_scores(prob, span_mask, span_len=span_len,
                                            arrangement=params.span_arrangement, scoring=params.span_scoring))
        st.cursor.add_(1)

    def _run_step(self, st: DecodeState, shape: StepShape, params: DecodingParams,
                  forward: tp.Optional[FrameForward], hook: tp.Optional[ConfidenceHook]) -> None:
        if self.cuda_graphs and forward is None and not shape.hooked:
            self._states.graph(st, shape, lambda: self._step_fn(st, shape, params, None, None),
                               (st.codes, st.prob, st.scores, st.cursor, st.nonfinite)).replay()
        else:
            self._step_fn(st, shape, params, forward, hook)

    # ------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, cond: torch.Tensor, frames: int, params: DecodingParams,
                 prompt: tp.Optional[torch.Tensor] = None, seeds: tp.Optional[tp.Sequence[int]] = None,
                 listener: tp.Optional[ev.Listener] = None, *,
                 prompt_lens: tp.Optional[tp.Sequence[int]] = None,
                 canvas: tp.Optional[torch.Tensor] = None, fixed: tp.Optional[torch.Tensor] = None,
                 forward: tp.Optional[FrameForward] = None, hook: tp.Optional[ConfidenceHook] = None,
                 done_before: int = 0, total: tp.Optional[int] = None) -> torch.Tensor:
        """cond [2B, S, D] (conditional rows, then null rows) -> codes [B, K, T'].

        Fixed cells: `fixed` [K, T'] bool (shared by the rows) marks cells that are never
        decoded, and `canvas` [B, K, >= T'] holds their codes (infill, long-form windows).
        `prompt` [B, K, P] with `prompt_lens` is the prefix special case: codebook k's first
        prompt_lens[k] frames are fixed (default P for all; the hybrid staircase gives
        codebook k fewer). seeds: one int per row (default 0 for every row). forward: a
        FrameForward replacing this runtime's transformer (the hybrid tail). hook: a
        ConfidenceHook (rescoring). listener: gets a StageStep event after every step;
        done_before/total: step counts of the whole run (a hybrid's AR steps, earlier windows).
        """
        st, shapes = self.prepare(cond, frames, params, prompt, seeds, prompt_lens=prompt_lens, canvas=canvas,
                                  fixed=fixed, forward=forward, hook=hook)
        total = done_before + sum(len(s) for s in shapes) if total is None else total
        done = done_before
        for stage, stage_shapes in enumerate(shapes):
            st.scores.copy_(st.init_scores[stage])
            for i, shape in enumerate(stage_shapes):
                self._run_step(st, shape, params, forward, hook)
                done += 1
                if listener is not None:
                    # p̂ of a fixed cell is never drawn: the event reports it as certain
                    confidence = torch.where(st.fixed[stage], math.inf, st.prob) if shape.fixed else st.prob
                    listener(ev.StageStep(stage, i, len(stage_shapes), done, total, st.codes, confidence))
        # A NaN p̂ is re-masked (NaN scores rank first) and later overwritten, so it is
        # remembered on the device and reported once, here.
        if bool(st.nonfinite):
            raise NumericalError("non-finite probabilities during decoding (NaN/inf logits): check the "
                                 "checkpoint weights and the precision setting")
        return st.codes.clone()

    @torch.no_grad()
    def prepare(self, cond: torch.Tensor, frames: int, params: DecodingParams,
                prompt: tp.Optional[torch.Tensor] = None, seeds: tp.Optional[tp.Sequence[int]] = None, *,
                prompt_lens: tp.Optional[tp.Sequence[int]] = None, canvas: tp.Optional[torch.Tensor] = None,
                fixed: tp.Optional[torch.Tensor] = None, forward: tp.Optional[FrameForward] = None,
                hook: tp.Optional[ConfidenceHook] = None) -> tp.Tuple[DecodeState, tp.List[tp.List[StepShape]]]:
        """Everything before the loop: the schedule and every step's shape on the host, then
        the call's inputs copied into the static buffers. Returns the state and, per stage,
        the shapes of its steps (arguments as `generate`)."""
        cfg, dev = self.cfg, self.device
        batch = cond.shape[0] // 2
        if forward is None and cfg.pattern != "parallel":   # its rows are not frames: only the hybrid tail fits
            raise InvalidOptionError(f"a {cfg.pattern}-layout checkpoint decodes through a hybrid plan "
                                     "(engine.generate: an AR prefix, then the masked tail), not plain masked decoding")
        seeds = [0] * batch if seeds is None else list(seeds)
        if len(seeds) != batch:
            raise InvalidOptionError(f"expected {batch} seeds (one per row), found {len(seeds)}")
        layout = masking.mode(cfg.span_len, params.span_arrangement)
        kept = kept_frames(frames, cfg.span_len, params.span_arrangement)
        span_len = cfg.span_len if layout != "token" else 1
        canvas, fixed = fixed_cells(cfg.n_q, cfg.mask_id, batch, kept, prompt, prompt_lens, canvas, fixed)
        fixed_spans = span_fixed(fixed, cfg.span_len, layout)          # [K, n] bool, on the host
        to_generate = (fixed_spans.shape[1] - fixed_spans.sum(dim=1)).tolist()

        # ---- host: the whole schedule and every step's shape, before any device work
        shapes, coefs, temps, masked = [], [], [], []
        for stage, sched in enumerate(stage_schedules(params, to_generate)):
            n_steps = sched.steps
            coefs += sched.cfg_coef
            temps += sched.temperature
            masked += sched.num_masked
            has_fixed = bool(fixed[stage].any())
            shapes.append([StepShape(stage, kept if layout == "stride1" else m * span_len, c != 1.0, has_fixed,
                                     hook is not None and hook.active(i, n_steps))
                           for i, (m, c) in enumerate(zip(sched.num_masked, sched.cfg_coef))])

        # ---- device: copy the call's inputs into the static buffers
        st = self.state(batch, kept, cond.shape[1], params.span_arrangement, len(coefs))
        st.fixed.copy_(fixed)
        st.fixed_codes.copy_(torch.where(st.fixed, canvas.to(dev), cfg.mask_id))
        st.codes.copy_(st.fixed_codes)
        st.seeds.copy_(torch.tensor(seeds, dtype=torch.long)[:, None])
        st.coefs.copy_(torch.tensor(coefs, dtype=torch.float32))
        st.temps.copy_(torch.tensor(temps, dtype=torch.float32))
        st.num_masked.copy_(torch.tensor(masked, dtype=torch.long))
        st.init_scores.copy_(torch.where(fixed_spans, masking.DONT_REMASK, 0.0))
        st.scores.copy_(st.init_scores[0])
        st.cursor.zero_()
        st.nonfinite.zero_()
        st.prob.zero_()
        if forward is None:
            for (k, v), (k_new, v_new) in zip(st.cross_kv, self.lm.cfg_cross_kv(cond, self.matmul_dtype)):
                k.copy_(k_new)
                v.copy_(v_new)
        return st, shapes


def transformer_hidden(lm: MagnetLM, codes: torch.Tensor, cross_kv, dtype: torch.dtype, window: tp.Optional[int],
                       attend: SelfAttention, cond_only: bool = False,
                       cross_mask: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """The transformer of a masked step, both CFG halves: codes [B, K, T] -> final-layer output
    [2B, T, D] (conditional rows first), pre out_norm; [B, T, D] of the conditional rows alone
    with cond_only (CFG coefficient exactly 1). Layer 0's self-attention runs once for both
    halves (they carry the same codes); `cross_kv` rows past B are null rows, whose
    cross-attention is skipped when absent (`Layer.cross_and_ffn`). attend: the self-attention
    (a kernel with `window`, or a masked attention that ignores it); cross_mask: one row per
    row of `cross_kv`, or None (`Attention.cross_attend`)."""
    layers = lm.transformer.layers
    x = lm.embed(codes).to(dtype)                                        # [B, T, D]
    if cond_only:
        cross_kv = [(k[:x.shape[0]], v[:x.shape[0]]) for k, v in cross_kv]
        cross_mask = None if cross_mask is None else cross_mask[:x.shape[0]]
    first = layers[0]
    x = first.self_attn.self_attend(x, window, attend, first.norm1, residual=x)  # same for both halves
    if not cond_only:
        x = torch.cat([x, x])
    x = first.cross_and_ffn(x, cross_kv[0], cross_mask)
    for layer, kv in zip(layers[1:], cross_kv[1:]):
        x = layer.self_attn.self_attend(x, window, attend, layer.norm1, residual=x)
        x = layer.cross_and_ffn(x, kv, cross_mask)
    return x


def fixed_cells(n_q: int, mask_id: int, batch: int, frames: int, prompt: tp.Optional[torch.Tensor] = None,
                prompt_lens: tp.Optional[tp.Sequence[int]] = None, canvas: tp.Optional[torch.Tensor] = None,
                fixed: tp.Optional[torch.Tensor] = None) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """The fixed cells of a call -> (canvas [B, K, T'] long, fixed [K, T'] bool, host).

    Either `canvas` [B, K, >= T'] with `fixed` [K, T'] (any cells), or the prefix special
    case: `prompt` [B, K, P] with codebook k's first prompt_lens[k] frames fixed (default P)."""
    if prompt is not None or prompt_lens is not None:
        if canvas is not None or fixed is not None:
            raise InvalidOptionError("give either prompt (and prompt_lens) or canvas and fixed, not both")
        p_len = 0 if prompt is None else prompt.shape[-1]
        lens = tuple(prompt_lens) if prompt_lens is not None else (p_len,) * n_q
        if len(lens) != n_q or any(not 0 <= n <= min(p_len, frames) for n in lens):
            raise InvalidOptionError(f"prompt_lens must be {n_q} frame counts in [0, {min(p_len, frames)}], found {lens}")
        fixed = torch.arange(frames)[None] < torch.tensor(lens)[:, None]
        canvas = torch.full((batch, n_q, frames), mask_id, dtype=torch.long, device=None if prompt is None else prompt.device)
        if prompt is not None:
            canvas[..., :min(p_len, frames)] = prompt[..., :frames]
        return canvas, fixed
    if (canvas is None) != (fixed is None):
        raise InvalidOptionError("canvas and fixed go together: the fixed cells' codes and where they are")
    if fixed is None:
        return torch.full((batch, n_q, frames), mask_id, dtype=torch.long), torch.zeros(n_q, frames, dtype=torch.bool)
    if fixed.dtype != torch.bool or tuple(fixed.shape) != (n_q, frames) or fixed.device.type != "cpu":
        # host data, as prompt_lens: the step shapes and the schedule are read from it before
        # the loop, so a device mask would have to be copied back (a sync) to plan the run
        raise InvalidOptionError(f"fixed must be a bool [{n_q}, {frames}] cell mask on the CPU, found "
                                 f"{fixed.dtype} {tuple(fixed.shape)} on {fixed.device}")
    if canvas.dim() != 3 or canvas.shape[0] != batch or canvas.shape[1] != n_q or canvas.shape[2] < frames:
        raise InvalidOptionError(f"canvas must be [{batch}, {n_q}, >= {frames}] codes, found {tuple(canvas.shape)}")
    return canvas[..., :frames].long(), fixed


def _masked_positions(span_mask: torch.Tensor, count: int, span_len: int) -> torch.Tensor:
    """Frame indices [B, count] of the masked spans, ascending, without a host sync.

    span_mask: [B, n] bool with exactly count / span_len spans set in every row.
    """
    n = span_mask.shape[1]
    key = span_mask.float() * (n + 1) - torch.arange(n, device=span_mask.device)   # masked first, by index
    spans = key.topk(count // span_len, dim=1).indices.sort(dim=1).values
    return (spans[..., None] * span_len + torch.arange(span_len, device=span_mask.device)).reshape(
        span_mask.shape[0], -1)
