"""The iterative unmasking loop (docs/model.md §13.9) as one capturable step on static
buffers, the speech counterpart of `engine/decoding.py`. `playdiffusion.plan.plan_speech` /
`run_speech` drive it; nothing else loops over it.

One loop fills L target positions between a fixed left (P units) and right (Q units) context:

    ids   [R, S]   R = 2 with CFG (row 1: inner text -> TEXT_GUIDANCE), S = Lt + P + L + Q
    step i:  hidden = model(ids)                        [R, S, D]  one batched forward
             E = CFG mix of the audio rows, std-rescaled (head linear: mix hidden, run head once)
             logits = E[target] @ W_outᵀ                [L, A]
             u = uniforms (sample [L, A] unless greedy, then score [L]: upstream's call order)
             tokens, scores = gumbel_topk_sample(...)   kernels/gumbel_sampling.py
             target = tokens + V where masked; masked = the next_masked[i] highest scores
             among the masked positions (kernels.masking.remask, token mode); context never moves

Everything that depends on the step index (τ_i = max(τ0·t_i, 1e-3), δ_i = δ0·t_i, how many
stay masked) is a host table (`Schedule`) copied once into device tables that the step reads
through a device cursor; CFG weights are device scalars. What changes a step's control flow
(greedy: no sample draw; where the uniforms come from; top-k, CFG on/off) is its host
`SpeechShape`. So a step issues work and never waits: it traces whole under
torch.compile(fullgraph=True) and is captured once per shape as a CUDA graph.

Where the uniforms come from (`SpeechShape.draws`):
  'generator'  GeneratorDraws on the CPU: a torch generator's state tensor, advanced inside the
               step (kernels.rng.generator_uniform_): the global or a seeded generator gives
               upstream's numbers in upstream's order, bit for bit.
  'keyed'      KeyedDraws, and GeneratorDraws on CUDA (seeded from the generator, on the device):
               the keyed counter RNG (kernels.rng.uniform) at offsets 2i, 2i + 1 of the cursor.
  'given'      RecordedDraws (fixture replay) or any other `Draws`: written into the step's
               uniform buffers on the host before each step; the step reads them.
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import torch

from magnet_engine.engine import events as ev
from magnet_engine.engine import graphs
from magnet_engine.engine.config import MAX_SEED
from magnet_engine.engine.errors import InvalidOptionError
from magnet_engine.engine.playdiffusion.inpainter import Inpainter
from magnet_engine.kernels import backend, rng
from magnet_engine.kernels.gumbel_sampling import gumbel_topk_sample
from magnet_engine.kernels.masking import remask

FLT_MAX = torch.finfo(torch.float32).max
MAX_STATES = 8   # buffer sets (one per loop geometry) kept per runtime, with their graphs


@dataclasses.dataclass(frozen=True)
class UnmaskOptions:
    """The loop's settings (upstream `generate` kwargs, fed from the API's input models) and
    the named fixes of upstream quirks, all off by default (docs/model.md §13.11)."""
    steps: int = 30
    init_temp: float = 1.0
    init_diversity: float = 1.0
    guidance: float = 0.5
    rescale: float = 0.7
    topk: int = 25
    # Fix of quirk 3: when the schedule stops early (L·sin(π/2n) < 1), make the last step run
    # greedy instead of keeping tokens drawn at temperature τ0·t_i > 0.
    greedy_last_step_always: bool = False
    # Fix of quirk 14: take the CFG rescale std over the target rows only (not the context).
    cfg_std_target_only: bool = False

    def check(self, codebook: int) -> None:
        if not 1 <= self.steps:
            raise InvalidOptionError(f"steps must be >= 1, found {self.steps}")
        if not 1 <= self.topk <= codebook:
            raise InvalidOptionError(f"topk must be in [1, {codebook}] (the codebook size), found {self.topk}")
        for name in ("init_temp", "init_diversity", "guidance", "rescale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidOptionError(f"{name} must be a finite number >= 0, found {value!r}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Host tables for one loop over L positions; index i = step."""
    target_len: int
    steps_run: int
    temperature: tp.Tuple[float, ...]   # max(τ0·t_i, 1e-3)
    diversity: tp.Tuple[float, ...]     # δ0·t_i
    next_masked: tp.Tuple[int, ...]     # positions still masked after step i (0 at the last step)
    greedy: tp.Tuple[bool, ...]         # argmax instead of Gumbel-max at step i


