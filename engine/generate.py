"""The one mode dispatch: `plan(...)` turns a request into phases, `run(plan, ...)` executes them.

    p = plan(cfg, params, batch=2, frames=500)                       # plain masked decoding
    p = plan(cfg, params, batch=1, frames=500, prompt_frames=150)    # continuation
    p = plan(cfg, params, batch=1, frames=498, fixed=((0, 198), (300, 498)))   # infill frames 198..300
    p = plan(cfg, params, batch=1, frames=3000, window_frames=500,   # long-form: 60 s in 10 s
             stride_frames=375)                                      #  windows, 7.5 s new each
    p = plan(cfg, params, batch=1, frames=500, prefix_frames=150,    # hybrid (a delay-layout
             hybrid=HybridOptions())                                 #  MAGNeT checkpoint)
    p = plan(cfg, params, batch=1, frames=500, prefix_frames=150,    # two-model hybrid (a
             hybrid=HybridOptions(), prefix_cfg=musicgen.cfg)        #  MusicGen prefix)
    codes = run(p, runtimes.models(p), cond, seeds=[0], listener=print)

A plan is host data only (no tensors): the AR phase (steps, sequence length), the masked
phase (frames kept, steps per stage, the fixed cells of each codebook as frame intervals)
and the total step count that progress is measured in. Every mode is masked decoding with
some cells fixed: a prompt fixes a prefix of every codebook, the hybrid staircase a prefix
of length len_k of codebook k, infill every frame outside the regions, and a long-form
window (`Plan.phases`, one MaskedPhase each) the previous window's tail. `run` walks it and reports typed events (`events.py`):
`Started`, an `ARStep` per AR step, `PrefixReady` when a hybrid prefix is final, a `StageStep` per masked
step, a `WindowReady` when a window's frames are final (every plan has at least one window),
`Done` at the end. The API, the CLI, the server and every benchmark call these two. The
rules the API checks its options by before it keeps them are asked here too (`check_prefix`,
`check_engine`), and which runtimes a plan runs on is picked here (`Runtimes.models`).
Rescoring is not a mode: it is a confidence hook passed to `run` (`rescoring.BoundRescorer`).

PlayDiffusion's unmasking (speech inpainting, TTS) plans with its model, in
`playdiffusion/plan.py` (`plan_speech`, `SpeechPlan`); `run` dispatches a speech plan there:

    units = run(p, Models(speech=SpeechRuntime(inpainter)), [(text, left, right), ...], draws=draws)
"""
from __future__ import annotations

import dataclasses
import typing as tp

import torch

from magnet_engine.engine import events as ev
from magnet_engine.engine import reference
from magnet_engine.engine.config import SEED_LIMIT, DecodingParams, ModelConfig, check_same_codes
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.errors import InvalidOptionError, RegionError
from magnet_engine.engine.hybrid import (ARParams, ARRuntime, HybridOptions, HybridPlan, check_tail,
                                         delayed_length, plan_hybrid, revert_delayed, tail_forward)
from magnet_engine.engine.model import MagnetLM
from magnet_engine.engine.playdiffusion.plan import SpeechPlan, run_speech
from magnet_engine.engine.playdiffusion.unmasking import Draws
from magnet_engine.engine.schedule import kept_frames, span_fixed
from magnet_engine.kernels import masking

# Long-form windows after the first draw with seed + i·WINDOW_SEED_STEP (mod SEED_LIMIT), so that
# a window's draws are not the previous window's replayed on a shifted canvas.
WINDOW_SEED_STEP = 0x9E3779B97F4A7C15

Intervals = tp.Tuple[tp.Tuple[int, int], ...]    # half-open frame intervals [start, end)
ENGINES = ("fast", "reference")


@dataclasses.dataclass(frozen=True)
class ARPhase:
    """Autoregressive prefix: `steps` positions of a delay-layout sequence of `seq_len`."""
    model: str                 # 'self' (hybrid-MAGNeT) or 'prefix' (two-model: the prefix model)
    steps: int
    seq_len: int
    prefix_frames: int         # F: frames of the clip the prefix covers
    params: ARParams


