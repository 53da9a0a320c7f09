"""magnet-engine on Ray Serve: model replicas, autoscaling, the same HTTP API with every route.

    magnet-engine serve --ray --replicas 4 --gpus-per-replica 1 --model facebook/magnet-small-10secs
    magnet-engine serve --ray --autoscale 1:8 --address auto      # join an existing Ray cluster
    serve run deploy/serve_config.yaml                           # the same application from a config file

One application, two deployments:

  MagnetModel    replicas that each load the models (server.models.ModelSpec: every load option of
                 `magnet-engine serve`, the speech model included) on one device and run what reaches
                 them with the single-process server's runner (server.runner.Runner pulling from a
                 server.batcher.EntryQueue): generate rows batched by its policy, an edit, a streamed
                 run or a speech edit alone. A call is one queue entry: its work goes in, its run's
                 events (started, steps with the token canvas, prefix, chunks, codec, result or error)
                 come back as a stream. This is the deployment that scales.
  MagnetIngress  the HTTP API: server.create_app with all its routes (generate, edit, stream, speech
                 edit with a speech model, progress, prefix, the demo page), mounted with
                 @serve.ingress over the models' cards (config, tokenizer, rates; no weights) fetched
                 from a model replica, with RayBatcher sending every job's entries to MagnetModel in
                 place of the worker thread. The jobs (server.jobs) turn the events that come back into
                 answers, progress messages and metrics as in one process, under the same queue
                 bound, timeout and request-id rules. Progress streams, hybrid prefix audio, streamed
                 runs' chunks and request ids live here, so every GET works whichever replica ran
                 the work. One replica (it only routes); several would each hold their own streams.

Faults: an entry whose replica dies (killed actor, lost node) is sent again, once, to another
replica — its seed fixes its tokens (an edit or a streamed run without one gets one drawn by its
route), so the retry returns what the first try would have, and a streamed run's chunks already
delivered are not sent twice — and answered 503 ReplicaFailed if that fails too. Ray restarts the
dead replica. Nothing waits beyond the request timeout (504). A model that fails to load fails the
deployment with its error (max_constructor_retry_count=1): deterministic load errors are not
retried in a loop.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import sys
import threading
import time
import typing as tp

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from magnet_engine.api import MAGNeT
from magnet_engine.engine.conditioning import TextConditioner
from magnet_engine.engine.config import rows_per_batch
from magnet_engine.errors import MagnetEngineError
from magnet_engine.server.app import create_app
from magnet_engine.server.batcher import EntryQueue, QueueFull
from magnet_engine.server.jobs import error_answer
from magnet_engine.server.metrics import Metrics
from magnet_engine.server.models import DEMO_NOTE, Models, ModelSpec
from magnet_engine.server.routes.edit import EditLimits
from magnet_engine.server.routes.speech import SpeechCard
from magnet_engine.server.routes.stream import StreamLimits
from magnet_engine.server.runner import TERMINAL, Begun, Event, Failed, Finished, Runner
from magnet_engine.server.schema import ApiError, Settings

__all__ = ["ModelSpec", "ModelCard", "MagnetModel", "MagnetIngress", "RayBatcher", "application", "build_app",
           "deployment_error", "main"]

APP_NAME = "magnet"
MODEL_DEPLOYMENT = "MagnetModel"
REPLICA_HEADER = "X-Replica-Id"     # the MagnetModel replicas that ran a request's entries
RETRIES_HEADER = "X-Row-Retries"    # its entries sent again because their replica died


# ------------------------------------------------------------------------------ what the ingress sees
class TextTokens:
    """A conditioner's tokenizer without the T5 weights: enough to validate and key rows."""

    tokenize = TextConditioner.tokenize   # one tokenize, so the ingress keys rows as the replicas do
    device = torch.device("cpu")

    def __init__(self, tokenizer, max_text_tokens: tp.Optional[int]):
        self.tokenizer, self.max_text_tokens = tokenizer, max_text_tokens


