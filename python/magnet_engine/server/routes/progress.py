"""What a request publishes while it runs: `GET /v1/progress/{id}` (server-sent events: queued,
started, step, codec, done | error) and `GET /v1/prefix/{id}` (a hybrid checkpoint's AR prefix
audio, before the clip is done). Every POST route publishes on the channel of its request id
(server.progress.ProgressHub)."""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from magnet_engine.server.jobs import REQUEST_ID, Jobs
from magnet_engine.server.progress import TERMINAL_EVENTS, sse
from magnet_engine.server.schema import REQUEST_ID_PATTERN, ApiError


def progress_router(jobs: Jobs) -> APIRouter:
    """A router with the progress and prefix streams of the requests `jobs` runs."""
    router = APIRouter()
    hub, settings = jobs.hub, jobs.settings

    def known_id(request_id: str) -> None:
        if not REQUEST_ID.match(request_id):
            raise ApiError(404, "NotFound", f"no such request (ids match {REQUEST_ID_PATTERN.strip('^$')})")

    @router.get("/v1/progress/{request_id}")
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

    @router.get("/v1/prefix/{request_id}")
    async def prefix(request_id: str, index: int = 0):
        """Hybrid checkpoints: row `index`'s AR prefix as a wav, as soon as the SSE stream
        announced it (event "prefix"), while the rest of the clip is still being decoded."""
        channel = hub.get(request_id)
        blob = None if channel is None else channel.prefix.get(index)
        if blob is None:
            return ApiError(404, "NotFound", f"no prefix audio for request {request_id[:64]!r} row {index} (only "
                            "hybrid checkpoints make one, and only requests that gave a request_id)").response()
        return Response(blob, media_type="audio/wav")

    return router
