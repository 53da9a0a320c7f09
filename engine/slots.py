"""Continuous batching for plain masked decoding: a fixed set of row slots that requests take
and leave between steps, every occupied slot advanced by one decoding step per forward.

A `Runtime` runs one call's rows in lockstep: same parameters, same duration, same step.
`SlotRuntime`, built over a Runtime (its model, precision and kernel choice), runs rows that
differ in everything `DecodingParams` holds (temperature, top_k / top_p / greedy, CFG
coefficients, decoding_steps, span arrangement and scoring), in seed, duration and text
length, and that are at different steps and stages of their runs:

    slots = SlotRuntime(runtime, rows=8, frames=500, text_len=64)
    if slots.fits(frames, params, text_len=cond.shape[1]):
        slot = slots.admit(cond, frames, params, seed, listener)   # cond [2, S, D]: conditional, null row
    while slots.active:
        for done in slots.step():            # one forward for every occupied slot
            done.slot, done.codes, done.error   # codes [1, K, T']: its solo run's tokens; or what ended it
    slots.cancel(slot)                       # drop a row between steps (its client left)

A row's tokens are its solo `Runtime.generate` tokens (`docs/numerics.md` §2): its schedule is
built by the same `stage_schedules` and written into per-row device tables [rows, steps] read
through a per-row cursor, and its draws are keyed by (its seed, its own step index, its frame
positions), never by the slot it sits in or the rows beside it.

The step, per row r at its own stage s_r and step (all device values read through the cursor):
  * re-mask codebook s_r from r's span scores with r's mask count (`kernels.masking.remask`
    with per-row counts, once per masking layout present; a row's scores reset at its stages'
    first steps);
  * one transformer forward of every row, both CFG halves. Self-attention: while every
    active row fills the frame bucket and all share one window, the runtime's own kernel
    (banded at stages > 0) runs, exactly as in the solo run; otherwise one boolean mask per
    row [rows, 1, T, T] through SDPA: key j is visible to query i iff j is one of the row's
    frames and (s_r = 0 or |i - j| <= W); a padded query attends to itself only, so its
    (discarded) output stays finite. Cross-attention: each row's text K/V sit in its slot,
    zero-padded to the text bucket, and keys past the row's own text length are masked (its
    softmax runs over exactly its solo keys; the padding of its own text is not masked,
    docs/model.md §3);
  * gather each row's frames to sample, padded to the largest count of the step (invalid
    positions are computed, never written, never flagged); head s_r through the rows' stage
    heads (each head present runs on every gathered row and a row keeps its own: exact);
  * `sample_tokens` with per-row CFG coefficient, temperature, options, seed and RNG offset
    (both CFG halves are always computed; a row whose coefficient is exactly 1 gets its
    conditional logits, as the kernel defines); write, score spans, advance the cursors.

Padded frames and free slots hold code PAD_CODE (a real codebook entry, never the mask id,
so no layout sees them as masked) and span score -inf (ranked below every real span, so the
chunk, token and stride1 searches choose among the spans of the row's solo run; on the CPU,
where torch.topk's choice among tied scores depends on the row's length, `masking.remask`
ranks a padded chunk or token row on exactly its own spans, given each row's span count).
The occupied rows of the buffers are kept dense, [0, occupied): a row that leaves is replaced
by the last one (its buffers copied between steps), so a step computes rows [0, rows), the
bucket of the occupied count, and frames [0, frames), the bucket of the longest row, and
text [0, text), of the longest text. A slot (what `admit` returns, the lowest free number)
names a request's row whichever buffer row it sits in.

Exactness (tests/test_slots.py). A row whose attention is the kernel's and whose text is not
masked computes as its solo run (no padding involved): its tokens and its confidences equal
the solo run's. Padding (another row is longer, rows at stages with different windows, a
shorter text) swaps the kernel for masked SDPA, which sums in another order: logits move by
fp32 rounding (3.4e-6 at most on the test model) and tokens are equal unless a draw or a
span ranking sits within that rounding of a tie; the tests hold tokens equal on their sizes,
as every fast-vs-reference token test does (docs/numerics.md §2).

Padding bound. A step costs about in proportion to rows x frames computed (the FFN and
projections dominate; attention's T^2 term is a few percent at the published sizes), so a
long row admitted among short ones makes every row pay its length. `fits` admits a row while
the padded share of the computed frames of the occupied slots stays <= MAX_PADDING (1/2),
each row counted at its frame bucket (its exact length without a frame ladder): the step
then does at most twice the work of its rows' own buckets, the price of not making a request
wait for a whole run (50 forwards) to be served, and rows whose buckets are all within 2x of
each other always share. The padding a ladder gives a row (its bucket over its length) is
paid alone too, so it does not keep rows apart; with frames at capacity every row shares.
An idle runtime admits any row that fits its capacity. Rows are not counted: the rows a
row bucket adds past the occupied ones are free slots the next admissions fill.

Ladders, compile and CUDA graphs. The buffers are allocated once at capacity and a step
reads only them (no host value, no sync), so a compiled graph or a CUDA graph per
`SlotShape` stays valid across admissions. Given ladders (`row_ladder`, `frame_ladder`,
`text_ladder`: the sizes each axis is rounded up to; an axis without one is at its
capacity), a step's shape is one of `ladder_shapes()`, rows x frames x text buckets with
every other field pinned to what any rows need: `count` the frame bucket (every frame is
gathered and drawn; a frame's draw is keyed by its position, so the sampled ones are the
solo run's), every stage head, every layout and scoring, both CFG halves, masked self- and
cross-attention. Exact as the rest (masked SDPA, above); the extra work is the heads and
draws of every frame at every stage (2% of a magnet-small step) and the layouts absent
from the step (a few small ops). `warm()` compiles (compile=True) and captures
(cuda_graphs=True, on CUDA) each of them once, largest first into one memory pool, before
any row; `step()` then replays (or calls the compiled step) and never compiles or captures
again (tests/test_slots.py holds dynamo to fail_on_recompile). `default_ladders`, what
`MAGNeT.slot_runtime` gives a compiled or graphed model: rows, powers of two up to the
capacity (a step computes at most twice its occupied slots); text, the capacity (the text
K/V sit zero-padded there anyway, and attending over 256 keys is ~3% of a magnet-small
step); frames, on the CPU the capacity alone, since each shape compiles for tens of seconds
(benchmarks/slot_ladder.py times the warm-up per shape; automatic dynamic shapes save few:
rows (1, 2, 4) x the window's quarters, 12 shapes, compiled 8 graphs in 288 s on the tests'
2-layer tiny LM): a row of T frames then computes the window's T_max, T_max / T its own
frames (2x for a 5 s row in a 10 s window); on CUDA its quarters (a capture costs
milliseconds): at most 2x past a quarter, 4/3 past three quarters. The CUDA-graph path is
held by a `gpu` test (benchmarks/gpu_suite.sh runs it) that no GPU has run yet. Without
ladders (the default: eager has nothing to prepare, and the exact shape is the cheapest)
every axis is its exact size, and compile or CUDA graphs work per shape met, on demand.

Out of scope, run through `Runtime.generate`: prompts, infill and other fixed cells, hybrid
(delay-layout) checkpoints, frame-forward overrides, rescoring hooks.
"""
from __future__ import annotations

