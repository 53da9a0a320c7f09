"""The HTTP service: every endpoint, every error code, batching, queue limits, cancellation.

One tiny random-weight model is built per session; requests use 0.3 s and steps [2, 1, 1, 1]
so a generation takes a fraction of a second on CPU. `GatedModel` holds the worker inside
`generate_tokens` until a test opens its gate, which makes queue-full, timeout and
disconnect cases deterministic without sleeping on wall-clock guesses.
"""
import concurrent.futures as cf
import io
import json
import socket
import threading
import time
import zipfile

import pytest
import soundfile as sf

from fastapi.testclient import TestClient

from magnet_engine.api import MAGNeT
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.events import StageStep
from magnet_engine.audio import wav_bytes
from magnet_engine.demo import build_random_model
from magnet_engine.server import BackgroundServer, Settings, create_app, text_token_count
from service_helpers import FAST, assert_same_audio, metric, solo_wav, sse_events, wait_until

LONGER = "warm lo-fi piano with soft vinyl crackle and slow cinematic strings"
WORDS = ("piano drums guitar bass jazz rock techno rain choir strings synth funk disco reggae ambient "
         "cinematic orchestral folk soul swing trumpet saxophone thunder waves wind crowd").split()


@pytest.fixture(scope="session")
def same_len(tiny_model):
    """Four one-word descriptions with equal T5 token counts (the random tokenizer differs per build)."""
    groups = {}
    for word in WORDS:
        groups.setdefault(text_token_count(tiny_model, word), []).append(word)
    texts = max(groups.values(), key=len)[:4]
    assert len(texts) == 4 and text_token_count(tiny_model, LONGER) != text_token_count(tiny_model, texts[0])
    return texts


class GatedModel:
    """The tiny model, with generate_tokens held at a gate and an injectable failure."""

    def __init__(self, model):
        self._model = model
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_text = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate_tokens(self, descriptions, **kwargs):
        self.entered.set()
        assert self.gate.wait(timeout=60), "test gate never opened"
        if self.fail_text is not None and self.fail_text in descriptions:
            raise RuntimeError("injected failure")
        return self._model.generate_tokens(descriptions, **kwargs)


@pytest.fixture
def gated(tiny_model):
    model = GatedModel(tiny_model)
    yield model
    model.gate.set()


def serve(model, **settings):
    return TestClient(create_app(model, Settings(**settings)))


def post(client, **body):
    return client.post("/v1/generate", json={**FAST, **body})


# ---------------------------------------------------------------- endpoints
def test_generate_returns_wav_with_timing_headers(tiny_model):
    with serve(tiny_model) as client:
        r = post(client, description="warm piano", seed=7, request_id="one")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    wav, sr = sf.read(io.BytesIO(r.content))
    assert sr == tiny_model.sample_rate and wav.shape == (int(0.3 * tiny_model.frame_rate) * 640,)
    assert r.headers["x-request-id"] == "one" and r.headers["x-seed"] == "7"
    assert r.headers["x-batch-size"] == "1"
    for name in ("x-queue-wait-ms", "x-tokens-ms", "x-codec-ms"):
        assert float(r.headers[name]) >= 0
    assert r.content == solo_wav(tiny_model, "warm piano", 7)


def test_continuous_batching_answers_with_the_solo_audio(tiny_model):
    """--batching continuous: a generate request (here sampled, and a greedy one) gets the same
    WAV bytes as the API alone; /v1/model says which batching runs."""
    with serve(tiny_model, batching="continuous") as client:
        assert client.get("/v1/model").json()["batching"] == "continuous"
        sampled = post(client, description="warm piano", seed=7)
        greedy = post(client, description="warm piano", seed=8, use_sampling=False)
    assert sampled.status_code == 200 and greedy.status_code == 200
    assert sampled.content == solo_wav(tiny_model, "warm piano", 7)
    assert greedy.content == solo_wav(tiny_model, "warm piano", 8, use_sampling=False)