@dataclasses.dataclass(frozen=True)
class MaskedPhase:
    """Masked decoding of every stage over `kept` frames; fixed[k]: the frame intervals of
    codebook k whose cells are fixed (a prompt, the AR prefix, infill context, the previous
    long-form window's tail). start: where the phase's frames begin in the clip (long-form)."""
    kept: int
    steps: tp.Tuple[int, ...]
    fixed: tp.Tuple[Intervals, ...]
    tail: tp.Optional[HybridPlan] = None     # hybrid: decoded in the delay layout over the AR cache
    start: int = 0

    @property
    def prompt_lens(self) -> tp.Tuple[int, ...]:
        """Frames fixed from the start of each codebook (a prompt, the hybrid staircase)."""
        return tuple(next((e for s, e in iv if s == 0), 0) for iv in self.fixed)

    @property
    def end(self) -> int:
        return self.start + self.kept

    def fixed_mask(self) -> torch.Tensor:
        """[K, kept] bool on the host: the fixed cells."""
        mask = torch.zeros(len(self.fixed), self.kept, dtype=torch.bool)
        for k, intervals in enumerate(self.fixed):
            for s, e in intervals:
                mask[k, s:e] = True
        return mask


def _prefixes(lens: tp.Sequence[int]) -> tp.Tuple[Intervals, ...]:
    return tuple(((0, n),) if n else () for n in lens)


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    engine: str
    batch: int
    frames: int                # T requested
    params: DecodingParams
    ar: tp.Optional[ARPhase]
    masked: MaskedPhase        # the first (or only) window
    windows: tp.Tuple[MaskedPhase, ...] = ()   # long-form: every window, the first included

    @property
    def phases(self) -> tp.Tuple[MaskedPhase, ...]:
        """The masked phases in order: one per window."""
        return self.windows or (self.masked,)

    @property
    def out_frames(self) -> int:
        """Frames of the result: the last window's end (span-trimmed); infill: the clip's frames
        (the frames past T' that span trimming leaves out are the clip's own)."""
        return self.frames if self.mode == "infill" else self.phases[-1].end

    @property
    def ar_steps(self) -> int:
        return 0 if self.ar is None else self.ar.steps

    @property
    def total_steps(self) -> int:
        """What progress counts: AR steps and masked steps of every window together."""
        return self.ar_steps + sum(sum(phase.steps) for phase in self.phases)

    def stage_of(self, done: int) -> tp.Tuple[int, int]:
        """(stage, step in stage) of the masked step that makes `done` steps in total."""
        i = (done - self.ar_steps - 1) % sum(self.masked.steps)
        for stage, n in enumerate(self.masked.steps):
            if i < n:
                return stage, i
            i -= n
        raise ValueError(f"step {done} is past the plan's {self.total_steps} steps")


