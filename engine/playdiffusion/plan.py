"""PlayDiffusion's plan: its unmasking loops (speech inpainting regions, TTS pieces) as host
data, and their run on the `SpeechRuntime`, reporting the engine's typed events.

    p = plan_speech(inpainter.cfg, options, [(text_len, left, target, right), ...])   # one loop each
    units = run_speech(p, SpeechRuntime(inpainter), [(text, left, right), ...], draws)

One `SpeechPhase` per loop (an edit region, a TTS piece) with its host schedule; the run
reports `Started`, a `StageStep` per step (stage 0, `window` = the loop, canvas: the loop's
units [1, 1, P + L + Q], MASK as the codebook size), a `WindowReady` per loop (its L new
units) and `Done` (every loop's new units, [1, 1, ΣL]); a raising listener cancels it after
the current step, as for MAGNeT. `engine.generate.run` dispatches a `SpeechPlan` here, so
the engine's one entry point runs every plan; this module imports nothing of `generate`.
"""
from __future__ import annotations

import dataclasses
import typing as tp

import torch

from magnet_engine.engine import events as ev
from magnet_engine.engine.errors import InvalidOptionError
from magnet_engine.engine.playdiffusion.inpainter import MAX_SEQ_LEN, InpainterConfig
from magnet_engine.engine.playdiffusion.unmasking import Draws, Schedule, SpeechRuntime, UnmaskOptions, make_schedule


@dataclasses.dataclass(frozen=True)
class SpeechPhase:
    """One PlayDiffusion unmasking loop: `target` positions decoded between `left` and `right`
    units of fixed context, conditioned on `text` inner text ids (BOS / EOS not counted)."""
    text: int
    left: int
    target: int
    right: int
    schedule: Schedule

    @property
    def seq_len(self) -> int:
        return self.text + 2 + self.left + self.target + self.right


@dataclasses.dataclass(frozen=True)
class SpeechPlan:
    """PlayDiffusion's loops, in order (an edit's regions, a TTS text's pieces)."""
    options: UnmaskOptions
    phases: tp.Tuple[SpeechPhase, ...]
    mode: str = "speech"

    @property
    def total_steps(self) -> int:
        return sum(phase.schedule.steps_run for phase in self.phases)


def plan_speech(cfg: InpainterConfig, options: UnmaskOptions,
                loops: tp.Sequence[tp.Tuple[int, int, int, int]]) -> SpeechPlan:
    """loops: (inner text ids, left context units, target positions, right context units) of
    each unmasking loop -> the plan: every schedule made, every length checked, on the host."""
    options.check(cfg.codebook_size)
    if not loops:
        raise InvalidOptionError("a speech plan needs at least one unmasking loop")
    phases = []
    for text, left, target, right in loops:
        if target < 1 or min(text, left, right) < 0:
            raise InvalidOptionError(f"an unmasking loop needs >= 1 target position and lengths >= 0, found "
                                     f"text {text}, left {left}, target {target}, right {right}")
        phase = SpeechPhase(text, left, target, right, make_schedule(target, options))
        if phase.seq_len > MAX_SEQ_LEN:
            raise InvalidOptionError(f"an unmasking loop of {phase.seq_len} positions exceeds the inpainter's "
                                     f"maximum of {MAX_SEQ_LEN}")
        phases.append(phase)
    return SpeechPlan(options, tuple(phases))


def run_speech(p: SpeechPlan, runtime: SpeechRuntime, inputs, draws: Draws,
               listener: tp.Optional[ev.Listener] = None) -> tp.Tuple[torch.Tensor, ...]:
    """Each loop of a speech plan on the speech runtime -> units [P + L + Q] of each loop
    (context and filled target). inputs: one (text [Lt'] ids, left [P] units, right [Q]
    units) per loop; draws: the uniforms (`unmasking`: GeneratorDraws, KeyedDraws,
    RecordedDraws); events as the module docstring says."""
    listen = listener or (lambda event: None)
    inputs = list(inputs)
    if len(inputs) != len(p.phases):
        raise InvalidOptionError(f"expected one (text, left, right) per loop ({len(p.phases)}), found {len(inputs)}")
    for phase, (text, left, right) in zip(p.phases, inputs):
        if (text.numel(), left.numel(), right.numel()) != (phase.text, phase.left, phase.right):
            raise InvalidOptionError(f"loop inputs of text {text.numel()}, left {left.numel()}, right "
                                     f"{right.numel()} do not match the plan's {phase.text}, {phase.left}, {phase.right}")
    total = p.total_steps
    listen(ev.Started(total))
    outs, done = [], 0
    for i, (phase, (text, left, right)) in enumerate(zip(p.phases, inputs)):
        units = runtime.generate(phase.schedule, p.options, text, left, right, draws, ev.in_window(listen, i),
                                 done_before=done, total=total)
        listen(ev.WindowReady(i, len(p.phases), units[None, None, phase.left:phase.left + phase.target]))
        outs.append(units)
        done += phase.schedule.steps_run
    listen(ev.Done(torch.cat([u[ph.left:ph.left + ph.target] for u, ph in zip(outs, p.phases)])[None, None]))
    return tuple(outs)
