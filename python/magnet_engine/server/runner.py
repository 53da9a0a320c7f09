"""Running the service's work on loaded models: the one runner behind the single-process
worker (server.batcher) and the Ray replicas (cluster.MagnetModel). It knows nothing of HTTP:
whoever queued the work turns its events into answers and progress messages (server.jobs).

    Work      what to run, as data (it crosses to a Ray replica, so it pickles):
                GenerateRow   one description of a generate request; rows of equal `key`
                              (BatchKey) may run as one batch, through one generate_tokens +
                              one decode
                Work          the base of everything else, run alone (`key` None): an edit, a
                              streamed run, a speech edit (their routes define them):
                              `run(models, listen, emit) -> result`, where `listen` goes to the
                              engine run it makes and `emit` takes its partial output (Chunk)
    Entry     a piece of work waiting for a runner, and the way back to whoever asked:
                .work    .tag (its request: entries of one request share it)
                .arrived (time.monotonic() when queued)
                .cancelled() -> bool   asked between decoding steps
                .watched() -> bool     its step events should carry the token canvas
                .emit(event)           its run's events, on the runner's thread
    Source    where entries wait, oldest first (server.batcher.EntryQueue):
                .pull(choose, running, block) -> the entries `choose` picked, taken out of
                the source ([] when not blocking and it picked none; None once closed)
    Policy    which entries run together, asked by the runner through its source:
                .choose(waiting, running, now) -> (entries to start now, or [] and the
                seconds after which to ask again (None: when the source changes))
    Runner    Runner(models, max_batch, max_wait_ms, name).serve(source): whenever it has
                room it pulls entries through its policy and runs them.

Events, per entry: Begun; then Step (with Prefix for a hybrid checkpoint's AR prefix, Chunk for
a streamed run's audio), Codec (generate rows: the tokens are done); then one of Finished,
Failed, Cancelled. Step and Codec go to the first entry of each request in a run (one progress
message per request, as its rows share a run), every other event to each entry.

Cancellation: between two decoding steps the runner asks every entry of the run; when all
are cancelled it stops the run there (Cancelled). A run that raises fails all its entries
(Failed); the runner goes on with the next.

The policy is the one place that decides which entries run together, and the runner pulls:
it asks only when it has room. `KeyedBatches` (today's): with nothing running, the oldest
entry and every waiting entry of its key up to max_batch, once max_batch are there or the
oldest has waited max_wait_ms; work without a key alone, at once; nothing joins a running
batch. A continuous-batching policy answers `choose` with `running` non-empty as well: the
entries that join the running rows at the next step boundary, as many as there are free slots
(rows with other parameters or durations included, when the engine takes per-row options).
It plugs in here, with the engine call that admits rows between steps (engine/slots.py): the
runner then pulls without blocking (`block=False`) from its step listener and hands the rows
it gets to the engine; the sources, the entries, the events and everything above them (the
batcher, the Ray replica and ingress) stay as they are.
"""
from __future__ import annotations

import base64
import ctypes
import ctypes.util
import dataclasses
import time
import typing as tp

import torch

from magnet_engine.audio import wav_bytes
from magnet_engine.engine import events
from magnet_engine.engine.config import DecodingParams, rows_per_batch


# ------------------------------------------------------------------------------ work
@dataclasses.dataclass(frozen=True)
class BatchKey:
    """Rows run as one batch only when these are equal. The reference does not mask T5 padding
    in cross-attention, so a row is batch-invariant only among texts of its own token count; its
    random draws depend only on its seed, so a row gets the same tokens alone or batched."""

    params: DecodingParams
    duration: float
    text_tokens: tp.Optional[int]   # None: unconditional row


class Work:
    """Work run alone: `run(models, listen, emit)` on the runner's thread, its return value the
    entry's result. `listen` is the engine listener for the run it makes (`on_event=` /
    `listener=`): it reports progress and raises once every entry is cancelled, which stops the
    run after its current step. `emit` takes partial output (Chunk). Subclasses are frozen
    dataclasses of plain data (tensors included): they pickle to a Ray replica."""

    kind: tp.ClassVar[str] = "task"                 # names the route in metrics and progress
    key: tp.ClassVar[tp.Optional[BatchKey]] = None  # None: never batched
    canvas: tp.ClassVar[bool] = True                # its steps carry the music model's token canvas

    def run(self, models, listen: events.Listener, emit: tp.Callable[["Event"], None]) -> tp.Any:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class GenerateRow:
    """One description of a generate request; its result is its audio, [C, samples]."""

    text: tp.Optional[str]
    seed: int
    key: BatchKey
    kind: tp.ClassVar[str] = "generate"
    canvas: tp.ClassVar[bool] = True


# ------------------------------------------------------------------------------ events
@dataclasses.dataclass(frozen=True)
class Begun:
    batch: tp.Tuple[str, int]   # (runner name, run number): which run it is part of
    batch_size: int             # entries in that run
    rows: int                   # of them, its request's (entries of its tag)


