"""POST /v1/edit (server.routes.edit.edit_router) as the service mounts it, with a tiny random model.
(Its queue, timeout, cancellation and metrics: tests/test_server_jobs.py.)"""
import io
import json

import pytest
import soundfile as sf
import torch

from fastapi import FastAPI
from fastapi.testclient import TestClient

from magnet_engine import MAGNeT
from magnet_engine.demo import build_random_model
from magnet_engine.server.routes.edit import EditLimits, edit_router
from magnet_engine.server import Settings, create_app


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model = MAGNeT.from_pretrained(build_random_model(tmp_path_factory.mktemp("edit"), "tiny", duration=1),
                                   device="cpu")
    model.set_generation_params(decoding_steps=[3, 2, 2, 2])
    app = create_app(model, Settings(max_text_chars=50, max_decoding_steps=20),
                     edit_limits=EditLimits(max_upload_bytes=200_000))
    with TestClient(app) as http:
        yield http, model


def _wav(seconds=0.8, rate=32000, channels=1) -> bytes:
    t = torch.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * torch.sin(2 * torch.pi * 220 * t))[:, None].expand(-1, channels).numpy(), rate,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _post(client, data: bytes, **fields):
    form = {"regions": json.dumps([[0.1, 0.2]]), **fields}
    return client.post("/v1/edit", files={"audio": ("clip.wav", data, "audio/wav")}, data=form)


def test_edit_returns_the_clip_with_the_region_regenerated(client):
    http, model = client
    src = _wav(channels=2)
    answer = _post(http, src, description="a fill", seed="3", decoding_steps="[3, 2, 2, 2]")
    assert answer.status_code == 200 and answer.headers["content-type"] == "audio/wav"
    out, rate = sf.read(io.BytesIO(answer.content))
    assert rate == 32000 and out.shape == (40 * 640,)
    want = model.generate_infill(torch.from_numpy(sf.read(io.BytesIO(src), dtype="float32")[0].T.copy()), 32000,
                                 [(0.1, 0.2)], ["a fill"], seed=3)
    assert abs(out - want[0, 0].clamp(-1, 1).numpy()).max() <= 1 / 32767 + 1e-6   # 16-bit PCM rounding


@pytest.mark.parametrize("data, fields, status, words", [
    (b"RIFF....WAVEnope", {}, 400, "cannot read"),
    (None, {"regions": "[[0.5, 0.9]]"}, 400, "0 <= start < end"),
    (None, {"regions": "[[0, 0.8]]"}, 400, "whole clip"),
    (None, {"regions": "not json"}, 400, "JSON"),
    (None, {"regions": "[]"}, 400, "non-empty"),
    (None, {"decoding_steps": "[3, 2]"}, 422, "decoding_steps"),
    (None, {"decoding_steps": "[21, 2, 2, 2]"}, 422, "20"),           # the service's max_decoding_steps
    (None, {"description": "x" * 51}, 400, "limit is 50"),            # the service's max_text_chars
    (None, {"request_id": "bad id!"}, 422, "request_id"),
    ("long", {}, 400, "the limit is 1 s"),
    ("rate", {}, 400, "sample rate"),
    ("big", {}, 413, "over"),
])
def test_edit_bad_input_is_a_4xx(client, data, fields, status, words):
    http, _ = client
    if data is None:
        data = _wav()
    elif data == "long":
        data = _wav(1.5, rate=8000)
    elif data == "rate":
        data = _wav(0.5, rate=4000)
    elif data == "big":
        data = _wav(1.0, rate=192000)
    answer = _post(http, data, **fields)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]["message"]


def test_a_router_on_an_app_of_its_own_runs_on_a_worker_of_its_own(client):
    """edit_router mounted without create_app still queues its edits on a worker (its own)."""
    _, model = client
    app = FastAPI()
    app.include_router(edit_router(model))
    answer = _post(TestClient(app), _wav(), seed="3")
    assert answer.status_code == 200 and answer.headers["x-request-id"]