def plan(cfg: ModelConfig, params: DecodingParams, *, batch: int, frames: int, prompt_frames: int = 0,
         prefix_frames: int = 0, hybrid: tp.Optional[HybridOptions] = None,
         prefix_cfg: tp.Optional[ModelConfig] = None, rescore_fill: str = "special",
         engine: str = "fast", fixed: tp.Optional[tp.Sequence[tp.Tuple[int, int]]] = None,
         window_frames: tp.Optional[int] = None, stride_frames: tp.Optional[int] = None) -> Plan:
    """The phases of one generation, on the host, before any device work.

    prompt_frames: frames of a prompt kept fixed (continuation). prefix_frames: frames of an
    AR prefix (hybrid: the checkpoint's own; with prefix_cfg, a MusicGen / AudioGen model's,
    the two-model hybrid). hybrid: the hand-off and sampling options of the AR phase.
    rescore_fill: the rescoring fill option ('greedy' does not combine with hybrid decoding).
    fixed: infill: half-open frame intervals whose cells (every codebook) are kept, the rest
    is decoded; `run` takes the clip's codes as `canvas`. window_frames / stride_frames:
    long-form: when `frames` exceeds the window, decode window by window, each advancing
    stride_frames, the rest of each window being the previous one's tail (fixed)."""
    check_engine(engine)
    steps = tuple(params.decoding_steps)
    layout = masking.mode(cfg.span_len, params.span_arrangement)
    kept = kept_frames(frames, cfg.span_len, params.span_arrangement)
    if prefix_frames and prompt_frames:
        raise InvalidOptionError("hybrid decoding and a prompt are exclusive: the AR prefix is the prompt")
    if fixed is not None and (prompt_frames or prefix_frames):
        raise InvalidOptionError("infill fixes its own cells: no prompt or AR prefix with it")
    if window_frames is not None and frames > window_frames:
        if prefix_frames or fixed is not None or not decodes_long_form(cfg):
            raise InvalidOptionError("long-form decoding (frames past the window) does not combine with hybrid "
                                     "decoding or infill")
        windows = plan_windows(cfg, params, frames, window_frames, stride_frames, prompt_frames)
        mode = "prompt" if prompt_frames else "plain"
        return Plan(mode, engine, batch, frames, params, None, windows[0], windows)
    if fixed is not None:
        if cfg.pattern != "parallel":
            raise InvalidOptionError(f"infill decodes the parallel layout; this checkpoint's is {cfg.pattern!r}")
        intervals = _check_intervals(fixed, kept)
        phase = MaskedPhase(kept, steps, (intervals,) * cfg.n_q)
        free = (~span_fixed(phase.fixed_mask(), cfg.span_len, layout)).sum(dim=1)
        if not bool((free > 0).all()):
            raise InvalidOptionError("infill: every cell is fixed, nothing to decode")
        return Plan("infill", engine, batch, frames, params, None, phase)
    check_prefix(cfg, frames, prefix_frames, prefix_cfg)
    if not prefix_frames:
        mode = "prompt" if prompt_frames else "plain"
        return Plan(mode, engine, batch, frames, params, None,
                    MaskedPhase(kept, steps, _prefixes((prompt_frames,) * cfg.n_q)))
    if engine != "fast":
        raise InvalidOptionError("hybrid decoding runs on the fast engine only")
    hybrid = (hybrid or HybridOptions()).validate()
    if prefix_cfg is None:
        if rescore_fill == "greedy":
            raise InvalidOptionError("rescore_fill='greedy' is not supported with hybrid decoding (the delay "
                                     "layout puts each head's frames on other rows); use 'special'")
        tail = plan_hybrid(cfg, frames, prefix_frames, params, hybrid.handoff, hybrid.prefix_attention)
        ar = ARPhase("self", tail.ar_steps, tail.seq_len, prefix_frames, hybrid.ar)
        return Plan("hybrid", engine, batch, frames, params, ar,
                    MaskedPhase(tail.frames, steps, _prefixes(tail.prompt_lens), tail))
    check_same_codes(prefix_cfg, cfg, "prefix model")
    # the staircase completed into a rectangle: max(d) extra steps fix F frames of every codebook
    ar = ARPhase("prefix", prefix_frames + prefix_cfg.max_delay, delayed_length(prefix_frames, prefix_cfg.delays),
                 prefix_frames, hybrid.ar)
    return Plan("two_model", engine, batch, frames, params, ar,
                MaskedPhase(kept, steps, _prefixes((prefix_frames,) * cfg.n_q)))


