"""The upload and streaming routes (/v1/edit, /v1/speech/edit, /v1/stream) under the failure
classes of issue 24, one or more cases each: deep JSON in a form field, speech clips shorter
than the tokenizer's receptive field, seeds outside int64, odd sample rates, headers that
understate or overstate a clip, bodies without bounds (size, part count, slow clients), and
checks that differ from /v1/generate's. Each answer must be the 4xx named, never a 5xx or a
hang. (The property-based fuzz of the same routes: tests/test_server_upload_fuzz.py.)"""
import io
import json
import socket
import sys
import time
import types

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from magnet_engine.server.routes.edit import EditLimits
from magnet_engine.server import BackgroundServer, Settings, create_app
from magnet_engine.server.routes.speech import NATIVE_RATES, SpeechLimits, make_speech_router
from magnet_engine.server.routes.stream import StreamLimits
from service_helpers import tiny_models

WORDS = [{"word": "hello", "start": 0.05, "end": 0.3}, {"word": "there", "start": 0.35, "end": 0.6},
         {"word": "world", "start": 0.65, "end": 0.95}]
SPEECH_FORM = dict(input_text="hello there world", output_text="hello big world", word_times=json.dumps(WORDS),
                   num_steps="2", seed="4")
SETTINGS = Settings(max_text_chars=50, max_decoding_steps=20, body_timeout_s=3, body_idle_timeout_s=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory, "uploads")


def make_app(models):
    model, speech = models
    return create_app(model, SETTINGS, speech=speech, edit_limits=EditLimits(max_upload_bytes=200_000),
                      speech_limits=SpeechLimits(max_upload_bytes=200_000, max_audio_seconds=5),
                      stream_limits=StreamLimits(max_duration=2))


@pytest.fixture(scope="module")
def http(models):
    with TestClient(make_app(models)) as client:
        yield client


def wav(seconds=0.8, rate=32000, channels=1, fmt="WAV") -> bytes:
    n = max(1, int(round(rate * seconds)))
    t = np.arange(n) / rate
    buf = io.BytesIO()
    sf.write(buf, np.repeat((0.3 * np.sin(2 * np.pi * 220 * t))[:, None], channels, 1).astype(np.float32), rate,
             format=fmt, subtype="PCM_16")
    return buf.getvalue()


