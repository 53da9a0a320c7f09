"""`magnet-engine serve`: an HTTP service with dynamic batching, and the demo page.

    magnet-engine serve                                   # embedded random-weight demo model
    magnet-engine serve --model facebook/magnet-small-10secs --max-batch 8

One generation worker (a thread) owns the model. A request is split into rows, one per
description, which wait in a bounded queue. The worker takes the oldest row, waits up to
`max_wait_ms` (counted from that row's arrival) for rows it can decode together, up to
`max_batch`, and runs them as one `generate_tokens` + one `decode`. Rows are compatible
when they share decoding params, duration and text token count: the reference does not
mask T5 padding in cross-attention, so a row is batch-invariant only among texts of its
own length. A row's random draws depend only on its seed, so a request gets the same
audio alone or batched.

Endpoints:
  POST /v1/generate          JSON -> audio/wav (one description) | application/zip of wavs (several)
  GET  /v1/progress/{id}     server-sent events: queued, started, step, codec, done | error
  GET  /v1/model             model facts, option defaults and server limits
  GET  /healthz              liveness of the worker
  GET  /metrics              Prometheus text exposition
  GET  /                     the demo page (static/)
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import math
import secrets
import sys
import threading
import time
import typing as tp
import zipfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from magnet_engine.audio import wav_bytes
from magnet_engine.cli import DEFAULT_CACHE
from magnet_engine.engine.config import SPAN_ARRANGEMENTS, SPAN_SCORINGS, DecodingParams
from magnet_engine.errors import InvalidInputError, InvalidOptionError, MagnetEngineError

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_SEED = 2 ** 62  # the API needs seed + row < 2**63; a request has far fewer rows than this margin
TERMINAL_EVENTS = ("done", "error")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Server limits. `max_duration` None: the model's trained length."""

    max_batch: int = 8               # rows per generation batch, and descriptions per request
    max_wait_ms: float = 20.0        # how long the oldest row waits for batch companions
    queue_size: int = 64             # requests waiting (not yet started) before 503
    max_text_chars: int = 500
    max_duration: tp.Optional[float] = None
    request_timeout_s: float = 300.0  # queue + generation, then 504
    progress_ttl_s: float = 60.0      # how long finished progress streams stay replayable
    note: str = ""                    # shown by the demo page (e.g. "random weights: noise")


# ------------------------------------------------------------------------------ request body
class GenerateRequest(BaseModel):
    """POST /v1/generate body. Omitted options take MAGNeT.set_generation_params defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    description: tp.Optional[str] = None
    descriptions: tp.Optional[tp.List[tp.Optional[str]]] = None
    duration: tp.Optional[float] = None
    seed: tp.Optional[int] = Field(None, ge=0, lt=MAX_SEED)
    use_sampling: tp.Optional[bool] = None
    top_k: tp.Optional[int] = None
    top_p: tp.Optional[float] = None
    temperature: tp.Optional[float] = None
    max_cfg_coef: tp.Optional[float] = None
    min_cfg_coef: tp.Optional[float] = None
    decoding_steps: tp.Optional[tp.List[int]] = None
    span_arrangement: tp.Optional[str] = None
    span_scoring: tp.Optional[str] = None
    anneal_temp: tp.Optional[bool] = None
    request_id: tp.Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")


OPTION_FIELDS = ("use_sampling", "top_k", "top_p", "temperature", "max_cfg_coef", "min_cfg_coef",
                 "decoding_steps", "span_arrangement", "span_scoring", "anneal_temp")


class ApiError(Exception):
    """An HTTP error answered as JSON {"error": {"status", "type", "message"}}."""

    def __init__(self, status: int, kind: str, message: str, headers: tp.Optional[dict] = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"status": self.status, "type": self.kind, "message": self.message}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def api_error_from(exc: BaseException) -> ApiError:
    """Map an exception to its HTTP answer: bad input 400, bad option 422, anything else 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidInputError):
        return ApiError(400, type(exc).__name__, str(exc))
    if isinstance(exc, InvalidOptionError):
        return ApiError(422, type(exc).__name__, str(exc))
    return ApiError(500, type(exc).__name__, f"generation failed: {exc}")


