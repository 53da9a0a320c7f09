"""The one mode dispatch: `plan(...)` turns a request into phases, `run(plan, ...)` executes them.

    p = plan(cfg, params, batch=2, frames=500)                       # plain masked decoding
    p = plan(cfg, params, batch=1, frames=500, prompt_frames=150)    # continuation
    p = plan(cfg, params, batch=1, frames=500, prefix_frames=150,    # hybrid (a delay-layout
             hybrid=HybridOptions())                                 #  MAGNeT checkpoint)
    p = plan(cfg, params, batch=1, frames=500, prefix_frames=150,    # two-model hybrid (a
             hybrid=HybridOptions(), prefix_cfg=musicgen.cfg)        #  MusicGen prefix)
    codes = run(p, models, cond, seeds=[0], listener=print)

A plan is host data only (no tensors): the AR phase (steps, sequence length), the masked
phase (frames kept, steps per stage, frames fixed per codebook) and the total step count
that progress is measured in. `run` walks it and reports typed events (`events.py`):
`Started`, an `ARStep` per AR step, `PrefixReady` when a hybrid prefix is final, a `StageStep` per masked
step, `Done` at the end. The API, the CLI, the server and every benchmark call these two.
Rescoring is not a mode: it is a confidence hook passed to `run` (`rescoring.BoundRescorer`).
"""
from __future__ import annotations

import dataclasses
import typing as tp

import torch

from magnet_engine.engine import events as ev
from magnet_engine.engine import reference
from magnet_engine.engine.config import DecodingParams, ModelConfig
from magnet_engine.engine.hybrid import (ARParams, ARRuntime, HybridOptions, HybridPlan, delayed_length,
                                         frames_with_prefix, plan_hybrid, revert_delayed, tail_forward)
from magnet_engine.engine.model import MagnetLM
from magnet_engine.engine.schedule import spans_to_generate
from magnet_engine.errors import InvalidOptionError
from magnet_engine.kernels import masking

MODES = ("plain", "prompt", "hybrid", "two_model")
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
    """Masked decoding of every stage over `kept` frames; codebook k's first prompt_lens[k]
    frames are fixed cells (a prompt, or the AR prefix)."""
    kept: int
    steps: tp.Tuple[int, ...]
    prompt_lens: tp.Tuple[int, ...]
    tail: tp.Optional[HybridPlan] = None     # hybrid: decoded in the delay layout over the AR cache


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    engine: str
    batch: int
    frames: int                # T requested
    params: DecodingParams
    ar: tp.Optional[ARPhase]
    masked: MaskedPhase
    rescored: bool

    @property
    def ar_steps(self) -> int:
        return 0 if self.ar is None else self.ar.steps

    @property
    def total_steps(self) -> int:
        """What progress counts: AR steps and masked steps together."""
        return self.ar_steps + sum(self.masked.steps)

    def stage_of(self, done: int) -> tp.Tuple[int, int]:
        """(stage, step in stage) of the masked step that makes `done` steps in total."""
        i = done - self.ar_steps - 1
        for stage, n in enumerate(self.masked.steps):
            if i < n:
                return stage, i
            i -= n
        raise ValueError(f"step {done} is past the plan's {self.total_steps} steps")


def plan(cfg: ModelConfig, params: DecodingParams, *, batch: int, frames: int, prompt_frames: int = 0,
         prefix_frames: int = 0, hybrid: tp.Optional[HybridOptions] = None,
         prefix_cfg: tp.Optional[ModelConfig] = None, rescored: bool = False, rescore_fill: str = "special",
         engine: str = "fast") -> Plan:
    """The phases of one generation, on the host, before any device work.

    prompt_frames: frames of a prompt kept fixed (continuation). prefix_frames: frames of an
    AR prefix (hybrid: the checkpoint's own; with prefix_cfg, a MusicGen / AudioGen model's,
    the two-model hybrid). hybrid: the hand-off and sampling options of the AR phase.
    rescored / rescore_fill: whether a confidence hook (rescoring) runs, and its fill option."""
    if engine not in ENGINES:
        raise InvalidOptionError(f"engine must be one of {ENGINES}, found {engine!r}")
    steps = tuple(params.decoding_steps)
    layout = masking.mode(cfg.span_len, params.span_arrangement)
    kept = spans_to_generate(frames, 0, cfg.span_len, layout == "chunk")[0]
    if prefix_frames and prompt_frames:
        raise InvalidOptionError("hybrid decoding and a prompt are exclusive: the AR prefix is the prompt")
    if not prefix_frames:
        if cfg.pattern != "parallel":
            raise InvalidOptionError(f"a {cfg.pattern}-layout (hybrid-MAGNeT) checkpoint decodes with an AR prefix: "
                                     "prefix_frames must be >= 1")
        mode = "prompt" if prompt_frames else "plain"
        return Plan(mode, engine, batch, frames, params, None,
                    MaskedPhase(kept, steps, (prompt_frames,) * cfg.n_q), rescored)
    if engine != "fast":
        raise InvalidOptionError("hybrid decoding runs on the fast engine only")
    hybrid = (hybrid or HybridOptions()).validate()
    if prefix_cfg is None:
        if not cfg.is_hybrid:
            raise InvalidOptionError("an AR prefix on a plain MAGNeT needs a prefix model (MusicGen / AudioGen): "
                                     "the two-model hybrid")
        if rescore_fill == "greedy":
            raise InvalidOptionError("rescore_fill='greedy' is not supported with hybrid decoding (the delay "
                                     "layout puts each head's frames on other rows); use 'special'")
        tail = plan_hybrid(cfg, frames, prefix_frames, params, hybrid.handoff, hybrid.prefix_attention)
        ar = ARPhase("self", tail.ar_steps, tail.seq_len, prefix_frames, hybrid.ar)
        return Plan("hybrid", engine, batch, frames, params, ar, MaskedPhase(tail.frames, steps, tail.prompt_lens, tail),
                    rescored)
    if (prefix_cfg.n_q, prefix_cfg.card, prefix_cfg.frame_rate) != (cfg.n_q, cfg.card, cfg.frame_rate):
        raise InvalidOptionError(f"prefix model codes (n_q {prefix_cfg.n_q}, card {prefix_cfg.card}, "
                                 f"{prefix_cfg.frame_rate} Hz) do not match MAGNeT's (n_q {cfg.n_q}, "
                                 f"card {cfg.card}, {cfg.frame_rate} Hz)")
    frames_with_prefix(cfg, frames, prefix_frames, params)
    # the staircase completed into a rectangle: max(d) extra steps fix F frames of every codebook
    ar = ARPhase("prefix", prefix_frames + prefix_cfg.max_delay, delayed_length(prefix_frames, prefix_cfg.delays),
                 prefix_frames, hybrid.ar)
    return Plan("two_model", engine, batch, frames, params, ar, MaskedPhase(kept, steps, (prefix_frames,) * cfg.n_q),
                rescored)