def flac_claiming(total_samples: int, seconds=0.8, rate=32000) -> bytes:
    """A FLAC of `seconds` whose STREAMINFO says `total_samples` (0: length unknown)."""
    data = bytearray(wav(seconds, rate, fmt="FLAC"))
    assert data[:4] == b"fLaC"
    i = 8 + 13   # STREAMINFO's data starts at byte 8; total_samples: low 4 bits of its byte 13, then 4 bytes
    data[i] = (data[i] & 0xF0) | ((total_samples >> 32) & 0x0F)
    data[i + 1:i + 5] = (total_samples & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def edit(http, audio=None, **fields):
    form = {"regions": json.dumps([[0.1, 0.2]]), **fields}
    return http.post("/v1/edit", files={"audio": ("clip.wav", wav() if audio is None else audio, "audio/wav")},
                     data=form)


def speech(http, audio=None, **fields):
    audio = wav(1.0, 16000) if audio is None else audio
    return http.post("/v1/speech/edit", files={"audio": ("in.wav", audio, "audio/wav")},
                     data={**SPEECH_FORM, **fields})


def is_error(answer, status: int, words: str = "") -> None:
    assert answer.status_code == status, answer.text[:300]
    error = answer.json()["error"]
    assert error["status"] == status and words in error["message"], error


# ------------------------------------------------------------------ 1. deep JSON in a form field
DEEP = "[" * 1000 + "]" * 1000


@pytest.mark.parametrize("route, field", [("edit", "regions"), ("edit", "decoding_steps"), ("speech", "word_times")])
def test_json_fields_nested_deep_are_400(http, route, field):
    is_error((edit if route == "edit" else speech)(http, **{field: DEEP}), 400, "nested deeper than 8 levels")


def test_a_json_body_nested_deep_on_stream_is_400(http):
    answer = http.post("/v1/stream", content=b'{"duration": 1, "decoding_steps": ' + DEEP.encode() + b"}",
                       headers={"content-type": "application/json"})
    is_error(answer, 400, "not valid JSON")


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/stream"])
def test_a_deep_json_body_is_400_whatever_the_recursion_limit(http, route):
    """torch.compile raises the process's recursion limit; the body's depth bound must not
    depend on it (the parser would then accept 1000 levels and the schema answer 422)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        for depth in (17, 3000):
            body = b'{"duration": 1, "decoding_steps": ' + b"[" * depth + b"]" * depth + b"}"
            is_error(http.post(route, content=body, headers={"content-type": "application/json"}), 400, "nested")
    finally:
        sys.setrecursionlimit(limit)


# ------------------------------------------------------------------ 2. speech shorter than the receptive field
@pytest.mark.parametrize("samples", [1, 160, 399])
def test_speech_shorter_than_the_receptive_field_is_400(http, samples):
    is_error(speech(http, wav(samples / 16000, 16000)), 400, "receptive field")


# ------------------------------------------------------------------ 3. seeds outside the API's range
@pytest.mark.parametrize("seed", [str(2 ** 64), str(2 ** 63), "-1", "9" * 41, "1.5"])
def test_speech_seeds_outside_the_range_are_422(http, seed):
    assert speech(http, seed=seed).status_code == 422


# ------------------------------------------------------------------ 4. odd sample rates
class RecordingSpeech:
    """A speech model that records the audio it is given and answers a silent clip."""

    def __init__(self):
        self.seen = []

    def inpaint_audio(self, wave, sample_rate, request, seed=None, listener=None):
        self.seen.append((wave.shape, sample_rate))
        return types.SimpleNamespace(pcm=np.zeros(240, np.int16), sample_rate=24000, units=torch.zeros(3),
                                     timings={"unmask": 0.0})


@pytest.mark.parametrize("rate", [16001, 48004, 191999, 44100, 16000, 24000])
def test_speech_uploads_reach_the_model_at_a_rate_it_resamples_cheaply(rate):
    """The pipeline's resampler builds a rate / gcd(rate, 16000) filter bank: at 191999 Hz that was
    a 24.6 GB allocation. Odd rates are converted (soxr) before the model sees them."""
    fake = RecordingSpeech()
    app = FastAPI()
    app.include_router(make_speech_router(fake, SpeechLimits(max_audio_seconds=5)))
    answer = speech(TestClient(app), wav(0.5, rate))
    assert answer.status_code == 200, answer.text
    (shape, seen_rate), = fake.seen
    assert seen_rate in NATIVE_RATES
    assert abs(shape[-1] - 0.5 * seen_rate) <= 2


def test_speech_at_an_odd_rate_is_edited(http):
    answer = speech(http, wav(1.0, 16001))
    assert answer.status_code == 200, answer.text
    assert sf.read(io.BytesIO(answer.content))[0].size > 0


# ------------------------------------------------------------------ 5. checked from the header, before decoding
def test_edit_refuses_a_clip_whose_header_says_12_hours(http):
    answer = edit(http, flac_claiming(12 * 3600 * 32000))   # 0.8 s of samples, a 12 h header
    is_error(answer, 400, "43200 s")


def test_edit_decodes_a_clip_of_unknown_length_only_up_to_its_limit(http):
    is_error(edit(http, flac_claiming(0, seconds=1.5)), 400, "decodes to more than")


def test_speech_refuses_a_clip_over_its_limit_from_the_header(http):
    is_error(speech(http, flac_claiming(12 * 3600 * 16000, seconds=1.0, rate=16000)), 413, "43200 s")


def test_edit_takes_a_clip_at_another_rate(http):
    answer = edit(http, wav(0.8, 44100), seed="2")
    assert answer.status_code == 200, answer.text
    out, rate = sf.read(io.BytesIO(answer.content))
    assert rate == 32000 and out.shape == (40 * 640,)


def test_more_channels_than_the_limit_are_400(http):
    is_error(edit(http, wav(0.8, 32000, channels=3)), 400, "channels")


# ------------------------------------------------------------------ 6. bodies with bounds
def test_extra_parts_beside_a_valid_edit_are_refused(http):
    files = [("audio", ("clip.wav", wav(), "audio/wav"))] + [(f"junk{i}", (f"{i}.bin", b"x" * 100, "x/y"))
                                                             for i in range(40)]
    is_error(http.post("/v1/edit", files=files, data={"regions": "[[0.1, 0.2]]"}), 422, "unknown part 'junk0'")
    twice = [("audio", ("clip.wav", wav(), "audio/wav"))] * 2
    is_error(http.post("/v1/edit", files=twice, data={"regions": "[[0.1, 0.2]]"}), 422, "given twice")


def test_a_field_over_its_limit_is_413(http):
    is_error(edit(http, description="x" * (65 * 1024)), 413, "'description'")


def test_a_json_body_over_the_cap_on_stream_is_413(http):
    body = json.dumps({"duration": 1, "description": "a" * 100_000}).encode()
    is_error(http.post("/v1/stream", content=body, headers={"content-type": "application/json"}), 413)


def test_fields_that_are_not_utf8_are_400(http):
    body = (b"--b\r\nContent-Disposition: form-data; name=\"regions\"\r\n\r\n[[0.1, 0.2]]\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"description\"\r\n\r\n\xff\xfe\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n\r\n" + wav() + b"\r\n--b--\r\n")
    answer = http.post("/v1/edit", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    is_error(answer, 400, "UTF-8")


@pytest.fixture(scope="module")
def live(models):
    with BackgroundServer(make_app(models)) as url:
        yield url.rsplit(":", 1)[1]


def raw_answer(port: str, head: bytes, body_pieces=(), pause: float = 0.0, wait_s: float = 15.0) -> bytes:
    """Send a request head and body pieces (`pause` s apart) over a raw socket; the first bytes of the answer."""
    with socket.create_connection(("127.0.0.1", int(port)), timeout=wait_s) as sock:
        sock.sendall(head)
        for piece in body_pieces:
            try:
                sock.sendall(piece)
            except OSError:      # the server answered and closed: read what it said
                break
            time.sleep(pause)
        try:
            return sock.recv(4096)
        except socket.timeout:
            return b"(no answer)"


@pytest.mark.parametrize("path", ["/v1/edit", "/v1/speech/edit"])
def test_a_declared_length_over_the_cap_is_413_before_the_body(live, path):
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: 300000000\r\n\r\n").encode()
    assert raw_answer(live, head).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("path, kind", [("/v1/edit", "multipart/form-data; boundary=b"),
                                        ("/v1/speech/edit", "multipart/form-data; boundary=b"),
                                        ("/v1/stream", "application/json")])
def test_a_body_trickled_a_byte_at_a_time_is_408(live, path, kind):
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: 1000\r\n\r\n".encode()
    started = time.monotonic()
    start = b'{"description": "' if kind == "application/json" else (
        b'--b\r\nContent-Disposition: form-data; name="request_id"\r\n\r\n')
    answer = raw_answer(live, head, [start] + [b"a"] * 30, pause=0.3)    # 3.3 bytes/s, never idle 1 s
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 12                            # the 3 s body timeout, not the client's pace


@pytest.mark.parametrize("path", ["/v1/edit", "/v1/speech/edit"])
def test_a_chunked_upload_over_the_cap_is_413_before_it_ends(live, path):
    """No Content-Length, and a body that never ends: the 413 comes from the bytes counted so far."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    part = b'--b\r\nContent-Disposition: form-data; name="audio"; filename="a"\r\n\r\n'
    piece = b"\0" * 50_000
    chunks = [b"%x\r\n%s\r\n" % (len(part), part)] + [b"%x\r\n%s\r\n" % (len(piece), piece)] * 6   # 300 kB
    assert raw_answer(live, head, chunks).startswith(b"HTTP/1.1 413")


def test_a_body_that_stops_is_408_after_the_idle_timeout(live):
    head = (b"POST /v1/edit HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000\r\n\r\n--b\r\n")
    assert b"no body bytes for 1 s" in raw_answer(live, head)


# ------------------------------------------------------------------ 7. the same checks as /v1/generate
def test_stream_refuses_a_lone_surrogate_as_generate_does(http):
    body = b'{"description": "piano \\ud800", "duration": 0.5}'
    for path in ("/v1/generate", "/v1/stream"):
        is_error(http.post(path, content=body, headers={"content-type": "application/json"}), 400, "not valid Unicode")


@pytest.mark.parametrize("seed", [str(2 ** 64), "-1", "x"])
def test_edit_seeds_outside_the_range_are_422(http, seed):
    assert edit(http, seed=seed).status_code == 422
