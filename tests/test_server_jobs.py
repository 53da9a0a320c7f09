"""Every kind of work the service runs goes through the one queue and worker: /v1/edit,
/v1/stream and /v1/speech/edit get the generate path's queue bound (503 + Retry-After),
timeout (504), cancellation between steps (timeout, disconnect), request-id ownership (409)
and metrics (by route).

`HeldModel` holds the worker inside a run's step-2 listener (the model's lock held, as in a
real run) until a test opens its gate, so queue-full, timeout and disconnect cases are
deterministic without sleeping on wall-clock guesses.
"""
import concurrent.futures as cf
import io
import json
import socket
import threading

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from magnet_engine.api import MAGNeT
from magnet_engine.demo import build_random_model
from magnet_engine.engine.events import StageStep
from magnet_engine.server import BackgroundServer, Settings, create_app
from service_helpers import metric, speech_edit_request, sse_events, wait_until

GEN = {"duration": 0.3, "decoding_steps": [50, 1, 1, 1], "description": "warm piano"}
EDIT_STEPS = json.dumps([50, 50, 50, 50])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = MAGNeT.from_pretrained(build_random_model(tmp_path_factory.mktemp("jobs"), "tiny", duration=1),
                                   device="cpu")
    model.set_generation_params(decoding_steps=[3, 2, 2, 2])
    model.extend_stride = 0.6
    return model


class HeldModel:
    """The tiny model; each run (generate_tokens or generate_infill) records its steps and the
    first one to reach step 2 holds there, inside the worker's listener, until the gate opens."""

    def __init__(self, model):
        self._model = model
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.runs = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _hold(self, on_event):
        steps = []
        self.runs.append(steps)

        def hold(event):
            if isinstance(event, StageStep):
                steps.append(event.done)
                if event.done == 2:
                    self.entered.set()
                    assert self.gate.wait(timeout=60), "test gate never opened"
            if on_event is not None:
                on_event(event)
        return hold

    def generate_tokens(self, descriptions, on_event=None, **kwargs):
        return self._model.generate_tokens(descriptions, on_event=self._hold(on_event), **kwargs)

    def generate_infill(self, *args, on_event=None, **kwargs):
        return self._model.generate_infill(*args, on_event=self._hold(on_event), **kwargs)


@pytest.fixture
def held(tiny):
    model = HeldModel(tiny)
    yield model
    model.gate.set()


def app_for(model, **settings):
    return create_app(model, Settings(**settings))


def clip_wav(seconds=0.8, rate=32000) -> bytes:
    t = torch.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * torch.sin(2 * torch.pi * 220 * t)).numpy(), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def edit(client, **fields):
    form = {"regions": json.dumps([[0.1, 0.3]]), "seed": "1", **fields}
    return client.post("/v1/edit", files={"audio": ("clip.wav", clip_wav(), "audio/wav")}, data=form)


def test_an_edit_flood_is_bounded_by_the_queue(held):
    """20 concurrent edits on a queue of 2 behind a busy worker: exactly 2 queued, 18 answered
    503 + Retry-After at once (they used to wait, unbounded, for the model's lock)."""
    held.gate.clear()
    with TestClient(app_for(held, max_batch=1, queue_size=2, max_wait_ms=0)) as client:
        with cf.ThreadPoolExecutor(21) as pool:
            try:
                running = pool.submit(client.post, "/v1/generate", json=GEN)
                assert held.entered.wait(30)
                flood = [pool.submit(edit, client) for _ in range(20)]
                wait_until(lambda: sum(f.done() for f in flood) >= 18, timeout=15)
                depths = [metric(client, "magnet_queue_depth"), client.get("/healthz").json()["queue_depth"]]
                rejected = [f.result() for f in flood if f.done()]
            finally:
                held.gate.set()
            answers = [f.result() for f in flood]
            assert running.result().status_code == 200
        assert depths == [2, 2] and metric(client, "magnet_queue_depth") == 0
    assert len(rejected) == 18
    assert all(r.status_code == 503 and int(r.headers["retry-after"]) >= 1 for r in rejected)
    assert all(r.json()["error"]["type"] == "QueueFull" for r in rejected)
    assert sorted(r.status_code for r in answers) == [200] * 2 + [503] * 18


