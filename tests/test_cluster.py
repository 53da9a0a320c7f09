"""The service on Ray Serve: a local Ray instance (2 CPUs), MagnetModel replicas of the tiny
random model behind MagnetIngress, the single-process server's HTTP API over loopback.

One application serves the whole module (replicas take tens of seconds to start on 2 cores);
the tests run in file order: spread and equality, the API's other routes, a replica killed
under load, autoscaling 1 -> 2 -> 1, and last a model that fails to load.
"""
import concurrent.futures as cf
import io
import json
import socket
import time
import zipfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the [cluster] extra (ray[serve]) is not installed")
import requests  # noqa: E402  (ray[serve] brings it)
from ray import serve  # noqa: E402

from magnet_engine.api import MAGNeT  # noqa: E402
from magnet_engine.audio import wav_bytes  # noqa: E402
from magnet_engine.cluster import APP_NAME, MODEL_DEPLOYMENT, ModelSpec, application, deployment_error  # noqa: E402
from magnet_engine.demo import build_random_model  # noqa: E402
from magnet_engine.engine.config import DecodingParams  # noqa: E402
from magnet_engine.server import Settings, text_token_count  # noqa: E402
from service_helpers import FAST, assert_same_audio, solo_wav, sse_events  # noqa: E402

pytestmark = pytest.mark.ray

SETTINGS = Settings(max_batch=4, max_wait_ms=20, request_timeout_s=120)
HTTP_TIMEOUT_S = 90   # a request with no answer by then counts as hung


@pytest.fixture(scope="module")
def spec(tiny_dir):
    return ModelSpec(model=str(tiny_dir), device="cpu", threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()
URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def cluster(spec):
    """Ray with 2 CPUs: one per model replica; the ingress takes none."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(application(spec, SETTINGS, replicas=2), name=APP_NAME, route_prefix="/")
    yield
    serve.shutdown()
    ray.shutdown()


def post(**body):
    return requests.post(f"{URL}/v1/generate", json={**FAST, **body}, timeout=HTTP_TIMEOUT_S)


def model_replicas() -> dict:
    """Replica states of MagnetModel, e.g. {"RUNNING": 2}."""
    return dict(serve.status().applications[APP_NAME].deployments[MODEL_DEPLOYMENT].replica_states)


def model_replica_actors():
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if f"#{MODEL_DEPLOYMENT}#" in a["name"] and a["namespace"] == "serve"]


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds until condition() held; fails after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.25)
    return time.monotonic() - start


@pytest.mark.parametrize("argv, message", [
    (["--autoscale", "3:1"], "0 <= MIN <= MAX"), (["--autoscale", "2"], "MIN:MAX (two integers)"),
    (["--replicas", "0"], "--replicas must be >= 1"), (["--max-batch", "0"], "max_batch must be >= 1")])
def test_serve_ray_refuses_bad_flags_before_starting_ray(argv, message, capsys):
    from magnet_engine.cli import main

    assert main(["serve", "--ray", *argv]) == 2
    assert message in capsys.readouterr().err and not ray.is_initialized()


def test_config_file_is_a_valid_serve_config():
    """deploy/serve_config.yaml: Serve's schema accepts it and its args build the application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from magnet_engine.cluster import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (magnet,) = schema.applications
    assert magnet.import_path == "magnet_engine.cluster:build_app"
    model = next(d for d in magnet.deployments if d.name == MODEL_DEPLOYMENT)
    assert model.autoscaling_config["target_ongoing_requests"] > 0 and model.ray_actor_options.num_gpus == 1
    assert type(build_app(magnet.args)).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown application args"):
        build_app({**magnet.args, "max_batch_size": 8})


def test_rows_spread_over_replicas_same_audio_as_one_process(cluster, tiny_model):
    seeds = list(range(8))
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda s: post(description="piano", seed=s), seeds))
    assert [r.status_code for r in answers] == [200] * len(seeds)
    replicas = {r.headers["x-replica-id"] for r in answers}
    assert len(replicas) == 2, f"all requests went to {replicas}"
    assert max(int(r.headers["x-batch-size"]) for r in answers) > 1, "equal rows were never batched"
    for seed, r in zip(seeds, answers):
        assert r.headers["content-type"] == "audio/wav" and r.headers["x-seed"] == str(seed)
        assert_same_audio(r.content, solo_wav(tiny_model, "piano", seed))
    # three text lengths: three batches, wherever the rows ran; one zip, each row its own seed
    texts = ["piano", "slow cinematic strings", "warm lo-fi piano with soft vinyl crackle"]
    assert len({text_token_count(tiny_model, text) for text in texts}) == 3
    r = post(descriptions=texts, seed=40)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["x-batches"] == "3"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        for i, text in enumerate(texts):
            assert_same_audio(zf.read(f"sample_{i}.wav"), solo_wav(tiny_model, text, 40 + i))


