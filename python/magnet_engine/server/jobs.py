"""The routes' side of the worker: a request as a job, what its run's events do to it, and what
every route does around the worker.

    Job      a generate request: one Row entry per description; answered once every row has its audio
    Task     any other request (an edit, a streamed run, a speech edit): one entry, its Work run alone
    deliver  (Job.deliver, Task.deliver) a runner event (server.runner) -> the job's progress
             messages, result or error, and the run metrics: the same whether the run was on this
             process's worker (server.batcher) or on a Ray replica (cluster.RayBatcher)
    Jobs     own a request id (409), queue a job (503 + Retry-After), await it (504; 499 when the
             client leaves; either cancels it), answer and count by route
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import threading
import time
import typing as tp

from fastapi.responses import Response
from starlette.exceptions import HTTPException

from magnet_engine.server.batcher import Batcher, QueueFull
from magnet_engine.server.models import Models
from magnet_engine.server.progress import ProgressChannel, ProgressHub
from magnet_engine.server.runner import (Begun, BatchKey, Cancelled, Chunk, Codec, Event, Failed, Finished,
                                         GenerateRow, Prefix, Step, Work)
from magnet_engine.server.schema import REQUEST_ID_PATTERN, ApiError, Settings, api_error_from

REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
HTTP_ERROR_TYPES = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 408: "RequestTimeout",
                    413: "PayloadTooLarge", 415: "UnsupportedMediaType", 429: "TooManyRequests",
                    431: "RequestHeaderFieldsTooLarge"}


class ClientGone(Exception):
    """The client closed the connection before its request was answered (499)."""


class TaskCancelled(Exception):
    """A run stopped because nobody wanted its result any more."""


def error_answer(exc: BaseException) -> ApiError:
    """The HTTP answer to a failed request (bad input 400, bad option 422, the status of an
    HTTPException a route or a work raised, anything else 500)."""
    if isinstance(exc, HTTPException):
        return ApiError(exc.status_code, HTTP_ERROR_TYPES.get(exc.status_code, "HTTPError"), str(exc.detail),
                        headers=dict(exc.headers or {}))
    return api_error_from(exc)


class _Queued:
    """What every job has: its progress channel, the future its route awaits, what its runs told it."""

    kind = "generate"

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, channel: ProgressChannel):
        self.request_id = request_id
        self.loop = loop
        self.channel = channel
        self.future: asyncio.Future = loop.create_future()
        self.enqueued = time.monotonic()
        self.closed = False             # answered, failed or cancelled: later events are dropped
        self.lock = threading.Lock()    # events arrive on the worker thread, cancellation on the event loop
        self.queue_ms: tp.Optional[float] = None
        self.batches: tp.Set[tp.Tuple[str, int]] = set()   # the runs it was part of: (runner, run)
        self.batch_sizes: tp.List[int] = []
        self.headers: tp.Dict[str, str] = {}   # added to its answer by the transport (Ray: replicas, retries)
        self.metrics = None             # the service's, set when Jobs queues it: its runs count there

    @property
    def entries(self) -> tp.List[tp.Any]:
        raise NotImplementedError

    def close(self) -> bool:
        """Close it; False when it already was."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            return True

    def fail(self, error: BaseException) -> bool:
        if not self.close():
            return False
        self.resolve(error=error)
        return True

    def resolve(self, result: tp.Any = None, error: tp.Optional[BaseException] = None) -> None:
        def settle():
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self.loop.call_soon_threadsafe(settle)

    def deliver(self, index: int, event: Event) -> None:
        """A runner event of entry `index`, on any thread: progress messages on the job's
        channel, its result or error, the run counted in the metrics."""
        if isinstance(event, Finished) and event.lead and self.metrics is not None:
            self._count(event)      # the run happened, whether or not anyone still wants it
        with self.lock:
            if self.closed:
                return
            if isinstance(event, Begun):
                if self.queue_ms is None:
                    self.queue_ms = (time.monotonic() - self.enqueued) * 1000
                if event.batch not in self.batches:   # a request's rows in one run: one `started`
                    self.batches.add(event.batch)
                    self.batch_sizes.append(event.batch_size)
                    started = {"batch_size": event.batch_size, "rows": event.rows, "kind": self.kind}
                    if event.batch[0]:
                        started["replica"] = event.batch[0]
                    self.channel.publish("started", started)
            elif isinstance(event, Step):
                self.channel.publish("step", event.data)
            elif isinstance(event, Prefix):
                self.channel.prefix[index] = event.wav
                self.channel.publish("prefix", {"seconds": event.seconds, "rows": [index],
                                                "url": f"/v1/prefix/{self.request_id}"})
            elif isinstance(event, Chunk):
                self._chunk(event)
            elif isinstance(event, Codec):
                self.channel.publish("codec", {})
            elif isinstance(event, Finished):
                self._finished(index, event)
            elif isinstance(event, Failed):
                self.closed = True
                self.resolve(error=event.error)
            elif isinstance(event, Cancelled):
                self.closed = True
                self.resolve(error=TaskCancelled(f"{self.kind} {self.request_id} stopped: no longer wanted"))

    def _chunk(self, event: Chunk) -> None:
        raise TypeError(f"a {self.kind} run sent a chunk")

    def _finished(self, index: int, event: Finished) -> None:   # with the lock held
        raise NotImplementedError

    def _count(self, event: Finished) -> None:
        raise NotImplementedError


