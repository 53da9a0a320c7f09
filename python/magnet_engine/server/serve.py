"""Running the service: uvicorn configured with the app's HTTP limits, `magnet-engine serve`,
and `BackgroundServer` (uvicorn in a thread, for tests and embedding)."""
from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
import threading
import time
import typing as tp
from pathlib import Path

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from magnet_engine.demo import DEFAULT_CACHE
from magnet_engine.engine.generate import ENGINES
from magnet_engine.engine.precision import CHOICES
from magnet_engine.errors import MagnetEngineError
from magnet_engine.server.models import DEMO_NOTE, ModelSpec
from magnet_engine.server.routes.edit import EditLimits
from magnet_engine.server.routes.stream import StreamLimits
from magnet_engine.server.schema import ApiError, Settings


def _head_timeout_protocol(head_timeout_s: float, max_header_bytes: int) -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head
    within `head_timeout_s` of connecting or of its previous response. uvicorn's own
    keep-alive timer is disarmed by the first byte of a request, so without this a client
    that trickles its head a byte at a time (or connects and says nothing) holds its
    connection forever. A head h11 cannot parse (malformed, or over `max_header_bytes`) is
    answered in the service's error shape rather than uvicorn's plain text."""

    class HeadTimeoutH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = ApiError(400, "BadRequest", f"invalid HTTP request: malformed, or a head over "
                            f"{max_header_bytes} bytes").response()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body.body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def connection_made(self, transport) -> None:
            self.head_timer = None
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._in_request():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self.head_timer = self.loop.call_later(head_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _timed_out(self) -> None:
            self.head_timer = None
            if not self._in_request() and self.conn.our_state is not h11.ERROR:
                self.transport.close()

    return HeadTimeoutH11Protocol


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> uvicorn.Config:
    """uvicorn settings from the app's `Settings`: header size, slow and idle clients, connections."""
    settings: Settings = app.state.settings
    return uvicorn.Config(app, host=host, port=port, http=_head_timeout_protocol(settings.header_timeout_s, settings.max_header_bytes),
                          h11_max_incomplete_event_size=settings.max_header_bytes,
                          timeout_keep_alive=settings.keepalive_timeout_s,
                          limit_concurrency=settings.max_connections, log_level="warning", **kwargs)


class BackgroundServer:
    """uvicorn in a thread, for tests and embedding: `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket()
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, host))
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
    p.add_argument("--engine", choices=ENGINES, default="fast")
    p.add_argument("--precision", choices=CHOICES, default=None,
                   help="default: auto on CPU (the fastest of fp32, bf16 and int8 on this CPU; /v1/model says "
                        "which and why), fp16-mixed on CUDA (fp16 matmuls, fp32 residual stream)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoding step whole (with --batching "
                   "continuous: every shape of the slot runtime's ladder, at start-up)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each decoding step shape as a CUDA graph (with "
                   "--batching continuous: every shape of the slot runtime's ladder captured at start-up)")
    p.add_argument("--speech", default=None, metavar="DIR|ID|random",
                   help="also serve PlayDiffusion speech editing at POST /v1/speech/edit (a directory with its "
                        "six upstream files, a Hub id, or 'random' for random weights)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the demo model is built")
    d = Settings()
    g = p.add_argument_group("limits")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help="rows per batch and descriptions per request")
    g.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits for companions")
    g.add_argument("--batching", choices=("grouped", "continuous"), default=d.batching,
                   help="grouped: rows of equal options start together and nothing joins a running batch; "
                        "continuous: plain generate rows (fast engine, one window) of any options join the "
                        "running rows between decoding steps and leave when done")
    g.add_argument("--queue-size", type=int, default=d.queue_size, help="waiting requests before 503")
    g.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
    g.add_argument("--max-duration", type=float, default=None,
                   help="seconds per /v1/generate request (default: the model's window; longer: long-form, "
                        "window by window)")
    g.add_argument("--max-stream-duration", type=float, default=StreamLimits().max_duration,
                   help="seconds a long-form run streamed by POST /v1/stream may ask for")
    g.add_argument("--max-edit-upload-bytes", type=int, default=EditLimits().max_upload_bytes,
                   help="POST /v1/edit upload limit")
    g.add_argument("--max-decoding-steps", type=int, default=d.max_decoding_steps, help="per codebook")
    g.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    g.add_argument("--max-headers", type=int, default=d.max_headers)
    g.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes)
    g.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                   help="a client must send its whole request head within this")
    g.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help="a client must send its whole body (JSON or upload) within this")
    g.add_argument("--body-idle-timeout-s", type=float, default=d.body_idle_timeout_s,
                   help="... with no gap between body bytes longer than this")
    g.add_argument("--keepalive-timeout-s", type=float, default=d.keepalive_timeout_s)
    g.add_argument("--max-connections", type=int, default=d.max_connections)
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: model replicas, autoscaling "
                   "(pip install magnet-engine[cluster]; its flags: serve --ray --help)")
    return p


SETTING_ARGS = ("max_batch", "max_wait_ms", "batching", "queue_size", "max_text_chars", "max_duration", "max_decoding_steps",
                "request_timeout_s", "max_body_bytes", "max_headers", "max_header_bytes", "header_timeout_s",
                "body_timeout_s", "body_idle_timeout_s", "keepalive_timeout_s", "max_connections")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What `magnet-engine serve`'s flags ask for, in one process or on Ray (`serve --ray`)."""

    spec: ModelSpec                  # how the models load
    settings: Settings               # the service's limits
    routes: tp.Dict[str, tp.Any]     # create_app's edit_limits and stream_limits


def options(args: argparse.Namespace) -> ServeOptions:
    """The parsed flags of `build_parser()` as options; InvalidOptionError for a bad limit."""
    spec = ModelSpec(model=args.model, t5=args.t5, device=args.device, engine=args.engine, precision=args.precision,
                     compile=args.compile, cuda_graphs=args.cuda_graphs, speech=args.speech,
                     cache_dir=str(Path(args.cache_dir).expanduser()))
    settings = Settings(**{name: getattr(args, name) for name in SETTING_ARGS}, note=spec.note)
    routes = dict(edit_limits=EditLimits(max_upload_bytes=args.max_edit_upload_bytes),
                  stream_limits=StreamLimits(max_duration=args.max_stream_duration))
    return ServeOptions(spec, settings, routes)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    from magnet_engine.server.app import create_app

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ray" in argv:   # `magnet-engine serve --ray` (cli.serve) hands Ray its own way: cluster sits above server
        print("magnet-engine serve --ray: run it as `magnet-engine serve --ray ...`", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        opts = options(args)
        if opts.spec.model is None:
            print(f"magnet-engine serve: no --model given. {DEMO_NOTE} Pass --model for a real checkpoint.")
        models = opts.spec.load()
    except MagnetEngineError as exc:
        print(f"magnet-engine serve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    # every route (/v1/speech/edit with a speech model) a job of the same worker and queue
    app = create_app(models.music, opts.settings, speech=models.speech, **opts.routes)
    model = models.music
    print(f"magnet-engine serve: {model.name} on {model.device} ({model.engine}); http://{args.host}:{args.port}/",
          flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, args.port)).run()
    return 0