@dataclasses.dataclass(frozen=True)
class Step:
    data: dict   # the `step` progress message: stage, step, stage_steps, done, total [, canvas]


@dataclasses.dataclass(frozen=True)
class Prefix:
    wav: bytes       # a hybrid checkpoint's decoded AR prefix, before the rest of the clip
    seconds: float


@dataclasses.dataclass(frozen=True)
class Chunk:
    index: int       # chunks of a run are numbered from 0; a rerun sends them again from 0
    wav: bytes
    seconds: float


@dataclasses.dataclass(frozen=True)
class Codec:
    """The tokens are done; the codec decodes them."""


@dataclasses.dataclass(frozen=True)
class Finished:
    result: tp.Any
    batch: tp.Tuple[str, int]
    batch_size: int
    timing: dict     # run_ms; a generate row also tokens_ms, codec_ms
    lead: bool       # the first entry of its run: the run is counted once


@dataclasses.dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclasses.dataclass(frozen=True)
class Cancelled:
    """Every entry of the run was cancelled: it stopped after a decoding step."""


Event = tp.Union[Begun, Step, Prefix, Chunk, Codec, Finished, Failed, Cancelled]
TERMINAL = (Finished, Failed, Cancelled)


class Entry(tp.Protocol):
    work: tp.Any
    tag: str
    arrived: float

    def cancelled(self) -> bool: ...

    def watched(self) -> bool: ...

    def emit(self, event: Event) -> None: ...


Choice = tp.Tuple[tp.List[Entry], tp.Optional[float]]


class Source(tp.Protocol):
    def pull(self, choose: tp.Callable[[tp.List[Entry], tp.Sequence[Entry], float], Choice],
             running: tp.Sequence[Entry] = (), block: bool = True) -> tp.Optional[tp.List[Entry]]: ...


# ------------------------------------------------------------------------------ progress messages
def step_data(event: events.Event) -> tp.Optional[dict]:
    """The `step` progress message of a run event (None: not a step)."""
    if isinstance(event, events.ARStep):          # a hybrid checkpoint's AR prefix comes first
        data = {"stage": "prefix", "step": event.step + 1, "stage_steps": event.steps}
    elif isinstance(event, events.StageStep):
        data = {"stage": event.stage, "step": event.step + 1, "stage_steps": event.steps}
    else:
        return None
    return {**data, "done": event.done, "total": event.total}


def canvas_snapshot(event: events.StageStep, row: int, mask_id: int) -> dict:
    """One row's token canvas after a step, one byte per cell, for the demo page's canvas view:
    0 = still masked; 1..255 = fixed, the current codebook's cells shaded by their confidence
    p̂ (1 + 254·p̂), cells fixed before this stage (earlier codebooks, prompt) 255. A 10 s
    clip of 4 codebooks is 2,000 bytes, 2.7 kB as base64."""
    codes = event.canvas[row].cpu()                                   # [K, T]
    cells = torch.full(codes.shape, 255, dtype=torch.uint8)
    p_hat = event.confidence[row].float().cpu().nan_to_num(0.0, posinf=1.0).clamp(0, 1)   # [T]
    cells[event.stage] = (1 + 254 * p_hat).round().to(torch.uint8)
    cells[codes == mask_id] = 0
    return {"codebooks": codes.shape[0], "frames": codes.shape[1],
            "cells": base64.b64encode(cells.numpy().tobytes()).decode("ascii")}