import dataclasses
import time
import typing as tp

import torch
import torch.nn.functional as F

from magnet_engine.engine import events as ev
from magnet_engine.engine import graphs
from magnet_engine.engine.config import MAX_DECODING_STEPS, SPAN_ARRANGEMENTS, SPAN_SCORINGS, DecodingParams
from magnet_engine.engine.decoding import Runtime, transformer_hidden
from magnet_engine.engine.errors import InvalidOptionError, NumericalError
from magnet_engine.engine.schedule import kept_frames, stage_schedules
from magnet_engine.kernels import attention as attn_kernels
from magnet_engine.kernels import masking, sampling

MAX_PADDING = 0.5   # padded share of the frames a step computes that `fits` accepts (module docstring)
PAD_CODE = 0        # what padded frames and free slots hold: a real code, never the mask id

_LAYOUT_CODE = {"chunk": masking.CHUNK, "stride1": masking.STRIDE1, "token": masking.TOKEN}
_ARRANGEMENT = {masking.CHUNK: "nonoverlap", masking.STRIDE1: "stride1", masking.TOKEN: "token"}


@dataclasses.dataclass(frozen=True)
class SlotShape:
    """What fixes a slot step's shapes and control flow (host values): one graph each."""
    rows: int                 # buffer rows computed: [0, rows)
    frames: int               # frames computed: [0, frames)
    text: int                 # text keys: [0, text)
    count: int                # frames gathered per row for the heads (the largest of the rows)
    stages: tp.Tuple[int, ...]     # the stage heads the rows need
    layouts: tp.Tuple[int, ...]    # masking layouts of the rows (masking.CHUNK / STRIDE1 / TOKEN)
    variants: tp.Tuple[tp.Tuple[int, str], ...]   # (layout, span scoring) of the rows
    with_cfg: bool            # some row's CFG coefficient is not exactly 1
    masked: bool              # self-attention needs per-row masks (padding, or windows differ)
    window: tp.Optional[int]  # the rows' common window when not masked
    text_masked: bool         # some row's text is shorter than `text`