@dataclasses.dataclass
class ModelCard:
    """What the HTTP routes read from a model, without its weights (sent from a replica to the ingress)."""

    name: str
    engine: str
    device: str
    sample_rate: int
    frame_rate: float
    config: tp.Any               # the checkpoint's ModelConfig
    conditioner: TextTokens
    _max_duration: tp.Union[int, float]
    params: tp.Any               # DecodingParams: the span arrangement fixes the long-form windows
    _extend_stride: tp.Optional[float]
    precision: str               # what the replicas run, as /v1/model reports it
    precision_choice: tp.Any
    compile: bool
    cuda_graphs: bool

    check_duration = MAGNeT.check_duration   # the model's own rules, not copies
    max_duration = MAGNeT.max_duration
    extend_stride = MAGNeT.extend_stride
    window_count = MAGNeT.window_count
    _stride_frames = MAGNeT._stride_frames

    @classmethod
    def of(cls, model: MAGNeT) -> "ModelCard":
        return cls(model.name, model.engine, str(model.device), model.sample_rate, model.frame_rate, model.config,
                   TextTokens(model.conditioner.tokenizer, model.conditioner.max_text_tokens), model.max_duration,
                   model.params, model.extend_stride, model.precision, model.precision_choice, model.compile,
                   model.cuda_graphs)


class ReplicaError(Exception):
    """A run's error as its HTTP answer (status, type, message), the form in which it crosses from
    a replica to the ingress: not every exception pickles (ApiError and HTTPException do not)."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(status, kind, message)

    def answer(self) -> ApiError:
        return ApiError(*self.args)


def _portable(event: Event) -> Event:
    if isinstance(event, Failed):
        err = error_answer(event.error)
        return Failed(ReplicaError(err.status, err.kind, err.message))
    return event


# ------------------------------------------------------------------------------ model replicas
class _Call:
    """One call's queue entry on a replica (server.runner.Entry): its work, its events back to the call."""

    def __init__(self, work, tag: str, watched: bool, emit: tp.Callable[[Event], None]):
        self.work, self.tag, self._watched, self._emit = work, tag, watched, emit
        self.arrived = time.monotonic()
        self.gone = False            # the caller went away (cancelled), or the call ended

    def cancelled(self) -> bool:
        return self.gone

    def watched(self) -> bool:
        return self._watched

    def emit(self, event: Event) -> None:
        self._emit(event)


class MagnetModel:
    """The models on one device, run by the single-process server's runner. Deployed by `application`."""

    def __init__(self, spec: ModelSpec, max_batch: int, max_wait_ms: float, batching: str = "grouped"):
        self.models = spec.load()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # Calls wait here while a run goes on; when it ends, the runner's policy takes the next
        # run from every call that waited (rows of one key batched, as in one process).
        self.queue = EntryQueue()
        runner = Runner(self.models, max_batch, max_wait_ms, name=self.replica_id, batching=batching)
        self.worker = threading.Thread(target=runner.serve, args=(self.queue,), name="magnet-runner", daemon=True)
        self.worker.start()

    def __del__(self):
        self.queue.close()

    def card(self) -> Models:
        speech = self.models.speech
        return Models(ModelCard.of(self.models.music), None if speech is None else SpeechCard.of(speech))

    async def run(self, work, tag: str, watched: bool) -> tp.AsyncIterator[Event]:
        """One entry (work of request `tag`) run by this replica's runner: its events, the last
        one Finished, Failed or Cancelled. A caller that goes away cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: Event) -> None:   # on the runner's thread
            with contextlib.suppress(RuntimeError):   # loop closed at shutdown
                loop.call_soon_threadsafe(events.put_nowait, event)

        call = _Call(work, tag, watched, emit)
        self.queue.put([call])
        try:
            while True:
                event = await events.get()
                yield _portable(event)
                if isinstance(event, TERMINAL):
                    return
        finally:
            call.gone = True
            self.queue.remove(lambda e: e is call)


# ------------------------------------------------------------------------------ the ingress side
@dataclasses.dataclass(eq=False)
class _Calls:
    """RayBatcher's state of one job."""

    tasks: tp.List[asyncio.Task]
    unstarted: int                                                  # entries no replica has begun
    begun: tp.Set[int] = dataclasses.field(default_factory=set)     # entries a replica has begun (ever)
    running: tp.Set[int] = dataclasses.field(default_factory=set)   # entries being run now
    retries: int = 0                                                # entries sent again after their replica died


