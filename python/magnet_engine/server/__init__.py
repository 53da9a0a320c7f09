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

The names below are imported on first use (PEP 562), so importing one module of the package
(the batcher in a test, say) does not import the app and its routers.
"""
import importlib

_WHERE = {"create_app": "app", "Settings": "schema", "text_token_count": "schema",
          "BackgroundServer": "serve", "main": "serve"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