@dataclasses.dataclass
class SlotState:
    """Every buffer a slot step reads or writes, allocated once at capacity.
    R rows (the slots), T frames, S text keys, N steps per row (every stage)."""
    codes: torch.Tensor        # [R, K, T] the canvases (mask id = card; PAD_CODE outside a row's frames)
    prob: torch.Tensor         # [R, T] p̂ of each row's current stage
    scores: torch.Tensor       # [R, T] span scores (chunk rows: the first T // L columns); -inf: no such span
    frames: torch.Tensor       # [R] int64 frames kept (0: free)
    text: torch.Tensor         # [R] int64 text length
    active: torch.Tensor       # [R] bool
    seeds: torch.Tensor        # [R] int64
    cursor: torch.Tensor       # [R] int64: the row's step index = its RNG offset
    layout: torch.Tensor       # [R] int64 masking layout code
    prod: torch.Tensor         # [R] bool: span scoring 'prod' (else 'max')
    use_sampling: torch.Tensor  # [R] bool
    top_k: torch.Tensor        # [R] int64
    top_p: torch.Tensor        # [R] fp32
    coefs: torch.Tensor        # [R, N] fp32 CFG coefficient per step
    temps: torch.Tensor        # [R, N] fp32 temperature per step
    num_masked: torch.Tensor   # [R, N] int64 spans to mask per step
    stage: torch.Tensor        # [R, N] int64 the stage of each step
    first: torch.Tensor        # [R, N] bool: the first step of a stage (scores start afresh)
    nonfinite: torch.Tensor    # [R] bool: a NaN/inf p̂ was drawn for the row
    # per layer (K, V) [R, H, S, d]; [2R, ...] with attention biases (conditional rows, then null rows)
    cross_kv: tp.List[tp.Tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Finished:
    """A row that left its slot: its codes [1, K, T'] (T' the frames kept), or the error that
    ended it (NumericalError for a NaN/inf probability, or what its listener raised)."""
    slot: int
    codes: tp.Optional[torch.Tensor]
    error: tp.Optional[BaseException] = None


@dataclasses.dataclass(frozen=True)
class _Step:
    stage: int
    index: int       # within the stage
    steps: int       # of the stage
    count: int       # frames gathered for the head
    with_cfg: bool


@dataclasses.dataclass
class _Row:
    """The host's mirror of an occupied slot: where its buffers are and its schedule, so step
    shapes need no device read."""
    index: int       # its row of the state's buffers: the occupied rows are [0, occupied)
    frames: int
    spans: int
    text: int
    layout: int
    scoring: str
    steps: tp.Tuple[_Step, ...]
    listener: tp.Optional[ev.Listener]
    done: int = 0


def _bucket(size: int, ladder: tp.Optional[tp.Sequence[int]]) -> int:
    return size if ladder is None else min(v for v in ladder if v >= size)


def default_ladders(rows: int, frames: int, text_len: int,
                    device: tp.Union[str, torch.device]) -> tp.Dict[str, tp.Tuple[int, ...]]:
    """The ladders of a compiled or graphed slot runtime (module docstring, "Ladders"): rows,
    the powers of two below the capacity and the capacity; frames, the capacity alone on the
    CPU (each shape compiles for tens of seconds there), its quarters on CUDA (a capture
    costs milliseconds); text, the capacity (cross-attention is a few percent of a step)."""
    row_ladder = {2 ** i for i in range(rows.bit_length()) if 2 ** i < rows} | {rows}
    frame_ladder = {frames} if torch.device(device).type != "cuda" else {-(-frames * q // 4) for q in (1, 2, 3, 4)}
    return dict(row_ladder=tuple(sorted(row_ladder)), frame_ladder=tuple(sorted(frame_ladder)),
                text_ladder=(text_len,))


def _masked_attention(first: torch.Tensor, both: torch.Tensor):
    """Self-attention under per-row masks: `first` [R, 1, T, T] for layer 0 (R rows), `both`
    for the 2R rows of the CFG halves after it; the kernel window is unused."""
    rows = first.shape[0]

    def attend(q, k, v, window):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=first if q.shape[0] == rows else both)
    return attend


class SlotRuntime:
    """Slots of one Runtime's model for rows that join and leave between steps (module docstring).

    rows, frames, text_len: the capacity (slots, frames kept per row, text tokens per row);
    max_steps: decoding steps per row, all stages (default: every valid DecodingParams);
    row_ladder / frame_ladder / text_ladder: bucket sizes each axis is rounded up to; with
    any of them the step shapes are a fixed set (`ladder_shapes`; an axis without one is at
    its capacity), with none every axis is its exact size (module docstring, "Ladders");
    compile: the step through torch.compile(fullgraph=True), as Runtime's; cuda_graphs:
    each step shape captured once as a CUDA graph and replayed (CUDA only). `warm()` compiles
    and captures every ladder shape before the first row.
    """

    def __init__(self, runtime: Runtime, rows: int, frames: int, text_len: int, *,
                 max_steps: tp.Optional[int] = None, row_ladder: tp.Optional[tp.Sequence[int]] = None,
                 frame_ladder: tp.Optional[tp.Sequence[int]] = None,
                 text_ladder: tp.Optional[tp.Sequence[int]] = None, compile: bool = False,
                 cuda_graphs: bool = False):
        cfg = runtime.cfg
        if cfg.pattern != "parallel":
            raise InvalidOptionError(f"slots decode plain masked (parallel-layout) checkpoints; a {cfg.pattern}-layout "
                                     "checkpoint decodes through a hybrid plan (engine.generate)")
        if min(rows, frames, text_len) < 1:
            raise InvalidOptionError(f"slot capacity must be positive, found rows={rows}, frames={frames}, "
                                     f"text_len={text_len}")
        for name, ladder, cap in (("row", row_ladder, rows), ("frame", frame_ladder, frames),
                                  ("text", text_ladder, text_len)):
            if ladder is not None and (cap not in ladder or min(ladder) < 1 or max(ladder) > cap):
                raise InvalidOptionError(f"{name}_ladder must hold sizes in [1, {cap}] including {cap}, "
                                         f"found {sorted(ladder)}")
        graphs.check_device(cuda_graphs, runtime.device)
        self.runtime, self.cfg, self.lm = runtime, cfg, runtime.lm
        self.device, self.dtype, self.impl = runtime.device, runtime.dtype, runtime.impl
        self.capacity = rows
        self.max_frames, self.max_text = frames, text_len
        self.max_steps = cfg.n_q * MAX_DECODING_STEPS if max_steps is None else max_steps
        self.pinned = any(ladder is not None for ladder in (row_ladder, frame_ladder, text_ladder))
        if self.pinned:   # an axis without a ladder sits at its capacity
            row_ladder, frame_ladder, text_ladder = (tuple(sorted(set(ladder or (cap,)))) for ladder, cap in (
                (row_ladder, rows), (frame_ladder, frames), (text_ladder, text_len)))
        self.ladders = (row_ladder, frame_ladder, text_ladder)
        layouts = {_LAYOUT_CODE[masking.mode(cfg.span_len, a)] for a in SPAN_ARRANGEMENTS}
        self._layouts = tuple(sorted(layouts))
        self._variants = tuple(sorted({(code, scoring if code == masking.CHUNK else "max")
                                       for code in layouts for scoring in SPAN_SCORINGS}))
        self.state = self._allocate()
        self._rows: tp.Dict[int, _Row] = {}
        self.compiled, self.cuda_graphs = compile, cuda_graphs
        self._step_fn = graphs.compile_step(self._step) if compile else self._step
        self._graphs: graphs.StateCache[SlotState] = graphs.StateCache(1)
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def _allocate(self) -> SlotState:
        cfg, dev = self.cfg, self.device
        r, t, n = self.capacity, self.max_frames, self.max_steps
        kv_rows = r if not cfg.bias_attn else 2 * r
        kv = [tuple(torch.zeros(kv_rows, cfg.num_heads, self.max_text, cfg.head_dim, dtype=self.runtime.matmul_dtype,
                                device=dev) for _ in range(2)) for _ in range(cfg.num_layers)]

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)
        return SlotState(
            codes=torch.full((r, cfg.n_q, t), PAD_CODE, dtype=torch.long, device=dev),
            prob=zeros(r, t, dtype=torch.float32), scores=zeros(r, t, dtype=torch.float32),
            frames=zeros(r), text=zeros(r), active=zeros(r, dtype=torch.bool), seeds=zeros(r), cursor=zeros(r),
            layout=zeros(r), prod=zeros(r, dtype=torch.bool), use_sampling=zeros(r, dtype=torch.bool),
            top_k=zeros(r), top_p=zeros(r, dtype=torch.float32),
            coefs=zeros(r, n, dtype=torch.float32), temps=zeros(r, n, dtype=torch.float32), num_masked=zeros(r, n),
            stage=zeros(r, n), first=zeros(r, n, dtype=torch.bool), nonfinite=zeros(r, dtype=torch.bool),
            cross_kv=kv)

    # ------------------------------------------------------------ admission
    @property
    def active(self) -> int:
        """Occupied slots."""
        return len(self._rows)

    @property
    def free(self) -> int:
        return self.capacity - len(self._rows)

    def kept_frames(self, frames: int, params: DecodingParams) -> int:
        """The frames a row of `frames` keeps ('nonoverlap' trims to whole spans, docs/model.md §5)."""
        return kept_frames(frames, self.cfg.span_len, params.span_arrangement)

    def padding(self, extra_frames: tp.Optional[int] = None) -> float:
        """The share of the frames a step computes over the occupied slots that sharing pads,
        with a row of `extra_frames` kept frames added if given: 1 - sum(bucket(T_r)) / (rows x
        bucket(max T_r)), each length rounded up to its frame bucket (exact without a ladder), so
        the padding the ladder gives a row alone is not counted against sharing."""
        lengths = [row.frames for row in self._rows.values()] + ([] if extra_frames is None else [extra_frames])
        if not lengths:
            return 0.0
        ladder = self.ladders[1]
        return 1.0 - sum(_bucket(t, ladder) for t in lengths) / (len(lengths) * _bucket(max(lengths), ladder))

    def fits(self, frames: int, params: DecodingParams, text_len: int = 1) -> bool:
        """Whether a row could be admitted now and should be: a free slot, within capacity, and
        the padded share of the step's frames stays <= MAX_PADDING (module docstring)."""
        kept = self.kept_frames(frames, params)
        if not self.free or not 1 <= kept <= self.max_frames or text_len > self.max_text \
                or sum(params.decoding_steps) > self.max_steps:
            return False
        return not self._rows or self.padding(kept) <= MAX_PADDING

    @torch.no_grad()
    def admit(self, cond: torch.Tensor, frames: int, params: DecodingParams, seed: int = 0,
              listener: tp.Optional[ev.Listener] = None) -> int:
        """Put a row into the lowest free slot, between steps; returns the slot.

        cond [2, S, D]: the row's conditional and null condition, as one row of what
        `Runtime.generate` receives; frames: as `Runtime.generate`'s (trimmed to whole spans in
        'nonoverlap'); seed: its RNG seed; listener: gets a StageStep after each of its steps
        (canvas [1, K, T'] and confidence [1, T'] are live views of its row until the next
        step: a row may move between steps)."""
        cfg, st = self.cfg, self.state
        params.validate(cfg.n_q, cfg.card, self.max_steps)
        if cond.dim() != 3 or cond.shape[0] != 2 or cond.shape[2] != cfg.dim:
            raise InvalidOptionError(f"cond must be [2, S, {cfg.dim}] (the conditional row, then the null row), "
                                     f"found {tuple(cond.shape)}")
        text = cond.shape[1]
        kept = self.kept_frames(frames, params)
        if not 1 <= kept <= self.max_frames or not 1 <= text <= self.max_text:
            raise InvalidOptionError(f"a row must keep 1 to {self.max_frames} frames and have 1 to {self.max_text} "
                                     f"text tokens, found {kept} frames (of {frames}) and {text} tokens")
        total = sum(params.decoding_steps)
        if total > self.max_steps:
            raise InvalidOptionError(f"a row may decode at most {self.max_steps} steps, found {total}")
        if not self.free:
            raise InvalidOptionError(f"every one of the {self.capacity} slots is taken: admit after a row leaves")
        slot = min(set(range(self.capacity)) - set(self._rows))
        index = len(self._rows)   # rows stay dense (`_release`)

        layout = masking.mode(cfg.span_len, params.span_arrangement)
        code = _LAYOUT_CODE[layout]
        spans = masking.num_spans(kept, cfg.span_len, params.span_arrangement)
        schedules = stage_schedules(params, [spans] * cfg.n_q)
        steps, stage_of, first = [], [], []
        for stage, sched in enumerate(schedules):
            for i, (m, c) in enumerate(zip(sched.num_masked, sched.cfg_coef)):
                count = {"chunk": m * cfg.span_len, "token": m, "stride1": kept}[layout]
                steps.append(_Step(stage, i, sched.steps, count, c != 1.0))
                stage_of.append(stage)
                first.append(i == 0)

        def row_table(table: torch.Tensor, values: tp.Sequence, dtype: torch.dtype) -> None:
            table[index].zero_()
            table[index, :len(values)] = torch.tensor(values, dtype=dtype)
        row_table(st.coefs, [c for s in schedules for c in s.cfg_coef], torch.float32)
        row_table(st.temps, [t for s in schedules for t in s.temperature], torch.float32)
        row_table(st.num_masked, [m for s in schedules for m in s.num_masked], torch.long)
        row_table(st.stage, stage_of, torch.long)
        row_table(st.first, first, torch.bool)
        st.codes[index].fill_(PAD_CODE)
        st.codes[index, :, :kept] = cfg.mask_id
        st.prob[index].zero_()
        # the span scores at the stage's start, over the whole capacity: a step computes only the
        # frames of its bucket, and a later, longer row must find -inf past this row's spans
        st.scores[index] = torch.where(torch.arange(self.max_frames, device=self.device) < spans, 0.0, -torch.inf)
        for buffer, value in ((st.frames, kept), (st.text, text), (st.active, True), (st.seeds, seed),
                              (st.cursor, 0), (st.layout, code), (st.prod, params.span_scoring == "prod"),
                              (st.use_sampling, params.use_sampling), (st.top_k, params.top_k),
                              (st.top_p, params.top_p), (st.nonfinite, False)):
            buffer[index] = value
        rows = [index] if not cfg.bias_attn else [index, self.capacity + index]
        new_kv = self.lm.cfg_cross_kv(cond.to(self.device), self.runtime.matmul_dtype)
        for (k, v), (k_new, v_new) in zip(st.cross_kv, new_kv):
            for buf, new in ((k, k_new), (v, v_new)):
                buf[rows] = 0
                buf[rows, :, :text] = new   # [1 or 2, H, S, d]
        self._rows[slot] = _Row(index, kept, spans, text, code, params.span_scoring, tuple(steps), listener)
        return slot

    def cancel(self, slot: int) -> None:
        """Drop the row in `slot` between steps; its slot is free at once."""
        if slot not in self._rows:
            raise InvalidOptionError(f"slot {slot} holds no row")
        self._release(slot)

    def _release(self, slot: int) -> None:
        """Free `slot`, and keep the occupied rows dense: the last row moves into the freed one
        (every per-row buffer copied, device to device), so a step computes only occupied rows."""
        st = self.state
        index, last = self._rows.pop(slot).index, len(self._rows)
        if index != last:
            moved = next(row for row in self._rows.values() if row.index == last)
            for field in dataclasses.fields(st):
                if field.name != "cross_kv":
                    buffer = getattr(st, field.name)
                    buffer[index] = buffer[last]
            kv_rows = [(index, last)] if not self.cfg.bias_attn else [(index, last), (self.capacity + index,
                                                                                   self.capacity + last)]
            for pair in st.cross_kv:
                for buffer in pair:
                    for to, source in kv_rows:
                        buffer[to] = buffer[source]
            moved.index = index
        st.active[last] = False
        st.frames[last] = 0
        st.cursor[last] = 0   # a free row still reads its tables at the cursor: keep it in range
        st.codes[last].fill_(PAD_CODE)

    # ------------------------------------------------------------------ step
    def shape(self) -> SlotShape:
        """The next step's shape, from the host's mirror of the occupied slots: one of
        `ladder_shapes()` with ladders, else the exact one."""
        rows = list(self._rows.values())
        row_ladder, frame_ladder, text_ladder = self.ladders
        n_rows = _bucket(len(self._rows), row_ladder)
        frames = _bucket(max(row.frames for row in rows), frame_ladder)
        text = _bucket(max(row.text for row in rows), text_ladder)
        if self.pinned:
            return self._ladder_shape(n_rows, frames, text)
        now = [row.steps[row.done] for row in rows]
        stages = tuple(sorted({s.stage for s in now}))
        windows = {self.lm.window(s) for s in stages}
        masked = len(windows) > 1 or any(row.frames != frames for row in rows)
        return SlotShape(
            rows=n_rows, frames=frames, text=text, count=max(s.count for s in now), stages=stages,
            layouts=tuple(sorted({row.layout for row in rows})),
            variants=tuple(sorted({(row.layout, row.scoring if row.layout == masking.CHUNK else "max")
                                   for row in rows})),
            with_cfg=any(s.with_cfg for s in now), masked=masked,
            window=None if masked else next(iter(windows)),
            text_masked=any(row.text != text for row in rows))

    def _ladder_shape(self, rows: int, frames: int, text: int) -> SlotShape:
        """The shape of a step over [0, rows) x [0, frames) x [0, text) whatever the rows are
        doing: every frame gathered, every stage head, layout and scoring, both CFG halves,
        masked self- and cross-attention (module docstring, "Ladders")."""
        return SlotShape(rows=rows, frames=frames, text=text, count=frames, stages=tuple(range(self.cfg.n_q)),
                         layouts=self._layouts, variants=self._variants, with_cfg=True, masked=True, window=None,
                         text_masked=True)

    def ladder_shapes(self) -> tp.List[SlotShape]:
        """Every step shape of the ladders, largest first (empty without ladders)."""
        if not self.pinned:
            return []
        row_ladder, frame_ladder, text_ladder = self.ladders
        return [self._ladder_shape(r, f, t) for r in reversed(row_ladder) for f in reversed(frame_ladder)
                for t in reversed(text_ladder)]

    @torch.no_grad()
    def warm(self) -> tp.List[tp.Tuple[SlotShape, float]]:
        """Compile (compile=True) and capture (cuda_graphs=True) every ladder shape now, before
        any row, so that no request pays for either; returns each shape warmed with its
        seconds (none when the step is eager: nothing to prepare). An idle step writes only the
        free slots' span scores, which admission resets."""
        if self._rows:
            raise InvalidOptionError(f"warm the slots before admitting rows ({len(self._rows)} occupied)")
        if not (self.compiled or self.cuda_graphs):
            return []
        warmed = []
        for shape in self.ladder_shapes():
            started = time.perf_counter()
            if self.cuda_graphs:
                self._graph(shape)           # its capture's own warm-up run compiles it
            else:
                self._step_fn(self.state, shape)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            warmed.append((shape, time.perf_counter() - started))
        return warmed

    def _graph(self, shape: SlotShape) -> "torch.cuda.CUDAGraph":
        """The CUDA graph of the step of `shape` (captured on first use, in the runtime's pool)."""
        st = self.state
        return self._graphs.graph(st, shape, lambda: self._step_fn(st, shape),
                                  (st.codes, st.prob, st.scores, st.cursor, st.nonfinite), self._pool)

    @torch.no_grad()
    def step(self) -> tp.List[Finished]:
        """One decoding step of every occupied slot, then per-row events; returns the rows that
        left (finished, failed, or stopped by their listener), whose slots are free again."""
        if not self._rows:
            return []
        shape = self.shape()
        if self.cuda_graphs:
            self._graph(shape).replay()
        else:
            self._step_fn(self.state, shape)
        st, left = self.state, []
        for slot, row in list(self._rows.items()):   # a release moves a row: read its index each time
            now = row.steps[row.done]
            row.done += 1
            if row.listener is not None:
                try:
                    row.listener(ev.StageStep(now.stage, now.index, now.steps, row.done, len(row.steps),
                                              st.codes[row.index:row.index + 1, :, :row.frames],
                                              st.prob[row.index:row.index + 1, :row.frames]))
                except Exception as error:   # scoped to its row: the others go on
                    self._release(slot)
                    left.append(Finished(slot, None, error))
                    continue
            if row.done == len(row.steps):
                # A NaN p̂ is re-masked and later overwritten: the row's flag remembers it (one read per row).
                error = None
                if bool(st.nonfinite[row.index]):
                    error = NumericalError("non-finite probabilities during decoding (NaN/inf logits): check the "
                                           "checkpoint weights, the precision setting and this row's condition")
                codes = None if error else st.codes[row.index:row.index + 1, :, :row.frames].clone()
                self._release(slot)
                left.append(Finished(slot, codes, error))
        return left

    def _hidden(self, st: SlotState, shape: SlotShape, codes: torch.Tensor, stage: torch.Tensor,
                real: torch.Tensor) -> torch.Tensor:
        """The transformer over rows [0, rows): codes [R, K, T], stage [R] (each row's), real
        [R, T] (its frames) -> [2R, T, D] (or [R, T, D] without CFG), pre out_norm."""
        cfg, rows, frames = self.cfg, shape.rows, shape.frames
        dev = codes.device
        if shape.masked:
            frame_ids = torch.arange(frames, device=dev)
            windowed = (stage > 0) & (cfg.subcodes_context >= 0)              # [R]
            band = (frame_ids[:, None] - frame_ids[None]).abs() <= cfg.subcodes_context
            allowed = real[:, None, :] & (band | ~windowed[:, None, None])
            allowed = allowed | (torch.eye(frames, dtype=torch.bool, device=dev) & ~real[:, :, None])
            allowed = allowed[:, None]                                        # [R, 1, T, T]
            attend = _masked_attention(allowed, torch.cat([allowed, allowed]) if shape.with_cfg else allowed)
        else:
            impl = self.impl

            def attend(q, k, v, window):
                return attn_kernels.attention(q, k, v, window, impl=impl)
        kv_rows = [slice(0, rows)]
        if cfg.bias_attn:   # the null rows' own K/V, after the conditional ones
            kv_rows.append(slice(self.capacity, self.capacity + rows))
        cross_kv = [tuple(torch.cat([t[r, :, :shape.text] for r in kv_rows]) if len(kv_rows) > 1
                          else t[:rows, :, :shape.text] for t in pair) for pair in st.cross_kv]
        cross_mask = None
        if shape.text_masked:   # a free slot (no text) sees every key: zero K/V, a finite zero output
            keys = (torch.arange(shape.text, device=dev) < st.text[:rows, None]) | ~st.active[:rows, None]
            cross_mask = keys.repeat(len(kv_rows), 1)[:, None, None, :]       # [R or 2R, 1, 1, S]
        return transformer_hidden(self.lm, codes, cross_kv, self.dtype, shape.window, attend, not shape.with_cfg,
                                  cross_mask)

    @torch.no_grad()
    def stage_logits(self) -> tp.Dict[int, torch.Tensor]:
        """The logits each occupied row's next step samples from, at every one of its frames,
        on the canvases as they are now (before the step's re-masking): slot -> [2, T', card]
        fp32 (conditional row, then null row), as `Runtime.stage_logits` gives for the row
        alone. For inspection (tests), not the hot loop."""
        st, shape = self.state, dataclasses.replace(self.shape(), with_cfg=True)
        rows, frames = shape.rows, shape.frames
        stage = st.stage[:rows].gather(1, st.cursor[:rows, None])[:, 0]
        real = torch.arange(frames, device=self.device) < st.frames[:rows, None]
        hidden = self._hidden(st, shape, st.codes[:rows, :, :frames], stage, real).float()
        normed = self.lm.out_norm(hidden)
        return {slot: torch.stack([self.lm.linears[row.steps[row.done].stage](
                    normed[half * rows + row.index, :row.frames]) for half in (0, 1)])
                for slot, row in self._rows.items()}

    def _step(self, st: SlotState, shape: SlotShape) -> None:
        """One decoding step of rows [0, rows): re-mask, forward, sample, score (module
        docstring). Reads and writes only `st`'s buffers; per-row values come from the
        tables through the cursors. No host sync, no host-to-device copy."""
        cfg, lm = self.cfg, self.lm
        rows, frames, span_len, mask_id = shape.rows, shape.frames, cfg.span_len, cfg.mask_id
        dev = st.codes.device
        codes = st.codes[:rows, :, :frames]                                   # [R, K, T] view
        at = st.cursor[:rows, None]
        coef = st.coefs[:rows].gather(1, at)[:, 0]
        temp = st.temps[:rows].gather(1, at)[:, 0]
        num_masked = st.num_masked[:rows].gather(1, at)[:, 0]
        stage = st.stage[:rows].gather(1, at)[:, 0]
        first = st.first[:rows].gather(1, at)[:, 0]
        active, layout = st.active[:rows], st.layout[:rows]
        frame_ids = torch.arange(frames, device=dev)
        real = frame_ids < st.frames[:rows, None]                             # [R, T] the row's own frames
        spans = torch.where(layout == masking.CHUNK, st.frames[:rows] // span_len, st.frames[:rows])
        span_real = frame_ids < spans[:, None]                                # [R, T] span j exists
        scores = st.scores[:rows, :frames]
        scores.copy_(torch.where(first[:, None], torch.where(span_real, 0.0, -torch.inf), scores))

        # ---- re-mask each row's stage codebook, once per layout present
        at_stage = stage.view(rows, 1, 1).expand(rows, 1, frames)
        row = codes.gather(1, at_stage)[:, 0]                                 # [R, T]
        remasked, sample = row, torch.zeros_like(real)
        masked: tp.Dict[int, torch.Tensor] = {}
        for code in shape.layouts:
            mine = active & (layout == code)
            work = row.clone()
            width = frames // span_len if code == masking.CHUNK else frames
            # spans: a shorter row is ranked on its own spans, as alone (module docstring)
            masked[code] = masking.remask(work, scores[:, :width], torch.where(mine, num_masked, 0),
                                          span_len=span_len, arrangement=_ARRANGEMENT[code], prompt_len=0,
                                          mask_id=mask_id, impl=self.impl, spans=spans)
            if code == masking.CHUNK:      # the frames of the chosen chunks
                to_sample = torch.zeros_like(real)
                to_sample[:, :width * span_len] = masked[code].repeat_interleave(span_len, dim=1)
            elif code == masking.STRIDE1:  # every frame, as the solo run (its masked count is data-dependent)
                to_sample = real
            else:
                to_sample = masked[code]
            remasked = torch.where(mine[:, None], work, remasked)
            sample = torch.where(mine[:, None], to_sample, sample)
        row = remasked
        codes.scatter_(1, at_stage, row[:, None])

        # ---- the transformer, both CFG halves
        hidden = self._hidden(st, shape, codes, stage, real)                 # [2R or R, T, D]

        # ---- each row's frames to sample, its stage head, the draw
        key = sample.float() * (frames + 1) - frame_ids                       # to sample first, by frame
        pos = key.topk(shape.count, dim=1).indices.sort(dim=1).values         # [R, M]
        valid = sample.gather(1, pos) & active[:, None]
        halves = hidden.shape[0] // rows
        h = torch.gather(hidden, 1, pos.repeat(halves, 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        normed = lm.out_norm(h.float())
        logits = None
        for s in shape.stages:
            head = lm.linears[s](normed)                                      # [2R or R, M, C]
            logits = head if logits is None else torch.where((stage == s).repeat(halves)[:, None, None], head, logits)
        n = rows * shape.count

        def per_row(values: torch.Tensor) -> torch.Tensor:                    # [R] -> [R·M]
            return values[:, None].expand(rows, shape.count).reshape(n)
        tokens, p_hat = sampling.sample_tokens(
            logits[:rows].reshape(n, cfg.card), logits[rows:].reshape(n, cfg.card) if shape.with_cfg else None,
            per_row(coef), per_row(temp), use_sampling=per_row(st.use_sampling[:rows]),
            top_k=per_row(st.top_k[:rows]), top_p=per_row(st.top_p[:rows]), seed=per_row(st.seeds[:rows]),
            offset=per_row(st.cursor[:rows]), row_ids=pos.reshape(n), impl=self.impl)
        tokens, p_hat = tokens.view(rows, -1), p_hat.view(rows, -1)
        current = row.gather(1, pos)
        row.scatter_(1, pos, torch.where(valid & (current == mask_id), tokens, current))
        codes.scatter_(1, at_stage, row[:, None])
        prob = st.prob[:rows, :frames]
        prob.scatter_(1, pos, torch.where(valid, p_hat, prob.gather(1, pos)))
        st.nonfinite[:rows].logical_or_((valid & ~torch.isfinite(p_hat)).any(dim=1))

        # ---- next step's span scores, per (layout, scoring) present; -inf where a row has no span
        new = scores
        for code, scoring in shape.variants:
            mine = layout == code
            if code == masking.CHUNK:   # the other layouts score frames whatever the scoring
                mine = mine & (st.prod[:rows] == (scoring == "prod"))
            if code == masking.CHUNK:
                width = frames // span_len
                s = masking.span_scores(prob[:, :width * span_len], masked[code], span_len=span_len,
                                        arrangement="nonoverlap", scoring=scoring)
                s = F.pad(s, (0, frames - width), value=-torch.inf)
            else:
                s = masking.span_scores(prob, masked[code], span_len=span_len, arrangement=_ARRANGEMENT[code],
                                        scoring=scoring)
            new = torch.where(mine[:, None], s, new)
        scores.copy_(torch.where(span_real, new, -torch.inf))
        st.cursor[:rows].add_(active.long())
