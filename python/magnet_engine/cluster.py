"""magnet-engine on Ray Serve: model replicas, per-replica batching, autoscaling, the same HTTP API.

    magnet-engine serve --ray --replicas 4 --gpus-per-replica 1 --model facebook/magnet-small-10secs
    magnet-engine serve --ray --autoscale 1:8 --address auto      # join an existing Ray cluster
    serve run deploy/serve_config.yaml                           # the same application from a config file

One application, two deployments:

  MagnetModel    replicas that each own one model on one device (ray_actor_options num_gpus /
                 num_cpus). A row (one description) arrives per call; @serve.batch gathers the rows
                 that reach a replica together, and each group of rows with equal BatchKey (params,
                 duration, text token count: the single-process batcher's rule) runs as one
                 generate_tokens + one decode. A call is a stream: started, step, prefix, codec
                 events, then the row's audio (or its error). This is the deployment that scales.
  MagnetIngress  the HTTP API: server.create_app's own routes, mounted with @serve.ingress, over a
                 ModelCard (config, tokenizer, sample rate; no weights) fetched from a model replica,
                 with RayBatcher sending the rows to MagnetModel in place of the worker thread. The
                 progress stream, the hybrid prefix audio and request ids live here, so
                 GET /v1/progress/{id} and /v1/prefix/{id} work whichever replica decodes the rows:
                 events come back over the row's streaming call. One replica (it only routes);
                 several would each hold their own progress streams.

Faults: a row whose replica dies (killed actor, lost node) is sent again, once, to another
replica — its seed fixes its tokens, so the retry returns the audio the first try would have —
and answered 503 ReplicaFailed if that fails too. Ray restarts the dead replica. Nothing waits
beyond the request timeout (504). A model that fails to load fails the deployment with its error
(max_constructor_retry_count=1): deterministic load errors are not retried in a loop.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import sys
import time
import typing as tp
from pathlib import Path

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from magnet_engine.api import MAGNeT
from magnet_engine.audio import wav_bytes
from magnet_engine.engine import events
from magnet_engine.engine.conditioning import TextConditioner
from magnet_engine.engine.config import rows_per_batch
from magnet_engine.errors import MagnetEngineError
from magnet_engine.server.app import create_app
from magnet_engine.server.batcher import BatchKey, Job, QueueFull, canvas_snapshot, step_data
from magnet_engine.server.metrics import Metrics
from magnet_engine.server.schema import ApiError, Settings, api_error_from

APP_NAME = "magnet"
MODEL_DEPLOYMENT = "MagnetModel"
REPLICA_HEADER = "X-Replica-Id"     # the MagnetModel replicas that decoded a request's rows
RETRIES_HEADER = "X-Row-Retries"    # its rows sent again because their replica died
DEMO_NOTE = "Demo model with random (untrained) weights: it makes noise, not music."


# ------------------------------------------------------------------------------ what replicas load
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How a replica loads its model; `model` None: the embedded random-weight demo model."""

    model: tp.Optional[str] = None
    t5: tp.Optional[str] = None
    device: tp.Optional[str] = None     # None: the replica's GPU when Ray gave it one, else CPU
    engine: str = "fast"
    precision: tp.Optional[str] = None
    cache_dir: tp.Optional[str] = None  # where the demo model is built (a path every node can write)
    threads: tp.Optional[int] = None    # torch CPU threads: the replica's num_cpus, not the node's cores

    @property
    def note(self) -> str:
        return DEMO_NOTE if self.model is None else ""

    def load(self) -> MAGNeT:
        if self.threads:
            torch.set_num_threads(self.threads)
        options = dict(device=self.device, t5=self.t5, engine=self.engine, precision=self.precision)
        if self.model is not None:
            return MAGNeT.get_pretrained(self.model, **options)
        from magnet_engine.demo import DEFAULT_CACHE, cached_demo_model

        directory = cached_demo_model(self.cache_dir or DEFAULT_CACHE, "tiny")
        return MAGNeT.from_pretrained(directory, name="demo-tiny (random weights)", **options)


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

    check_duration = MAGNeT.check_duration   # the model's own rules, not copies
    max_duration = MAGNeT.max_duration
    extend_stride = MAGNeT.extend_stride
    window_count = MAGNeT.window_count
    _stride_frames = MAGNeT._stride_frames

    @classmethod
    def of(cls, model: MAGNeT) -> "ModelCard":
        return cls(model.name, model.engine, str(model.device), model.sample_rate, model.frame_rate, model.config,
                   TextTokens(model.conditioner.tokenizer, model.conditioner.max_text_tokens), model.max_duration,
                   model.params, model.extend_stride)