def test_continuous_rows_of_one_request_are_one_batch(tiny_model):
    """Under continuous batching a request's rows join the slots one by one, but they run in
    one busy period of the slot runtime: the client hears one `started` and x-batches 1, as
    when the grouped batcher runs them together."""
    texts = ["warm piano", LONGER, "soft strings"]
    with serve(tiny_model, batching="continuous") as client:
        r = post(client, descriptions=texts, seed=100, request_id="rows3")
        progress = client.get("/v1/progress/rows3")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["x-batches"] == "1"
    kinds = [kind for kind, _ in sse_events(progress.text)]
    assert kinds.count("started") == 1 and kinds[-1] == "done"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        names = sorted(z.namelist())
        got = [z.read(n) for n in names]
    assert got == [solo_wav(tiny_model, t, 100 + i) for i, t in enumerate(texts)]


def test_seed_is_drawn_when_absent_and_reported(tiny_model):
    with serve(tiny_model) as client:
        a, b = post(client, description="warm piano"), post(client, description="warm piano")
        again = post(client, description="warm piano", seed=int(a.headers["x-seed"]))
    assert a.status_code == b.status_code == again.status_code == 200
    assert a.content != b.content and again.content == a.content


def test_several_descriptions_return_a_zip_in_order(tiny_model):
    texts = ["warm piano", LONGER, None]
    with serve(tiny_model) as client:
        r = post(client, descriptions=texts, seed=100)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["x-batches"] == "3"   # three different text lengths: three batches
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert zf.namelist() == ["sample_0.wav", "sample_1.wav", "sample_2.wav"]
        for i, text in enumerate(texts):  # row i is seeded with seed + i, as MAGNeT.generate does
            assert zf.read(f"sample_{i}.wav") == solo_wav(tiny_model, text, 100 + i)


def test_model_info(tiny_model):
    with serve(tiny_model, max_duration=2.0, max_text_chars=50) as client:
        info = client.get("/v1/model").json()
    assert info["sample_rate"] == 32000 and info["n_q"] == tiny_model.config.n_q
    assert info["max_duration"] == 2.0 and info["defaults"]["duration"] == 2.0
    assert info["defaults"]["decoding_steps"] == [20, 10, 10, 10] and info["defaults"]["top_p"] == 0.9
    assert info["choices"]["span_arrangement"] == ["nonoverlap", "stride1"]
    assert info["limits"]["max_text_chars"] == 50 and info["batching"] == "grouped"
    assert (info["precision"], info["compile"], info["cuda_graphs"]) == ("fp32", False, False)
    assert info["precision_choice"]["requested"] == "auto" and info["precision_choice"]["reason"].startswith("fp32")
    routes = info["limits"]["routes"]
    assert routes["/v1/edit"]["max_upload_bytes"] == 20 << 20 and routes["/v1/stream"]["max_duration"] == 120.0
    assert info["limits"]["body_timeout_s"] > 0 and info["limits"]["body_idle_timeout_s"] > 0
    weights = info["memory"]["weights_bytes"]
    assert weights["lm"] == sum(p.numel() * p.element_size() for p in tiny_model.lm.module.parameters())
    assert info["memory"]["weights_total_bytes"] == sum(weights.values()) and info["memory"]["peak_rss_bytes"] > 0


def test_healthz_page_and_static_files(tiny_model):
    with serve(tiny_model) as client:
        assert client.get("/healthz").json() == {"status": "ok", "queue_depth": 0}
        page = client.get("/")
        assert page.status_code == 200 and 'id="generate"' in page.text
        for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            r = client.get(f"/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"]


def test_metrics_exposition(tiny_model):
    with serve(tiny_model) as client:
        post(client, description="warm piano", seed=1)
        post(client, description="warm piano", top_p=3.0)
        assert metric(client, "magnet_requests_total", route="generate", status=200) == 1
        assert metric(client, "magnet_requests_total", route="generate", status=422) == 1
        assert metric(client, "magnet_errors_total", route="generate", type="InvalidOptionError") == 1
        assert metric(client, "magnet_request_duration_seconds_count", route="generate") == 1
        assert metric(client, "magnet_batch_size_bucket", le="1.0") == 1
        assert metric(client, "magnet_queue_depth") == 0 and metric(client, "magnet_batches_total") == 1
        assert metric(client, "magnet_rows_total") == 1 and metric(client, "magnet_running_rows") == 0
        assert client.get("/metrics").headers["content-type"].startswith("text/plain")
        assert metric(client, "magnet_weights_bytes") == tiny_model.memory_stats()["weights_total_bytes"] > 0
        assert metric(client, "magnet_peak_memory_bytes") >= metric(client, "magnet_weights_bytes")