class Job(_Queued):
    """One generate request: its rows, their audio, the future its route awaits."""

    def __init__(self, request_id: str, texts: tp.List[tp.Optional[str]], keys: tp.List[BatchKey],
                 seed: int, loop: asyncio.AbstractEventLoop, channel: ProgressChannel):
        super().__init__(request_id, loop, channel)
        self.rows = [Row(self, i, GenerateRow(text, seed + i, key)) for i, (text, key) in enumerate(zip(texts, keys))]
        self.seed = seed
        self.left = len(self.rows)      # rows without audio
        self.wavs: tp.List[tp.Any] = [None] * len(self.rows)
        self.tokens_ms = 0.0
        self.codec_ms = 0.0
        self.timed: tp.Set[tp.Tuple[str, int]] = set()   # runs whose time is counted

    @property
    def entries(self) -> tp.List["Row"]:
        return self.rows

    def _finished(self, index: int, event: Finished) -> None:
        if event.batch not in self.timed:   # a request's rows in one run count its time once
            self.timed.add(event.batch)
            self.tokens_ms += event.timing["tokens_ms"]
            self.codec_ms += event.timing["codec_ms"]
        if self.wavs[index] is None:
            self.wavs[index] = event.result
            self.left -= 1
        if self.left == 0:
            self.closed = True
            self.resolve(result=self.wavs)

    def _count(self, event: Finished) -> None:
        self.metrics.batch_done(event.batch_size)


@dataclasses.dataclass(eq=False)
class Row:
    """A generate row waiting for the runner (server.runner.Entry)."""

    job: Job
    index: int
    work: GenerateRow

    @property
    def tag(self) -> str:
        return self.job.request_id

    @property
    def arrived(self) -> float:
        return self.job.enqueued

    def cancelled(self) -> bool:
        return self.job.closed

    def watched(self) -> bool:
        return bool(self.job.channel.subscribers)

    def emit(self, event: Event) -> None:
        self.job.deliver(self.index, event)


class Task(_Queued):
    """A request whose work runs alone (server.runner.Work), and its own queue entry.

    on_chunk: what to do with the work's partial output (a streamed run's chunks), on the
    thread that delivers it."""

    index = 0

    def __init__(self, request_id: str, work: Work, loop: asyncio.AbstractEventLoop, channel: ProgressChannel,
                 on_chunk: tp.Optional[tp.Callable[[Chunk], None]] = None):
        super().__init__(request_id, loop, channel)
        self.kind = work.kind
        self.work = work
        self.on_chunk = on_chunk
        self.run_ms = 0.0

    @property
    def entries(self) -> tp.List["Task"]:
        return [self]

    @property
    def job(self) -> "Task":
        return self

    @property
    def tag(self) -> str:
        return self.request_id

    @property
    def arrived(self) -> float:
        return self.enqueued

    def cancelled(self) -> bool:
        return self.closed

    def watched(self) -> bool:
        return bool(self.channel.subscribers)

    def emit(self, event: Event) -> None:
        self.deliver(0, event)

    def _chunk(self, event: Chunk) -> None:
        if self.on_chunk is None:
            super()._chunk(event)
        self.on_chunk(event)

    def _finished(self, index: int, event: Finished) -> None:
        self.run_ms = event.timing["run_ms"]
        self.closed = True
        self.resolve(result=event.result)

    def _count(self, event: Finished) -> None:
        self.metrics.task_done(self.kind)


# ------------------------------------------------------------------------------ the routes' side
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
    """What every route does around the worker: own a request id, queue a job (503 +
    Retry-After when the queue is full), await it (504 on timeout, 499 when the client
    leaves; either cancels it), and count the answer by route.

    create_app makes one (`app.state.jobs`) and hands it to every router. A router mounted on
    an app of its own, without create_app, makes its own on first use (`Jobs.standalone`):
    one worker thread on its model, default limits. `batcher`: server.batcher.Batcher, or
    anything with its interface (cluster.RayBatcher)."""

    def __init__(self, batcher, hub: ProgressHub, settings: Settings):
        self.batcher, self.hub, self.settings = batcher, hub, settings
        self.metrics = batcher.metrics

    @classmethod
    def standalone(cls, models: Models) -> "Jobs":
        settings = Settings()
        batcher = Batcher(models, settings)
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
        job.metrics = self.metrics
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
            self.batcher.cancel(job)    # a no-op for a job already closed
            raise

    def failed(self, route: str, exc: BaseException, channel: tp.Optional[ProgressChannel]):
        """The answer to a failed request, published on its progress stream and counted."""
        if isinstance(exc, ClientGone):   # nobody reads the answer: the status is for logs and metrics
            if channel is not None:
                channel.publish("error", {"status": 499, "type": "ClientDisconnected", "message": "client left"})
            self.metrics.request_done(499, error="ClientDisconnected", route=route)
            return Response(status_code=499)
        err = error_answer(exc)
        if channel is not None:
            channel.publish("error", err.body())
        self.metrics.request_done(err.status, error=err.kind, route=route)
        return err.response()

    def succeeded(self, route: str, arrived: float, channel: ProgressChannel, data: dict) -> None:
        channel.publish("done", data)
        self.metrics.request_done(200, seconds=time.monotonic() - arrived, route=route)


def jobs_finder(jobs: tp.Optional[Jobs], models: Models) -> tp.Callable[[tp.Any], Jobs]:
    """request -> the Jobs a router's requests go to: the one given, else the app's
    (create_app sets app.state.jobs), else (a router on an app of its own) one of the
    router's on `models`, made on first use."""
    own: tp.List[Jobs] = []

    def find(request) -> Jobs:
        if jobs is not None:
            return jobs
        found = getattr(request.app.state, "jobs", None)
        if found is not None:
            return found
        if not own:
            own.append(Jobs.standalone(models))
        return own[0]
    return find
