"""Dynamic batching: the bounded queue and the one worker thread that runs every job of the service.

Two kinds of job share the queue and its bound. A generate request (`Job`) is split into
rows that the worker batches with compatible rows of other requests. Every other kind of
work (`Task`: an edit, a streamed long-form run, a speech edit) is one queue entry that the
worker runs alone: its inputs differ in shape (a clip, a run of several windows), so it is
never batched, but it waits in the same queue, counts in the same bound and queue depth,
and is cancelled the same way.

A request is split into rows, one per description, which wait in a bounded queue. The
worker takes the oldest row, waits up to `max_wait_ms` (counted from that row's arrival)
for rows it can decode together, up to `max_batch`, and runs them as one `generate_tokens`
+ one `decode`. Rows are compatible when they share decoding params, duration and text
token count: the reference does not mask T5 padding in cross-attention, so a row is
batch-invariant only among texts of its own length. A row's random draws depend only on
its seed, so a request gets the same tokens alone or batched (and the same audio up to one
PCM step: the codec's batched convolutions round a few samples differently).

The worker checks between decoding steps whether anyone still wants the batch: when every
request in it was cancelled (timeout, disconnect), its event listener raises and the model
stops after the current step. A task gets the same listener: its run stops after the step
during which it was cancelled.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import dataclasses
import math
import re
import secrets
import threading
import time
import typing as tp

import torch

from magnet_engine.audio import wav_bytes
from magnet_engine.engine import events
from magnet_engine.engine.config import DecodingParams, rows_per_batch
from magnet_engine.server.metrics import Metrics
from magnet_engine.server.progress import ProgressChannel, ProgressHub
from magnet_engine.server.schema import REQUEST_ID_PATTERN, ApiError, Settings, api_error_from

REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


HTTP_ERROR_TYPES = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 408: "RequestTimeout",
                    413: "PayloadTooLarge", 415: "UnsupportedMediaType", 429: "TooManyRequests",
                    431: "RequestHeaderFieldsTooLarge"}


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


def publish_step(channel: ProgressChannel, event: events.Event, row: int, mask_id: tp.Optional[int]) -> None:
    """A run event as a `step` progress event; with row `row`'s token canvas when someone
    watches the channel and the run has one (mask_id None: it has none)."""
    data = step_data(event)
    if data is None:
        return
    watched = (mask_id is not None and isinstance(event, events.StageStep) and event.canvas is not None
               and channel.subscribers)
    channel.publish("step", {**data, "canvas": canvas_snapshot(event, row, mask_id)} if watched else data)


def step_data(event: events.Event) -> tp.Optional[dict]:
    """The `step` progress event of a run event (None: not a step)."""
    if isinstance(event, events.ARStep):          # a hybrid checkpoint's AR prefix comes first
        data = {"stage": "prefix", "step": event.step + 1, "stage_steps": event.steps}
    elif isinstance(event, events.StageStep):
        data = {"stage": event.stage, "step": event.step + 1, "stage_steps": event.steps}
    else:
        return None
    return {**data, "done": event.done, "total": event.total}


def heap_trimmer() -> tp.Callable[[], None]:
    """glibc's malloc_trim(0) (a no-op elsewhere): hands the freed heap back to the OS. glibc
    keeps freed memory for reuse, and its mmap threshold rises after large frees, so without
    it a burst of long clips or big uploads would hold the process at its peak RSS for good."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


class QueueFull(Exception):
    pass


class _BatchAbandoned(Exception):
    """Every request of the running batch was cancelled: stop generating."""


class TaskCancelled(Exception):
    """A task stopped because nobody wanted its result any more (a stream whose consumers left)."""


@dataclasses.dataclass(frozen=True)
class BatchKey:
    params: DecodingParams
    duration: float
    text_tokens: tp.Optional[int]   # None: unconditional row


class _Queued:
    """What every job has: its progress channel, the future its endpoint awaits, its queue state."""

    kind = "generate"

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, channel: ProgressChannel):
        self.request_id = request_id
        self.loop = loop
        self.channel = channel
        self.future: asyncio.Future = loop.create_future()
        self.enqueued = time.monotonic()
        self.waiting = 0                # entries in the queue, not yet taken by the worker (0 until submitted)
        self.closed = False             # cancelled, failed or done: its remaining entries are dropped
        self.queue_ms: tp.Optional[float] = None

    def resolve(self, result: tp.Any = None, error: tp.Optional[BaseException] = None) -> None:
        def settle():
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self.loop.call_soon_threadsafe(settle)