@dataclasses.dataclass(eq=False)
class RowRequest:
    """One row sent to a model replica."""

    text: tp.Optional[str]
    seed: int
    key: BatchKey
    watched: bool = False        # someone follows the progress: step events carry the token canvas
    cancelled: bool = False      # set on the replica when the caller goes away


class _Abandoned(Exception):
    """Every row of the running group was cancelled: stop generating."""


# ------------------------------------------------------------------------------ model replicas
class MagnetModel:
    """One model on one device; concurrent rows batched per BatchKey. Deployed by `application`."""

    def __init__(self, spec: ModelSpec, max_batch: int, max_wait_ms: float):
        self.model = spec.load()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # The reference loop's rows are not batch-invariant (one generator for all rows).
        self.max_batch = rows_per_batch(self.model.engine, max_batch)
        # @serve.batch hands over up to two batches' worth of waiting rows, so that rows of equal
        # key find each other among more than one batch's worth, as in the single-process
        # batcher's whole queue; each generate_tokens call still takes at most max_batch.
        self._rows.set_max_batch_size(2 * max_batch)
        self._rows.set_batch_wait_timeout_s(max_wait_ms / 1000)
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="magnet-generation")
        self.batches = 0
        # @serve.batch forms the next batch as soon as the previous one is handed over, not when
        # the model is free: under steady load rows then arrive one per finished row and every
        # batch has one row. Rows wait here while a batch runs, and enter @serve.batch together
        # when it ends, so a batch gathers the rows that waited (the single-process batcher's
        # behaviour).
        self.idle = asyncio.Event()
        self.idle.set()

    def card(self) -> ModelCard:
        return ModelCard.of(self.model)

    async def generate(self, row: RowRequest) -> tp.AsyncIterator[tp.Tuple[str, dict]]:
        """A row's events: started, step..., [prefix], codec, then audio | error."""
        try:
            await self.idle.wait()
            async for event in self._rows(row):
                if event is not None:   # an event of another row of the same batch
                    yield event
        finally:   # cancelled by the caller, or done
            row.cancelled = True

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)   # both reset from Settings in __init__
    async def _rows(self, rows: tp.List[RowRequest]) -> tp.AsyncIterator[tp.List[tp.Any]]:
        """Runs rows of equal key together, max_batch at a time, the oldest row's group first.
        Yields one list per event, with the event at its rows' positions (None elsewhere);
        StopIteration ends a row's stream."""
        groups: tp.Dict[BatchKey, tp.List[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.key, []).append(i)
        self.idle.clear()
        try:
            for group in groups.values():
                for start in range(0, len(group), self.max_batch):
                    positions = group[start:start + self.max_batch]
                    async for targets, event in self._run([rows[i] for i in positions]):
                        out: tp.List[tp.Any] = [None] * len(rows)
                        for j in targets:
                            out[positions[j]] = event
                        yield out
                    yield [StopIteration if i in positions else None for i in range(len(rows))]
        finally:
            self.idle.set()

    async def _run(self, rows: tp.List[RowRequest]) -> tp.AsyncIterator[tp.Tuple[tp.List[int], tp.Any]]:
        """Generates one group of compatible rows on the worker thread; its events, as they come."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        done = object()

        def emit(targets, event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (targets, event))

        def work() -> None:
            try:
                self._generate(rows, emit)
            finally:
                emit(None, done)

        finished = loop.run_in_executor(self.worker, work)
        while True:
            targets, event = await events.get()
            if event is done:
                break
            yield targets, event
        await finished

    def _generate(self, rows: tp.List[RowRequest], emit) -> None:
        """Worker thread: one generate_tokens + one decode for rows of equal key."""
        model, key, everyone = self.model, rows[0].key, list(range(len(rows)))
        self.batches += 1
        batch = {"replica": self.replica_id, "batch": self.batches, "batch_size": len(rows)}
        emit(everyone, ("started", batch))

        def on_event(event: events.Event) -> None:   # between decoding steps, on this thread
            if all(row.cancelled for row in rows):
                raise _Abandoned()
            data = step_data(event)
            if data is None:
                return
            canvas = isinstance(event, events.StageStep) and event.canvas is not None
            watched = [i for i in everyone if canvas and rows[i].watched]
            emit([i for i in everyone if i not in watched], ("step", data))
            for i in watched:
                emit([i], ("step", {**data, "canvas": canvas_snapshot(event, i, model.config.card)}))

        def on_prefix(wav: torch.Tensor) -> None:   # hybrid checkpoints: [B, C, prefix samples]
            wav = wav.cpu()
            for i in everyone:
                emit([i], ("prefix", {"wav": wav_bytes(wav[i], model.sample_rate),
                                      "seconds": round(wav.shape[-1] / model.sample_rate, 3)}))

        started = time.monotonic()
        try:
            tokens = model.generate_tokens([r.text for r in rows], on_event=on_event, seed=[r.seed for r in rows],
                                           params=key.params, duration=key.duration, on_prefix=on_prefix)  # [B, K, T]
            tokens_done = time.monotonic()
            emit(everyone, ("codec", {}))
            wav = model.decode(tokens).cpu()                                                         # [B, C, samples]
        except _Abandoned:
            return
        except Exception as exc:  # noqa: BLE001 - a failed group fails its rows, not the replica
            err = api_error_from(exc)
            emit(everyone, ("error", {"status": err.status, "type": err.kind, "message": err.message}))
            return
        timing = {**batch, "tokens_ms": (tokens_done - started) * 1000,
                  "codec_ms": (time.monotonic() - tokens_done) * 1000}
        for i in everyone:
            emit([i], ("audio", {**timing, "wav": wav[i], "lead": i == 0}))


# ------------------------------------------------------------------------------ the ingress side
@dataclasses.dataclass(eq=False)
class _Rows:
    """RayBatcher's state of one job."""

    tasks: tp.List[asyncio.Task]
    begun: tp.Set[int] = dataclasses.field(default_factory=set)     # rows a replica has started (ever)
    running: tp.Set[int] = dataclasses.field(default_factory=set)   # rows being decoded now
    batches: tp.Set[tp.Tuple[str, int]] = dataclasses.field(default_factory=set)  # (replica, batch) seen
    timed: tp.Set[tp.Tuple[str, int]] = dataclasses.field(default_factory=set)    # batches whose time is counted
    retries: int = 0                                                # rows sent again after their replica died


class RayBatcher:
    """server.Batcher's interface, over the MagnetModel deployment: one streaming call per row.

    Runs on the ingress's event loop (the routes call submit and cancel)."""

    def __init__(self, handle: DeploymentHandle, card: ModelCard, settings: Settings, retries: int = 1):
        self.handle = handle.options(stream=True)
        self.settings, self.retries = settings, retries
        self.metrics = Metrics(self.queue_depth, lambda: self.running)
        self.max_batch = rows_per_batch(card.engine, settings.max_batch)
        self.jobs: tp.Dict[Job, _Rows] = {}
        self.waiting_jobs = 0                      # jobs with a row no replica has started
        self.batch_seconds = 1.0                   # moving average, for Retry-After
        # request id -> response headers naming the replicas that decoded it and the retries
        # (bounded: a response that is never sent, its client gone, leaves its entry)
        self.headers: "collections.OrderedDict[str, tp.Dict[str, str]]" = collections.OrderedDict()
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

    def submit(self, job: Job) -> None:
        if self.waiting_jobs >= self.settings.queue_size:
            raise QueueFull()
        self.waiting_jobs += 1
        job.channel.publish("queued", {"request_id": job.request_id, "position": self.waiting_jobs,
                                       "rows": len(job.rows)})
        loop = asyncio.get_running_loop()
        self.jobs[job] = _Rows([loop.create_task(self._row(job, row)) for row in job.rows])

    def cancel(self, job: Job) -> None:
        if job.closed:
            return
        self._close(job)
        self.metrics.cancelled.inc()

    def queue_depth(self) -> int:
        return self.waiting_jobs

    def retry_after_s(self) -> int:
        batches_ahead = self.waiting_jobs / self.max_batch / max(self.healthy, 1) + 1
        return int(min(60, max(1, math.ceil(batches_ahead * self.batch_seconds))))

    # --------------------------------------------------------- rows
    async def _row(self, job: Job, row) -> None:
        # as the single-process server: the canvas goes to a watched request's first row only
        request = RowRequest(row.text, row.seed, row.key, watched=row.index == 0 and bool(job.channel.subscribers))
        for attempt in range(self.retries + 1):
            if job.closed:   # cancelled, or failed by another row, before a retry
                return
            stream = self.handle.generate.remote(request)
            try:
                async for kind, data in stream:
                    self._event(job, row, kind, data)
                if not job.closed and job.wavs[row.index] is None:
                    self._fail(job, ApiError(500, "NoAudio", f"the replica ended row {row.index} without audio"))
                return
            except RayActorError as exc:   # the replica died: the row goes to another one
                if job in self.jobs and attempt < self.retries:
                    self.jobs[job].retries += 1
                if attempt == self.retries:
                    self._fail(job, ApiError(503, "ReplicaFailed", f"the replica decoding row {row.index} died "
                                             f"({type(exc).__name__}), retried {self.retries} time(s)"))
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - answered as JSON by the route
                self._fail(job, ApiError(500, type(exc).__name__, f"generation failed: {exc}"))
                return
            finally:
                if job in self.jobs:
                    self.jobs[job].running.discard(row.index)

    def _event(self, job: Job, row, kind: str, data: dict) -> None:
        state = self.jobs.get(job)
        if state is None or job.closed:
            return
        if kind == "started":
            self._begin(job, state, row.index, data)
            job.channel.publish("started", {"batch_size": data["batch_size"], "rows": 1, "replica": data["replica"]})
        elif kind == "step":
            job.channel.publish("step", data)
        elif kind == "prefix":
            job.channel.prefix[row.index] = data["wav"]
            job.channel.publish("prefix", {"seconds": data["seconds"], "rows": [row.index],
                                           "url": f"/v1/prefix/{job.request_id}"})
        elif kind == "codec":
            job.channel.publish("codec", {})
        elif kind == "error":
            self._fail(job, ApiError(data["status"], data["type"], data["message"]))
        elif kind == "audio":
            self._audio(job, state, row.index, data)

    def _begin(self, job: Job, state: _Rows, index: int, data: dict) -> None:
        if job.queue_ms is None:
            job.queue_ms = (time.monotonic() - job.enqueued) * 1000
        batch = (data["replica"], data["batch"])
        if batch not in state.batches:   # rows of one job in one batch count once, as in Batcher
            state.batches.add(batch)
            job.batch_sizes.append(data["batch_size"])
        state.running.add(index)
        if index not in state.begun:     # a retried row was already counted
            state.begun.add(index)
            job.waiting -= 1
            if job.waiting == 0:
                self.waiting_jobs -= 1

    def _audio(self, job: Job, state: _Rows, index: int, data: dict) -> None:
        batch = (data["replica"], data["batch"])
        if batch not in state.timed:
            state.timed.add(batch)
            job.tokens_ms += data["tokens_ms"]
            job.codec_ms += data["codec_ms"]
        if data["lead"]:
            self.metrics.batch_done(data["batch_size"])
            seconds = (data["tokens_ms"] + data["codec_ms"]) / 1000
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds
        state.running.discard(index)
        job.wavs[index] = data["wav"]
        job.left -= 1
        if job.left == 0:
            self.headers[job.request_id] = {REPLICA_HEADER: ",".join(sorted({r for r, _ in state.timed})),
                                            RETRIES_HEADER: str(state.retries)}
            while len(self.headers) > 4096:
                self.headers.popitem(last=False)
            self._close(job)
            job.resolve(result=job.wavs)

    def _fail(self, job: Job, err: ApiError) -> None:
        if not job.closed:
            self._close(job)
            job.resolve(error=err)

    def _close(self, job: Job) -> None:
        """Closes the job and cancels its rows still in flight (not the one calling)."""
        job.closed = True
        if job.waiting:
            job.waiting = 0
            self.waiting_jobs -= 1
        state = self.jobs.pop(job, None)
        current = asyncio.current_task()
        for task in state.tasks if state else ():
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
    """The HTTP API of `magnet-engine serve`, its routes from server.create_app. Deployed by `application`."""

    async def __init__(self, model: DeploymentHandle, settings: Settings, retries: int = 1):
        self.model, self.settings, self.retries = model, settings, retries
        self.card: ModelCard = await model.card.remote()

    def __serve_build_asgi_app__(self):
        def batcher(card, settings) -> RayBatcher:
            self.batcher = RayBatcher(self.model, card, settings, self.retries)
            return self.batcher

        app = create_app(self.card, self.settings, batcher_factory=batcher)

        @app.middleware("http")
        async def replica_headers(request, call_next):
            response = await call_next(request)
            response.headers.update(self.batcher.headers.pop(response.headers.get("x-request-id", ""), {}))
            return response

        return app


# ------------------------------------------------------------------------------ the application
def application(spec: ModelSpec, settings: Settings, replicas: tp.Optional[int] = None,
                autoscale: tp.Optional[tp.Tuple[int, int]] = None, gpus_per_replica: float = 0,
                cpus_per_replica: float = 1, target_ongoing_requests: tp.Optional[float] = None,
                retries: int = 1, autoscaling: tp.Optional[tp.Dict[str, tp.Any]] = None):
    """The bound Serve application: MagnetModel (N replicas, or autoscaled MIN:MAX on ongoing
    rows per replica; neither: Serve's default or a config file's `deployments:`) behind MagnetIngress.
    autoscaling: AutoscalingConfig fields over the defaults below (e.g. faster metrics in tests)."""
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
        # room for a batch being decoded and the next one gathering
        max_ongoing_requests=2 * settings.max_batch,
        max_constructor_retry_count=1,
        graceful_shutdown_timeout_s=settings.request_timeout_s,
        **scaling,
    ).bind(spec, settings.max_batch, settings.max_wait_ms)
    ingress = serve.deployment(serve.ingress()(MagnetIngress), name="MagnetIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(model, settings, retries)


def build_app(args: tp.Dict[str, tp.Any]):
    """Application builder for a Serve config file: `import_path: magnet_engine.cluster:build_app`.

    args: the ModelSpec fields (model, t5, device, engine, precision, cache_dir, threads) and
    Settings fields (max_batch, max_wait_ms, queue_size, ...), plus `retries`."""
    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)}
    setting_fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(args) - spec_fields - setting_fields - {"retries"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; known: "
                         f"{sorted(spec_fields | setting_fields | {'retries'})}")
    spec = ModelSpec(**{k: v for k, v in args.items() if k in spec_fields})
    settings = Settings(**{"note": spec.note, **{k: v for k, v in args.items() if k in setting_fields}})
    return application(spec, settings, retries=int(args.get("retries", 1)))


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
                       help="autoscale the replicas between MIN and MAX on ongoing rows per replica")
    g.add_argument("--target-ongoing", type=float, default=None,
                   help="autoscaling target: rows in flight per replica (default: --max-batch)")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica (fractions share a GPU; default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0)
    g.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto', or ray://host:10001); default: start a local one")
    g.add_argument("--retries", type=int, default=1, help="times a row whose replica died is sent again")


