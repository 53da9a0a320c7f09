"""Long-form streaming routes (stream_routes.stream_router) on their own app, tiny random model."""
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from magnet_engine import MAGNeT
from magnet_engine.demo import build_random_model
from magnet_engine.stream_routes import StreamLimits, stream_router


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model = MAGNeT.from_pretrained(build_random_model(tmp_path_factory.mktemp("stream"), "tiny", duration=1),
                                   device="cpu")
    model.set_generation_params(decoding_steps=[3, 2, 2, 2])
    model.extend_stride = 0.6
    app = FastAPI()
    app.include_router(stream_router(model, StreamLimits(max_duration=3)))
    return TestClient(app), model


def _events(http, run_id):
    seen = []
    with http.stream("GET", f"/v1/stream/{run_id}/events") as answer:
        kind = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                seen.append((kind, json.loads(line[6:])))
                if kind in ("done", "error"):
                    break
    return seen


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