class Job(_Queued):
    """One generate request: its rows, their results, and the future the endpoint awaits."""

    def __init__(self, request_id: str, texts: tp.List[tp.Optional[str]], keys: tp.List[BatchKey],
                 seed: int, loop: asyncio.AbstractEventLoop, channel: ProgressChannel):
        super().__init__(request_id, loop, channel)
        self.rows = [Row(self, i, text, seed + i, key) for i, (text, key) in enumerate(zip(texts, keys))]
        self.seed = seed
        self.left = len(self.rows)      # rows without a result
        self.wavs: tp.List[tp.Any] = [None] * len(self.rows)
        self.tokens_ms = 0.0
        self.codec_ms = 0.0
        self.batch_sizes: tp.List[int] = []


class Task(_Queued):
    """A job the worker runs alone: `work(listener)` on the worker thread, its result the
    future's. The work passes `listener` to the run it makes (`on_event=` / `listener=`):
    it publishes `step` progress and raises once the task is cancelled, which stops the run
    after its current step. `kind` names the route in metrics and progress ("edit", "stream",
    "speech_edit"). `wanted()`, when given, is asked between steps too: False cancels (a
    streamed run whose consumers all left). mask_id: the run's mask id, when its steps' token
    canvas should go to those watching its progress (as a generate request's)."""

    def __init__(self, request_id: str, kind: str, work: tp.Callable[[events.Listener], tp.Any],
                 loop: asyncio.AbstractEventLoop, channel: ProgressChannel,
                 wanted: tp.Optional[tp.Callable[[], bool]] = None, mask_id: tp.Optional[int] = None):
        super().__init__(request_id, loop, channel)
        self.kind = kind
        self.work = work
        self.wanted = wanted
        self.mask_id = mask_id
        self.rows = [self]              # its one queue entry is itself
        self.job = self
        self.run_ms = 0.0


@dataclasses.dataclass(eq=False)
class Row:
    job: Job
    index: int
    text: tp.Optional[str]
    seed: int
    key: BatchKey


