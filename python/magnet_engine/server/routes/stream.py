"""Long-form generation streamed window by window, as a FastAPI router.

    create_app(model, settings, stream_limits=StreamLimits(max_duration=120))   # mounts it

    POST /v1/stream                     JSON {description, duration, seed?, decoding_steps?, request_id?}
                                        -> 202 {id, events}
    GET  /v1/stream/{id}/events         server-sent events: `chunk` {index, url, seconds} per decoded
                                        window, then `done` {chunks, seconds} | `error` {type, message}
    GET  /v1/stream/{id}/chunk/{index}  that chunk as audio/wav (the chunks joined are the clip)

A run decodes window by window (`MAGNeT.generate_tokens` with the model's `extend_stride`);
as each window is final its new frames go through `StreamDecoder`, so the first chunk is
playable after the first window, not the whole clip. Durations up to the router's
`max_duration` (a server-configured limit; the model's own cap is MAX_LONGFORM_SECONDS). At
most `max_jobs` runs are kept; finished ones are dropped after `ttl_s`.

A run is a job of the service's worker (server.jobs.Task), its `StreamWork` run alone: it waits
in the same bounded queue as every other request (503 + Retry-After when full), and stops
after the current decoding step when it outlives the service's request timeout times its
window count (its events end with `error` {type: "Timeout"}) or when every consumer of its
events has left for `STREAM_GRACE_S` (`error` {type: "TaskCancelled"}; status 499 on its
progress stream, as a request whose client left): `follow` watches it on the event loop.
Its chunks reach the event stream as each window is final, while it runs. Without a seed one is
drawn here, so a run sent again (its Ray replica died) makes the same chunks, and those already
delivered are not repeated. A `request_id` names the run (its id, and its progress
on GET /v1/progress/{id}); 409 when in use. The POST body is read under the service's body
limits (server.body: 413 over `max_body_bytes`, 408 when slow, 415 for a non-JSON type) and
its description checked as /v1/generate checks one. Bad input: 400 / 422 JSON errors, 404 for
an unknown run or chunk, 503 when `max_jobs` runs are still going.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import threading
import time
import typing as tp

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from magnet_engine.audio import wav_bytes
from magnet_engine.engine import events
from magnet_engine.engine.codec import StreamDecoder
from magnet_engine.engine.config import DecodingParams
from magnet_engine.server.body import read_json_body
from magnet_engine.server.jobs import Jobs, Task, error_answer, jobs_finder
from magnet_engine.server.models import Models
from magnet_engine.server.runner import Chunk, Work
from magnet_engine.server.schema import ApiError, RequestId, Seed, check_text, parse_json_body

STREAM_GRACE_S = 5.0   # a run whose event consumers all left is stopped this long after (a reload reconnects)
# A stopped run's status on its progress stream: past its timeout 504; every consumer gone 499,
# as a request whose client left (nobody was refused and nothing failed: not a 5xx).
STOPPED_STATUS = {"Timeout": 504, "TaskCancelled": 499}


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    max_duration: float = 120.0      # seconds a request may ask for
    max_text_chars: int = 500
    max_jobs: int = 4                # runs kept (running or finished within ttl_s)
    ttl_s: float = 600.0


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    description: tp.Optional[str] = None
    duration: float
    seed: tp.Optional[Seed] = None
    decoding_steps: tp.Optional[tp.List[int]] = None
    request_id: tp.Optional[RequestId] = None


@dataclasses.dataclass
class _Run:
    chunks: tp.List[bytes] = dataclasses.field(default_factory=list)
    seconds: tp.List[float] = dataclasses.field(default_factory=list)
    finished: tp.Optional[dict] = None      # the terminal event: ('done' | 'error', payload)
    kind: str = ""
    ended_at: float = 0.0
    changed: threading.Condition = dataclasses.field(default_factory=threading.Condition)
    arrived: float = 0.0                    # when its POST arrived
    timeout_s: float = math.inf             # the service's request timeout x windows, counted from `arrived`
    watchers: int = 0                       # event streams open now
    left_at: tp.Optional[float] = None      # when the last one closed (None: one is open, or none came yet)
    stopped: tp.Optional[tp.Tuple[str, str]] = None   # why the worker was told to stop: (type, message)

    def wanted(self) -> bool:
        """False past the timeout, or once every consumer of the events left more than
        STREAM_GRACE_S ago (then `stopped` says which)."""
        now = time.monotonic()
        if now - self.arrived > self.timeout_s:
            self.stopped = ("Timeout", f"run not finished within {self.timeout_s:g} s")
        elif self.left_at is not None and now - self.left_at >= STREAM_GRACE_S:
            self.stopped = ("TaskCancelled", "every consumer of the run's events left")
        return self.stopped is None

    def add(self, chunk: Chunk) -> None:
        with self.changed:
            if chunk.index == len(self.chunks):   # a run sent again repeats the chunks it already sent
                self.chunks.append(chunk.wav)
                self.seconds.append(chunk.seconds)
                self.changed.notify_all()

    def end(self, kind: str, payload: dict) -> None:
        with self.changed:
            if self.finished is None:
                self.kind, self.finished, self.ended_at = kind, payload, time.monotonic()
                self.changed.notify_all()


@dataclasses.dataclass(frozen=True)
class StreamWork(Work):
    """A long-form run, run where the model is: a Chunk of audio as each window is final (the
    whole clip, one window long, as one chunk); its result the chunks' count and seconds."""

    kind: tp.ClassVar[str] = "stream"
    text: tp.Optional[str]
    duration: float
    seed: int
    params: DecodingParams

    def run(self, models, listen, emit) -> dict:
        model = models.music
        rate = model.sample_rate
        decoder = StreamDecoder(model.codec)
        seconds: tp.List[float] = []

        def add(wav: torch.Tensor) -> None:   # [1, C, samples]
            if wav.shape[-1]:
                seconds.append(wav.shape[-1] / rate)
                emit(Chunk(len(seconds) - 1, wav_bytes(wav[0], rate), seconds[-1]))

        def on_event(event: events.Event) -> None:
            listen(event)     # progress, and a cancelled run stops here
            if isinstance(event, events.WindowReady):
                for wav in decoder.window(event):
                    add(wav)
        tokens = model.generate_tokens([self.text], seed=self.seed, params=self.params, duration=self.duration,
                                       on_event=on_event)
        if not seconds:                      # one window: the whole clip is the one chunk
            add(model.decode(tokens))
        return {"chunks": len(seconds), "seconds": sum(seconds)}


