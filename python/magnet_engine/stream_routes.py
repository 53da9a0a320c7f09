"""Long-form generation streamed window by window, as a FastAPI router.

    app.include_router(stream_router(model, StreamLimits(max_duration=120)))

    POST /v1/stream                     JSON {description, duration, seed?, decoding_steps?} -> 202 {id, events}
    GET  /v1/stream/{id}/events         server-sent events: `chunk` {index, url, seconds} per decoded
                                        window, then `done` {chunks, seconds} | `error` {type, message}
    GET  /v1/stream/{id}/chunk/{index}  that chunk as audio/wav (the chunks joined are the clip)

A run decodes window by window (`MAGNeT.generate_tokens` with the model's `extend_stride`);
as each window is final its new frames go through `StreamDecoder`, so the first chunk is
playable after the first window, not the whole clip. Durations up to the router's
`max_duration` (a server-configured limit; the model's own cap is MAX_LONGFORM_SECONDS). At
most `max_jobs` runs are kept; finished ones are dropped after `ttl_s`. The model's lock
serialises runs with the service's worker. Bad input: 400 / 422 JSON errors, 404 for an
unknown run or chunk, 503 when `max_jobs` runs are still going.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
import typing as tp

import torch
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from magnet_engine.audio import wav_bytes
from magnet_engine.engine import events
from magnet_engine.engine.codec import StreamDecoder
from magnet_engine.errors import InvalidInputError, InvalidOptionError


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
    seed: tp.Optional[int] = Field(None, ge=0, lt=2 ** 62)
    decoding_steps: tp.Optional[tp.List[int]] = None


@dataclasses.dataclass
class _Run:
    chunks: tp.List[bytes] = dataclasses.field(default_factory=list)
    seconds: tp.List[float] = dataclasses.field(default_factory=list)
    finished: tp.Optional[dict] = None      # the terminal event: ('done' | 'error', payload)
    kind: str = ""
    ended_at: float = 0.0
    changed: threading.Condition = dataclasses.field(default_factory=threading.Condition)


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "type": kind, "message": message}}, status_code=status)


def stream_router(model, limits: StreamLimits = StreamLimits()) -> APIRouter:
    """A router streaming long-form generations of `model` (a loaded `MAGNeT`)."""
    router = APIRouter()
    runs: tp.Dict[str, _Run] = {}
    lock = threading.Lock()

    def work(run: _Run, text, duration, seed, params) -> None:
        rate = model.sample_rate
        decoder = StreamDecoder(model.codec)

        def add(wav: torch.Tensor) -> None:
            if wav.shape[-1]:
                with run.changed:
                    run.chunks.append(wav_bytes(wav[0], rate))
                    run.seconds.append(wav.shape[-1] / rate)
                    run.changed.notify_all()

        def listen(event: events.Event) -> None:
            if isinstance(event, events.WindowReady) and event.count > 1:
                with torch.no_grad():
                    add(decoder.push(event.codes))
                    if event.index == event.count - 1:
                        add(decoder.flush())
        try:
            tokens = model.generate_tokens([text], seed=seed, params=params, duration=duration, on_event=listen)
            if not run.chunks:                      # one window: the whole clip is the one chunk
                add(model.decode(tokens))
            kind, payload = "done", {"chunks": len(run.chunks), "seconds": sum(run.seconds)}
        except Exception as exc:   # reported on the event stream
            kind, payload = "error", {"type": type(exc).__name__, "message": str(exc)}
        with run.changed:
            run.kind, run.finished, run.ended_at = kind, payload, time.monotonic()
            run.changed.notify_all()

    @router.post("/v1/stream", status_code=202)
    def start(body: StreamRequest):
        try:
            if body.description is not None and len(body.description) > limits.max_text_chars:
                raise InvalidInputError(f"the description has {len(body.description)} characters; the limit is "
                                        f"{limits.max_text_chars}")
            duration = model.check_duration(body.duration, limit=limits.max_duration)
            params = model.params
            if body.decoding_steps is not None:
                params = params.replace(decoding_steps=tuple(body.decoding_steps)).validate(model.config.n_q, card=model.config.card)
        except InvalidInputError as exc:
            return _error(400, type(exc).__name__, str(exc))
        except InvalidOptionError as exc:
            return _error(422, type(exc).__name__, str(exc))
        with lock:
            now = time.monotonic()
            for key in [k for k, r in runs.items() if r.finished is not None and now - r.ended_at > limits.ttl_s]:
                del runs[key]
            if len(runs) >= limits.max_jobs:
                old = [k for k, r in runs.items() if r.finished is not None]
                if not old:
                    return _error(503, "Busy", f"{limits.max_jobs} streamed runs are still going; retry later")
                del runs[min(old, key=lambda k: runs[k].ended_at)]
            run_id = secrets.token_urlsafe(12)
            runs[run_id] = run = _Run()
        threading.Thread(target=work, args=(run, body.description, duration, body.seed, params),
                         name=f"magnet-stream-{run_id}", daemon=True).start()
        return {"id": run_id, "events": f"/v1/stream/{run_id}/events"}

    @router.get("/v1/stream/{run_id}/events")
    async def stream_events(run_id: str):
        run = runs.get(run_id)
        if run is None:
            return _error(404, "NotFound", f"no streamed run {run_id!r}")

        def wait(sent: int) -> tp.Tuple[int, tp.Optional[str]]:
            with run.changed:
                run.changed.wait_for(lambda: len(run.chunks) > sent or run.finished is not None, timeout=15)
                return len(run.chunks), run.kind if run.finished is not None else None

        async def feed():
            sent = 0
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
        return StreamingResponse(feed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.get("/v1/stream/{run_id}/chunk/{index}")
    def chunk(run_id: str, index: int):
        run = runs.get(run_id)
        if run is None or not 0 <= index < len(run.chunks):
            return _error(404, "NotFound", f"no chunk {index} of streamed run {run_id!r}")
        return Response(run.chunks[index], media_type="audio/wav")

    return router