class RayBatcher:
    """server.batcher.Batcher's interface over the MagnetModel deployment: one streaming call per
    queue entry (a generate row, an edit, a streamed run, a speech edit).

    Runs on the ingress's event loop (the routes call submit and cancel)."""

    def __init__(self, handle: DeploymentHandle, models: Models, settings: Settings, retries: int = 1):
        self.handle = handle.options(stream=True)
        self.settings, self.retries = settings, retries
        self.metrics = Metrics(self.queue_depth, lambda: self.running)
        self.max_batch = rows_per_batch(models.music.engine, settings.max_batch)
        self.jobs: tp.Dict[tp.Any, _Calls] = {}
        self.waiting_jobs = 0                      # jobs with an entry no replica has begun
        self.run_seconds = 1.0                     # moving average, for Retry-After
        self.healthy = 0                           # running MagnetModel replicas
        self.stopping = False
        self.app_name = APP_NAME

    # --------------------------------------------------------- Batcher's interface
    def start(self) -> None:
        self.app_name = serve.get_replica_context().app_name
        self.watcher = asyncio.get_running_loop().create_task(self._watch_replicas())

    def stop(self) -> None:
        self.stopping = True
        for job in list(self.jobs):
            self.cancel(job)

    def alive(self) -> bool:
        return not self.stopping and self.healthy > 0

    @property
    def running(self) -> int:
        return sum(len(state.running) for state in self.jobs.values())

    def submit(self, job) -> None:
        if self.waiting_jobs >= self.settings.queue_size:
            raise QueueFull()
        self.waiting_jobs += 1
        job.channel.publish("queued", {"request_id": job.request_id, "position": self.waiting_jobs,
                                       "rows": len(job.entries), "kind": job.kind})
        job.headers[RETRIES_HEADER] = "0"
        loop = asyncio.get_running_loop()
        self.jobs[job] = _Calls([loop.create_task(self._call(job, entry)) for entry in job.entries],
                                len(job.entries))

    def cancel(self, job) -> None:
        if job.close():
            self._forget(job)
            self.metrics.cancelled.inc()

    def queue_depth(self) -> int:
        return self.waiting_jobs

    def retry_after_s(self) -> int:
        runs_ahead = self.waiting_jobs / self.max_batch / max(self.healthy, 1) + 1
        return int(min(60, max(1, math.ceil(runs_ahead * self.run_seconds))))

    # --------------------------------------------------------- entries
    async def _call(self, job, entry) -> None:
        """One entry's streaming call, sent again to another replica when its replica dies."""
        for attempt in range(self.retries + 1):
            if job.closed:   # cancelled, or failed by another entry, before a retry
                return
            # as in one process: step events carry the canvas when someone follows the progress
            stream = self.handle.run.remote(entry.work, job.request_id, bool(job.channel.subscribers))
            ended = False
            try:
                async for event in stream:
                    ended = isinstance(event, TERMINAL)
                    self._event(job, entry.index, event)
                if not ended:
                    self._fail(job, ApiError(500, "NoResult", f"the replica ended {job.kind} entry {entry.index} "
                                             "without a result"))
                return
            except RayActorError as exc:   # the replica died: the entry goes to another one
                if attempt < self.retries and job in self.jobs:
                    self.jobs[job].retries += 1
                    job.headers[RETRIES_HEADER] = str(self.jobs[job].retries)
                elif attempt == self.retries:
                    self._fail(job, ApiError(503, "ReplicaFailed", f"the replica running {job.kind} entry "
                                             f"{entry.index} died ({type(exc).__name__}), retried {self.retries} "
                                             "time(s)"))
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - answered as JSON by the route
                self._fail(job, ApiError(500, type(exc).__name__, f"generation failed: {exc}"))
                return
            finally:
                if job in self.jobs:
                    self.jobs[job].running.discard(entry.index)

    def _event(self, job, index: int, event: Event) -> None:
        state = self.jobs.get(job)
        if state is None:   # closed: answered, failed or cancelled
            return
        if isinstance(event, Failed) and isinstance(event.error, ReplicaError):
            event = Failed(event.error.answer())
        if isinstance(event, Begun):
            state.running.add(index)
            if index not in state.begun:     # a retried entry was already counted
                state.begun.add(index)
                state.unstarted -= 1
                if state.unstarted == 0:
                    self.waiting_jobs -= 1
        elif isinstance(event, Finished) and event.lead:
            self.run_seconds = 0.8 * self.run_seconds + 0.2 * event.timing["run_ms"] / 1000
        job.deliver(index, event)
        if isinstance(event, Begun):
            job.headers[REPLICA_HEADER] = ",".join(sorted({replica for replica, _ in job.batches}))
        if job.closed:
            self._forget(job)

    def _fail(self, job, err: ApiError) -> None:
        if job.fail(err):
            self._forget(job)

    def _forget(self, job) -> None:
        """Drops a closed job and cancels its calls still in flight (not the one calling)."""
        state = self.jobs.pop(job, None)
        if state is None:
            return
        if state.unstarted:
            self.waiting_jobs -= 1
        current = asyncio.current_task()
        for task in state.tasks:
            if task is not current and not task.done():
                task.cancel()

    async def _watch_replicas(self) -> None:
        """Running MagnetModel replicas, for /healthz (0: answers 503)."""
        while not self.stopping:
            try:
                status = await asyncio.to_thread(serve.status)
                deployment = status.applications[self.app_name].deployments[MODEL_DEPLOYMENT]
                self.healthy = deployment.replica_states.get("RUNNING", 0)
            except Exception:  # noqa: BLE001 - the controller is restarting: keep the last count
                pass
            await asyncio.sleep(1.0)