def parse_autoscale(text: str) -> tp.Tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--autoscale must be MIN:MAX (two integers), found {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, found {text!r}")
    return low, high


def main(argv: tp.Sequence[str], parser: argparse.ArgumentParser, setting_args: tp.Sequence[str]) -> int:
    """`magnet-engine serve --ray ...`: deploy the application and serve until interrupted.

    parser: `magnet-engine serve`'s own (the Ray flags are added to it), setting_args: its
    flags that are `Settings` fields; `server.serve.main` hands both over with the argv, so
    the two modules do not import each other."""
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    prog = "magnet-engine serve --ray"
    try:
        autoscale = None if args.autoscale is None else parse_autoscale(args.autoscale)
        if args.replicas < 1 or args.retries < 0:
            raise ValueError(f"--replicas must be >= 1 and --retries >= 0, found {args.replicas} and {args.retries}")
        settings = Settings(**{name: getattr(args, name) for name in setting_args})
    except (ValueError, MagnetEngineError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    spec = ModelSpec(model=args.model, t5=args.t5, device=args.device, engine=args.engine, precision=args.precision,
                     cache_dir=str(Path(args.cache_dir).expanduser()), threads=max(1, int(args.cpus_per_replica)))
    settings = dataclasses.replace(settings, note=spec.note)
    if spec.model is None:   # built once here, not raced by replicas starting together on this node
        from magnet_engine.demo import cached_demo_model

        print(f"{prog}: no --model given. {DEMO_NOTE} Pass --model for a real checkpoint.")
        cached_demo_model(spec.cache_dir, "tiny")
    ray.init(address=args.address, include_dashboard=False)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    serve.start(http_options={"host": args.host, "port": args.port})
    app = application(spec, settings, replicas=args.replicas, autoscale=autoscale, gpus_per_replica=gpus,
                      cpus_per_replica=args.cpus_per_replica, target_ongoing_requests=args.target_ongoing,
                      retries=args.retries)
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
