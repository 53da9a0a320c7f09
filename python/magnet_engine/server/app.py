"""The HTTP routes around a loaded model, and the limits every request passes first.

Endpoints:
  POST /v1/generate          JSON -> audio/wav (one description) | application/zip of wavs (several)
  POST /v1/edit              multipart clip + regions -> audio/wav (edit_routes)
  POST /v1/stream            long-form, streamed window by window (stream_routes)
  POST /v1/speech/edit       PlayDiffusion speech editing, when a speech model is given (speech_routes)
  GET  /v1/progress/{id}     server-sent events: queued, started, step, codec, done | error
  GET  /v1/prefix/{id}       hybrid checkpoints: the AR prefix audio, before the clip is done
  GET  /v1/model             model facts, option defaults and server limits
  GET  /healthz              liveness of the worker
  GET  /metrics              Prometheus text exposition
  GET  /                     the demo page (static/)

Every POST body is read and parsed by one layer (server.body): size caps enforced while reading
(413), body and idle timeouts (408), multipart parsed as it arrives, form fields checked as a
JSON body's are. Every POST is a job of the one worker (batcher.Batcher): one queue bound (503 + Retry-After),
one timeout (504), cancellation between decoding steps when the client leaves or times out,
request ids owned by their first POST (409), metrics by route. Every error, from a route or
from the framework (404, 405, 422, 413 ...), is answered as {"error": {"status", "type",
"message"}} (schema.ApiError).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import secrets
import time
import typing as tp
import zipfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from magnet_engine.audio import wav_bytes
from magnet_engine.server.batcher import (
    HTTP_ERROR_TYPES, REQUEST_ID, Batcher, BatchKey, Job, Jobs,
)
from magnet_engine.server.body import read_json_body
from magnet_engine.server.progress import TERMINAL_EVENTS, ProgressHub, sse
from magnet_engine.server.schema import (
    ApiError, GenerateRequest, Settings, describe_validation_error, model_info, parse_body, parse_request,
    text_token_count,
)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


class HeaderLimits:
    """ASGI middleware: at most `max_headers` header fields and `max_header_bytes` in all (431).
    uvicorn's h11 parser bounds the raw head too; this also holds under any server."""

    def __init__(self, app, max_headers: int, max_header_bytes: int):
        self.app, self.max_headers, self.max_header_bytes = app, max_headers, max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(k) + len(v) + 4 for k, v in headers)
            if len(headers) > self.max_headers or size > self.max_header_bytes:
                err = ApiError(431, "RequestHeaderFieldsTooLarge",
                               f"{len(headers)} header fields, {size} bytes; the limits are {self.max_headers} "
                               f"fields and {self.max_header_bytes} bytes", headers={"Connection": "close"})
                return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def zip_of_wavs(blobs: tp.List[bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # PCM barely compresses
        for i, blob in enumerate(blobs):
            zf.writestr(f"sample_{i}.wav", blob)
    return buf.getvalue()


def create_app(model, settings: tp.Optional[Settings] = None, batcher_factory=None, *, speech=None,
               edit_limits=None, stream_limits=None, speech_limits=None) -> FastAPI:
    """The service around a loaded MAGNeT (anything with its interface); starts the worker on startup.

    batcher_factory(model, settings): what runs the jobs, with Batcher's interface (default:
    Batcher, one worker thread on this process's model; magnet_engine.cluster passes one that
    sends rows to Ray Serve replicas, which serves /v1/generate only). speech: a PlayDiffusion
    to serve POST /v1/speech/edit with; its edits run on the same worker, in the same queue.
    edit_limits / stream_limits / speech_limits: those routers' own limits (EditLimits ...)."""
    settings = settings or Settings()
    batcher = (batcher_factory or Batcher)(model, settings)
    metrics = batcher.metrics
    hub = ProgressHub(settings.progress_ttl_s)
    jobs = Jobs(batcher, hub, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="magnet-engine", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.settings, app.state.hub = batcher, metrics, settings, hub
    app.state.jobs = jobs
    app.add_middleware(HeaderLimits, max_headers=settings.max_headers, max_header_bytes=settings.max_header_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = HTTP_ERROR_TYPES.get(exc.status_code, "HTTPError")
        return ApiError(exc.status_code, kind, str(exc.detail), headers=dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return ApiError(422, "ValidationError", describe_validation_error(exc.errors())).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        return ApiError(500, type(exc).__name__, "internal error").response()

    @app.post("/v1/generate", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()}}}})
    async def generate(request: Request):
        arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        channel = job = None
        try:
            body = parse_body(await read_json_body(request, settings))
            # the first POST owns an id; a second one is refused before it can touch the channel
            request_id, channel = jobs.channel(body.request_id)
            texts, params, duration = parse_request(model, settings, body)
            keys = [BatchKey(params, duration, text_token_count(model, t)) for t in texts]
            seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
            job = Job(request_id, texts, keys, seed, loop, channel)
            wavs = await jobs.run(request, job, windows=model.window_count(duration))
            blobs = await asyncio.to_thread(lambda: [wav_bytes(w, model.sample_rate) for w in wavs])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered as JSON (a client gone: 499)
            return jobs.failed("generate", exc, channel)

        timing = {"queue_ms": round(job.queue_ms, 1), "tokens_ms": round(job.tokens_ms, 1),
                  "codec_ms": round(job.codec_ms, 1), "batch_size": max(job.batch_sizes),
                  "batches": len(job.batch_sizes), "seed": seed}
        headers = {"X-Request-Id": request_id, "X-Seed": str(seed), "X-Queue-Wait-Ms": str(timing["queue_ms"]),
                   "X-Tokens-Ms": str(timing["tokens_ms"]), "X-Codec-Ms": str(timing["codec_ms"]),
                   "X-Batch-Size": str(timing["batch_size"]), "X-Batches": str(timing["batches"])}
        jobs.succeeded("generate", arrived, channel, timing)
        if len(blobs) == 1:
            return Response(blobs[0], media_type="audio/wav", headers=headers)
        headers["Content-Disposition"] = 'attachment; filename="magnet.zip"'
        return Response(zip_of_wavs(blobs), media_type="application/zip", headers=headers)

    def known_id(request_id: str) -> None:
        if not REQUEST_ID.match(request_id):
            raise ApiError(404, "NotFound", "no such request (ids match [A-Za-z0-9_.:-]{1,64})")

    @app.get("/v1/progress/{request_id}")
    async def progress(request_id: str):
        try:
            known_id(request_id)
        except ApiError as err:
            return err.response()
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
            return ApiError(404, "NotFound", f"no prefix audio for request {request_id[:64]!r} row {index} (only "
                            "hybrid checkpoints make one, and only requests that gave a request_id)").response()
        return Response(blob, media_type="audio/wav")

    @app.get("/v1/model")
    async def get_model():   # "endpoints": what is mounted, the optional edit/stream/speech routers included
        info = {**model_info(model, settings, batcher.max_batch),
                "endpoints": sorted(path for path in app.openapi()["paths"] if path.startswith("/v1/"))}
        if stream_max is not None:
            info["limits"]["max_stream_duration"] = stream_max
        info["limits"]["routes"] = route_limits    # each mounted upload/stream route's own limits
        return info

    @app.get("/healthz")
    async def healthz():
        alive = batcher.alive()
        body = {"status": "ok" if alive else "worker stopped", "queue_depth": batcher.queue_depth()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    stream_max = None   # POST /v1/stream's duration limit, when it is mounted
    route_limits: tp.Dict[str, dict] = {}
    if getattr(batcher, "runs_tasks", False):
        # imported here: the routers import this package (server.batcher), not the other way round
        from magnet_engine.edit_routes import EditLimits, edit_router
        from magnet_engine.stream_routes import StreamLimits, stream_router

        edit_limits = edit_limits or EditLimits()
        app.include_router(edit_router(model, edit_limits, jobs=jobs))
        stream_limits = stream_limits or StreamLimits()
        stream_max = stream_limits.max_duration
        route_limits.update({"/v1/edit": dataclasses.asdict(edit_limits), "/v1/stream": dataclasses.asdict(stream_limits)})
        app.include_router(stream_router(model, stream_limits, jobs=jobs))
        if speech is not None:
            from magnet_engine.speech_routes import SpeechLimits, make_speech_router

            speech_limits = speech_limits or SpeechLimits()
            route_limits["/v1/speech/edit"] = dataclasses.asdict(speech_limits)
            app.include_router(make_speech_router(speech, speech_limits, jobs=jobs))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