def test_same_routes_and_progress_through_the_ingress(cluster, tiny_model):
    info = requests.get(f"{URL}/v1/model", timeout=10).json()
    assert info["n_q"] == tiny_model.config.n_q and info["sample_rate"] == tiny_model.sample_rate
    assert info["limits"]["max_batch"] == SETTINGS.max_batch
    assert requests.get(f"{URL}/healthz", timeout=10).json() == {"status": "ok", "queue_depth": 0}
    assert 'id="generate"' in requests.get(f"{URL}/", timeout=10).text
    # bad input is answered by the ingress's validation, as by the single-process server
    bad = post(description="piano", top_k=-3)
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "InvalidOptionError"
    assert post(description="piano", bogus=1).status_code == 422
    # the progress stream, opened before the POST, follows the row on whichever replica runs it
    with cf.ThreadPoolExecutor(1) as pool:
        stream = pool.submit(requests.get, f"{URL}/v1/progress/p-7", timeout=HTTP_TIMEOUT_S)
        time.sleep(0.5)
        r = post(description="piano", request_id="p-7", seed=7)
        events = sse_events(stream.result().text)
    assert r.status_code == 200
    # behind the proxy the header has our id first, then Ray Serve's own request id
    assert r.headers["x-request-id"].split(",")[0] == "p-7"
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and {"started", "step", "codec"} <= set(kinds)
    # a watched request's steps carry the token canvas, made on the replica
    canvas = [data["canvas"] for kind, data in events if kind == "step" and "canvas" in data]
    assert canvas and canvas[-1]["codebooks"] == tiny_model.config.n_q
    assert post(description="piano", request_id="p-7").status_code == 409
    metrics = requests.get(f"{URL}/metrics", timeout=10).text
    assert 'magnet_requests_total{route="generate",status="200"}' in metrics and "magnet_batches_total" in metrics


def busy_replica(names, rows: int = 2):
    """The first of the named replica actors found with at least `rows` requests in flight."""
    actors = [ray.get_actor(name, namespace="serve") for name in names]
    for _ in range(500):
        for actor in actors:
            if ray.get(actor.get_num_ongoing_requests.remote(), timeout=10) >= rows:
                return actor
        time.sleep(0.01)
    raise AssertionError(f"no replica had {rows} requests in flight")


def test_replica_killed_under_load(cluster, tiny_model):
    """A bounded load (24 requests, 4 at a time, slower rows); after the 4th answer, a model
    replica with rows in flight is killed. Its rows are retried on the other replica."""
    slow = {"decoding_steps": [10, 5, 5, 5]}
    expected = {seed: solo_wav(tiny_model, "rain", seed, **slow) for seed in range(4)}
    before = set(model_replica_actors())
    assert len(before) == 2
    results, killed_at = [], []

    def one(i):
        try:
            return i, post(description="rain", seed=i % 4, **slow)
        except requests.Timeout:
            return i, None

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        for future in cf.as_completed(futures):
            results.append(future.result())
            if len(results) == 4:
                ray.kill(busy_replica(sorted(before)), no_restart=True)
                killed_at.append(time.monotonic())
    answers = [r for _, r in results if r is not None]
    counts = {"sent": 24, "answered": len(answers), "200": sum(r.status_code == 200 for r in answers),
              "5xx": sum(r.status_code >= 500 for r in answers), "hung": 24 - len(answers),
              "retried rows": sum(int(r.headers.get("x-row-retries", 0)) for r in answers)}
    recovered = wait_for(lambda: model_replicas() == {"RUNNING": 2} and len(set(model_replica_actors()) - before) == 1,
                         120, "MagnetModel back to 2 replicas")
    print(f"\nreplica killed under load: {json.dumps(counts)}; 2 healthy again "
          f"{time.monotonic() - killed_at[0]:.1f} s after the kill ({recovered:.1f} s after the load ended)")
    assert counts["hung"] == 0 and counts["200"] + counts["5xx"] == 24
    assert counts["retried rows"] >= 1, "the killed replica's rows were not sent again"
    for i, r in results:
        if r.status_code == 200:
            assert_same_audio(r.content, expected[i % 4])   # a retried row gives its own audio, not another's
        else:
            assert r.status_code == 503 and r.json()["error"]["type"] == "ReplicaFailed"
    assert counts["200"] >= 24 - 2 * SETTINGS.max_batch   # at most the dead replica's rows in flight fail


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_autoscaling_up_under_load_and_back(cluster, spec):
    """Autoscaled 1..2 on ongoing rows (target 1 per replica): load brings a second replica, idle
    takes it away, each within a bounded time. Metrics every second (Serve's default: 10 s,
    looking back 30 s) keep the test short."""
    fast_metrics = {"metrics_interval_s": 1, "look_back_period_s": 3, "upscale_delay_s": 1, "downscale_delay_s": 3}
    app = application(spec, SETTINGS, autoscale=(1, 2), target_ongoing_requests=1, autoscaling=fast_metrics)
    serve.run(app, name=APP_NAME, route_prefix="/")
    wait_for(lambda: model_replicas() == {"RUNNING": 1}, 90, "autoscaled deployment at its minimum of 1")
    stop = time.monotonic() + 120
    statuses = []

    def load():
        while time.monotonic() < stop and model_replicas().get("RUNNING", 0) < 2:
            statuses.append(post(description="piano", seed=len(statuses)).status_code)

    start = time.monotonic()
    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: load(), range(4)))
    up = time.monotonic() - start
    assert model_replicas().get("RUNNING", 0) == 2, f"no second replica after {up:.0f} s of load"
    down = wait_for(lambda: model_replicas() == {"RUNNING": 1}, 90, "back to 1 replica when idle")
    print(f"\nautoscaling: 1 -> 2 after {up:.1f} s of load ({len(statuses)} requests), 2 -> 1 {down:.1f} s after it")
    assert set(statuses) == {200}


