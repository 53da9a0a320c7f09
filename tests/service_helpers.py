"""Helpers shared by the HTTP service tests (one process and Ray): a fast request, the same
request through the API, audio comparison, Prometheus samples, SSE parsing, polling."""
import io
import json
import time
import typing as tp

FAST = {"duration": 0.3, "decoding_steps": [2, 1, 1, 1]}   # a fraction of a second on the tiny model


def solo_wav(model, text, seed, **options) -> bytes:
    """The same request computed directly through the API, alone in its batch."""
    from magnet_engine.audio import wav_bytes

    model.set_generation_params(**{**FAST, **options})
    return wav_bytes(model.decode(model.generate_tokens([text], seed=[seed]))[0], model.sample_rate)


def assert_same_audio(got: bytes, want: bytes) -> None:
    """Equal tokens give equal audio up to the codec's batch-size rounding (~1e-7): 1 LSB of PCM16.
    Any token that differed would move samples by far more."""
    import soundfile as sf

    a, b = sf.read(io.BytesIO(got), dtype="int16")[0], sf.read(io.BytesIO(want), dtype="int16")[0]
    assert a.shape == b.shape and abs(a.astype(int) - b.astype(int)).max() <= 1


def metric(client, name: str, **labels) -> float:
    """One sample of the Prometheus exposition, parsed by prometheus_client; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {k: str(v) for k, v in labels.items()}:
                return sample.value
    return 0.0


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def sse_events(lines: tp.Union[str, tp.Iterable[str]]) -> tp.List[tp.Tuple[str, tp.Any]]:
    """(event, data) pairs of a server-sent event stream (its text, or its lines as they
    arrive), up to and including the first `done` or `error`; comments are skipped."""
    seen, kind = [], None
    for line in (lines.splitlines() if isinstance(lines, str) else lines):
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            seen.append((kind, json.loads(line[6:])))
            if kind in ("done", "error"):
                break
    return seen


def answer_is_sane(client, r) -> None:
    """A 200 carries a WAV (or a zip of them); anything else is a 4xx in the service's error
    shape; the server lives."""
    import soundfile as sf

    if r.status_code == 200:
        assert r.headers["content-type"] in ("audio/wav", "application/zip")
        if r.headers["content-type"] == "audio/wav":
            assert sf.read(io.BytesIO(r.content))[0].size > 0
    else:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
        error = r.json()["error"]
        assert error["status"] == r.status_code and error["type"] and error["message"]
    assert client.get("/healthz").json()["status"] == "ok"


SPEECH_WORDS = [{"word": "hello", "start": 0.10, "end": 0.50}, {"word": "there", "start": 0.55, "end": 0.90},
                {"word": "world", "start": 1.00, "end": 1.60}]


def speech_edit_request() -> tp.Tuple[bytes, dict]:
    """(a 2 s noise recording at 16 kHz as WAV, the form fields of a POST /v1/speech/edit on it)."""
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.random.RandomState(0).randn(2 * 16000)).astype(np.float32), 16000, format="WAV")
    form = dict(input_text="hello there world", output_text="hello big world", word_times=json.dumps(SPEECH_WORDS),
                num_steps="3", seed="4")
    return buf.getvalue(), form


def tiny_models(tmp_path_factory, name: str):
    """(MAGNeT, PlayDiffusion): tiny random models for the upload routes' tests, a 1 s window and
    steps 2 1 1 1, so a valid edit finishes in well under a second."""
    from magnet_engine import MAGNeT, PlayDiffusion
    from magnet_engine.demo import build_random_model
    from magnet_engine.engine.playdiffusion.random_weights import write_random_model

    model = MAGNeT.from_pretrained(build_random_model(tmp_path_factory.mktemp(f"{name}-magnet"), "tiny", duration=1),
                                   device="cpu")
    model.set_generation_params(decoding_steps=[2, 1, 1, 1])
    speech = PlayDiffusion(str(write_random_model(tmp_path_factory.mktemp(f"{name}-pd"), "tiny", seed=1)), device="cpu")
    return model, speech
