"""/v1/edit and /v1/speech/edit under property-based multipart bodies (hypothesis) against a
real uvicorn, as tests/test_server_fuzz.py does for /v1/generate: form fields drawn near and
far from their domains (deep and odd JSON, huge and negative numbers, non-UTF-8 bytes, unknown
and repeated parts), uploads drawn from valid clips at odd rates, lengths and channel counts,
truncated or corrupted. Every answer must be a 4xx in the service's error shape or a 200 with
a WAV, never a 5xx or a hang, the server alive after each, and its RSS bounded over the run.

Kept cheap: a 1 s tiny random model with 2 steps per codebook, a tiny random speech model
with 2 unmasking steps, and 130 examples in all (well under a minute on two cores).
"""
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from magnet_engine.server.routes.edit import EditLimits
from magnet_engine.server import BackgroundServer, Settings, create_app
from service_helpers import answer_is_sane, tiny_models
from magnet_engine.server.routes.speech import SpeechLimits

RSS_GROWTH_MIB = 300   # over the whole run; one leaked decode of an unbounded upload is gigabytes


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, speech = tiny_models(tmp_path_factory, "fuzz")
    app = create_app(model, Settings(max_text_chars=40, max_decoding_steps=2, queue_size=4, request_timeout_s=30,
                                     body_timeout_s=5, body_idle_timeout_s=2),
                     speech=speech, edit_limits=EditLimits(max_upload_bytes=300_000),
                     speech_limits=SpeechLimits(max_upload_bytes=300_000, max_audio_seconds=3, max_text_chars=80))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=httpx.Timeout(60.0)) as client:
        before = rss_mib()
        yield client
        if Path("/proc/self/status").exists():
            assert rss_mib() - before < RSS_GROWTH_MIB, f"RSS grew from {before:.0f} MiB to {rss_mib():.0f} MiB"




# ---------------------------------------------------------------- strategies
def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


@st.composite
def clips(draw, longest_s: float):
    """Audio files: a tone at a drawn rate, length and channel count, maybe cut short or corrupted."""
    common = [8000, 16000, 22050, 24000, 32000, 44100, 48000]
    rate = draw(st.one_of(st.sampled_from(common), st.integers(min_value=1000, max_value=200_000)))
    frames = draw(st.one_of(st.integers(min_value=0, max_value=int(rate * longest_s * 1.5)),
                            st.sampled_from([1, 2, 399, 400])))
    channels = draw(st.sampled_from([1, 1, 2, 3]))
    fmt = draw(st.sampled_from(["WAV", "WAV", "FLAC"])) if rate in common else "WAV"   # libsndfile's FLAC: common rates
    t = np.arange(frames) / rate
    samples = np.repeat((0.3 * np.sin(2 * np.pi * 220 * t))[:, None], channels, 1).astype(np.float32)
    data = encode(samples, rate, fmt)
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "garbage"]))
    if damage == "truncate":
        data = data[:draw(st.integers(min_value=0, max_value=len(data)))]
    elif damage == "flip" and data:
        i = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    elif damage == "garbage":
        data = draw(st.binary(max_size=200))
    return data


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def multipart(parts) -> tuple:
    """(body, content type) of (name, filename or None, bytes) parts, written by hand so that
    names, order, repeats and bytes are the test's, not a client library's."""
    boundary = b"fuzzboundary7MA4YWxk"
    out = []
    for name, filename, data in parts:
        disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
        out.append(b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n")
    out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out), "multipart/form-data; boundary=" + boundary.decode()


@st.composite
def forms(draw, valid: dict, hostile: dict):
    """Field name -> bytes: a valid form with up to two fields drawn from their hostile
    strategy or raw bytes, and maybe one left out, so that each request is near enough to
    valid that the hostile field is what the route has to deal with."""
    form = {name: value.encode() for name, value in valid.items()}
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), max_size=2, unique=True)):
        value = draw(st.one_of(hostile[name], hostile[name], field_text))
        form[name] = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    for name in draw(st.lists(st.sampled_from(sorted(form)), max_size=1)):
        del form[name]
    return form