def check_prefix(cfg: ModelConfig, frames: int, prefix_frames: int,
                 prefix_cfg: tp.Optional[ModelConfig] = None) -> None:
    """The rules of an AR prefix of `prefix_frames` in a `frames`-frame clip (prefix_cfg: a
    prefix model's config): `plan` applies them, the API asks them of its options before it
    keeps them. A hybrid-MAGNeT checkpoint makes its own prefix, of at least one frame; a
    plain MAGNeT takes one only from a prefix model (MusicGen / AudioGen: the two-model
    hybrid); the prefix leaves at least one span to masked decoding (`hybrid.check_tail`)."""
    if prefix_cfg is not None and cfg.is_hybrid:
        raise InvalidOptionError("prefix_model is for a plain MAGNeT (two-model hybrid); this hybrid-MAGNeT "
                                 "checkpoint makes its own prefix")
    if cfg.pattern != "parallel" and prefix_frames < 1:
        raise InvalidOptionError(f"a {cfg.pattern}-layout (hybrid-MAGNeT) checkpoint decodes with an AR prefix: "
                                 f"hybrid_prefix_seconds must be at least one frame (1/{cfg.frame_rate:g} s), "
                                 f"found {prefix_frames} frames")
    if not prefix_frames:
        return
    if prefix_cfg is None and not cfg.is_hybrid:
        raise InvalidOptionError("an AR prefix (hybrid_prefix_seconds) on a plain MAGNeT needs a prefix model "
                                 "(prefix_model=<MusicGen / AudioGen checkpoint>): the two-model hybrid")
    check_tail(cfg, frames, prefix_frames)


def decodes_long_form(cfg: ModelConfig) -> bool:
    """Whether a checkpoint decodes past its window, window by window: a parallel-layout MAGNeT
    does; a hybrid one (delay layout) decodes one window, its AR prefix then its tail."""
    return cfg.pattern == "parallel"


def check_engine(engine: str) -> str:
    """'fast' (the runtime) or 'reference' (the plain loop): the callers above ask here."""
    if engine not in ENGINES:
        raise InvalidOptionError(f"engine must be one of {ENGINES}, found {engine!r}")
    return engine


def plan_windows(cfg: ModelConfig, params: DecodingParams, frames: int, window_frames: int,
                 stride_frames: tp.Optional[int], prompt_frames: int = 0) -> tp.Tuple[MaskedPhase, ...]:
    """Long-form windows, audiocraft's way: window i starts at i·stride and is at most
    window_frames long (span-trimmed); its frames before the previous window's end are fixed
    (that window's tail), the rest are new. The last window is shorter when the clip ends
    earlier; a window that would add nothing after trimming is not made."""
    if stride_frames is None or not 1 <= stride_frames < window_frames:
        raise InvalidOptionError(f"long-form decoding needs a stride of 1 to {window_frames - 1} frames "
                                 f"(extend_stride below the window), found {stride_frames}")
    if kept_frames(window_frames, cfg.span_len, params.span_arrangement) - (window_frames - stride_frames) < 1:
        raise InvalidOptionError(f"a stride of {stride_frames} frames adds nothing to a {window_frames}-frame "
                                 "window after span trimming")
    steps = tuple(params.decoding_steps)
    windows: tp.List[MaskedPhase] = []
    start, end = 0, 0
    while True:
        length = kept_frames(min(window_frames, frames - start), cfg.span_len, params.span_arrangement)
        if start + length <= max(end, prompt_frames):
            break
        fixed = max(end - start, prompt_frames if start == 0 else 0)
        windows.append(MaskedPhase(length, steps, _prefixes((fixed,) * cfg.n_q), start=start))
        end = start + length
        if frames - start <= window_frames:
            break
        start += stride_frames
    if not windows:
        raise InvalidOptionError(f"a {prompt_frames}-frame prompt leaves nothing to generate in {frames} frames")
    return tuple(windows)