async def follow(service: Jobs, run: _Run, task: Task, channel) -> None:
    """A run, from the event loop, until it ends: stops it when it is no longer wanted (its
    timeout, its consumers gone), then reports how it ended on its event stream, its progress
    stream and in the metrics (nobody awaits a run: its POST was answered 202)."""
    while not task.future.done() and run.wanted():
        await asyncio.wait([task.future], timeout=0.2)
    if run.stopped is not None:
        service.batcher.cancel(task)                   # the run stops after its current step
        kind, message = run.stopped
        status = STOPPED_STATUS[kind]
    elif task.future.exception() is not None:
        err = error_answer(task.future.exception())
        kind, message, status = err.kind, err.message, err.status
    else:
        payload = {"chunks": len(run.chunks), "seconds": sum(run.seconds)}
        run.end("done", payload)
        channel.publish("done", payload)
        service.metrics.outcome("stream", seconds=time.monotonic() - run.arrived)
        return
    run.end("error", {"type": kind, "message": message})
    channel.publish("error", {"status": status, "type": kind, "message": message})
    service.metrics.outcome("stream", error=kind)


def stream_router(model, limits: StreamLimits = StreamLimits(), jobs: tp.Optional[Jobs] = None) -> APIRouter:
    """A router streaming long-form generations of `model` (a loaded `MAGNeT`, or a Ray ingress's
    card of it); jobs: the service's worker (see server.jobs.jobs_finder)."""
    router = APIRouter()
    runs: tp.Dict[str, _Run] = {}
    followers: tp.Set[asyncio.Task] = set()     # held: the loop keeps only weak references
    lock = threading.Lock()
    service_for = jobs_finder(jobs, Models(model))

    @router.post("/v1/stream", status_code=202, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": StreamRequest.model_json_schema()}}}})
    async def start(request: Request):
        arrived = time.monotonic()
        service = service_for(request)
        channel = None
        try:
            body = parse_json_body(await read_json_body(request, service.settings), StreamRequest)
            with lock:   # an id names a run: not one of the table's, and owned in the progress hub
                if body.request_id is not None and body.request_id in runs:
                    raise ApiError(409, "Conflict", f"request_id {body.request_id!r} is already in use")
                run_id, channel = service.channel(body.request_id)
            check_text("the description", body.description, limits.max_text_chars)
            duration = model.check_duration(body.duration, limit=limits.max_duration)
            params = model.params
            if body.decoding_steps is not None:
                params = params.replace(decoding_steps=tuple(body.decoding_steps)).validate(
                    model.config.n_q, card=model.config.card, max_steps=service.settings.max_decoding_steps)
            with lock:
                now = time.monotonic()
                for key in [k for k, r in runs.items() if r.finished is not None and now - r.ended_at > limits.ttl_s]:
                    del runs[key]
                if len(runs) >= limits.max_jobs:
                    old = [k for k, r in runs.items() if r.finished is not None]
                    if not old:
                        raise ApiError(503, "Busy", f"{limits.max_jobs} streamed runs are still going; retry later")
                    del runs[min(old, key=lambda k: runs[k].ended_at)]
                # the request timeout bounds one generation of the window's length: a run gets it per window
                run = _Run(arrived=arrived, timeout_s=service.settings.request_timeout_s * model.window_count(duration))
                seed = secrets.randbelow(2 ** 31) if body.seed is None else body.seed
                task = Task(run_id, StreamWork(body.description, duration, seed, params),
                            asyncio.get_running_loop(), channel, on_chunk=run.add)
                service.submit(task)            # 503 + Retry-After when the queue is full
                runs[run_id] = run
            follower = asyncio.get_running_loop().create_task(follow(service, run, task, channel))
            followers.add(follower)
            follower.add_done_callback(followers.discard)
        except Exception as exc:  # noqa: BLE001 - every failure is answered as JSON
            return service.failed("stream", exc, channel)
        service.metrics.request_done(202, route="stream")   # the run's own outcome: latency / errors at its end
        return {"id": run_id, "events": f"/v1/stream/{run_id}/events"}

    @router.get("/v1/stream/{run_id}/events")
    async def stream_events(run_id: str):
        run = runs.get(run_id)
        if run is None:
            return ApiError(404, "NotFound", f"no streamed run {run_id!r}").response()

        def wait(sent: int) -> tp.Tuple[int, tp.Optional[str]]:
            with run.changed:
                run.changed.wait_for(lambda: len(run.chunks) > sent or run.finished is not None, timeout=15)
                return len(run.chunks), run.kind if run.finished is not None else None

        async def feed():
            sent = 0
            with run.changed:
                run.watchers += 1
                run.left_at = None
            try:
                while True:
                    count, kind = await asyncio.to_thread(wait, sent)
                    if count == sent and kind is None:
                        yield ": keep-alive\n\n"           # a long window: keep proxies from closing the stream
                    for i in range(sent, count):
                        payload = {"index": i, "url": f"/v1/stream/{run_id}/chunk/{i}", "seconds": run.seconds[i]}
                        yield f"event: chunk\ndata: {json.dumps(payload)}\n\n"
                    sent = count
                    if kind is not None:
                        yield f"event: {kind}\ndata: {json.dumps(run.finished)}\n\n"
                        return
            finally:
                with run.changed:
                    run.watchers -= 1
                    if run.watchers == 0:
                        run.left_at = time.monotonic()
        return StreamingResponse(feed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.get("/v1/stream/{run_id}/chunk/{index}")
    def chunk(run_id: str, index: int):
        run = runs.get(run_id)
        if run is None or not 0 <= index < len(run.chunks):
            return ApiError(404, "NotFound", f"no chunk {index} of streamed run {run_id!r}").response()
        return Response(run.chunks[index], media_type="audio/wav")

    return router