@dataclasses.dataclass
class Models:
    """What `run` executes a plan with. runtime: the fast masked runtime (`decoding.Runtime`);
    lm: the fp32 LM (the reference engine's); ar: the AR runtime of the prefix phase (hybrid:
    the same LM's, two-model: the prefix model's)."""
    runtime: tp.Any = None
    lm: tp.Optional[MagnetLM] = None
    ar: tp.Optional[ARRuntime] = None


@torch.no_grad()
def run(p: Plan, models: Models, cond: torch.Tensor, *, seeds: tp.Sequence[int],
        prompt: tp.Optional[torch.Tensor] = None, ar_cond: tp.Optional[torch.Tensor] = None,
        hook=None, listener: tp.Optional[ev.Listener] = None,
        generator: tp.Optional[torch.Generator] = None) -> torch.Tensor:
    """Execute a plan -> codes [B, K, T'].

    cond: [2B, S, D] condition rows (conditional, then null); ar_cond: the prefix model's own
    rows (two-model hybrid); prompt: [B, K, P] fixed codes (mode 'prompt'); hook: a confidence
    hook (rescoring); listener: gets every event; generator: the reference engine's draws."""
    listen = listener or (lambda event: None)
    if len(seeds) != p.batch:
        raise InvalidOptionError(f"expected {p.batch} seeds (one per row), found {len(seeds)}")
    if (prompt is not None) != (p.mode == "prompt"):
        raise InvalidOptionError(f"a '{p.mode}' plan {'needs' if p.mode == 'prompt' else 'takes no'} prompt codes")
    listen(ev.Started(p.total_steps))
    if p.engine == "reference":
        def progress(done: int, total: int) -> None:
            stage, step = p.stage_of(done)
            listen(ev.StageStep(stage, step, p.masked.steps[stage], done, total))
        codes = reference.generate_tokens(models.lm, cond, p.frames, p.params, prompt=prompt, generator=generator,
                                          callback=progress, rescorer=hook)
        listen(ev.Done(codes))
        return codes

    total = p.total_steps
    forward = None
    if p.ar is not None:
        ar_rt = models.ar
        ar_params = p.ar.params

        def ar_progress(done: int, steps: int) -> None:
            listen(ev.ARStep(done - 1, steps, done, total))
        ar = ar_rt.generate(ar_cond if p.mode == "two_model" else cond, p.ar.steps, p.ar.seq_len, ar_params, seeds,
                            callback=ar_progress)
        prompt = revert_delayed(ar.seq, ar_rt.cfg.delays, p.ar.prefix_frames)          # [B, K, F]
        if p.mode == "hybrid":
            for k, n in enumerate(p.masked.prompt_lens):   # cells past a codebook's staircase are not fixed
                prompt[:, k, n:] = ar_rt.cfg.card
            forward = tail_forward(models.runtime, p.masked.tail, ar)
        listen(ev.PrefixReady(prompt[..., :min(p.masked.prompt_lens)].clone()))
    codes = models.runtime.generate(cond, p.frames, p.params, prompt=prompt, seeds=seeds, listener=listen,
                                    prompt_lens=p.masked.prompt_lens if prompt is not None else None,
                                    forward=forward, hook=hook, done_before=p.ar_steps, total=total)
    listen(ev.Done(codes))
    return codes