def snap_regions(cfg: ModelConfig, params: DecodingParams, frames: int,
                 regions: tp.Sequence[tp.Tuple[int, int]]) -> tp.Tuple[Intervals, Intervals]:
    """Infill regions [start, end) in frames of a `frames`-long clip -> (regions, fixed), both
    sorted, disjoint and within the kept frames T'. In 'nonoverlap' the regions are widened
    outward to whole chunks (a region's frames are then decoded with their chunk's
    neighbours); overlapping or touching regions are merged. fixed: the complement."""
    kept = kept_frames(frames, cfg.span_len, params.span_arrangement)
    unit = cfg.span_len if masking.mode(cfg.span_len, params.span_arrangement) == "chunk" else 1
    snapped = []
    for start, end in regions:
        if not 0 <= start < end <= frames:
            raise RegionError(f"region frames [{start}, {end}) are empty or outside the clip's {frames} frames")
        start, end = start // unit * unit, min(-(-end // unit) * unit, kept)
        if start >= end:
            raise RegionError(f"region frames [{start}, {end}) lie in the last {frames - kept} frames, "
                                     f"which {params.span_arrangement!r} decoding drops (span trimming)")
        snapped.append((start, end))
    merged: tp.List[tp.Tuple[int, int]] = []
    for start, end in sorted(snapped):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    if not merged:
        raise RegionError("infill needs at least one region")
    if merged == [(0, kept)]:
        raise RegionError("the regions cover the whole clip: that is plain generation (use generate)")
    fixed, at = [], 0
    for start, end in merged:
        if start > at:
            fixed.append((at, start))
        at = end
    if at < kept:
        fixed.append((at, kept))
    return tuple(merged), tuple(fixed)


def window_seeds(seeds: tp.Sequence[int], index: int) -> tp.List[int]:
    """The seeds of long-form window `index` (window 0: the rows' own)."""
    return [(s + index * WINDOW_SEED_STEP) % SEED_LIMIT for s in seeds]


def _check_intervals(fixed: tp.Sequence[tp.Tuple[int, int]], kept: int) -> Intervals:
    out = []
    for item in fixed:
        if len(item) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in item):
            raise InvalidOptionError(f"fixed intervals must be (start, end) frame pairs, found {item!r}")
        s, e = item
        if not 0 <= s < e <= kept:
            raise InvalidOptionError(f"fixed interval {item} is not within the {kept} frames of the clip")
        out.append((s, e))
    return tuple(sorted(out))




@dataclasses.dataclass
class Models:
    """What `run` executes a plan with (`Runtimes.models` picks them for a MAGNeT plan).
    runtime: the fast masked runtime (`decoding.Runtime`); lm: the fp32 LM (the reference
    engine's); ar: the AR runtime of the prefix phase (hybrid: the same LM's, two-model: the
    prefix model's); speech: PlayDiffusion's unmasking runtime
    (`playdiffusion.unmasking.SpeechRuntime`, speech plans)."""
    runtime: tp.Optional[Runtime] = None
    lm: tp.Optional[MagnetLM] = None
    ar: tp.Optional[ARRuntime] = None
    speech: tp.Any = None


class Runtimes:
    """The runtimes of one MAGNeT LM, each built on first use and kept (they hold its static
    step states): the fast masked runtime, which casts the LM in place to `precision`; the AR
    runtime over that same LM (a hybrid checkpoint's prefix); the fp32 LM of the reference
    engine, from `reference_lm`. `models(plan)` picks those the plan runs on."""

    def __init__(self, lm: MagnetLM, precision: str, reference_lm: tp.Callable[[], MagnetLM], *,
                 compile: bool = False, cuda_graphs: bool = False):
        self._lm, self._precision, self._reference_lm = lm, precision, reference_lm
        self._compile, self._cuda_graphs = compile, cuda_graphs
        self._masked: tp.Optional[Runtime] = None
        self._ar: tp.Optional[ARRuntime] = None

    def masked(self) -> Runtime:
        if self._masked is None:
            self._masked = Runtime(self._lm, precision=self._precision, compile=self._compile,
                                   cuda_graphs=self._cuda_graphs)
        return self._masked

    def models(self, p: Plan, prefix: tp.Optional[ARRuntime] = None) -> Models:
        """What `run` executes plan `p` with. prefix: the prefix model's AR runtime (two-model)."""
        if p.engine == "reference":
            return Models(lm=self._reference_lm())
        runtime, ar = self.masked(), None
        if p.ar is not None and p.ar.model == "self":
            if self._ar is None:
                self._ar = ARRuntime(runtime.lm, runtime.dtype, cuda_graphs=self._cuda_graphs)
            ar = self._ar
        elif p.ar is not None:
            if prefix is None:
                raise InvalidOptionError("a two-model plan runs its AR phase on the prefix model: pass its runtime")
            ar = prefix
        return Models(runtime=runtime, ar=ar)