def heap_trimmer() -> tp.Callable[[], None]:
    """glibc's malloc_trim(0) (a no-op elsewhere): hands the freed heap back to the OS. glibc
    keeps freed memory for reuse, and its mmap threshold rises after large frees, so without
    it a burst of long clips or big uploads would hold the process at its peak RSS for good."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


# ------------------------------------------------------------------------------ policy
@dataclasses.dataclass(frozen=True)
class KeyedBatches:
    """Rows of equal BatchKey, started together when the runner is idle (see the module docstring)."""

    max_batch: int
    max_wait_s: float

    def choose(self, waiting: tp.List[Entry], running: tp.Sequence[Entry], now: float) -> Choice:
        if running or not waiting:     # generate_tokens runs a fixed batch: nothing joins it
            return [], None
        first = waiting[0]
        if first.work.key is None:
            return [first], None
        batch = [e for e in waiting if e.work.key == first.work.key][:self.max_batch]
        remaining = first.arrived + self.max_wait_s - now
        if len(batch) >= self.max_batch or remaining <= 0:
            return batch, None
        return [], remaining           # a submit or a cancel asks again sooner


# ------------------------------------------------------------------------------ runner
class _Abandoned(Exception):
    """Every entry of the running batch was cancelled: stop generating."""


class Runner:
    """Runs entries on `models` (server.models.Models: the music model, the speech model), one
    run at a time, on the thread that calls `serve`. name: said in every Begun (a Ray replica's
    id; '' in one process)."""

    def __init__(self, models, max_batch: int, max_wait_ms: float, name: str = ""):
        self.models = models
        # the reference engine's rows are not batch-invariant: it runs one at a time
        self.max_batch = rows_per_batch(getattr(models.music, "engine", None), max_batch)
        self.policy = KeyedBatches(self.max_batch, max_wait_ms / 1000)
        self.name = name
        self.runs = 0
        self.running = 0                 # entries in the run going on now
        self.run_seconds = 1.0           # moving average, for Retry-After
        self.trim_heap = heap_trimmer()

    def serve(self, source: Source) -> None:
        """Until the source closes: pull the next entries through the policy, run them."""
        while True:
            entries = source.pull(self.policy.choose, (), block=True)
            if entries is None:
                return
            self.run(entries)

    def run(self, entries: tp.List[Entry]) -> None:
        started = time.monotonic()
        self.runs += 1
        self.running = len(entries)
        batch = (self.name, self.runs)
        try:
            if entries[0].work.key is None:
                self._run_alone(entries[0], batch)
            else:
                self._run_rows(entries, batch)
        finally:
            self.running = 0
            self.run_seconds = 0.8 * self.run_seconds + 0.2 * (time.monotonic() - started)
            self.trim_heap()   # a few ms against a run of tens of ms at least: memory as before the run

    def _begin(self, entries: tp.List[Entry], batch: tp.Tuple[str, int]) -> tp.List[tp.Tuple[int, Entry]]:
        """Begun to each entry; returns (position, entry) of each request's first entry."""
        tags = [e.tag for e in entries]
        for e in entries:
            e.emit(Begun(batch, len(entries), tags.count(e.tag)))
        return [(i, e) for i, e in enumerate(entries) if tags.index(e.tag) == i]

    def _listener(self, entries: tp.List[Entry], reporters: tp.List[tp.Tuple[int, Entry]],
                  canvas: bool) -> events.Listener:
        mask_id = self.models.music.config.card if canvas else None

        def listen(event: events.Event) -> None:
            """Between decoding steps, on this thread: stop when nobody wants the run any more,
            else tell each request where it is (and, to those watching, its first row's canvas)."""
            if all(e.cancelled() for e in entries):
                raise _Abandoned()
            data = step_data(event)
            if data is None:
                return
            has_canvas = mask_id is not None and isinstance(event, events.StageStep) and event.canvas is not None
            for row, e in reporters:
                watched = has_canvas and e.watched()
                e.emit(Step({**data, "canvas": canvas_snapshot(event, row, mask_id)} if watched else data))
        return listen

    def _run_rows(self, entries: tp.List[Entry], batch: tp.Tuple[str, int]) -> None:
        """Generate rows of one key: one generate_tokens + one decode."""
        model, key = self.models.music, entries[0].work.key
        reporters = self._begin(entries, batch)
        listen = self._listener(entries, reporters, canvas=True)

        def on_prefix(wav: torch.Tensor) -> None:   # hybrid checkpoints: [B, C, prefix samples]
            wav = wav.cpu()
            seconds = round(wav.shape[-1] / model.sample_rate, 3)
            for i, e in enumerate(entries):
                e.emit(Prefix(wav_bytes(wav[i], model.sample_rate), seconds))

        started = time.monotonic()
        try:
            if all(e.cancelled() for e in entries):   # cancelled between being taken and starting
                raise _Abandoned()
            # per-call options: the shared model instance is never reconfigured by a request
            tokens = model.generate_tokens([e.work.text for e in entries], on_event=listen,
                                           seed=[e.work.seed for e in entries], params=key.params,
                                           duration=key.duration, on_prefix=on_prefix)          # [B, K, T]
            tokens_done = time.monotonic()
            for _, e in reporters:
                e.emit(Codec())
            wav = model.decode(tokens).cpu()                                                    # [B, C, samples]
        except _Abandoned:
            for e in entries:
                e.emit(Cancelled())
            return
        except Exception as exc:  # noqa: BLE001 - a failed run fails its entries, not the runner
            for e in entries:
                e.emit(Failed(exc))
            return
        finished = time.monotonic()
        timing = {"tokens_ms": (tokens_done - started) * 1000, "codec_ms": (finished - tokens_done) * 1000,
                  "run_ms": (finished - started) * 1000}
        for i, e in enumerate(entries):   # a copy: a row's audio alone, not a view of the batch's
            e.emit(Finished(wav[i].clone(), batch, len(entries), timing, lead=i == 0))

    def _run_alone(self, entry: Entry, batch: tp.Tuple[str, int]) -> None:
        self._begin([entry], batch)
        listen = self._listener([entry], [(0, entry)], canvas=entry.work.canvas)
        started = time.monotonic()
        try:
            if entry.cancelled():
                raise _Abandoned()
            result = entry.work.run(self.models, listen, entry.emit)
        except _Abandoned:
            entry.emit(Cancelled())
            return
        except Exception as exc:  # noqa: BLE001 - a failed run fails its entry, not the runner
            entry.emit(Failed(exc))
            return
        entry.emit(Finished(result, batch, 1, {"run_ms": (time.monotonic() - started) * 1000}, lead=True))
