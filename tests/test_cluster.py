"""The service on Ray Serve: a local Ray instance (2 CPUs), MagnetModel replicas of the tiny
random model behind MagnetIngress, the single-process server's HTTP API over loopback.

One application serves the whole module (replicas take tens of seconds to start on 2 cores);
the tests run in file order: spread and equality, the API's other routes (edit, stream and
speech edit included, and their queue bound, timeout and cancellation on an application of
their own), a replica killed under load, in the middle of an edit and of a stream, autoscaling
1 -> 2 -> 1, and last a model that fails to load.
"""
import concurrent.futures as cf
import dataclasses
import io
import json
import socket
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ray = pytest.importorskip("ray", reason="the [cluster] extra (ray[serve]) is not installed")
import requests  # noqa: E402  (ray[serve] brings it)
from ray import serve  # noqa: E402

from magnet_engine.api import MAGNeT  # noqa: E402
from magnet_engine.audio import wav_bytes  # noqa: E402
from magnet_engine.cluster import APP_NAME, MODEL_DEPLOYMENT, ModelSpec, application, deployment_error  # noqa: E402
from magnet_engine.demo import build_random_model  # noqa: E402
from magnet_engine.engine.config import DecodingParams  # noqa: E402
from magnet_engine.server.routes.stream import StreamLimits  # noqa: E402
from magnet_engine.server import Settings, create_app, text_token_count  # noqa: E402
from service_helpers import (FAST, SPEECH_WORDS, assert_same_audio, metric, solo_wav, speech_edit_request,  # noqa: E402
                             sse_events)

pytestmark = pytest.mark.ray

SETTINGS = Settings(max_batch=4, max_wait_ms=20, request_timeout_s=120)
HTTP_TIMEOUT_S = 90   # a request with no answer by then counts as hung


@pytest.fixture(scope="module")
def spec(tiny_dir):
    return ModelSpec(model=str(tiny_dir), device="cpu", threads=1)