class MagnetIngress:
    """The HTTP API of `magnet-engine serve`, every route from server.create_app. Deployed by `application`.

    limits: create_app's route limits (edit_limits, stream_limits, speech_limits)."""

    async def __init__(self, model: DeploymentHandle, settings: Settings, retries: int = 1,
                       limits: tp.Optional[tp.Dict[str, tp.Any]] = None):
        self.model, self.settings, self.retries, self.limits = model, settings, retries, limits or {}
        self.cards: Models = await model.card.remote()

    def __serve_build_asgi_app__(self):
        def batcher(models: Models, settings: Settings) -> RayBatcher:
            return RayBatcher(self.model, models, settings, self.retries)

        return create_app(self.cards.music, self.settings, batcher_factory=batcher, speech=self.cards.speech,
                          **self.limits)


# ------------------------------------------------------------------------------ the application
def application(spec: ModelSpec, settings: Settings, replicas: tp.Optional[int] = None,
                autoscale: tp.Optional[tp.Tuple[int, int]] = None, gpus_per_replica: float = 0,
                cpus_per_replica: float = 1, target_ongoing_requests: tp.Optional[float] = None,
                retries: int = 1, autoscaling: tp.Optional[tp.Dict[str, tp.Any]] = None,
                limits: tp.Optional[tp.Dict[str, tp.Any]] = None):
    """The bound Serve application: MagnetModel (N replicas, or autoscaled MIN:MAX on ongoing
    calls per replica; neither: Serve's default or a config file's `deployments:`) behind MagnetIngress.
    autoscaling: AutoscalingConfig fields over the defaults below (e.g. faster metrics in tests).
    limits: the routes' own limits, as create_app takes them (edit_limits, stream_limits, speech_limits)."""
    scaling: tp.Dict[str, tp.Any] = {} if replicas is None else {"num_replicas": replicas}
    if autoscale is not None:
        low, high = autoscale
        # One full batch in flight per replica is the steady state worth scaling out from.
        target = target_ongoing_requests or settings.max_batch
        scaling = {"autoscaling_config": {
            "min_replicas": low, "initial_replicas": low, "max_replicas": high, "target_ongoing_requests": target,
            "upscale_delay_s": 2.0, "downscale_delay_s": 10.0, **(autoscaling or {})}}
    model = serve.deployment(
        MagnetModel, name=MODEL_DEPLOYMENT,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        # room for a run going on and the next one gathering in the replica's queue
        max_ongoing_requests=2 * settings.max_batch,
        max_constructor_retry_count=1,
        graceful_shutdown_timeout_s=settings.request_timeout_s,
        **scaling,
    ).bind(spec, settings.max_batch, settings.max_wait_ms, settings.batching)
    ingress = serve.deployment(serve.ingress()(MagnetIngress), name="MagnetIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(model, settings, retries, limits)


ROUTE_ARGS = ("retries", "max_stream_duration", "max_edit_upload_bytes")   # as `magnet-engine serve`'s flags


def build_app(args: tp.Dict[str, tp.Any]):
    """Application builder for a Serve config file: `import_path: magnet_engine.cluster:build_app`.

    args: the ModelSpec fields (model, t5, device, engine, precision, compile, cuda_graphs, speech,
    cache_dir, threads), the Settings fields (max_batch, max_wait_ms, queue_size, ...), `retries`,
    and the routes' `max_stream_duration` and `max_edit_upload_bytes`."""
    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)}
    setting_fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(args) - spec_fields - setting_fields - set(ROUTE_ARGS)
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; known: "
                         f"{sorted(spec_fields | setting_fields | set(ROUTE_ARGS))}")
    spec = ModelSpec(**{k: v for k, v in args.items() if k in spec_fields})
    settings = Settings(**{"note": spec.note, **{k: v for k, v in args.items() if k in setting_fields}})
    limits = dict(edit_limits=EditLimits(**({"max_upload_bytes": args["max_edit_upload_bytes"]}
                                            if "max_edit_upload_bytes" in args else {})),
                  stream_limits=StreamLimits(**({"max_duration": args["max_stream_duration"]}
                                                if "max_stream_duration" in args else {})))
    return application(spec, settings, retries=int(args.get("retries", 1)), limits=limits)