deep = st.sampled_from([9, 100, 1000, 5000]).map(lambda n: "[" * n + "]" * n)
json_text = st.one_of(json_values.map(json.dumps), deep, st.text(max_size=30))
big_ints = st.one_of(st.integers(min_value=-2 ** 70, max_value=2 ** 70), st.sampled_from([2 ** 63, 2 ** 64, -1]))
numbers = st.one_of(big_ints.map(str), st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=12))
field_text = st.one_of(st.binary(max_size=40), st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")))
request_ids = st.text(alphabet="abc-_./:%", max_size=70)

EDIT_VALID = {"regions": "[[0.1, 0.2]]", "description": "drum fill", "seed": "3", "decoding_steps": "[2, 1, 1, 1]"}
EDIT_HOSTILE = {"regions": json_text, "description": st.text(max_size=60), "seed": numbers,
                "decoding_steps": json_text, "request_id": request_ids}
WORDS = [{"word": "hello", "start": 0.05, "end": 0.3}, {"word": "there", "start": 0.35, "end": 0.6}]
SPEECH_VALID = {"input_text": "hello there", "output_text": "hello you", "word_times": json.dumps(WORDS),
                "num_steps": "2", "init_temp": "1", "init_diversity": "1", "guidance": "0.5", "rescale": "0.7",
                "topk": "25", "audio_token_syllable_ratio": "14", "seed": "4"}
SPEECH_HOSTILE = {"input_text": st.text(max_size=100), "output_text": st.text(max_size=100), "word_times": json_text,
                  **{name: numbers for name in ("num_steps", "init_temp", "init_diversity", "guidance", "rescale",
                                                "topk", "audio_token_syllable_ratio", "seed")},
                  "request_id": request_ids}
extra_parts = st.one_of(st.just([]), st.just([]), st.just([]), st.lists(
    st.tuples(st.sampled_from([b"audio", b"junk", b"regions", b"\xff"]), st.binary(max_size=30)), min_size=1, max_size=2))
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])


@hyp_settings(max_examples=50, **FUZZ)
@given(audio=st.one_of(clips(longest_s=1.0), clips(longest_s=1.0), st.none()), extra=extra_parts,
       fields=forms(EDIT_VALID, EDIT_HOSTILE))
def test_fuzzed_edit_bodies_never_get_a_5xx(server, audio, fields, extra):
    parts = [(name.encode(), None, value) for name, value in fields.items()]
    if audio is not None:
        parts.append((b"audio", b"clip.wav", audio))
    parts += [(name, None, data) for name, data in extra]
    body, kind = multipart(parts)
    answer_is_sane(server, server.post("/v1/edit", content=body, headers={"content-type": kind}))


@hyp_settings(max_examples=50, **FUZZ)
@given(audio=st.one_of(clips(longest_s=3.0), clips(longest_s=3.0), st.none()), extra=extra_parts,
       fields=forms(SPEECH_VALID, SPEECH_HOSTILE))
def test_fuzzed_speech_edit_bodies_never_get_a_5xx(server, audio, fields, extra):
    parts = [(name.encode(), None, value) for name, value in fields.items()]
    if audio is not None:
        parts.append((b"audio", b"in.wav", audio))
    parts += [(name, None, data) for name, data in extra]
    body, kind = multipart(parts)
    answer_is_sane(server, server.post("/v1/speech/edit", content=body, headers={"content-type": kind}))


@hyp_settings(max_examples=30, **FUZZ)
@given(raw=st.binary(max_size=400), boundary=st.sampled_from(["fuzzboundary7MA4YWxk", "", "x" * 300]),
       path=st.sampled_from(["/v1/edit", "/v1/speech/edit"]))
def test_fuzzed_raw_multipart_bodies_never_get_a_5xx(server, raw, boundary, path):
    body = b"--fuzzboundary7MA4YWxk\r\n" + raw
    answer_is_sane(server, server.post(path, content=body,
                                       headers={"content-type": f"multipart/form-data; boundary={boundary}"}))