@pytest.fixture(scope="module")
def speech_model(tiny_speech_dir):
    from magnet_engine import PlayDiffusion

    return PlayDiffusion(str(tiny_speech_dir), device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()
URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def cluster(spec, tiny_speech_dir):
    """Ray with 2 CPUs: one per model replica (each with a speech model); the ingress takes none."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(application(dataclasses.replace(spec, speech=str(tiny_speech_dir)), SETTINGS, replicas=2,
                          limits={"stream_limits": StreamLimits(max_duration=40)}),
              name=APP_NAME, route_prefix="/")
    yield
    serve.shutdown()
    ray.shutdown()


def post(**body):
    return requests.post(f"{URL}/v1/generate", json={**FAST, **body}, timeout=HTTP_TIMEOUT_S)


def tone(seconds: float, rate: int = 32000) -> bytes:
    t = torch.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * torch.sin(2 * torch.pi * 220 * t)).numpy(), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def post_edit(clip: bytes, regions, base: str = URL, **fields):
    return requests.post(f"{base}/v1/edit", files={"audio": ("clip.wav", clip, "audio/wav")},
                         data={"regions": json.dumps(regions), **fields}, timeout=HTTP_TIMEOUT_S)


def solo_edit(model, clip: bytes, regions, description, seed, steps) -> bytes:
    """The same edit through the API, in this process."""
    wave = torch.from_numpy(sf.read(io.BytesIO(clip), dtype="float32")[0][None].copy())   # [1, samples]
    wav = model.generate_infill(wave, model.sample_rate, regions, [description], seed=seed,
                                params=DecodingParams(decoding_steps=steps))
    return wav_bytes(wav[0], model.sample_rate)


def stream_events(run_id: str, on_first_chunk=None):
    """The SSE events of a streamed run, read as they arrive; on_first_chunk() runs when the
    first chunk is announced."""
    def lines(answer):
        called = False
        for line in answer.iter_lines(decode_unicode=True):
            if line.startswith("event: chunk") and on_first_chunk is not None and not called:
                called = True
                on_first_chunk()
            yield line
    with requests.get(f"{URL}/v1/stream/{run_id}/events", stream=True, timeout=HTTP_TIMEOUT_S) as answer:
        return sse_events(lines(answer))


def joined_chunks(events) -> np.ndarray:
    parts = [sf.read(io.BytesIO(requests.get(f"{URL}{data['url']}", timeout=10).content))[0]
             for kind, data in events if kind == "chunk"]
    return np.concatenate(parts)


def solo_stream(model, text, seed, duration, steps) -> np.ndarray:
    tokens = model.generate_tokens([text], seed=seed, duration=duration, params=DecodingParams(decoding_steps=steps))
    return model.decode(tokens)[0, 0].clamp(-1, 1).numpy()


SERVICE = types.SimpleNamespace(get=lambda path: requests.get(f"{URL}{path}", timeout=10))   # for metric()


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


def test_serve_ray_keeps_every_load_option(tiny_dir, tmp_path, monkeypatch):
    """`serve --ray` reads its flags as `serve` does (server.serve.options): every load option
    reaches the replicas' ModelSpec (--compile and --cuda-graphs were once accepted and dropped),
    and the routes' limits reach the ingress."""
    from magnet_engine import cluster
    from magnet_engine.cli import main

    deployed = {}

    class Deployed(Exception):
        pass

    def application(spec, settings, **options):
        deployed.update(spec=spec, settings=settings, **options)
        raise Deployed()
    monkeypatch.setattr(cluster, "application", application)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    with pytest.raises(Deployed):
        main(["serve", "--ray", "--model", str(tiny_dir), "--device", "cpu", "--precision", "fp32", "--compile",
              "--cuda-graphs", "--speech", str(tmp_path), "--engine", "reference", "--t5", "t5-small",
              "--cpus-per-replica", "2", "--max-stream-duration", "30", "--max-edit-upload-bytes", "1000",
              "--queue-size", "5"])
    assert deployed["spec"] == ModelSpec(model=str(tiny_dir), t5="t5-small", device="cpu", engine="reference",
                                         precision="fp32", compile=True, cuda_graphs=True, speech=str(tmp_path),
                                         cache_dir=deployed["spec"].cache_dir, threads=2)
    assert deployed["settings"].queue_size == 5
    assert deployed["limits"]["stream_limits"].max_duration == 30
    assert deployed["limits"]["edit_limits"].max_upload_bytes == 1000


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


def test_edit_stream_and_speech_edit_through_the_ingress(cluster, tiny_model, speech_model):
    """Every route of the single-process server is mounted on the ingress and runs on the
    replicas: /v1/model lists the same endpoints, an edit, a streamed run and a speech edit
    answer what the API answers in this process, with their progress, request ids and metrics."""
    info = requests.get(f"{URL}/v1/model", timeout=10).json()
    one_process = create_app(tiny_model, Settings(), speech=speech_model).openapi()["paths"]
    assert info["endpoints"] == sorted(path for path in one_process if path.startswith("/v1/"))
    assert {"/v1/edit", "/v1/stream", "/v1/speech/edit"} <= set(info["endpoints"])
    assert info["limits"]["max_stream_duration"] == 40 and "/v1/speech/edit" in info["limits"]["routes"]

    # an edit, its progress followed from before the POST
    clip = tone(1.0)
    with cf.ThreadPoolExecutor(1) as pool:
        progress = pool.submit(requests.get, f"{URL}/v1/progress/ray-edit", timeout=HTTP_TIMEOUT_S)
        time.sleep(0.5)
        edited = post_edit(clip, [[0.2, 0.5]], description="a fill", seed="3", decoding_steps="[3, 2, 2, 2]",
                           request_id="ray-edit")
        events = sse_events(progress.result().text)
    assert edited.status_code == 200 and edited.headers["content-type"] == "audio/wav"
    assert edited.headers["x-replica-id"] and edited.headers["x-row-retries"] == "0"
    assert_same_audio(edited.content, solo_edit(tiny_model, clip, [(0.2, 0.5)], "a fill", 3, (3, 2, 2, 2)))
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and "step" in kinds
    started = dict(events)["started"]
    assert started["kind"] == "edit" and started["replica"] == edited.headers["x-replica-id"]
    assert any("canvas" in data for kind, data in events if kind == "step")
    again = post_edit(clip, [[0.2, 0.5]], request_id="ray-edit")
    assert again.status_code == 409 and again.json()["error"]["type"] == "Conflict"
    assert post_edit(b"RIFF....WAVEnope", [[0.2, 0.5]]).status_code == 400     # the ingress reads the upload

    # a streamed run: 2 windows of the 10 s model, its chunks joined are the clip
    run = requests.post(f"{URL}/v1/stream", json={"description": "a", "duration": 12, "seed": 4,
                                                  "decoding_steps": [2, 1, 1, 1], "request_id": "ray-stream"},
                        timeout=HTTP_TIMEOUT_S)
    assert run.status_code == 202 and run.json()["id"] == "ray-stream"
    seen = stream_events("ray-stream")
    assert [kind for kind, _ in seen][-1] == "done" and seen[-1][1]["chunks"] == len(seen) - 1 >= 2
    assert [data["index"] for kind, data in seen if kind == "chunk"] == list(range(len(seen) - 1))
    joined, whole = joined_chunks(seen), solo_stream(tiny_model, "a", 4, 12, (2, 1, 1, 1))
    assert joined.shape == whole.shape and abs(joined - whole).max() <= 1e-4 + 1 / 32767
    assert requests.post(f"{URL}/v1/stream", json={"duration": 41}, timeout=10).status_code == 422

    # a speech edit on the replicas' speech model
    audio, form = speech_edit_request()
    spoken = requests.post(f"{URL}/v1/speech/edit", data=form, files={"audio": ("in.wav", audio, "audio/wav")},
                           timeout=HTTP_TIMEOUT_S)
    assert spoken.status_code == 200 and spoken.headers["content-type"] == "audio/wav", spoken.text
    wave = torch.from_numpy(sf.read(io.BytesIO(audio), dtype="float32")[0][None].copy())
    local = speech_model.inpaint_audio(wave, 16000, dict(input_text=form["input_text"], output_text=form["output_text"],
                                                         input_word_times=SPEECH_WORDS, num_steps=3), seed=4)
    assert int(spoken.headers["x-units"]) == local.units.numel() and sf.read(io.BytesIO(spoken.content))[0].size
    assert requests.get(f"{URL}/v1/speech/edit/defaults", timeout=10).json()["num_steps"] > 0
    bad = requests.post(f"{URL}/v1/speech/edit", data={**form, "num_steps": "0"},
                        files={"audio": ("in.wav", audio, "audio/wav")}, timeout=HTTP_TIMEOUT_S)
    assert bad.status_code == 422

    for route, status in (("edit", 200), ("edit", 409), ("edit", 400), ("stream", 202), ("stream", 422),
                          ("speech_edit", 200), ("speech_edit", 422)):
        assert metric(SERVICE, "magnet_requests_total", route=route, status=status) >= 1, (route, status)
    for kind in ("edit", "stream", "speech_edit"):
        assert metric(SERVICE, "magnet_tasks_total", kind=kind) >= 1, kind
    assert metric(SERVICE, "magnet_request_duration_seconds_count", route="stream") >= 1   # at the run's end


def test_queue_bound_timeout_and_cancellation_hold_for_edits_on_ray(cluster, spec):
    """An application with a queue of 1 and a 3 s timeout: of three long edits at once, those
    beyond the bound get 503 + Retry-After, the others 504; each timed-out edit stops on its
    replica within a step (a short request right after is answered in time)."""
    strict = Settings(max_batch=4, queue_size=1, request_timeout_s=3, max_wait_ms=0)
    # no CPU of its own: the main application's two replicas hold the cluster's two
    serve.run(application(spec, strict, replicas=1, cpus_per_replica=0), name="strict", route_prefix="/strict")
    base = f"{URL}/strict"
    clip = tone(5.0)
    try:
        with cf.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda i: post_edit(clip, [[0.5, 4.5]], base, seed=str(i),
                                                        decoding_steps="[100, 100, 100, 100]"), range(3)))
        statuses = sorted(r.status_code for r in answers)
        assert 503 in statuses and set(statuses) <= {503, 504}, statuses
        for r in answers:
            kind = r.json()["error"]["type"]
            assert kind == ("QueueFull" if r.status_code == 503 else "Timeout")
            assert r.status_code == 504 or int(r.headers["retry-after"]) >= 1
        quick = requests.post(f"{base}/v1/generate", json={**FAST, "description": "piano"}, timeout=HTTP_TIMEOUT_S)
        assert quick.status_code == 200, quick.text
        service = types.SimpleNamespace(get=lambda path: requests.get(f"{base}{path}", timeout=10))
        assert metric(service, "magnet_requests_total", route="edit", status=503) >= 1
        assert metric(service, "magnet_cancelled_total") == statuses.count(504)
        assert metric(service, "magnet_queue_depth") == 0
    finally:
        serve.delete("strict")


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