@torch.no_grad()
def run(p: tp.Union[Plan, SpeechPlan], models: Models, cond: tp.Union[torch.Tensor, tp.Sequence[torch.Tensor]], *,
        seeds: tp.Sequence[int] = (), prompt: tp.Optional[torch.Tensor] = None,
        canvas: tp.Optional[torch.Tensor] = None, ar_cond: tp.Optional[torch.Tensor] = None, hook=None,
        listener: tp.Optional[ev.Listener] = None, generator: tp.Optional[torch.Generator] = None,
        draws: tp.Optional[Draws] = None) -> tp.Union[torch.Tensor, tp.Tuple[torch.Tensor, ...]]:
    """Execute a plan -> codes [B, K, p.out_frames]; a speech plan -> units [P + L + Q] of
    each loop (context and filled target).

    cond: [2B, S, D] condition rows (conditional, then null), or one such tensor per window
    (long-form text that changes per window); speech: one (text [Lt'] ids, left [P] units,
    right [Q] units) per loop. ar_cond: the prefix model's own rows
    (two-model hybrid); prompt: [B, K, P] fixed codes (mode 'prompt'); canvas: [B, K, >= T']
    the clip's codes, read at the fixed cells (mode 'infill'); hook: a confidence hook
    (rescoring), or one per window (long-form text that changes per window); listener: gets
    every event; generator: the reference engine's draws; draws: a speech plan's uniforms
    (`playdiffusion.unmasking`: GeneratorDraws, KeyedDraws, RecordedDraws)."""
    listen = listener or (lambda event: None)
    if isinstance(p, SpeechPlan):
        if seeds or draws is None:
            raise InvalidOptionError("a speech plan draws its randomness from `draws` (no seeds)")
        return run_speech(p, models.speech, cond, draws, listen)
    if draws is not None:
        raise InvalidOptionError(f"a '{p.mode}' plan draws from its seeds; `draws` is for speech plans")
    if len(seeds) != p.batch:
        raise InvalidOptionError(f"expected {p.batch} seeds (one per row), found {len(seeds)}")
    if (prompt is not None) != (p.mode == "prompt"):
        raise InvalidOptionError(f"a '{p.mode}' plan {'needs' if p.mode == 'prompt' else 'takes no'} prompt codes")
    if (canvas is not None) != (p.mode == "infill"):
        raise InvalidOptionError(f"a '{p.mode}' plan {'needs' if p.mode == 'infill' else 'takes no'} canvas codes")
    phases = p.phases
    conds = [cond] * len(phases) if isinstance(cond, torch.Tensor) else list(cond)
    if len(conds) != len(phases):
        raise InvalidOptionError(f"expected one condition per window ({len(phases)}), found {len(conds)}")
    hooks = list(hook) if isinstance(hook, (list, tuple)) else [hook] * len(phases)
    if len(hooks) != len(phases):
        raise InvalidOptionError(f"expected one confidence hook per window ({len(phases)}), found {len(hooks)}")
    listen(ev.Started(p.total_steps))
    total = p.total_steps
    if p.ar is not None:
        codes = _run_hybrid(p, models, cond, seeds, ar_cond, hooks[0], listen)   # one phase
        listen(ev.WindowReady(0, 1, codes))
        listen(ev.Done(codes))
        return codes

    mask_id = (models.lm if p.engine == "reference" else models.runtime).cfg.mask_id
    out: tp.Optional[torch.Tensor] = None
    done = 0
    for i, phase in enumerate(phases):
        fixed = phase.fixed_mask()
        first = canvas if p.mode == "infill" else prompt
        known = first if i == 0 else out[..., phase.start:phase.start + phase.prompt_lens[0]]
        win_canvas = None
        if bool(fixed.any()):
            win_canvas = torch.full((p.batch, fixed.shape[0], phase.kept), mask_id, dtype=torch.long,
                                    device=known.device)
            width = min(known.shape[-1], phase.kept)
            win_canvas[..., :width] = known[..., :width]
        codes = _run_masked(p, phase, models, conds[i], win_canvas, fixed if win_canvas is not None else None,
                            window_seeds(seeds, i), hooks[i], ev.in_window(listen, i), generator, done, total)
        if len(phases) == 1:
            out = codes
        else:
            if out is None:
                out = torch.full((p.batch, codes.shape[1], p.out_frames), mask_id, dtype=torch.long,
                                 device=codes.device)
            out[..., phase.start:phase.end] = codes
        if p.mode == "infill" and p.frames > phase.kept:
            out = codes = torch.cat([codes, canvas[..., phase.kept:p.frames].to(codes)], dim=-1)
        new = 0 if i == 0 else phase.prompt_lens[0]
        listen(ev.WindowReady(i, len(phases), codes[..., new:]))
        done += sum(phase.steps)
    listen(ev.Done(out))
    return out