def test_a_disconnected_edit_frees_the_worker_within_one_step(held):
    held.gate.clear()
    with BackgroundServer(app_for(held, max_wait_ms=0)) as url, httpx.Client(base_url=url, timeout=60) as client:
        form = {"regions": json.dumps([[0.1, 0.3]]), "decoding_steps": EDIT_STEPS}
        request = client.build_request("POST", "/v1/edit", data=form,
                                       files={"audio": ("clip.wav", clip_wav(), "audio/wav")})
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        host, port = url.removeprefix("http://").split(":")
        try:
            with socket.create_connection((host, int(port))) as sock:   # a client that leaves mid-run
                sock.sendall(f"POST /v1/edit HTTP/1.1\r\n{head}\r\n".encode() + request.read())
                assert held.entered.wait(30)
            wait_until(lambda: metric(client, "magnet_cancelled_total") == 1, timeout=15)
        finally:
            held.gate.set()
        wait_until(lambda: metric(client, "magnet_running_rows") == 0)
        assert held.runs[0] == [1, 2]           # the listener of step 2 raised: not one more step ran
        assert metric(client, "magnet_requests_total", route="edit", status=499) == 1
        assert edit(client).status_code == 200


def test_an_edit_times_out_with_504_and_stops_within_one_step(held):
    held.gate.clear()
    with TestClient(app_for(held, request_timeout_s=0.5, max_wait_ms=0)) as client:
        try:
            answer = edit(client, decoding_steps=EDIT_STEPS)
            assert answer.status_code == 504 and held.entered.is_set()
            assert "0.5 s" in answer.json()["error"]["message"]
        finally:
            held.gate.set()
        wait_until(lambda: metric(client, "magnet_running_rows") == 0)
        assert held.runs[0] == [1, 2]
        assert metric(client, "magnet_requests_total", route="edit", status=504) == 1


def test_metrics_count_every_route(tiny):
    with TestClient(app_for(tiny)) as client:
        assert edit(client).status_code == 200
        assert edit(client, regions="not json").status_code == 400
        assert client.post("/v1/generate", json={**GEN, "decoding_steps": [2, 1, 1, 1]}).status_code == 200
        assert metric(client, "magnet_requests_total", route="edit", status=200) == 1
        assert metric(client, "magnet_requests_total", route="edit", status=400) == 1
        assert metric(client, "magnet_requests_total", route="generate", status=200) == 1
        assert metric(client, "magnet_request_duration_seconds_count", route="edit") == 1
        assert metric(client, "magnet_request_duration_seconds_count", route="generate") == 1
        assert metric(client, "magnet_errors_total", route="edit", type="InvalidInputError") == 1


def test_an_edit_owns_its_request_id_and_streams_progress(held):
    """An edit may name a request_id: its progress is on /v1/progress/{id}, and a second POST of
    any kind with that id while it lives gets 409 and touches nothing."""
    held.gate.clear()
    with TestClient(app_for(held, max_wait_ms=0)) as client:
        with cf.ThreadPoolExecutor(1) as pool:
            try:
                first = pool.submit(edit, client, request_id="mine")
                assert held.entered.wait(30)
                again = edit(client, request_id="mine")
                generate = client.post("/v1/generate", json={**GEN, "request_id": "mine"})
            finally:
                held.gate.set()
            assert first.result().status_code == 200
        kinds = [k for k, _ in sse_events(client.get("/v1/progress/mine").text)]
    assert again.status_code == generate.status_code == 409
    assert again.json()["error"]["type"] == "Conflict"
    assert kinds[:2] == ["queued", "started"] and "step" in kinds and kinds[-1] == "done"


