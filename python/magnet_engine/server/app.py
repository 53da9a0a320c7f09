"""The service around a loaded model: the limits every request passes first, the one error
shape, the worker, and the routers (server/routes/) mounted on one FastAPI app.

Endpoints:
  POST /v1/generate          JSON -> audio/wav (one description) | application/zip of wavs (several) (routes.generate)
  POST /v1/edit              multipart clip + regions -> audio/wav (routes.edit)
  POST /v1/stream            long-form, streamed window by window (routes.stream)
  POST /v1/speech/edit       PlayDiffusion speech editing, when a speech model is given (routes.speech)
  GET  /v1/progress/{id}     server-sent events: queued, started, step, codec, done | error (routes.progress)
  GET  /v1/prefix/{id}       hybrid checkpoints: the AR prefix audio, before the clip is done (routes.progress)
  GET  /v1/model             model facts, option defaults and server limits
  GET  /healthz              liveness of the worker
  GET  /metrics              Prometheus text exposition
  GET  /                     the demo page (static/)

Every POST body is read and parsed by one layer (server.body): size caps enforced while reading
(413), body and idle timeouts (408), multipart parsed as it arrives, form fields checked as a
JSON body's are. Every POST is a job (server.jobs) of the worker (batcher.Batcher; on Ray,
cluster.RayBatcher): one queue bound (503 + Retry-After), one timeout (504), cancellation between
decoding steps when the client leaves or times out, request ids owned by their first POST (409),
metrics by route. Every error, from a route or from the framework (404, 405, 422, 413 ...), is
answered as {"error": {"status", "type", "message"}} (schema.ApiError).
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing as tp
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from magnet_engine.server.batcher import Batcher
from magnet_engine.server.jobs import HTTP_ERROR_TYPES, Jobs
from magnet_engine.server.models import Models
from magnet_engine.server.progress import ProgressHub
from magnet_engine.server.routes.edit import EditLimits, edit_router
from magnet_engine.server.routes.generate import generate_router
from magnet_engine.server.routes.progress import progress_router
from magnet_engine.server.routes.speech import SpeechLimits, make_speech_router
from magnet_engine.server.routes.stream import StreamLimits, stream_router
from magnet_engine.server.schema import ApiError, Settings, describe_validation_error, model_info

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


def create_app(model, settings: tp.Optional[Settings] = None, batcher_factory=None, *, speech=None,
               edit_limits=None, stream_limits=None, speech_limits=None) -> FastAPI:
    """The service around a loaded MAGNeT (anything with its interface); starts the worker on startup.

    batcher_factory(models, settings): what runs the jobs, with Batcher's interface (default:
    Batcher, one worker thread on this process's models; magnet_engine.cluster passes one that
    sends every job's entries to Ray Serve replicas, `model` and `speech` then being their
    cards). speech: a PlayDiffusion to serve POST /v1/speech/edit with; its edits run on the same
    worker, in the same queue. edit_limits / stream_limits / speech_limits: those routers' own
    limits (EditLimits ...)."""
    settings = settings or Settings()
    batcher = (batcher_factory or Batcher)(Models(model, speech), settings)
    metrics = batcher.metrics
    hub = ProgressHub(settings.progress_ttl_s)
    jobs = Jobs(batcher, hub, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="magnet-engine", lifespan=lifespan, redirect_slashes=False)
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

    app.include_router(generate_router(model, jobs))
    app.include_router(progress_router(jobs))
    edit_limits = edit_limits or EditLimits()
    stream_limits = stream_limits or StreamLimits()
    route_limits = {"/v1/edit": dataclasses.asdict(edit_limits), "/v1/stream": dataclasses.asdict(stream_limits)}
    app.include_router(edit_router(model, edit_limits, jobs=jobs))
    app.include_router(stream_router(model, stream_limits, jobs=jobs))
    if speech is not None:
        speech_limits = speech_limits or SpeechLimits()
        route_limits["/v1/speech/edit"] = dataclasses.asdict(speech_limits)
        app.include_router(make_speech_router(speech, speech_limits, jobs=jobs))

    @app.get("/v1/model")
    async def get_model():   # "endpoints": what is mounted (the speech router only with a speech model)
        info = {**model_info(model, settings, batcher.max_batch),
                "endpoints": sorted(path for path in app.openapi()["paths"] if path.startswith("/v1/"))}
        info["limits"]["max_stream_duration"] = stream_limits.max_duration
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

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