def test_hybrid_prefix_announced_and_served_through_the_ingress(cluster, tmp_path_factory):
    """A hybrid checkpoint on its own application: the AR prefix decoded on the replica is
    announced on the ingress's progress stream and served from the ingress before the clip."""
    directory = build_random_model(tmp_path_factory.mktemp("hybrid"), "tiny", kind="hybrid")
    serve.run(application(ModelSpec(model=str(directory), device="cpu", threads=1), SETTINGS, replicas=1),
              name="hybrid", route_prefix="/hybrid")
    base = f"{URL}/hybrid"
    body = {**FAST, "description": "warm piano", "seed": 3, "duration": 0.6, "request_id": "hy"}
    with cf.ThreadPoolExecutor(1) as pool:
        stream = pool.submit(requests.get, f"{base}/v1/progress/hy", timeout=HTTP_TIMEOUT_S)
        time.sleep(0.5)
        r = requests.post(f"{base}/v1/generate", json=body, timeout=HTTP_TIMEOUT_S)
        events = sse_events(stream.result().text)
    first = requests.get(f"{base}/v1/prefix/hy", timeout=10)
    serve.delete("hybrid")
    assert r.status_code == 200
    kinds = [kind for kind, _ in events]
    assert kinds.index("prefix") < kinds.index("codec") < kinds.index("done")
    assert dict(events)["prefix"]["rows"] == [0] and dict(events)["prefix"]["url"] == "/v1/prefix/hy"
    assert any(data.get("stage") == "prefix" for kind, data in events if kind == "step")
    # the prefix served early is the decoded first frames of the final clip
    model = MAGNeT.from_pretrained(directory, device="cpu")
    tokens = model.generate_tokens(["warm piano"], seed=[3], params=DecodingParams(decoding_steps=(2, 1, 1, 1)),
                                   duration=0.6)
    frames = int(dict(events)["prefix"]["seconds"] * model.frame_rate)
    assert first.status_code == 200
    assert_same_audio(first.content, wav_bytes(model.decode(tokens[..., :frames])[0], model.sample_rate))
    assert_same_audio(r.content, wav_bytes(model.decode(tokens)[0], model.sample_rate))


def test_model_that_fails_to_load_fails_the_deployment(cluster, tmp_path):
    """The constructor's error is the deployment's error, after one try (no restart loop)."""
    missing = tmp_path / "no-such-model"
    app = application(ModelSpec(model=str(missing), device="cpu", threads=1), SETTINGS, replicas=1)
    with pytest.raises(RuntimeError, match="MagnetModel"):
        serve.run(app, name="broken", route_prefix="/broken")
    status = serve.status().applications["broken"]
    model = status.deployments[MODEL_DEPLOYMENT]
    assert status.status == "DEPLOY_FAILED" and model.status == "DEPLOY_FAILED"
    assert "failed to start 1 times" in model.message
    cause = deployment_error("broken")
    assert cause.startswith("magnet_engine.errors.ModelNotFoundError") and str(missing) in cause
    serve.delete("broken")
