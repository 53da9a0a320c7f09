"""Long-form streaming routes (server.routes.stream.stream_router) as the service mounts them, tiny random model.
(Their queue bound: tests/test_server_jobs.py.)"""
import io

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from magnet_engine import MAGNeT
from magnet_engine.demo import build_random_model
from magnet_engine.server import Settings, create_app
from magnet_engine.server.routes import stream as stream_routes
from magnet_engine.server.routes.stream import StreamLimits
from service_helpers import metric, sse_events


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model = MAGNeT.from_pretrained(build_random_model(tmp_path_factory.mktemp("stream"), "tiny", duration=1),
                                   device="cpu")
    model.set_generation_params(decoding_steps=[3, 2, 2, 2])
    model.extend_stride = 0.6
    with TestClient(create_app(model, Settings(), stream_limits=StreamLimits(max_duration=3))) as http:
        yield http, model


def _events(http, run_id):
    with http.stream("GET", f"/v1/stream/{run_id}/events") as answer:
        return sse_events(answer.iter_lines())


def test_long_form_streams_chunks_that_join_to_the_clip(client):
    http, model = client
    answer = http.post("/v1/stream", json={"description": "a", "duration": 2.5, "seed": 4})
    assert answer.status_code == 202
    seen = _events(http, answer.json()["id"])
    assert [k for k, _ in seen] == ["chunk"] * 5 + ["done"]        # 4 windows, the held-back tail flushed last
    parts = [sf.read(io.BytesIO(http.get(p["url"]).content))[0] for _, p in seen[:-1]]
    joined = np.concatenate(parts)
    whole = model.decode(model.generate_tokens(["a"], seed=4, duration=2.5))[0, 0].clamp(-1, 1).numpy()
    assert joined.shape == whole.shape == (123 * 640,)
    assert abs(joined - whole).max() <= 1e-4 + 1 / 32767              # + 16-bit PCM rounding
    assert seen[-1][1]["chunks"] == 5


def test_one_window_is_one_chunk(client):
    http, _ = client
    assert http.get("/v1/model").json()["limits"]["max_stream_duration"] == 3     # the page reads it
    run_id = http.post("/v1/stream", json={"duration": 0.5, "seed": 1}).json()["id"]
    assert [k for k, _ in _events(http, run_id)] == ["chunk", "done"]


@pytest.mark.parametrize("body, status", [
    ({"duration": 4}, 422),                           # over the router's limit
    ({"duration": 1, "decoding_steps": [3, 2]}, 422),
    ({"duration": 1, "description": "x" * 501}, 400),
    ({"duration": "long"}, 422),                      # schema
])
def test_bad_requests_are_4xx(client, body, status):
    http, _ = client
    assert http.post("/v1/stream", json=body).status_code == status


def test_unknown_run_and_chunk_are_404(client):
    http, _ = client
    assert http.get("/v1/stream/nope/events").status_code == 404
    assert http.get("/v1/stream/nope/chunk/0").status_code == 404


def test_a_run_reports_progress_under_its_request_id_and_owns_it(client):
    http, _ = client
    answer = http.post("/v1/stream", json={"duration": 2.5, "seed": 1, "request_id": "long-1"})
    assert answer.status_code == 202 and answer.json()["id"] == "long-1"
    assert http.post("/v1/stream", json={"duration": 1, "request_id": "long-1"}).status_code == 409
    assert [k for k, _ in _events(http, "long-1")][-1] == "done"
    progress = http.get("/v1/progress/long-1").text
    assert "event: queued" in progress and "event: step" in progress and "event: done" in progress
    assert metric(http, "magnet_requests_total", route="stream", status=202) >= 1


def test_a_run_whose_consumers_left_stops_within_a_step(client, monkeypatch):
    """Every consumer of the events closed: after the grace period the worker stops the run at
    its next step (it used to decode every window for nobody)."""
    http, model = client
    monkeypatch.setattr(stream_routes, "STREAM_GRACE_S", 0.0)
    steps = []
    original = model.generate_tokens

    def counting(*args, on_event=None, **kwargs):
        def count(event):
            steps.append(event)
            on_event(event)
        return original(*args, on_event=count, **kwargs)
    monkeypatch.setattr(model, "generate_tokens", counting)
    body = {"duration": 3, "seed": 2, "decoding_steps": [20, 20, 20, 20], "request_id": "left"}
    assert http.post("/v1/stream", json=body).status_code == 202
    with http.stream("GET", "/v1/stream/left/events") as answer:
        for line in answer.iter_lines():
            if line.startswith("event: chunk"):
                break                                   # leaves after the first chunk
    progress = http.get("/v1/progress/left").text          # ends when the run does
    end = progress.strip().split("\n\n")[-1]
    assert end.startswith("event: error") and '"type":"TaskCancelled"' in end
    assert '"status":499' in end                          # nobody failed: not reported as a 5xx
    stage_steps = [e for e in steps if type(e).__name__ == "StageStep"]
    assert len(stage_steps) < stage_steps[0].total         # stopped long before the last window
    assert http.get("/v1/stream/left/chunk/0").status_code == 200
    ended = _events(http, "left")                          # a late consumer replays the end
    assert ended[-1][0] == "error" and ended[-1][1]["type"] == "TaskCancelled"
    assert metric(http, "magnet_errors_total", route="stream", type="TaskCancelled") == 1