class Batcher:
    """The bounded queue and the one worker thread that runs every job (generate rows batched, tasks alone)."""

    runs_tasks = True   # submit takes `Task`s too (the Ray batcher runs generate rows only)

    def __init__(self, model, settings: Settings):
        self.model = model
        self.settings = settings
        self.metrics = Metrics(self.queue_depth, lambda: self.running, getattr(model, "memory_stats", None))
        self.max_batch = rows_per_batch(getattr(model, "engine", None), settings.max_batch)
        self.cond = threading.Condition()
        self.pending: tp.List[tp.Union[Row, Task]] = []     # FIFO of rows and tasks not yet taken
        self.waiting_jobs = 0               # jobs with at least one row in `pending`
        self.running = 0                    # rows in the batch being generated (a task: 1)
        self.stopping = False
        self.batch_seconds = 1.0            # moving average, for Retry-After
        self.trim_heap = heap_trimmer()
        self.thread = threading.Thread(target=self._loop, name="magnet-generation-worker", daemon=True)

    # --------------------------------------------------------- event-loop side
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, job: tp.Union[Job, Task]) -> None:
        """Queue a job's rows (a task: itself), or raise QueueFull (and leave the queue as it was)."""
        with self.cond:
            if self.waiting_jobs >= self.settings.queue_size:
                raise QueueFull()
            self.pending.extend(job.rows)
            job.waiting = len(job.rows)
            self.waiting_jobs += 1
            # under the lock, so `queued` precedes the worker's `started`
            job.channel.publish("queued", {"request_id": job.request_id, "position": self.waiting_jobs,
                                           "rows": len(job.rows), "kind": job.kind})
            self.cond.notify_all()

    def cancel(self, job: tp.Union[Job, Task]) -> None:
        """Drop a job's queued rows; a running batch whose jobs are all cancelled stops at its next step."""
        with self.cond:
            if job.closed:
                return
            self._close(job)
        self.metrics.cancelled.inc()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def queue_depth(self) -> int:
        with self.cond:
            return self.waiting_jobs

    def retry_after_s(self) -> int:
        with self.cond:
            batches_ahead = self.waiting_jobs / self.max_batch + 1
            return int(min(60, max(1, math.ceil(batches_ahead * self.batch_seconds))))

    def _close(self, job: tp.Union[Job, Task]) -> None:
        """Caller holds `cond`. Only a job that still has queued rows counts in `waiting_jobs`."""
        job.closed = True
        if job.waiting:
            self.pending = [r for r in self.pending if r.job is not job]
            job.waiting = 0
            self.waiting_jobs -= 1
            self.cond.notify_all()

    # --------------------------------------------------------- worker side
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if isinstance(batch[0], Task):
                self._run_task(batch[0])
            else:
                self._run(batch)

    def _next_batch(self) -> tp.Optional[tp.List[tp.Union[Row, Task]]]:
        """Oldest row plus compatible ones, once max_batch are there or the oldest has waited
        max_wait; a task at the head of the queue is taken alone at once."""
        max_batch, max_wait = self.max_batch, self.settings.max_wait_ms / 1000
        with self.cond:
            while True:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return None
                first = self.pending[0]
                if isinstance(first, Task):
                    batch = [first]
                    break
                batch = [r for r in self.pending if isinstance(r, Row) and r.key == first.key][:max_batch]
                remaining = first.job.enqueued + max_wait - time.monotonic()
                if len(batch) >= max_batch or remaining <= 0:
                    break
                self.cond.wait(remaining)  # woken by a submit or a cancel: look again
            taken = set(map(id, batch))
            self.pending = [r for r in self.pending if id(r) not in taken]
            for row in batch:
                row.job.waiting -= 1
                if row.job.waiting == 0:
                    self.waiting_jobs -= 1
            self.running = len(batch)
            return batch

    def _run(self, batch: tp.List[Row]) -> None:
        key = batch[0].key
        jobs = list({id(r.job): r.job for r in batch}.values())
        started = time.monotonic()
        for job in jobs:
            if job.queue_ms is None:
                job.queue_ms = (started - job.enqueued) * 1000
            job.batch_sizes.append(len(batch))
            job.channel.publish("started", {"batch_size": len(batch), "rows": sum(r.job is job for r in batch)})
        first_row = {id(job): next(i for i, r in enumerate(batch) if r.job is job) for job in jobs}

        def on_event(event: events.Event) -> None:
            """Between decoding steps, on this thread: stop when nobody wants the batch any more,
            else tell each request where the run is (and, to those watching, its first row's canvas)."""
            if all(job.closed for job in jobs):
                raise _BatchAbandoned()
            for job in jobs:
                publish_step(job.channel, event, first_row[id(job)], self.model.config.card)

        def on_prefix(wav) -> None:   # hybrid checkpoints: the decoded AR prefix, before the tail exists
            wav = wav.cpu()
            for i, row in enumerate(batch):
                row.job.channel.prefix[row.index] = wav_bytes(wav[i], self.model.sample_rate)
            for job in jobs:
                job.channel.publish("prefix", {"seconds": round(wav.shape[-1] / self.model.sample_rate, 3),
                                               "rows": sorted(r.index for r in batch if r.job is job),
                                               "url": f"/v1/prefix/{job.request_id}"})

        try:
            # per-call options: the shared model instance is never reconfigured by a request
            tokens = self.model.generate_tokens([r.text for r in batch], on_event=on_event,
                                                seed=[r.seed for r in batch], params=key.params,
                                                duration=key.duration, on_prefix=on_prefix)  # [B, K, T]
            tokens_done = time.monotonic()
            for job in jobs:
                job.channel.publish("codec", {})
            wav = self.model.decode(tokens).cpu()                                  # [B, C, samples]
        except _BatchAbandoned:
            self._finish_batch(started)
            return
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the server
            self._fail(jobs, exc)
            self._finish_batch(started)
            return
        finished = time.monotonic()
        self.metrics.batch_done(len(batch))
        with self.cond:
            for job in jobs:
                job.tokens_ms += (tokens_done - started) * 1000
                job.codec_ms += (finished - tokens_done) * 1000
            for i, row in enumerate(batch):
                job = row.job
                job.wavs[row.index] = wav[i]
                job.left -= 1
                if job.left == 0 and not job.closed:
                    job.closed = True
                    job.resolve(result=job.wavs)
        self._finish_batch(started)

    def _run_task(self, task: Task) -> None:
        started = time.monotonic()
        task.queue_ms = (started - task.enqueued) * 1000
        task.channel.publish("started", {"batch_size": 1, "rows": 1, "kind": task.kind})

        def on_event(event: events.Event) -> None:
            """Between the run's steps, on this thread: stop once the task is cancelled or unwanted."""
            if task.closed or (task.wanted is not None and not task.wanted()):
                raise _BatchAbandoned()
            publish_step(task.channel, event, 0, task.mask_id)

        try:
            if task.closed:     # cancelled between being taken and starting
                raise _BatchAbandoned()
            result = task.work(on_event)
        except _BatchAbandoned:
            with self.cond:
                if not task.closed:     # unwanted rather than cancelled by its endpoint
                    self._close(task)
                    task.resolve(error=TaskCancelled(f"{task.kind} {task.request_id} stopped: no longer wanted"))
                    self.metrics.cancelled.inc()
            self._finish_batch(started)
            return
        except Exception as exc:  # noqa: BLE001 - a failed task fails its request, not the server
            self._fail([task], exc)
            self._finish_batch(started)
            return
        task.run_ms = (time.monotonic() - started) * 1000
        self.metrics.task_done(task.kind)
        with self.cond:
            if not task.closed:
                task.closed = True
                task.resolve(result=result)
        self._finish_batch(started)

    def _fail(self, jobs: tp.Sequence[tp.Union[Job, Task]], exc: BaseException) -> None:
        """The run failed: each of its jobs not already closed gets the error."""
        with self.cond:
            for job in jobs:
                if not job.closed:
                    self._close(job)
                    job.resolve(error=exc)

    def _finish_batch(self, started: float) -> None:
        with self.cond:
            self.running = 0
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.monotonic() - started)
        self.trim_heap()    # a few ms against a run of tens of ms at least: after every run, memory as before it