def _run_masked(p: Plan, phase: MaskedPhase, models: Models, cond: torch.Tensor, canvas: tp.Optional[torch.Tensor],
                fixed: tp.Optional[torch.Tensor], seeds: tp.Sequence[int], hook, listen: ev.Listener,
                generator: tp.Optional[torch.Generator], done_before: int, total: int) -> torch.Tensor:
    """One masked phase (a window) on the plan's engine -> codes [B, K, phase.kept]."""
    if p.engine == "reference":
        def progress(done: int, _total: int) -> None:
            stage, step = p.stage_of(done_before + done)
            listen(ev.StageStep(stage, step, phase.steps[stage], done_before + done, total))
        return reference.generate_tokens(models.lm, cond, phase.kept, p.params, generator=generator,
                                         callback=progress, rescorer=hook, canvas=canvas, fixed=fixed)
    return models.runtime.generate(cond, phase.kept, p.params, seeds=seeds, listener=listen, canvas=canvas,
                                   fixed=fixed, hook=hook, done_before=done_before, total=total)


def _run_hybrid(p: Plan, models: Models, cond: torch.Tensor, seeds: tp.Sequence[int],
                ar_cond: tp.Optional[torch.Tensor], hook, listen: ev.Listener) -> torch.Tensor:
    """The AR prefix, then masked decoding with the prefix (hybrid: its staircase) fixed."""
    total = p.total_steps
    ar_rt = models.ar

    def ar_progress(done: int, steps: int) -> None:
        listen(ev.ARStep(done - 1, steps, done, total))
    ar = ar_rt.generate(ar_cond if p.mode == "two_model" else cond, p.ar.steps, p.ar.seq_len, p.ar.params, seeds,
                        callback=ar_progress)
    prompt = revert_delayed(ar.seq, ar_rt.cfg.delays, p.ar.prefix_frames)          # [B, K, F]
    forward = None
    if p.mode == "hybrid":
        for k, n in enumerate(p.masked.prompt_lens):   # cells past a codebook's staircase are not fixed
            prompt[:, k, n:] = ar_rt.cfg.card
        forward = tail_forward(models.runtime, p.masked.tail, ar)
    listen(ev.PrefixReady(prompt[..., :min(p.masked.prompt_lens)].clone()))
    return models.runtime.generate(cond, p.frames, p.params, prompt=prompt, seeds=seeds, listener=listen,
                                   prompt_lens=p.masked.prompt_lens, forward=forward, hook=hook,
                                   done_before=p.ar_steps, total=total)
