"""`magnet-engine serve`: an HTTP service with dynamic batching, and the demo page.

    magnet-engine serve                                   # embedded random-weight demo model
    magnet-engine serve --model facebook/magnet-small-10secs --max-batch 8

    schema.py    limits (Settings), request body, validation, the one error shape
    models.py    what the service runs on (Models) and how to load it (ModelSpec: every load option)
    runner.py    runs work on the models: the batching policy, cancellation, run events (no HTTP)
    batcher.py   the bounded queue and the one worker thread that runs every route's jobs
    jobs.py      a request as a job (Job, Task), what its run events do to it, Jobs: the routes' side
    metrics.py   Prometheus metrics (prometheus_client)
    progress.py  per-request progress streams (server-sent events)
    app.py       the service (create_app): worker, error handlers, limits; mounts routes/
    routes/      one router per route family: generate, progress, edit, stream, speech
    serve.py     uvicorn with the HTTP limits, `magnet-engine serve`, BackgroundServer

The names below are imported on first use (PEP 562), so importing one module of the package
(the runner on a Ray replica, the batcher in a test) does not import the app and its routers.
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