# ------------------------------------------------------------------------------ the routes' side
class ClientGone(Exception):
    """The client closed the connection before its request was answered (499)."""


async def wait_for_job(request, job: _Queued, timeout_s: float) -> tp.Any:
    """The job's result; raises ClientGone when the client goes away, ApiError 504 on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise ApiError(504, "Timeout", f"request not finished within {timeout_s:g} s")
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), min(0.2, remaining))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None


class Jobs:
    """What every route does around the one worker: own a request id, queue a job (503 +
    Retry-After when the queue is full), await it (504 on timeout, 499 when the client
    leaves; either cancels it), and count the answer by route.

    create_app makes one (`app.state.jobs`) and hands it to the edit, stream and speech
    routers. A router mounted on an app of its own, without create_app, makes its own on
    first use (`Jobs.standalone`): one worker thread, default limits."""

    def __init__(self, batcher, hub: ProgressHub, settings: Settings):
        self.batcher, self.hub, self.settings = batcher, hub, settings
        self.metrics = batcher.metrics

    @classmethod
    def standalone(cls) -> "Jobs":
        settings = Settings()
        batcher = Batcher(None, settings)
        batcher.start()
        return cls(batcher, ProgressHub(settings.progress_ttl_s), settings)

    def channel(self, request_id: tp.Optional[str]) -> tp.Tuple[str, ProgressChannel]:
        """(id, progress channel): a client's id is owned by its first POST (409 for a second one
        while it lives), a drawn one is kept out of the hub (nobody can watch an id they do not know)."""
        loop = asyncio.get_running_loop()
        if request_id is None:
            return secrets.token_hex(8), ProgressChannel(loop)
        if not REQUEST_ID.match(request_id):
            raise ApiError(422, "ValidationError", f"'request_id' must match {REQUEST_ID.pattern}")
        return request_id, self.hub.claim(request_id, loop)

    def submit(self, job: _Queued) -> None:
        try:
            self.batcher.submit(job)
        except QueueFull:
            raise ApiError(503, "QueueFull", f"the queue is full ({self.settings.queue_size} requests waiting); "
                           "retry later", headers={"Retry-After": str(self.batcher.retry_after_s())}) from None

    async def run(self, request, job: _Queued, windows: int = 1) -> tp.Any:
        """Queue the job and await its result; on any failure (timeout, disconnect, cancellation) it is cancelled.
        windows: a long-form job's window count; the request timeout bounds one window's generation."""
        self.submit(job)
        try:
            return await wait_for_job(request, job, self.settings.request_timeout_s * windows)
        except BaseException:
            self.batcher.cancel(job)    # a no-op for a job the worker already closed
            raise

    def failed(self, route: str, exc: BaseException, channel: tp.Optional[ProgressChannel]):
        """The answer to a failed request, published on its progress stream and counted."""
        from fastapi.responses import Response
        from starlette.exceptions import HTTPException

        if isinstance(exc, ClientGone):   # nobody reads the answer: the status is for logs and metrics
            if channel is not None:
                channel.publish("error", {"status": 499, "type": "ClientDisconnected", "message": "client left"})
            self.metrics.request_done(499, error="ClientDisconnected", route=route)
            return Response(status_code=499)
        if isinstance(exc, HTTPException):
            exc = ApiError(exc.status_code, HTTP_ERROR_TYPES.get(exc.status_code, "HTTPError"), str(exc.detail),
                           headers=dict(exc.headers or {}))
        err = api_error_from(exc)
        if channel is not None:
            channel.publish("error", err.body())
        self.metrics.request_done(err.status, error=err.kind, route=route)
        return err.response()

    def succeeded(self, route: str, arrived: float, channel: ProgressChannel, data: dict) -> None:
        channel.publish("done", data)
        self.metrics.request_done(200, seconds=time.monotonic() - arrived, route=route)


def jobs_finder(jobs: tp.Optional[Jobs]) -> tp.Callable[[tp.Any], Jobs]:
    """request -> the worker a router's requests go to: the one given, else the app's
    (create_app sets app.state.jobs), else (a router on an app of its own) one of the
    router's, made on first use."""
    own: tp.List[Jobs] = []

    def find(request) -> Jobs:
        if jobs is not None:
            return jobs
        found = getattr(request.app.state, "jobs", None)
        if found is not None:
            return found
        if not own:
            own.append(Jobs.standalone())
        return own[0]
    return find