def test_progress_stream_replays_a_finished_request(tiny_model):
    with serve(tiny_model) as client:
        assert post(client, description="warm piano", request_id="p1").status_code == 200
        r = client.get("/v1/progress/p1")
    assert r.headers["content-type"].startswith("text/event-stream")
    kinds = [kind for kind, _ in sse_events(r.text)]
    assert kinds == ["queued", "started", "step", "codec", "done"]  # only the latest step is kept
    step = dict(sse_events(r.text))["step"]
    assert step["done"] == step["total"] == sum(FAST["decoding_steps"])


def test_progress_stream_opened_before_the_request(tiny_model):
    with serve(tiny_model) as client:
        with cf.ThreadPoolExecutor(1) as pool:
            stream = pool.submit(client.get, "/v1/progress/early")
            wait_until(lambda: client.app.state.hub.get("early") is not None)
            assert post(client, description="warm piano", request_id="early").status_code == 200
            events = sse_events(stream.result(timeout=60).text)
    assert events[0][0] == "queued" and events[-1][0] == "done"
    assert "step" in [kind for kind, _ in events]


def test_progress_stream_for_an_id_that_never_arrives_ends_with_404(tiny_model):
    with serve(tiny_model, progress_ttl_s=0.2) as client:
        events = sse_events(client.get("/v1/progress/nobody").text)
        assert events == [("error", {"status": 404, "message": "no request 'nobody' arrived"})]
        assert post(client, description="warm piano", request_id="later").status_code == 200
        assert client.app.state.hub.get("nobody") is None  # purged


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("body, status, says", [
    ({"description": "a", "descriptions": ["b"]}, 400, "exactly one of"),
    ({}, 400, "exactly one of"),
    ({"descriptions": []}, 400, "must not be empty"),
    ({"description": "x" * 51}, 400, "limit is 50"),
    ({"descriptions": ["a", "b", "c"]}, 400, "at most 2 descriptions"),
    ({"description": "a", "temprature": 1.0}, 422, "unknown field 'temprature'"),
    ({"description": "a", "top_k": "five"}, 422, "'top_k'"),
    ({"description": 3}, 422, "'description'"),
    ({"description": "a", "seed": -1}, 422, "'seed'"),
    ({"description": "a", "top_p": 1.5}, 422, "top_p"),
    ({"description": "a", "temperature": -1.0}, 422, "temperature"),
    ({"description": "a", "decoding_steps": [2, 1]}, 422, "one entry per codebook"),
    ({"description": "a", "span_arrangement": "zigzag"}, 422, "span_arrangement"),
    ({"description": "a", "duration": 2.5}, 422, "(0, 2]"),
    ({"description": "a", "duration": 0.01}, 422, "shorter than one span"),
    ({"description": "a", "request_id": "../etc"}, 422, "'request_id'"),
])
def test_bad_requests_get_clear_json_errors(tiny_model, body, status, says):
    with serve(tiny_model, max_batch=2, max_text_chars=50, max_duration=2.0) as client:
        r = client.post("/v1/generate", json={**FAST, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and says in error["message"], error


def test_invalid_json_is_400(tiny_model):
    with serve(tiny_model) as client:
        r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidJSON"


def test_reused_request_id_is_409(tiny_model):
    with serve(tiny_model) as client:
        assert post(client, description="warm piano", request_id="dup").status_code == 200
        r = post(client, description="warm piano", request_id="dup")
    assert r.status_code == 409 and "already in use" in r.json()["error"]["message"]


def test_failed_batch_fails_its_requests_and_the_server_keeps_serving(gated):
    gated.fail_text = "boom"
    with serve(gated) as client:
        bad = post(client, description="boom", request_id="bad")
        good = post(client, description="warm piano")
        events = sse_events(client.get("/v1/progress/bad").text)
        assert client.get("/healthz").status_code == 200
    assert bad.status_code == 500 and "injected failure" in bad.json()["error"]["message"]
    assert events[-1] == ("error", {"status": 500, "type": "RuntimeError",
                                    "message": "generation failed: injected failure"})
    assert good.status_code == 200


# ---------------------------------------------------------------- batching
def test_concurrent_compatible_requests_share_one_generation_loop(tiny_model, same_len):
    # A long max_wait makes the grouping deterministic: the batch starts when it is full.
    with serve(tiny_model, max_batch=4, max_wait_ms=20_000) as client:
        with cf.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: post(client, description=same_len[i], seed=10 + i), range(4)))
        assert metric(client, "magnet_batches_total") == 1
        assert metric(client, "magnet_batch_size_bucket", le="3.0") == 0
    assert [r.status_code for r in answers] == [200] * 4
    assert [r.headers["x-batch-size"] for r in answers] == ["4"] * 4
    for i, r in enumerate(answers):  # batched == alone, row for row
        assert_same_audio(r.content, solo_wav(tiny_model, same_len[i], 10 + i))