def deployment_error(app_name: str = APP_NAME) -> str:
    """Why the application's model deployment failed: the last line of its status message
    (Serve's message ends with the replica constructor's exception, e.g. ModelNotFoundError: ...)."""
    deployment = serve.status().applications[app_name].deployments.get(MODEL_DEPLOYMENT)
    lines = [] if deployment is None else [line for line in deployment.message.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown (see the Ray Serve controller log)"


# ------------------------------------------------------------------------------ `serve --ray`
def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """`magnet-engine serve --ray` flags, on top of the single-process server's."""
    g = parser.add_argument_group("Ray Serve (--ray)")
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="model replicas, each one model on one device")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="autoscale the replicas between MIN and MAX on ongoing calls per replica")
    g.add_argument("--target-ongoing", type=float, default=None,
                   help="autoscaling target: calls (rows, edits, runs) in flight per replica (default: --max-batch)")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica (fractions share a GPU; default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0)
    g.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto', or ray://host:10001); default: start a local one")
    g.add_argument("--retries", type=int, default=1,
                   help="times a request's row or run whose replica died is sent again")


def parse_autoscale(text: str) -> tp.Tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--autoscale must be MIN:MAX (two integers), found {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, found {text!r}")
    return low, high


def main(argv: tp.Sequence[str], parser: argparse.ArgumentParser, options: tp.Callable) -> int:
    """`magnet-engine serve --ray ...`: deploy the application and serve until interrupted.

    parser: `magnet-engine serve`'s own (the Ray flags are added to it); options: its parsed
    flags -> server.serve.ServeOptions (the models' spec, Settings, the routes' limits), the one
    reading of those flags in one process and here. `cli.serve_on_ray` hands both over with the
    argv, so the two modules do not import each other."""
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    prog = "magnet-engine serve --ray"
    try:
        autoscale = None if args.autoscale is None else parse_autoscale(args.autoscale)
        if args.replicas < 1 or args.retries < 0:
            raise ValueError(f"--replicas must be >= 1 and --retries >= 0, found {args.replicas} and {args.retries}")
        opts = options(args)
    except (ValueError, MagnetEngineError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    spec = dataclasses.replace(opts.spec, threads=max(1, int(args.cpus_per_replica)))
    if spec.model is None:
        print(f"{prog}: no --model given. {DEMO_NOTE} Pass --model for a real checkpoint.")
    spec.prepare()   # built once here, not raced by replicas starting together on this node
    ray.init(address=args.address, include_dashboard=False)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    serve.start(http_options={"host": args.host, "port": args.port})
    app = application(spec, opts.settings, replicas=args.replicas, autoscale=autoscale, gpus_per_replica=gpus,
                      cpus_per_replica=args.cpus_per_replica, target_ongoing_requests=args.target_ongoing,
                      retries=args.retries, limits=opts.routes)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError:   # Serve's message names the deployment; the cause is in its status
        print(f"{prog}: the deployment failed: {deployment_error()}", file=sys.stderr)
        serve.delete(APP_NAME)
        return 2
    scale = f"autoscaled {autoscale[0]}..{autoscale[1]}" if autoscale else f"{args.replicas}"
    print(f"{prog}: {scale} replica(s), {gpus:g} GPU / {args.cpus_per_replica:g} CPU each; "
          f"http://{args.host}:{args.port}/", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:   # as `serve run`: the application goes, the cluster (if joined) stays
        print(f"{prog}: stopping", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            serve.delete(APP_NAME)
    return 0