def make_schedule(target_len: int, options: UnmaskOptions) -> Schedule:
    """t_i = 1 - i·(1/n) in double as upstream; the mask count uses upstream's fp32 torch ops
    (t·π, /2, sin, ×L, trunc), so boundary cases such as sin(π/6) = 0.5 come out the same."""
    n = options.steps
    h = 1.0 / n
    t = [1.0 - i * h for i in range(n)] + [0.0]
    temps, divs, counts, greedy = [], [], [], []
    for i in range(n):
        temps.append(max(options.init_temp * t[i], 1e-3))
        divs.append(options.init_diversity * t[i])
        count = int((torch.sin(t[i + 1] * torch.ones(1) * torch.pi / 2) * target_len).long()[0])
        counts.append(count)
        greedy.append(i == n - 1)
        if count == 0:
            break
    if options.greedy_last_step_always:
        greedy[-1] = True
    return Schedule(target_len, len(counts), tuple(temps), tuple(divs), tuple(counts), tuple(greedy))


# ----------------------------------------------------------------------------- draws
class Draws(tp.Protocol):
    """Fills a step's uniform buffers in upstream's order: sample (if not greedy), then score.
    The plain loop (reference.py) calls these; the runtime calls them only in 'given' mode."""

    def sample(self, step: int, out: torch.Tensor) -> None: ...

    def score(self, step: int, out: torch.Tensor) -> None: ...


