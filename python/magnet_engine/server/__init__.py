"""`magnet-engine serve`: an HTTP service with dynamic batching, and the demo page.

    magnet-engine serve                                   # embedded random-weight demo model
    magnet-engine serve --model facebook/magnet-small-10secs --max-batch 8

    schema.py    limits (Settings), request body, validation, the one error shape
    metrics.py   Prometheus metrics (prometheus_client)
    progress.py  per-request progress streams (server-sent events)
    batcher.py   the bounded queue and the one worker every route's jobs run on (Jobs: the routes' side)
    app.py       the service (create_app): worker, error handlers, limits; mounts routes/
    routes/      one router per route family: generate, progress, edit, stream, speech
    serve.py     uvicorn with the HTTP limits, `magnet-engine serve`, BackgroundServer
"""
from magnet_engine.server.app import create_app
from magnet_engine.server.schema import Settings, text_token_count
from magnet_engine.server.serve import BackgroundServer, main

__all__ = ["create_app", "Settings", "BackgroundServer", "main", "text_token_count"]
