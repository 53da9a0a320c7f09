"""Typed events reported by a generation run (`engine.generate.run`).

Everything above the engine that wants to watch a run (the API's progress bar, the server's
progress stream and canvas view, the benchmarks' timestamps, streaming) listens to these,
instead of reconstructing stage and step from a bare (done, total) count.

A listener is called on the decoding thread, between steps. Tensors in an event are live
views of the run's static buffers (no copy is made for a listener that does not look): read
or copy them inside the call; reading a CUDA tensor synchronises, so only do it when needed.
A listener that raises stops the run after the current step: that is how a caller cancels
(the exception propagates out of `run`, nothing half-made is returned).
"""
from __future__ import annotations

import dataclasses
import typing as tp

import torch


@dataclasses.dataclass(frozen=True)
class Started:
    """The run begins: the condition is encoded, no step has run. total: steps of the run."""
    total: int


@dataclasses.dataclass(frozen=True)
class ARStep:
    """One autoregressive step of a hybrid prefix. done/total count every step of the run."""
    step: int          # 0-based, within the AR phase
    steps: int         # AR steps in the phase
    done: int
    total: int


@dataclasses.dataclass(frozen=True)
class StageStep:
    """One masked-decoding step. done/total count every step of the run (AR steps included).

    canvas: [B, K, T] the codes after this step (mask id = the checkpoint's card);
    confidence: [B, T] this stage's per-frame confidence p̂ after this step (fixed cells: inf).
    """
    stage: int         # codebook being decoded
    step: int          # 0-based, within the stage
    steps: int         # steps of this stage
    done: int
    total: int
    canvas: tp.Optional[torch.Tensor] = None
    confidence: tp.Optional[torch.Tensor] = None
    window: int = 0    # long-form: which window of the clip


@dataclasses.dataclass(frozen=True)
class PrefixReady:
    """A hybrid run's AR prefix is final: codes [B, K, F] (audio frames, delay reverted)."""
    codes: torch.Tensor


@dataclasses.dataclass(frozen=True)
class WindowReady:
    """Long-form: window `index` of `count` is final; codes [B, K, frames] of that window's new frames."""
    index: int
    count: int
    codes: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Done:
    """The run is complete: codes [B, K, T]."""
    codes: torch.Tensor


Event = tp.Union[Started, ARStep, StageStep, PrefixReady, WindowReady, Done]
Listener = tp.Callable[[Event], None]


def progress_listener(callback: tp.Callable[[int, int], None]) -> Listener:
    """Adapts a (done, total) progress callback to a listener of step events."""
    def listen(event: Event) -> None:
        if isinstance(event, (ARStep, StageStep)):
            callback(event.done, event.total)
    return listen


def in_window(listen: Listener, index: int) -> Listener:
    """A listener that stamps window `index` (a long-form window, a speech loop) on its stage steps."""
    if index == 0:
        return listen

    def stamped(event: Event) -> None:
        listen(dataclasses.replace(event, window=index) if isinstance(event, StageStep) else event)
    return stamped