def kill_the_busy_replica(before):
    ray.kill(busy_replica(sorted(before), rows=1), no_restart=True)


def wait_for_recovery(before) -> None:
    wait_for(lambda: model_replicas() == {"RUNNING": 2} and len(set(model_replica_actors()) - before) == 1,
             120, "MagnetModel back to 2 replicas")


def test_replica_killed_in_the_middle_of_an_edit(cluster, tiny_model):
    """The edit is sent again to the other replica (its seed fixes the clip) or answered 503;
    never hung, never a half-made clip."""
    before = set(model_replica_actors())
    clip, steps = tone(5.0), (40, 40, 40, 40)

    def kill_at_its_first_step():   # not before: a call no replica has started is re-routed by Serve itself
        with requests.get(f"{URL}/v1/progress/kill-edit", stream=True, timeout=HTTP_TIMEOUT_S) as progress:
            for line in progress.iter_lines(decode_unicode=True):
                if line.startswith("event: step"):
                    return kill_the_busy_replica(before)

    with cf.ThreadPoolExecutor(2) as pool:
        killer = pool.submit(kill_at_its_first_step)
        time.sleep(0.5)
        r = post_edit(clip, [[0.5, 4.5]], seed="9", decoding_steps=json.dumps(steps), request_id="kill-edit")
        killer.result()
    wait_for_recovery(before)
    print(f"\nreplica killed mid-edit: {r.status_code}, retries {r.headers.get('x-row-retries')}")
    if r.status_code == 200:
        assert r.headers["x-row-retries"] == "1"
        assert_same_audio(r.content, solo_edit(tiny_model, clip, [(0.5, 4.5)], None, 9, steps))
    else:
        assert r.status_code == 503 and r.json()["error"]["type"] == "ReplicaFailed", r.text


