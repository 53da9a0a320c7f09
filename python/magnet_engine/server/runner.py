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
batch. `ContinuousBatches` (batching='continuous') answers `choose` with `running` non-empty
as well: generate rows of plain masked decoding (the fast engine, a parallel-layout checkpoint,
one window, no rescoring) run in one slot runtime (engine/slots.py), where rows of any options,
durations and seeds advance together; at each step boundary the runner pulls without blocking
and admits the oldest waiting entry while it is such a row and `SlotRuntime.fits` takes it
(strict arrival order: a row that does not fit, or work of another kind, waits for the slots
to drain, then runs as today). Each row leaves when its last step is done: decoded alone,
Finished at once. Its events are a generate row's, with one Begun per admission (its `batch`
a run number of its own, `batch_size` the rows in the slots after it joined), Step and Codec
to the first live row of its request; a cancelled entry's slot is freed before the next step;
a step that raises fails the rows in the slots. A row's tokens are its solo run's for its
seed (engine/slots.py), which are the grouped run's, so both policies answer a request with
the same audio (tests/test_runner.py).
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


@dataclasses.dataclass(frozen=True)
class ContinuousBatches:
    """Rows that join a slot runtime between steps (see the module docstring). slotted(entry):
    whether it is a row the slots run; fits(entry): whether the slots take it now."""

    keyed: KeyedBatches
    slotted: tp.Callable[[Entry], bool]
    fits: tp.Callable[[Entry], bool]

    def choose(self, waiting: tp.List[Entry], running: tp.Sequence[Entry], now: float) -> Choice:
        if not waiting:
            return [], None
        first = waiting[0]
        if running:   # oldest first: a row that does not fit now is not passed by later ones
            return ([first], None) if self.slotted(first) and self.fits(first) else ([], None)
        if self.slotted(first):   # companions join between steps: no reason to wait for them
            return [first], None
        return self.keyed.choose(waiting, running, now)


BATCHING = ("grouped", "continuous")


def _slots_run(model) -> bool:
    """Whether `model` decodes generate rows in a slot runtime: plain masked decoding on the
    fast engine of a parallel-layout checkpoint (engine/slots.py)."""
    return getattr(model, "engine", None) == "fast" and model.config.pattern == "parallel"


def _reports(live: dict, entry: Entry) -> bool:
    """Whether `entry` is the first live slotted row of its request (it gets the request's Step and Codec)."""
    return next(e for e, _, _ in sorted(live.values(), key=lambda v: v[1][1]) if e.tag == entry.tag) is entry


# ------------------------------------------------------------------------------ runner
class _Abandoned(Exception):
    """Every entry of the running batch was cancelled: stop generating."""