def test_incompatible_requests_are_not_batched_together(tiny_model, same_len):
    with serve(tiny_model, max_batch=4, max_wait_ms=300) as client:
        with cf.ThreadPoolExecutor(3) as pool:
            jobs = [pool.submit(post, client, description=same_len[0], seed=1),
                    pool.submit(post, client, description=LONGER, seed=2),
                    pool.submit(post, client, description=same_len[1], seed=3, top_p=0.5)]
            answers = [job.result() for job in jobs]
        assert metric(client, "magnet_batches_total") == 3
    assert [r.headers["x-batch-size"] for r in answers] == ["1", "1", "1"]
    assert answers[1].content == solo_wav(tiny_model, LONGER, 2)
    assert answers[2].content == solo_wav(tiny_model, same_len[1], 3, top_p=0.5)


def test_reference_engine_is_served_one_row_per_batch(tiny_dir, same_len):
    model = MAGNeT.from_pretrained(tiny_dir, device="cpu", engine="reference")
    with serve(model, max_batch=4, max_wait_ms=20_000) as client:
        assert client.get("/v1/model").json()["limits"]["max_batch"] == 1
        with cf.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda i: post(client, description=same_len[i], seed=i), range(2)))
        assert metric(client, "magnet_batches_total") == 2
    assert [r.headers["x-batch-size"] for r in answers] == ["1", "1"]
    assert answers[1].content == solo_wav(model, same_len[1], 1)


# ---------------------------------------------------------------- queue, timeout, disconnect
def test_full_queue_answers_503_with_retry_after(gated):
    gated.gate.clear()
    with serve(gated, max_batch=1, queue_size=1, max_wait_ms=0) as client:
        with cf.ThreadPoolExecutor(3) as pool:
            try:
                running = pool.submit(post, client, description="warm piano")
                assert gated.entered.wait(30)
                queued = pool.submit(post, client, description="warm piano")
                wait_until(lambda: metric(client, "magnet_queue_depth") == 1)
                # answered at once while the worker is held; a request queued by mistake would wait
                # for the gate instead, so the test looks for either outcome rather than blocking
                third = pool.submit(post, client, description="warm piano")
                wait_until(lambda: third.done() or metric(client, "magnet_queue_depth") != 1)
                assert third.done(), f"queue depth {metric(client, 'magnet_queue_depth')}: the third request was queued"
                rejected = third.result()
            finally:
                gated.gate.set()
            assert running.result().status_code == queued.result().status_code == 200
    assert rejected.status_code == 503 and int(rejected.headers["retry-after"]) >= 1
    assert "queue is full" in rejected.json()["error"]["message"]


def test_queue_bound_holds_under_a_flood(gated):
    """30 concurrent requests on a queue of 2 behind a busy worker: exactly 2 queued, 28 answered
    503 + Retry-After, and the queue-depth gauge never below 0 (a rejected request once
    decremented it, so each 503 made room for one more)."""
    gated.gate.clear()
    with serve(gated, max_batch=1, queue_size=2, max_wait_ms=0) as client:
        depths = []
        with cf.ThreadPoolExecutor(31) as pool:
            try:
                running = pool.submit(post, client, description="warm piano")
                assert gated.entered.wait(30)
                flood = [pool.submit(post, client, description="warm piano") for _ in range(30)]
                # 30 rejections take well under a second; with the bound eroding, some never come
                wait_until(lambda: sum(f.done() for f in flood) >= 28, timeout=15)
                depths.append(metric(client, "magnet_queue_depth"))
                depths.append(client.get("/healthz").json()["queue_depth"])
                rejected = [f.result() for f in flood if f.done()]
            finally:
                gated.gate.set()
            answers = [f.result() for f in flood]
            assert running.result().status_code == 200
        depths.append(metric(client, "magnet_queue_depth"))
    assert depths == [2, 2, 0]
    assert len(rejected) == 28 and all(r.status_code == 503 and int(r.headers["retry-after"]) >= 1 for r in rejected)
    assert sorted(r.status_code for r in answers) == [200] * 2 + [503] * 28