def test_replica_killed_in_the_middle_of_a_stream(cluster, tiny_model):
    """Killed after the first chunk: the run goes on on the other replica, the chunks already
    delivered are not sent twice and the whole is the clip; or it ends with `error`
    ReplicaFailed. Either way the event stream ends."""
    before = set(model_replica_actors())
    body = {"description": "rain", "duration": 30, "seed": 5, "decoding_steps": [10, 5, 5, 5],
            "request_id": "ray-kill-stream"}
    assert requests.post(f"{URL}/v1/stream", json=body, timeout=HTTP_TIMEOUT_S).status_code == 202
    seen = stream_events("ray-kill-stream", on_first_chunk=lambda: kill_the_busy_replica(before))
    wait_for_recovery(before)
    kinds = [kind for kind, _ in seen]
    chunks = [data["index"] for kind, data in seen if kind == "chunk"]
    print(f"\nreplica killed mid-stream: {len(chunks)} chunks, then {seen[-1]}")
    assert chunks == list(range(len(chunks))) and kinds[-1] in ("done", "error")
    if kinds[-1] == "done":
        joined, whole = joined_chunks(seen), solo_stream(tiny_model, "rain", 5, 30, (10, 5, 5, 5))
        assert joined.shape == whole.shape and abs(joined - whole).max() <= 1e-4 + 1 / 32767
    else:
        assert seen[-1][1]["type"] == "ReplicaFailed"


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