class Runner:
    """Runs entries on `models` (server.models.Models: the music model, the speech model), one
    run at a time, on the thread that calls `serve`. name: said in every Begun (a Ray replica's
    id; '' in one process). batching: 'grouped' (KeyedBatches) or 'continuous' (ContinuousBatches
    over a slot runtime of max_batch rows, one window of frames, `text_len` text tokens, built
    and warmed here, at start-up: its step shapes compiled and captured before any request)."""

    def __init__(self, models, max_batch: int, max_wait_ms: float, name: str = "",
                 batching: str = "grouped", text_len: int = 256):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, found {batching!r}")
        self.models = models
        # the reference engine's rows are not batch-invariant: it runs one at a time
        self.max_batch = rows_per_batch(getattr(models.music, "engine", None), max_batch)
        self.policy = KeyedBatches(self.max_batch, max_wait_ms / 1000)
        self.slots = None                # the slot runtime (continuous batching of a model that slots)
        self.text_len = text_len
        self._plans: tp.Dict[BatchKey, tp.Optional[int]] = {}
        if batching == "continuous":
            self.policy = ContinuousBatches(self.policy, self._slotted, self._fits)
            if _slots_run(models.music):   # in the Batcher's or the Ray replica's constructor: before serving
                self.slots = models.music.slot_runtime(self.max_batch, text_len)
                self.slots.warm()
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
            if isinstance(self.policy, ContinuousBatches) and self._slotted(entries[0]):
                self._run_slots(entries, source)
            else:
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

    # -------------------------------------------------------------------------- continuous
    def _slot_frames(self, key: BatchKey) -> tp.Optional[int]:
        """The frames a row of `key` decodes in the slots, or None when its plan is not one plain
        masked window (the plan is the model's own, as generate_tokens would run it)."""
        if key not in self._plans:
            if len(self._plans) >= 4096:   # keys are per-request options: bound the cache
                self._plans.clear()
            model, frames = self.models.music, None
            if self.slots is not None and (model.rescorer is None or model.rescore.weight == 1.0):
                plan = model.plan(1, key.duration, params=key.params)
                if plan.mode == "plain" and plan.ar is None and len(plan.phases) == 1:
                    frames = plan.phases[0].kept
            self._plans[key] = frames
        return self._plans[key]

    def _slotted(self, entry: Entry) -> bool:
        key = entry.work.key
        return (isinstance(entry.work, GenerateRow) and key is not None and self._slot_frames(key) is not None
                and (key.text_tokens or 1) <= self.text_len)

    def _fits(self, entry: Entry) -> bool:
        key = entry.work.key
        return self.slots.fits(self._slot_frames(key), key.params, key.text_tokens or 1)

    def _run_slots(self, first: tp.List[Entry], source: Source) -> None:
        """Slotted rows until none is left: admit at step boundaries, step, finish each row as it
        leaves (module docstring)."""
        model, slots = self.models.music, self.slots
        mask_id = model.config.card
        live: tp.Dict[int, tp.Tuple[Entry, tp.Tuple[str, int], float]] = {}   # slot -> entry, batch, admitted

        def listener(entry: Entry) -> events.Listener:
            def listen(event: events.Event) -> None:
                data = step_data(event)
                if data is None or not _reports(live, entry):
                    return
                watched = entry.watched() and getattr(event, "canvas", None) is not None
                entry.emit(Step({**data, "canvas": canvas_snapshot(event, 0, mask_id)} if watched else data))
            return listen

        # One run for the slot runtime's whole busy period: a request's rows admitted in it
        # are one batch to the client (one `started`, x-batches 1), as in a grouped run.
        self.runs += 1
        batch = (self.name, self.runs)

        def admit(entry: Entry) -> None:
            started = time.monotonic()
            key = entry.work.key
            try:
                with torch.no_grad():   # [2, S, D]: the row's conditional, then null, as generate_tokens' rows
                    cond = model.conditioner.encode([entry.work.text]).embeds.to(model.device)
                slot = slots.admit(cond, self._slot_frames(key), key.params, entry.work.seed, listener(entry))
            except Exception as exc:  # noqa: BLE001 - a row that cannot start fails alone
                entry.emit(Failed(exc))
                return
            live[slot] = (entry, batch, started)
            self.running = len(live)
            entry.emit(Begun(batch, len(live), sum(e.tag == entry.tag for e, _, _ in live.values())))

        def leave(slot: int, event: Event) -> None:
            entry = live.pop(slot)[0]
            entry.emit(event)

        for entry in first:
            admit(entry)
        try:
            while live:
                for slot in [s for s, (e, _, _) in live.items() if e.cancelled()]:
                    slots.cancel(slot)
                    leave(slot, Cancelled())
                while slots.free:
                    more = source.pull(self.policy.choose, [e for e, _, _ in live.values()], block=False)
                    if not more:
                        break
                    for entry in more:
                        admit(entry)
                if not live:
                    break
                try:
                    done = slots.step()
                except Exception as exc:  # noqa: BLE001 - a failed step fails the rows in the slots, not the runner
                    for slot in list(live):
                        slots.cancel(slot)
                        leave(slot, Failed(exc))
                    break
                for row in done:
                    self._finish(row, live, leave)
                self.running = len(live)
        finally:
            self.running = 0
            self.trim_heap()

    def _finish(self, row, live, leave) -> None:
        """A row that left the slots: its codes decoded alone, its entry Finished (or Failed)."""
        entry, batch, started = live[row.slot]
        if row.error is not None:
            leave(row.slot, Failed(row.error))
            return
        tokens_done = time.monotonic()
        if _reports(live, entry):
            entry.emit(Codec())
        try:
            wav = self.models.music.decode(row.codes).cpu()                                    # [1, C, samples]
        except Exception as exc:  # noqa: BLE001 - fails its row only
            leave(row.slot, Failed(exc))
            return
        finished = time.monotonic()
        timing = {"tokens_ms": (tokens_done - started) * 1000, "codec_ms": (finished - tokens_done) * 1000,
                  "run_ms": (finished - started) * 1000}
        self.run_seconds = 0.8 * self.run_seconds + 0.2 * (finished - started)
        leave(row.slot, Finished(wav[0].clone(), batch, len(live), timing, lead=True))