class GeneratorDraws:
    """uniform_ on a torch generator (None: the device's default one, as upstream). The runtime
    draws inside the step: on the CPU from the generator's state (the same numbers), on CUDA
    from the keyed RNG seeded by one draw of the generator."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def sample(self, step: int, out: torch.Tensor) -> None:
        out.uniform_(0, 1, generator=self.generator)

    def score(self, step: int, out: torch.Tensor) -> None:
        out.uniform_(0, 1, generator=self.generator)


class KeyedDraws:
    """The keyed counter RNG: step i's sample uniform of (row, unit) is uniform(seed, 2i, row·A +
    unit), its score uniform of row uniform(seed, 2i + 1, row). Reproducible on every device."""

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidOptionError(f"seed must be an int, found {seed!r}")
        self.seed = seed

    def sample(self, step: int, out: torch.Tensor) -> None:
        index = torch.arange(out.numel(), device=out.device).view(out.shape)
        out.copy_(rng.uniform(torch.tensor(self.seed, device=out.device), torch.tensor(2 * step, device=out.device),
                              index))

    def score(self, step: int, out: torch.Tensor) -> None:
        index = torch.arange(out.numel(), device=out.device)
        out.copy_(rng.uniform(torch.tensor(self.seed, device=out.device),
                              torch.tensor(2 * step + 1, device=out.device), index))


class RecordedDraws:
    """Replays recorded uniforms: sample[i] [1, L, A] (absent on a greedy step), score[i] [1, L]."""

    def __init__(self, sample: tp.Sequence[torch.Tensor], score: tp.Sequence[torch.Tensor]):
        self.sample_u, self.score_u = list(sample), list(score)

    def sample(self, step: int, out: torch.Tensor) -> None:
        out.copy_(self.sample_u[step].reshape(out.shape))

    def score(self, step: int, out: torch.Tensor) -> None:
        out.copy_(self.score_u[step].reshape(out.shape))


# ----------------------------------------------------------------------------- pieces
def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, guidance, rescale, std_rows: slice | None = None,
            keep=None) -> torch.Tensor:
    """[N, D] audio rows of both passes -> guided rows; upstream's op order (docs/model.md §13.9 step 2).
    std over all elements of `std_rows` (all rows by default), unbiased. guidance, rescale:
    floats or 0-d fp32 tensors; keep: 1 - rescale (given as a tensor when rescale is one, so
    that it is fp32(1 - rescale), as upstream's float arithmetic rounds it)."""
    rows = slice(None) if std_rows is None else std_rows
    pos_std = cond[rows].std()
    mixed = cond + guidance * (cond - uncond)
    rescaled = mixed * pos_std / mixed[rows].std()
    return rescale * rescaled + (1 - rescale if keep is None else keep) * mixed


def build_ids(model: Inpainter, text: torch.Tensor, left: torch.Tensor, right: torch.Tensor, target_len: int,
              with_null: bool) -> torch.Tensor:
    """[R, S] int64: [BOS, text, EOS, left + V, MASK × L, right + V]; row 1 has the inner text
    replaced by TEXT_GUIDANCE. text, left, right: [n] int64 (units, not ids)."""
    cfg = model.cfg
    dev = text.device
    row = torch.cat([torch.tensor([cfg.bos], device=dev), text, torch.tensor([cfg.eos], device=dev),
                     left + cfg.vocab_size, torch.full((target_len,), cfg.mask, device=dev),
                     right + cfg.vocab_size])
    if not with_null:
        return row[None].clone()
    null = row.clone()
    null[1:1 + text.numel()] = cfg.text_guidance
    return torch.stack([row, null])


def split_code(code: torch.Tensor, start_frame: int, end_frame: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Upstream `generate`'s reading of (code [T], start, end) -> (left, L, right) (docs/model.md §13.9).

    L = end - start + 1: one more than the n placeholders when a right context of >= 2 frames
    follows; a right context of exactly 1 frame is dropped (quirk 1)."""
    t = code.numel()
    left = code[:start_frame] if start_frame > 0 else code[:0]
    start_frame = max(start_frame, 0)
    if end_frame < t - 1:
        right = code[end_frame:]
    else:
        end_frame, right = t - 1, code[:0]
    return left, end_frame - start_frame + 1, right


# ----------------------------------------------------------------------------- the step
@dataclasses.dataclass(frozen=True)
class SpeechShape:
    """What fixes a step's control flow (host values): one compiled graph / CUDA graph each."""
    greedy: bool            # argmax; no sample draw (upstream draws none on that step)
    draws: str              # 'generator', 'keyed' or 'given' (module docstring)
    top_k: int
    cfg: bool               # guidance > 0: two rows, mixed on the hidden states
    std_target_only: bool   # quirk-14 fix: CFG std over the target rows


@dataclasses.dataclass
class SpeechState:
    """Every buffer a step reads or writes, allocated before the loop; reused by later loops of
    the same geometry (rows, text, left, target, right lengths, steps) so graphs stay valid."""
    text_len: int              # BOS + inner text + EOS
    left: int                  # P
    target: int                # L
    ids: torch.Tensor          # [R, S] int64: the model input; the target rows are the canvas
    units: torch.Tensor        # [1, 1, P + L + Q] int64: the canvas as units (MASK as A), for events
    masked: torch.Tensor       # [L] bool: target positions still masked
    sample_u: torch.Tensor     # [L, A] fp32 uniforms of the Gumbel-max draw
    score_u: torch.Tensor      # [L] fp32 uniforms of the confidence noise
    sample_index: torch.Tensor  # [L, A] int64: the keyed RNG's element index
    score_index: torch.Tensor  # [L] int64
    rng_state: torch.Tensor    # [5056] uint8: a CPU torch generator's state ('generator' draws)
    seed: torch.Tensor         # 0-d int64 ('keyed' draws)
    cursor: torch.Tensor       # 0-d int64: the step index
    temps: torch.Tensor        # [n] fp32
    divs: torch.Tensor         # [n] fp32
    next_masked: torch.Tensor  # [n] int64
    mix: torch.Tensor          # [3] fp32: guidance, rescale, 1 - rescale
    neg_max: torch.Tensor      # 0-d fp32: -FLT_MAX, the score of committed positions


class SpeechRuntime:
    """The inpainter prepared for unmasking, with buffers (and graphs) reused across loops.

    impl: the kernels' implementation (None: the best for the device). compile: the whole step
    through torch.compile(fullgraph=True). cuda_graphs: capture each step shape once as a CUDA
    graph and replay it (CUDA only). Every mode computes the same tokens from the same draws."""

    def __init__(self, model: Inpainter, impl: str | None = None, compile: bool = False, cuda_graphs: bool = False):
        self.model = model
        self.cfg = model.cfg
        self.device = model.to_logits.weight.device
        graphs.check_device(cuda_graphs, self.device)
        self.impl = backend.resolve(self.device, impl)   # once, outside the step
        self.cuda_graphs = cuda_graphs
        self._states: graphs.StateCache[SpeechState] = graphs.StateCache(MAX_STATES)
        self._step_fn = self._step
        if compile:
            self._step_fn = graphs.compile_step(self._step)

    def state(self, rows: int, text_len: int, left: int, target: int, right: int, steps: int) -> SpeechState:
        """The buffers of one loop geometry; the MAX_STATES most recently used are kept."""
        def make() -> SpeechState:
            dev, card = self.device, self.cfg.codebook_size
            return SpeechState(
                text_len, left, target,
                ids=torch.zeros(rows, text_len + left + target + right, dtype=torch.long, device=dev),
                units=torch.zeros(1, 1, left + target + right, dtype=torch.long, device=dev),
                masked=torch.ones(target, dtype=torch.bool, device=dev),
                sample_u=torch.zeros(target, card, device=dev),
                score_u=torch.zeros(target, device=dev),
                sample_index=torch.arange(target * card, device=dev).view(target, card),
                score_index=torch.arange(target, device=dev),
                rng_state=torch.zeros(torch.default_generator.get_state().numel() if dev.type == "cpu" else 0,
                                      dtype=torch.uint8),
                seed=torch.zeros((), dtype=torch.long, device=dev),
                cursor=torch.zeros((), dtype=torch.long, device=dev),
                temps=torch.zeros(steps, device=dev), divs=torch.zeros(steps, device=dev),
                next_masked=torch.zeros(steps, dtype=torch.long, device=dev),
                mix=torch.zeros(3, device=dev), neg_max=torch.tensor(-FLT_MAX, device=dev))
        return self._states.get((rows, text_len, left, target, right, steps), make)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def logits(self, st: SpeechState, shape: SpeechShape) -> torch.Tensor:
        """[L, A] fp32: guided logits of the target rows from one batched forward of st.ids."""
        # fp32 from here on (a no-op for an fp32 model): the CFG stds and the sampling need it.
        hidden = self.model.hidden(st.ids)[:, st.text_len:].float()      # [R, P + L + Q, D]
        rows = slice(st.left, st.left + st.target)
        if shape.cfg:
            guided = cfg_mix(hidden[0], hidden[1], st.mix[0], st.mix[1], rows if shape.std_target_only else None,
                             keep=st.mix[2])
        else:
            guided = hidden[0]
        head = self.model.to_logits
        return head(guided[rows].to(head.weight.dtype)).float()

    def _step(self, st: SpeechState, shape: SpeechShape) -> None:
        """One unmasking step on `st`'s buffers: forward, draw, sample, commit, re-mask.
        Every per-step value comes from the device tables through st.cursor: no host sync,
        no host-to-device copy, no branch on a device value."""
        at = st.cursor.view(1)
        temperature = st.temps.index_select(0, at).view(())
        diversity = st.divs.index_select(0, at).view(())
        still_masked = st.next_masked.index_select(0, at).view(())
        logits = self.logits(st, shape)
        if shape.draws == "generator":          # upstream's order: the sample draw, then the score's
            if not shape.greedy:
                rng.generator_uniform_(st.sample_u, st.rng_state)
            rng.generator_uniform_(st.score_u, st.rng_state)
        elif shape.draws == "keyed":
            offset = st.cursor * 2
            if not shape.greedy:
                st.sample_u.copy_(rng.uniform(st.seed, offset, st.sample_index))
            st.score_u.copy_(rng.uniform(st.seed, offset + 1, st.score_index))
        tokens, scores = gumbel_topk_sample(logits, None if shape.greedy else st.sample_u, st.score_u, temperature,
                                            diversity, top_k=shape.top_k, impl=self.impl)
        cfg = self.cfg
        start = st.text_len + st.left
        target = st.ids[0, start:start + st.target]                       # view: the canvas
        target.copy_(torch.where(st.masked, tokens + cfg.vocab_size, target))
        scores = torch.where(st.masked, scores, st.neg_max)
        # after the last step still_masked is 0: nothing is re-masked and `masked` empties
        masked = remask(target[None], scores[None], still_masked, span_len=1, arrangement="token", prompt_len=0,
                        mask_id=cfg.mask, impl=self.impl)
        st.masked.copy_(masked[0])
        if shape.cfg:
            st.ids[1, start:start + st.target].copy_(target)
        st.units.copy_(st.ids[0:1, None, st.text_len:] - cfg.vocab_size)
        st.cursor.add_(1)

    @torch.no_grad()
    def step(self, st: SpeechState, shape: SpeechShape, i: int, draws: Draws | None = None) -> None:
        """Step i: host-given uniforms written first ('given'), then the step, as a CUDA
        graph replay when cuda_graphs is on."""
        if shape.draws == "given":
            if not shape.greedy:
                draws.sample(i, st.sample_u)
            draws.score(i, st.score_u)
        if self.cuda_graphs:
            self._states.graph(st, shape, lambda: self._step_fn(st, shape),
                               (st.ids, st.units, st.masked, st.sample_u, st.score_u, st.cursor)).replay()
        else:
            self._step_fn(st, shape)

    # ------------------------------------------------------------- one loop
    @torch.no_grad()
    def prepare(self, schedule: Schedule, options: UnmaskOptions, text: torch.Tensor, left: torch.Tensor,
                right: torch.Tensor, draws: Draws) -> tp.Tuple[SpeechState, tp.List[SpeechShape]]:
        """Everything before the loop: the call's inputs and tables copied into the static
        buffers, the draw source set up, every step's shape. text [Lt'] ids; left [P], right
        [Q] units."""
        options.check(self.cfg.codebook_size)
        dev = self.device
        cfg_on = options.guidance > 0
        ids = build_ids(self.model, text.to(dev), left.to(dev), right.to(dev), schedule.target_len, cfg_on)
        st = self.state(ids.shape[0], text.numel() + 2, left.numel(), schedule.target_len, right.numel(),
                        schedule.steps_run)
        st.ids.copy_(ids)
        st.units.copy_(st.ids[0:1, None, st.text_len:] - self.cfg.vocab_size)
        st.masked.fill_(True)
        st.temps.copy_(torch.tensor(schedule.temperature, dtype=torch.float32))
        st.divs.copy_(torch.tensor(schedule.diversity, dtype=torch.float32))
        st.next_masked.copy_(torch.tensor(schedule.next_masked, dtype=torch.long))
        # fp32 of the double values, as upstream's Python floats enter its fp32 ops
        st.mix.copy_(torch.tensor([options.guidance, options.rescale, 1 - options.rescale], dtype=torch.float32))
        st.cursor.zero_()
        mode = self._set_draws(st, draws)
        return st, [SpeechShape(greedy, mode, options.topk, cfg_on, options.cfg_std_target_only)
                    for greedy in schedule.greedy]

    def _set_draws(self, st: SpeechState, draws: Draws) -> str:
        if isinstance(draws, KeyedDraws):
            st.seed.fill_(draws.seed)
            return "keyed"
        if not isinstance(draws, GeneratorDraws):
            return "given"
        gen = draws.generator
        if gen is not None and gen.device.type != self.device.type:
            raise InvalidOptionError(f"the draws' generator is on {gen.device}, the inpainter on {self.device}")
        if self.device.type == "cpu":
            st.rng_state.copy_((gen or torch.default_generator).get_state())
            return "generator"
        st.seed.copy_(torch.randint(0, MAX_SEED, (), generator=gen, device=self.device))
        return "keyed"

    @torch.no_grad()
    def generate(self, schedule: Schedule, options: UnmaskOptions, text: torch.Tensor, left: torch.Tensor,
                 right: torch.Tensor, draws: Draws, listener: ev.Listener | None = None, *, done_before: int = 0,
                 total: int | None = None) -> torch.Tensor:
        """One loop -> units [P + L + Q] int64 (context unchanged, target filled). A listener
        gets a StageStep after every step (stage 0; canvas: the live [1, 1, P + L + Q] units,
        MASK as A); done_before / total: step counts of the whole run."""
        st, shapes = self.prepare(schedule, options, text, left, right, draws)
        total = done_before + len(shapes) if total is None else total
        try:
            for i, shape in enumerate(shapes):
                self.step(st, shape, i, draws)
                if listener is not None:
                    listener(ev.StageStep(0, i, len(shapes), done_before + i + 1, total, st.units))
        finally:
            if shapes[0].draws == "generator":   # the generator advances as upstream's, even on a cancel
                (draws.generator or torch.default_generator).set_state(st.rng_state)
        return st.units[0, 0].clone()