def describe_validation_error(exc: ValidationError) -> str:
    """Pydantic errors -> one line naming each offending field."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{field}' (allowed: {', '.join(GenerateRequest.model_fields)})")
        else:
            parts.append(f"'{field}': {err['msg']}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ metrics
class Histogram:
    def __init__(self, buckets: tp.Sequence[float]):
        self.buckets = list(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> tp.List[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """Counters and histograms, updated from the event loop and the worker thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: tp.Dict[str, int] = {}      # HTTP status -> count
        self.errors: tp.Dict[str, int] = {}        # error type -> count
        self.latency = Histogram([0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
        self.batch_size = Histogram([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64])
        self.batches = 0                           # generation loops run (one generate_tokens each)
        self.rows = 0
        self.cancelled = 0

    def request_done(self, status: int, seconds: tp.Optional[float] = None, error: tp.Optional[str] = None) -> None:
        with self.lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1
            if seconds is not None:
                self.latency.observe(seconds)
            if error is not None:
                self.errors[error] = self.errors.get(error, 0) + 1

    def batch_done(self, size: int) -> None:
        with self.lock:
            self.batches += 1
            self.rows += size
            self.batch_size.observe(size)

    def render(self, queue_depth: int, running: int) -> str:
        def family(name, kind, doc):
            return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        with self.lock:
            out = family("magnet_requests_total", "counter", "Generate requests answered, by HTTP status.")
            out += [f'magnet_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            out += family("magnet_errors_total", "counter", "Failed generate requests, by error type.")
            out += [f'magnet_errors_total{{type="{t}"}} {n}' for t, n in sorted(self.errors.items())]
            out += family("magnet_request_duration_seconds", "histogram",
                          "Latency of successful generate requests, arrival to audio.")
            out += self.latency.lines("magnet_request_duration_seconds")
            out += family("magnet_queue_depth", "gauge", "Requests waiting for the generation worker.")
            out += [f"magnet_queue_depth {queue_depth}"]
            out += family("magnet_running_rows", "gauge", "Rows in the batch being generated now.")
            out += [f"magnet_running_rows {running}"]
            out += family("magnet_batch_size", "histogram", "Rows per generation batch.")
            out += self.batch_size.lines("magnet_batch_size")
            out += family("magnet_batches_total", "counter", "Generation loops run (one per batch).")
            out += [f"magnet_batches_total {self.batches}"]
            out += family("magnet_rows_total", "counter", "Rows (descriptions) generated.")
            out += [f"magnet_rows_total {self.rows}"]
            out += family("magnet_cancelled_total", "counter", "Requests cancelled by disconnect or timeout.")
            out += [f"magnet_cancelled_total {self.cancelled}"]
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ progress
class ProgressChannel:
    """The events of one request_id, replayed to late subscribers.

    A subscriber may connect before the POST arrives (the page opens the stream first),
    so a channel exists from whichever comes first. Only the latest `step` is kept.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.events: tp.List[tp.Tuple[str, dict]] = []
        self.subscribers: tp.List[asyncio.Queue] = []
        self.claimed = False            # a POST owns this id
        self.created = time.monotonic()
        self.finished: tp.Optional[float] = None
        self.prefix: tp.Dict[int, bytes] = {}   # hybrid: row index -> the AR prefix as a wav, served early

    def publish(self, kind: str, data: dict) -> None:
        """Any thread."""
        with self.lock:
            if self.finished is not None:
                return
            if kind == "step" and self.events and self.events[-1][0] == "step":
                self.events[-1] = (kind, data)
            else:
                self.events.append((kind, data))
            if kind in TERMINAL_EVENTS:
                self.finished = time.monotonic()
            subscribers = list(self.subscribers)
        for queue in subscribers:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                self.loop.call_soon_threadsafe(queue.put_nowait, (kind, data))

    def subscribe(self) -> tp.Tuple[asyncio.Queue, tp.List[tp.Tuple[str, dict]]]:
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            self.subscribers.append(queue)
            return queue, list(self.events)

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self.lock:
            self.subscribers.remove(queue)


class ProgressHub:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self.lock = threading.Lock()
        self.channels: tp.Dict[str, ProgressChannel] = {}

    def claim(self, request_id: str, loop) -> ProgressChannel:
        """The POST's channel; a second POST with a live id is a conflict."""
        with self.lock:
            self._purge()
            channel = self.channels.get(request_id)
            if channel is not None and channel.claimed:
                raise ApiError(409, "Conflict", f"request_id {request_id!r} is already in use")
            channel = channel or ProgressChannel(loop)
            channel.claimed = True
            self.channels[request_id] = channel
            return channel

    def get(self, request_id: str) -> tp.Optional[ProgressChannel]:
        with self.lock:
            return self.channels.get(request_id)

    def watch(self, request_id: str, loop) -> ProgressChannel:
        with self.lock:
            self._purge()
            return self.channels.setdefault(request_id, ProgressChannel(loop))

    def _purge(self) -> None:
        now = time.monotonic()
        for key, ch in list(self.channels.items()):
            stale = ch.finished is not None and now - ch.finished > self.ttl_s
            orphan = not ch.claimed and now - ch.created > self.ttl_s
            if stale or (orphan and not ch.subscribers):
                del self.channels[key]


# ------------------------------------------------------------------------------ batching
def step_event(steps: tp.Sequence[int], done: int, total: int) -> dict:
    """The progress event of generation step `done` of `total` (the `progress` callback's
    arguments) for a row decoded with `decoding_steps` = steps."""
    prefix_steps = total - sum(steps)          # AR steps of a hybrid checkpoint come first
    if done <= prefix_steps:
        return {"stage": "prefix", "step": done, "stage_steps": prefix_steps, "done": done, "total": total}
    masked = done - prefix_steps
    stage = next(s for s in range(len(steps)) if masked <= sum(steps[:s + 1]))
    return {"stage": stage, "step": masked - sum(steps[:stage]), "stage_steps": steps[stage],
            "done": done, "total": total}


class QueueFull(Exception):
    pass


class _BatchAbandoned(Exception):
    """Every request of the running batch was cancelled: stop generating."""


@dataclasses.dataclass(frozen=True)
class BatchKey:
    params: DecodingParams
    duration: float
    text_tokens: tp.Optional[int]   # None: unconditional row


class Job:
    """One generate request: its rows, their results, and the future the endpoint awaits."""

    def __init__(self, request_id: str, texts: tp.List[tp.Optional[str]], keys: tp.List[BatchKey],
                 seed: int, loop: asyncio.AbstractEventLoop, channel: ProgressChannel):
        self.request_id = request_id
        self.rows = [Row(self, i, text, seed + i, key) for i, (text, key) in enumerate(zip(texts, keys))]
        self.seed = seed
        self.loop = loop
        self.channel = channel
        self.future: asyncio.Future = loop.create_future()
        self.enqueued = time.monotonic()
        self.waiting = len(self.rows)   # rows not yet taken by the worker
        self.left = len(self.rows)      # rows without a result
        self.wavs: tp.List[tp.Any] = [None] * len(self.rows)
        self.closed = False             # cancelled, failed or done: its remaining rows are dropped
        self.queue_ms: tp.Optional[float] = None
        self.tokens_ms = 0.0
        self.codec_ms = 0.0
        self.batch_sizes: tp.List[int] = []

    def resolve(self, result: tp.Any = None, error: tp.Optional[BaseException] = None) -> None:
        def settle():
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self.loop.call_soon_threadsafe(settle)


@dataclasses.dataclass(eq=False)
class Row:
    job: Job
    index: int
    text: tp.Optional[str]
    seed: int
    key: BatchKey


class Batcher:
    """The bounded queue and the one worker thread that owns the model."""

    def __init__(self, model, settings: Settings, metrics: Metrics):
        self.model = model
        self.settings = settings
        self.metrics = metrics
        # The reference loop draws every row from one generator seeded with the first row's
        # seed, so its rows are not batch-invariant: it generates one row at a time.
        self.max_batch = 1 if getattr(model, "engine", None) == "reference" else settings.max_batch
        self.cond = threading.Condition()
        self.pending: tp.List[Row] = []     # FIFO of rows not yet taken
        self.waiting_jobs = 0               # jobs with at least one row in `pending`
        self.running = 0                    # rows in the batch being generated
        self.stopping = False
        self.batch_seconds = 1.0            # moving average, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="magnet-generation-worker", daemon=True)

    # --------------------------------------------------------- event-loop side
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a job's rows, or raise QueueFull."""
        with self.cond:
            if self.waiting_jobs >= self.settings.queue_size:
                raise QueueFull()
            self.pending.extend(job.rows)
            self.waiting_jobs += 1
            # under the lock, so `queued` precedes the worker's `started`
            job.channel.publish("queued", {"request_id": job.request_id, "position": self.waiting_jobs,
                                           "rows": len(job.rows)})
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job's queued rows; a running batch whose jobs are all cancelled stops at its next step."""
        with self.cond:
            if job.closed:
                return
            self._close(job)
        with self.metrics.lock:
            self.metrics.cancelled += 1

    def alive(self) -> bool:
        return self.thread.is_alive()

    def queue_depth(self) -> int:
        with self.cond:
            return self.waiting_jobs

    def retry_after_s(self) -> int:
        with self.cond:
            batches_ahead = self.waiting_jobs / self.max_batch + 1
            return int(min(60, max(1, math.ceil(batches_ahead * self.batch_seconds))))

    def _close(self, job: Job) -> None:
        """Caller holds `cond`."""
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
            self._run(batch)

    def _next_batch(self) -> tp.Optional[tp.List[Row]]:
        """Oldest row plus compatible ones, once max_batch are there or the oldest has waited max_wait."""
        max_batch, max_wait = self.max_batch, self.settings.max_wait_ms / 1000
        with self.cond:
            while True:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return None
                first = self.pending[0]
                batch = [r for r in self.pending if r.key == first.key][:max_batch]
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

        def progress(done: int, total: int) -> None:
            if all(job.closed for job in jobs):
                raise _BatchAbandoned()
            event = step_event(key.params.decoding_steps, done, total)
            for job in jobs:
                job.channel.publish("step", event)

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
            tokens = self.model.generate_tokens([r.text for r in batch], progress=progress,
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
            with self.cond:
                for job in jobs:
                    if not job.closed:
                        self._close(job)
                        job.resolve(error=exc)
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

    def _finish_batch(self, started: float) -> None:
        with self.cond:
            self.running = 0
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.monotonic() - started)


# ------------------------------------------------------------------------------ the app
def text_token_count(model, text: tp.Optional[str]) -> tp.Optional[int]:
    """Length of a description's T5 token sequence (EOS included); None for no text."""
    if text is None:
        return None
    return int(model.conditioner.tokenize([text])[0].shape[-1])


def check_duration(model, settings: Settings, duration: tp.Optional[float]) -> float:
    """The request's duration (default: the longest allowed), validated by the model."""
    limit = min(model.max_duration, settings.max_duration or model.max_duration)
    return limit if duration is None else model.check_duration(duration, limit=limit)


def parse_request(model, settings: Settings, body: GenerateRequest):
    """Validated (texts, params, duration); raises InvalidInputError / InvalidOptionError."""
    if (body.description is None) == (body.descriptions is None):
        raise InvalidInputError("give exactly one of 'description' (a string) or 'descriptions' (a list)")
    texts = [body.description] if body.descriptions is None else body.descriptions
    if not texts:
        raise InvalidInputError("'descriptions' must not be empty")
    if len(texts) > settings.max_batch:
        raise InvalidInputError(f"at most {settings.max_batch} descriptions per request, found {len(texts)}")
    for i, text in enumerate(texts):
        if text is not None and len(text) > settings.max_text_chars:
            raise InvalidInputError(f"description {i} has {len(text)} characters; the limit is "
                                    f"{settings.max_text_chars}")
    options = {name: getattr(body, name) for name in OPTION_FIELDS if getattr(body, name) is not None}
    params = DecodingParams().replace(**options).validate(model.cfg.n_q)
    return texts, params, check_duration(model, settings, body.duration)


def model_info(model, settings: Settings, max_batch: int) -> dict:
    return {
        "name": model.name,
        "engine": model.engine,
        "device": str(model.device),
        "sample_rate": model.sample_rate,
        "frame_rate": model.frame_rate,
        "channels": model.cfg.channels,
        "n_q": model.cfg.n_q,
        "hybrid": model.cfg.is_hybrid,   # AR prefix first: progress events with stage "prefix"
        "max_duration": check_duration(model, settings, None),
        "defaults": {**dataclasses.asdict(DecodingParams()), "duration": check_duration(model, settings, None)},
        "choices": {"span_arrangement": list(SPAN_ARRANGEMENTS), "span_scoring": list(SPAN_SCORINGS)},
        "limits": {"max_descriptions": settings.max_batch, "max_text_chars": settings.max_text_chars,
                   "max_batch": max_batch, "queue_size": settings.queue_size,
                   "request_timeout_s": settings.request_timeout_s},
        "note": settings.note,
    }


def zip_of_wavs(blobs: tp.List[bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # PCM barely compresses
        for i, blob in enumerate(blobs):
            zf.writestr(f"sample_{i}.wav", blob)
    return buf.getvalue()


def sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def wait_for_job(request: Request, job: Job, timeout_s: float) -> tp.List[tp.Any]:
    """The job's wavs; cancels it when the client goes away (None) or on timeout (504)."""
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
                return None


def create_app(model, settings: tp.Optional[Settings] = None, batcher_factory=None) -> FastAPI:
    """The service around a loaded MAGNeT (anything with its interface); starts the worker on startup.

    batcher_factory(model, settings, metrics): what runs the jobs, with Batcher's interface
    (default: Batcher, one worker thread on this process's model; magnet_engine.cluster
    passes one that sends rows to Ray Serve replicas)."""
    settings = settings or Settings()
    metrics = Metrics()
    batcher = (batcher_factory or Batcher)(model, settings, metrics)
    hub = ProgressHub(settings.progress_ttl_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="magnet-engine", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.settings, app.state.hub = batcher, metrics, settings, hub

    @app.post("/v1/generate", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()}}}})
    async def generate(request: Request):
        arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        channel = job = None
        try:
            try:
                raw = json.loads(await request.body())
            except ValueError as exc:
                raise ApiError(400, "InvalidJSON", f"body is not valid JSON: {exc}") from exc
            if isinstance(raw, dict) and isinstance(raw.get("request_id"), str):
                channel = hub.get(raw["request_id"])  # someone already watches: tell them about errors too
            try:
                body = GenerateRequest.model_validate(raw)
            except ValidationError as exc:
                raise ApiError(422, "ValidationError", describe_validation_error(exc)) from exc
            texts, params, duration = parse_request(model, settings, body)
            keys = [BatchKey(params, duration, text_token_count(model, t)) for t in texts]
            if body.request_id is None:  # nobody can watch an id they do not know: keep it out of the hub
                request_id, channel = secrets.token_hex(8), ProgressChannel(loop)
            else:
                request_id, channel = body.request_id, hub.claim(body.request_id, loop)
            seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
            job = Job(request_id, texts, keys, seed, loop, channel)
            try:
                batcher.submit(job)
            except QueueFull:
                raise ApiError(503, "QueueFull", f"the queue is full ({settings.queue_size} requests waiting); "
                               "retry later", headers={"Retry-After": str(batcher.retry_after_s())}) from None
            wavs = await wait_for_job(request, job, settings.request_timeout_s)
            if wavs is None:  # the client went away: free its place
                batcher.cancel(job)
                channel.publish("error", {"status": 499, "type": "ClientDisconnected", "message": "client left"})
                metrics.request_done(499, error="ClientDisconnected")
                return Response(status_code=499)
            blobs = await asyncio.to_thread(lambda: [wav_bytes(w, model.sample_rate) for w in wavs])
        except asyncio.CancelledError:
            if job is not None:
                batcher.cancel(job)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered as JSON
            if job is not None:
                batcher.cancel(job)  # on timeout; a no-op for a job the worker already closed
            err = api_error_from(exc)
            if channel is not None:
                channel.publish("error", {"status": err.status, "type": err.kind, "message": err.message})
            metrics.request_done(err.status, error=err.kind)
            return err.response()

        timing = {"queue_ms": round(job.queue_ms, 1), "tokens_ms": round(job.tokens_ms, 1),
                  "codec_ms": round(job.codec_ms, 1), "batch_size": max(job.batch_sizes),
                  "batches": len(job.batch_sizes), "seed": seed}
        headers = {"X-Request-Id": request_id, "X-Seed": str(seed), "X-Queue-Wait-Ms": str(timing["queue_ms"]),
                   "X-Tokens-Ms": str(timing["tokens_ms"]), "X-Codec-Ms": str(timing["codec_ms"]),
                   "X-Batch-Size": str(timing["batch_size"]), "X-Batches": str(timing["batches"])}
        channel.publish("done", timing)
        metrics.request_done(200, seconds=time.monotonic() - arrived)
        if len(blobs) == 1:
            return Response(blobs[0], media_type="audio/wav", headers=headers)
        headers["Content-Disposition"] = 'attachment; filename="magnet.zip"'
        return Response(zip_of_wavs(blobs), media_type="application/zip", headers=headers)

    @app.get("/v1/progress/{request_id}")
    async def progress(request_id: str):
        channel = hub.watch(request_id, asyncio.get_running_loop())
        keepalive = min(15.0, settings.progress_ttl_s)

        async def stream():
            queue, history = channel.subscribe()
            try:
                for kind, data in history:
                    yield sse(kind, data)
                    if kind in TERMINAL_EVENTS:
                        return
                while True:
                    try:
                        kind, data = await asyncio.wait_for(queue.get(), keepalive)
                    except asyncio.TimeoutError:
                        if not channel.claimed and time.monotonic() - channel.created > settings.progress_ttl_s:
                            yield sse("error", {"status": 404, "message": f"no request {request_id!r} arrived"})
                            return
                        yield ": keep-alive\n\n"
                        continue
                    yield sse(kind, data)
                    if kind in TERMINAL_EVENTS:
                        return
            finally:
                channel.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/prefix/{request_id}")
    async def prefix(request_id: str, index: int = 0):
        """Hybrid checkpoints: row `index`'s AR prefix as a wav, as soon as the SSE stream
        announced it (event "prefix"), while the rest of the clip is still being decoded."""
        channel = hub.get(request_id)
        blob = None if channel is None else channel.prefix.get(index)
        if blob is None:
            return ApiError(404, "NotFound", f"no prefix audio for request {request_id!r} row {index} (only "
                            "hybrid checkpoints make one, and only requests that gave a request_id)").response()
        return Response(blob, media_type="audio/wav")

    @app.get("/v1/model")
    async def get_model():
        return model_info(model, settings, batcher.max_batch)

    @app.get("/healthz")
    async def healthz():
        alive = batcher.alive()
        body = {"status": "ok" if alive else "worker stopped", "queue_depth": batcher.queue_depth()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(batcher.queue_depth(), batcher.running),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ------------------------------------------------------------------------------ running it
class BackgroundServer:
    """uvicorn in a thread, for tests and embedding: `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magnet-engine serve", description="HTTP service and demo page")
    p.add_argument("--model", default=None,
                   help="model directory or Hub id (default: the embedded random-weight 'tiny' demo model)")
    p.add_argument("--t5", default=None, help="T5 text encoder: local directory or Hub name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    d = Settings()
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="rows per batch and descriptions per request")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits for companions")
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="waiting requests before 503")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
    p.add_argument("--max-duration", type=float, default=None, help="seconds (default: the model's trained length)")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the demo model is built")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: model replicas, autoscaling "
                   "(pip install magnet-engine[cluster]; its flags: serve --ray --help)")
    return p


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    import uvicorn

    from magnet_engine.api import MAGNeT

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ray" in argv:   # the same routes on Ray Serve replicas (magnet_engine.cluster)
        try:
            from magnet_engine.cluster import main as cluster_main
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("ray"):
                raise
            print(f"magnet-engine serve --ray: needs Ray Serve (pip install magnet-engine[cluster]): {exc}",
                  file=sys.stderr)
            return 2
        return cluster_main(argv)
    args = build_parser().parse_args(argv)
    for name in ("max_batch", "queue_size", "max_text_chars"):
        if getattr(args, name) < 1:
            print(f"magnet-engine serve: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    note = ""
    try:
        if args.model is None:
            from magnet_engine.demo import cached_demo_model

            note = "Demo model with random (untrained) weights: it makes noise, not music."
            print(f"magnet-engine serve: no --model given. {note} Pass --model for a real checkpoint.")
            directory = cached_demo_model(args.cache_dir, "tiny")
            model = MAGNeT.from_pretrained(directory, device=args.device, t5=args.t5, engine=args.engine,
                                           precision=args.precision, name="demo-tiny (random weights)")
        else:
            model = MAGNeT.get_pretrained(args.model, device=args.device, t5=args.t5, engine=args.engine,
                                          precision=args.precision)
    except MagnetEngineError as exc:
        print(f"magnet-engine serve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    settings = Settings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                        max_text_chars=args.max_text_chars, max_duration=args.max_duration,
                        request_timeout_s=args.request_timeout_s, note=note)
    print(f"magnet-engine serve: {model.name} on {model.device} ({model.engine}); http://{args.host}:{args.port}/",
          flush=True)
    uvicorn.run(create_app(model, settings), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