def test_timeout_answers_504_and_cancels(gated):
    gated.gate.clear()
    with serve(gated, max_batch=1, max_wait_ms=0, request_timeout_s=0.5) as client:
        with cf.ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, client, description="warm piano")
            assert gated.entered.wait(30)
            queued = post(client, description="warm piano", request_id="late")
            assert running.result().status_code == 504
        assert queued.status_code == 504 and "0.5 s" in queued.json()["error"]["message"]
        assert metric(client, "magnet_queue_depth") == 0
        assert metric(client, "magnet_cancelled_total") == 2
        assert sse_events(client.get("/v1/progress/late").text)[-1][1]["status"] == 504
        gated.gate.set()  # the running batch now finds all its requests gone and stops early
        wait_until(lambda: metric(client, "magnet_running_rows") == 0)
        assert metric(client, "magnet_batches_total") == 0
        assert post(client, description="warm piano").status_code == 200


def test_client_disconnect_frees_its_queue_slot(gated):
    gated.gate.clear()
    with BackgroundServer(create_app(gated, Settings(max_batch=1, max_wait_ms=0))) as url:
        import httpx

        with httpx.Client(base_url=url, timeout=60) as client, cf.ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.post, "/v1/generate", json={**FAST, "description": "warm piano"})
            assert gated.entered.wait(30)
            body = json.dumps({**FAST, "description": "warm piano"}).encode()
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as sock:   # a client that leaves early
                sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                wait_until(lambda: metric(client, "magnet_queue_depth") == 1)
            wait_until(lambda: metric(client, "magnet_cancelled_total") == 1)
            assert metric(client, "magnet_queue_depth") == 0
            gated.gate.set()
            assert running.result().status_code == 200
            assert metric(client, "magnet_requests_total", route="generate", status=499) == 1