def test_a_watched_edit_streams_its_token_canvas(tiny):
    """Those watching an edit's progress get its canvas with each step, as a generate request's:
    outside the region every cell is fixed (255) from the first step, in every codebook (the engine
    reports a fixed cell's confidence as certain), inside it the codebooks fill in stage by stage."""
    import base64

    with TestClient(app_for(tiny)) as client:
        with cf.ThreadPoolExecutor(1) as pool:
            stream = pool.submit(client.get, "/v1/progress/watched")
            wait_until(lambda: client.app.state.hub.get("watched") is not None)
            assert edit(client, request_id="watched").status_code == 200
            steps = [data for kind, data in sse_events(stream.result(timeout=60).text) if kind == "step"]
    assert [s["done"] for s in steps] == list(range(1, 10))           # steps 3, 2, 2, 2
    shape = steps[0]["canvas"]["codebooks"], steps[0]["canvas"]["frames"]
    grids = [np.frombuffer(base64.b64decode(s["canvas"]["cells"]), dtype=np.uint8).reshape(shape) for s in steps]
    region = (grids[0][1:] == 0).all(0)          # after step 1 only codebook 0 of the region is decoded
    assert region[5:15].all() and not region[:3].any() and not region[18:].any()   # 0.1-0.3 s, span-snapped
    for s, g in zip(steps, grids):
        assert (g[:, ~region] == 255).all()
        assert not g[s["stage"] + 1:, region].any() and g[:s["stage"] + 1, region].all()
    assert grids[-1].all()


def test_stream_runs_wait_in_the_same_queue(held):
    """A streamed run is a job of the one worker: behind a busy worker it waits in the queue
    (counted in queue_depth), the queue bound answers 503 + Retry-After, and once it runs its
    chunks reach the SSE consumer as each window is final."""
    held.gate.clear()
    with TestClient(app_for(held, max_batch=1, queue_size=1, max_wait_ms=0)) as client:
        with cf.ThreadPoolExecutor(1) as pool:
            try:
                running = pool.submit(client.post, "/v1/generate", json=GEN)
                assert held.entered.wait(30)
                queued = client.post("/v1/stream", json={"description": "a", "duration": 2.5, "seed": 4})
                assert queued.status_code == 202
                assert client.get("/healthz").json()["queue_depth"] == 1
                full = client.post("/v1/stream", json={"duration": 2.5})
            finally:
                held.gate.set()
            assert running.result().status_code == 200
        with client.stream("GET", queued.json()["events"]) as answer:
            seen = sse_events(answer.iter_lines())
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    assert [k for k, _ in seen] == ["chunk"] * 5 + ["done"]


def test_speech_edits_wait_in_the_same_queue(held, tiny_speech_dir):
    """The speech model is a separate object, but its edits share the worker (the CPU is the
    shared resource): behind a busy worker one waits in the queue, the next is refused."""
    from magnet_engine import PlayDiffusion

    speech = PlayDiffusion(str(tiny_speech_dir), device="cpu")
    audio, form = speech_edit_request()
    post = lambda: client.post("/v1/speech/edit", data=form, files={"audio": ("in.wav", audio, "audio/wav")})
    held.gate.clear()
    with TestClient(create_app(held, Settings(max_batch=1, queue_size=1, max_wait_ms=0), speech=speech)) as client:
        with cf.ThreadPoolExecutor(2) as pool:
            try:
                running = pool.submit(client.post, "/v1/generate", json=GEN)
                assert held.entered.wait(30)
                queued = pool.submit(post)
                wait_until(lambda: metric(client, "magnet_queue_depth") == 1, timeout=15)
                full = post()
            finally:
                held.gate.set()
            assert running.result().status_code == 200 and queued.result().status_code == 200
        assert metric(client, "magnet_requests_total", route="speech_edit", status=200) == 1
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