def test_serve_command_reports_a_missing_model(tmp_path, capsys):
    from magnet_engine.server import main

    assert main(["--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "missing" in capsys.readouterr().err


def test_serve_loads_through_the_one_loader_with_every_option(tiny_dir, tiny_speech_dir):
    """`serve`'s flags become a ModelSpec (the loader every Ray replica uses too), and each load
    option reaches the loaded models; the routes' limits come with them."""
    from magnet_engine.server.serve import build_parser, options

    opts = options(build_parser().parse_args(["--model", str(tiny_dir), "--device", "cpu", "--precision", "fp32",
                                              "--compile", "--speech", str(tiny_speech_dir), "--max-stream-duration",
                                              "30", "--max-edit-upload-bytes", "1000", "--queue-size", "3"]))
    assert (opts.spec.compile, opts.spec.cuda_graphs, opts.spec.precision) == (True, False, "fp32")
    assert opts.settings.queue_size == 3 and opts.settings.note == ""
    assert opts.routes["stream_limits"].max_duration == 30 and opts.routes["edit_limits"].max_upload_bytes == 1000
    models = opts.spec.load()
    assert models.music.compile and models.music.precision == "fp32" and str(models.music.device) == "cpu"
    assert models.speech is not None and models.speech.sample_rate > 0


def test_hybrid_checkpoint_served_with_prefix_progress(tmp_path_factory, tiny_model):
    """A hybrid-MAGNeT checkpoint served: the AR prefix steps count in the progress, the
    decoded prefix is announced (SSE "prefix") and served at /v1/prefix/<id> before the clip
    is done, and the shared instance's settings stay untouched (per-call params)."""
    model = MAGNeT.from_pretrained(build_random_model(tmp_path_factory.mktemp("hybrid"), "tiny", kind="hybrid"),
                                   device="cpu")
    before = (model.params, model.duration)
    with serve(model) as client:
        assert client.get("/v1/model").json()["hybrid"] is True
        r = post(client, description="warm piano", seed=3, request_id="hy", duration=0.6)
        events = sse_events(client.get("/v1/progress/hy").text)
        first = client.get("/v1/prefix/hy")
        missing = client.get("/v1/prefix/nobody")
    assert r.status_code == 200
    wav, _ = sf.read(io.BytesIO(r.content))
    assert wav.shape == (int(0.6 * model.frame_rate) // 3 * 3 * 640,)
    step = dict(events)["step"]          # a replay keeps the latest step: AR prefix steps + masked steps
    assert step["done"] == step["total"] == 15 + 5 and step["stage"] == 3   # prefix: half of the 0.6 s clip
    kinds = [kind for kind, _ in events]
    assert kinds.index("prefix") < kinds.index("codec") < kinds.index("done")
    announced = dict(events)["prefix"]
    assert announced["url"] == "/v1/prefix/hy" and announced["rows"] == [0] and announced["seconds"] == 12 * 640 / 32000
    # the prefix served early is the decoded first 12 frames (15 − 3: every codebook fixed) of the final clip
    assert first.status_code == 200 and first.headers["content-type"] == "audio/wav"
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFound"
    tokens = model.generate_tokens(["warm piano"], seed=[3], params=DecodingParams(decoding_steps=(2, 1, 1, 1)),
                                   duration=0.6)
    assert_same_audio(first.content, wav_bytes(model.decode(tokens[..., :12])[0], model.sample_rate))
    assert (model.params, model.duration) == before
    model.set_generation_params(duration=0.6, decoding_steps=[2, 1, 1, 1])
    assert r.content == wav_bytes(model.decode(model.generate_tokens(["warm piano"], seed=[3]))[0], model.sample_rate)


# ---------------------------------------------------------------- hostile input (issue 13)
def test_decoding_steps_are_bounded_and_the_bound_is_configurable(tiny_model):
    """A million steps once held the only worker until the request timed out (and 1e8 ran the
    host out of memory building the schedule): refused before anything is queued."""
    with serve(tiny_model, max_decoding_steps=3, request_timeout_s=5) as client:
        huge = post(client, description="warm piano", decoding_steps=[10 ** 6, 1, 1, 1])
        over = post(client, description="warm piano", decoding_steps=[4, 1, 1, 1])
        at_bound = post(client, description="warm piano", decoding_steps=[3, 3, 3, 3])
        assert client.get("/v1/model").json()["limits"]["max_decoding_steps"] == 3
        assert metric(client, "magnet_batches_total") == 1
    for r in (huge, over):
        assert r.status_code == 422 and "decoding_steps must be ints in [1, 3]" in r.json()["error"]["message"]
    assert at_bound.status_code == 200
    with pytest.raises(Exception, match="at most 1000|in \\[1, 1000\\]"):
        Settings(max_decoding_steps=1001)


class StepGatedModel(GatedModel):
    """Holds the worker before the server's listener sees step 2 until the gate opens; records steps."""

    def __init__(self, model):
        super().__init__(model)
        self.steps = []

    def generate_tokens(self, descriptions, on_event=None, **kwargs):
        def hold(event):
            if isinstance(event, StageStep):
                self.steps.append(event.done)
                if event.done == 2:
                    self.entered.set()
                    assert self.gate.wait(timeout=60), "test gate never opened"
            on_event(event)
        return self._model.generate_tokens(descriptions, on_event=hold, **kwargs)


def test_a_timed_out_request_frees_the_worker_within_one_step(tiny_model):
    model = StepGatedModel(tiny_model)
    model.gate.clear()
    try:
        with serve(model, request_timeout_s=0.5, max_wait_ms=0) as client:
            r = post(client, description="warm piano", decoding_steps=[50, 50, 50, 50])
            assert r.status_code == 504 and model.entered.is_set()
            model.gate.set()
            wait_until(lambda: metric(client, "magnet_running_rows") == 0)
            assert model.steps == [1, 2]   # the callback of step 2 raised: not one more step ran
            assert metric(client, "magnet_batches_total") == 0
            assert post(client, description="warm piano").status_code == 200
    finally:
        model.gate.set()


def test_a_duplicate_request_id_gets_409_and_touches_nothing(gated):
    """A second POST with a live id, valid or not, is refused before it can publish anything on
    the first request's progress stream (it used to end that stream with its own error)."""
    gated.gate.clear()
    with serve(gated, max_wait_ms=0) as client:
        with cf.ThreadPoolExecutor(1) as pool:
            try:
                first = pool.submit(post, client, description="warm piano", request_id="mine")
                assert gated.entered.wait(30)
                invalid = post(client, description="warm piano", request_id="mine", top_p=3.0)
                valid = post(client, description="warm piano", request_id="mine")
            finally:
                gated.gate.set()
            assert first.result().status_code == 200
        events = sse_events(client.get("/v1/progress/mine").text)
    assert invalid.status_code == valid.status_code == 409
    assert invalid.json()["error"] == {"status": 409, "type": "Conflict",
                                       "message": "request_id 'mine' is already in use"}
    assert [kind for kind, _ in events] == ["queued", "started", "step", "codec", "done"]


def test_nan_audio_is_an_error_not_a_wav(tmp_path):
    """NaN codec weights: the finite-waveform check answers 500 NumericalError (the model is
    broken, not the request) instead of 200 with a WAV of -32768 samples."""
    import torch
    from magnet_engine.engine import checkpoint as ckpt

    directory = build_random_model(tmp_path / "nan", "tiny")
    codec = torch.load(directory / ckpt.CODEC_FILE, weights_only=True)
    name = next(k for k in codec["best_state"] if k.startswith("decoder.") and k.endswith("bias"))
    codec["best_state"][name] = torch.full_like(codec["best_state"][name], float("nan"))
    ckpt.atomic_save(codec, directory / ckpt.CODEC_FILE)
    model = MAGNeT.from_pretrained(directory, device="cpu")
    with serve(model) as client:
        r = post(client, description="warm piano", request_id="nan")
        assert client.get("/healthz").status_code == 200
    assert r.status_code == 500 and r.json()["error"]["type"] == "NumericalError"
    assert "NaN or inf" in r.json()["error"]["message"]


def raw_http(url: str, data: bytes, read: bool = True, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; the answer (until the server closes), or b"" if not read."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_an_aborted_upload_counts_as_499_not_500(tiny_model):
    with BackgroundServer(create_app(tiny_model, Settings())) as url:
        import httpx

        raw_http(url, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"description\": ", read=False)
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_until(lambda: metric(client, "magnet_requests_total", route="generate", status=499) == 1)
            assert metric(client, "magnet_requests_total", route="generate", status=500) == 0


@pytest.fixture(scope="module")
def limited_server(tiny_model):
    """A real uvicorn with tight HTTP limits."""
    import httpx

    settings = Settings(max_body_bytes=4096, max_headers=30, max_header_bytes=4096, header_timeout_s=0.5,
                        body_timeout_s=0.5, keepalive_timeout_s=0.5)
    with BackgroundServer(create_app(tiny_model, settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield url, client


def test_a_huge_body_is_refused_without_reading_it(limited_server):
    url, client = limited_server
    declared = raw_http(url, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 200000000\r\n\r\n" + b"[" * 65536)
    chunked = client.post("/v1/generate", content=iter([b"[" * 1024] * 64), headers={"content-type": "application/json"})
    assert declared.startswith(b"HTTP/1.1 413") and b'"type":"PayloadTooLarge"' in declared
    assert chunked.status_code == 413 and "limit of 4096 bytes" in chunked.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_too_many_or_too_large_headers_are_refused(limited_server):
    url, client = limited_server
    many = client.get("/healthz", headers={f"x-h{i}": "v" for i in range(100)})
    assert many.status_code == 431 and many.json()["error"]["type"] == "RequestHeaderFieldsTooLarge"
    big = raw_http(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    # h11 refuses a head that arrives in pieces past the limit (400); one that arrives whole
    # reaches the app, which refuses it (431): either way in the service's error shape
    status = int(big.split(b" ")[1])
    assert status in (400, 431) and json.loads(big.split(b"\r\n\r\n", 1)[1])["error"]["status"] == status
    trickled = raw_http(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192)
    assert trickled.startswith(b"HTTP/1.1 400") and b"a head over 4096 bytes" in trickled
    assert client.get("/healthz").status_code == 200


def test_slow_and_idle_clients_are_disconnected(limited_server):
    url, client = limited_server
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as silent, \
            socket.create_connection((host, int(port)), timeout=10) as trickle:
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")      # a head that never ends
        assert silent.recv(100) == b"" and trickle.recv(100) == b""   # closed by the server
    assert time.monotonic() - started < 5
    slow_body = raw_http(url, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{")
    assert slow_body.startswith(b"HTTP/1.1 408") and b'"type":"RequestTimeout"' in slow_body


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_generate_requires_a_json_content_type(tiny_model, content_type):
    """A cross-site HTML form can POST text/plain without a preflight: such bodies are refused."""
    body = json.dumps({**FAST, "description": "warm piano"})
    with serve(tiny_model) as client:
        headers = {} if content_type is None else {"content-type": content_type}
        r = client.post("/v1/generate", content=body, headers=headers)
        assert metric(client, "magnet_batches_total") == 0
    assert r.status_code == 415 and r.json()["error"]["type"] == "UnsupportedMediaType"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nope", 404), ("GET", "/static/nope.js", 404), ("GET", "/v1/generate", 405),
    ("DELETE", "/healthz", 405), ("GET", "/v1/prefix/x?index=abc", 422), ("GET", "/v1/progress/..%2Fetc", 404),
])
def test_every_error_has_the_service_shape(tiny_model, method, path, status):
    with serve(tiny_model) as client:
        r = client.request(method, path)
    assert r.status_code == status
    assert set(r.json()) == {"error"} and r.json()["error"]["status"] == status
    assert isinstance(r.json()["error"]["type"], str) and isinstance(r.json()["error"]["message"], str)


def test_progress_stream_carries_the_token_canvas_step_by_step(tiny_model):
    """A watcher gets, with each step, one byte per cell of the canvas: 0 masked, 1..255 fixed."""
    import base64

    import numpy as np

    with serve(tiny_model) as client:
        with cf.ThreadPoolExecutor(1) as pool:
            stream = pool.submit(client.get, "/v1/progress/canvas")
            wait_until(lambda: client.app.state.hub.get("canvas") is not None)
            assert post(client, description="warm piano", request_id="canvas", decoding_steps=[3, 2, 1, 1]).status_code == 200
            steps = [data for kind, data in sse_events(stream.result(timeout=60).text) if kind == "step"]
    assert [s["done"] for s in steps] == [1, 2, 3, 4, 5, 6, 7]
    k, t = tiny_model.config.n_q, int(0.3 * tiny_model.frame_rate)
    grids = []
    for s in steps:
        assert (s["canvas"]["codebooks"], s["canvas"]["frames"]) == (k, t)
        grids.append(np.frombuffer(base64.b64decode(s["canvas"]["cells"]), dtype=np.uint8).reshape(k, t))
    # A step re-masks the least confident spans, then samples every masked cell: after it the
    # stage's codebook is filled, each cell shaded by its confidence; later codebooks are masked.
    first, stage_1, last = grids[0], grids[3], grids[-1]
    assert first[0].all() and not first[1:].any()
    assert len(set(first[0].tolist())) > 1                           # shaded by confidence, not uniform
    assert (stage_1[0] == 255).all() and stage_1[1].all() and not stage_1[2:].any()
    assert last.all() and (last[:-1] == 255).all()


def test_generate_past_the_window_up_to_the_configured_limit(tiny_model):
    """/v1/generate stays within the model's window by default; a server configured for longer
    decodes long-form, window by window, the same audio as the API."""
    with serve(tiny_model) as client:
        assert post(client, description="a", duration=12.0).status_code == 422
    with serve(tiny_model, max_duration=12.0) as client:
        assert client.get("/v1/model").json()["max_duration"] == 12.0
        r = post(client, description="a", duration=12.0, seed=3)
        assert r.status_code == 200, r.text
    assert sf.info(io.BytesIO(r.content)).frames == 12 * tiny_model.sample_rate
    assert_same_audio(r.content, solo_wav(tiny_model, "a", 3, duration=12.0))
