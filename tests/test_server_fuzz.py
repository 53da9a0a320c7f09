"""The service under hostile input: the malformed-request table of issue 13 as explicit cases,
then property-based requests (hypothesis) against a real uvicorn. Every answer must be a 4xx
(or a 200 with a WAV), never a 5xx or a hang, and the server must stay alive after each.

Generation is kept cheap: at most 0.3 s of audio and 2 steps per codebook, so the valid
requests hypothesis stumbles on cost a fraction of a second each on CPU.
"""
import json

import httpx
import pytest
from hypothesis import example, HealthCheck, given, settings as hyp_settings, strategies as st

from magnet_engine.api import MAGNeT
from magnet_engine.demo import build_random_model
from magnet_engine.server import BackgroundServer, Settings, create_app
from service_helpers import answer_is_sane

LIMITS = dict(max_duration=0.3, max_decoding_steps=2, max_batch=2, max_text_chars=40, queue_size=4,
              request_timeout_s=20, max_body_bytes=8192)
FIELDS = ("description", "descriptions", "duration", "seed", "use_sampling", "top_k", "top_p", "temperature",
          "max_cfg_coef", "min_cfg_coef", "decoding_steps", "span_arrangement", "span_scoring", "anneal_temp",
          "request_id")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = MAGNeT.from_pretrained(build_random_model(tmp_path_factory.mktemp("fuzz-model"), "tiny"), device="cpu")
    with BackgroundServer(create_app(model, Settings(**LIMITS))) as url, \
            httpx.Client(base_url=url, timeout=httpx.Timeout(30.0)) as client:
        yield client




def post_raw(client, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return client.post("/v1/generate", content=body, headers={"content-type": content_type})


# ---------------------------------------------------------------- the table of issue 13
DEEP = b"[" * 100_000 + b"]" * 100_000
TABLE = [
    # (what, body bytes, expected status, expected error type)
    ("JSON nested 100k deep", DEEP, 413, "PayloadTooLarge"),
    ("JSON nested 4k deep (under the size cap)", b'{"description": ' + b"[" * 4000 + b"]" * 4000 + b"}",
     400, "InvalidJSON"),
    ("lone surrogate in the text", b'{"description": "piano \\ud800"}', 400, "InvalidInputError"),
    ("lone surrogate as a field name", b'{"\\ud800": 1}', 422, "ValidationError"),
    ("top_k 2^63", b'{"description": "a", "top_k": 9223372036854775808}', 422, "InvalidOptionError"),
    ("top_k beyond the codebook", b'{"description": "a", "top_k": 2049}', 422, "InvalidOptionError"),
    ("max_cfg_coef 1e308", b'{"description": "a", "max_cfg_coef": 1e308}', 422, "InvalidOptionError"),
    ("min_cfg_coef -1e308", b'{"description": "a", "min_cfg_coef": -1e308}', 422, "InvalidOptionError"),
    ("temperature NaN literal", b'{"description": "a", "temperature": NaN}', 400, "InvalidJSON"),
    ("duration Infinity literal", b'{"description": "a", "duration": Infinity}', 400, "InvalidJSON"),
    ("number overflowing a float", b'{"description": "a", "top_p": 1e400}', 400, "InvalidJSON"),
    ("integer of 5000 digits", b'{"description": "a", "seed": ' + b"9" * 5000 + b"}", 400, "InvalidJSON"),
    ("decoding_steps 1e6", b'{"description": "a", "decoding_steps": [1000000, 1, 1, 1]}', 422, "InvalidOptionError"),
    ("decoding_steps 1e8 entries", b'{"description": "a", "decoding_steps": [100000000]}', 422, "InvalidOptionError"),
    ("decoding_steps as floats", b'{"description": "a", "decoding_steps": [1e6, 1, 1, 1]}', 422, "ValidationError"),
    ("seed as bool", b'{"description": "a", "seed": true}', 422, "ValidationError"),
    ("not an object", b'[1, 2, 3]', 422, "ValidationError"),
    ("not UTF-8", b'{"description": "\xff\xfe"}', 400, "InvalidJSON"),
    ("empty body", b"", 400, "InvalidJSON"),
    ("body over the cap", b'{"description": "' + b"a" * 9000 + b'"}', 413, "PayloadTooLarge"),
    ("text over max_text_chars", json.dumps({"description": "a" * 41}).encode(), 400, "InvalidInputError"),
    ("too many descriptions", json.dumps({"descriptions": ["a", "b", "c"]}).encode(), 400, "InvalidInputError"),
    ("duration beyond the limit", b'{"description": "a", "duration": 10}', 422, "InvalidOptionError"),
    ("negative duration", b'{"description": "a", "duration": -1}', 422, "InvalidOptionError"),
    ("request_id with a path", b'{"description": "a", "request_id": "../x"}', 422, "ValidationError"),
    ("request_id of 10k chars", json.dumps({"description": "a", "request_id": "x" * 10_000}).encode(), 413,
     "PayloadTooLarge"),
]


@pytest.mark.parametrize("what, body, status, kind", TABLE, ids=[row[0] for row in TABLE])
def test_malformed_request_table(server, what, body, status, kind):
    r = post_raw(server, body)
    assert (r.status_code, r.json()["error"]["type"]) == (status, kind), r.text[:300]
    answer_is_sane(server, r)


def test_text_plain_post_is_refused(server):
    r = post_raw(server, json.dumps({"description": "a"}).encode(), "text/plain")
    assert r.status_code == 415
    answer_is_sane(server, r)


# ---------------------------------------------------------------- property-based requests
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=50))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                           max_leaves=20)
# Values near each field's domain, so that requests get past the schema and into validation.
plausible = {
    "description": st.one_of(st.text(max_size=60), st.sampled_from(["warm piano", "", " "])),
    "descriptions": st.lists(st.one_of(st.none(), st.text(max_size=20)), max_size=3),
    "duration": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.2, 0.3, 0.0])),
    "seed": st.integers(min_value=-5, max_value=2 ** 64),
    "use_sampling": st.booleans(),
    "top_k": st.integers(min_value=-5, max_value=2 ** 64),
    "top_p": st.floats(allow_nan=False, allow_infinity=False),
    "temperature": st.floats(allow_nan=False, allow_infinity=False),
    "max_cfg_coef": st.floats(allow_nan=False, allow_infinity=False),
    "min_cfg_coef": st.floats(allow_nan=False, allow_infinity=False),
    "decoding_steps": st.lists(st.integers(min_value=-2, max_value=2 ** 40), max_size=6),
    "span_arrangement": st.sampled_from(["nonoverlap", "stride1", "zigzag", ""]),
    "span_scoring": st.sampled_from(["max", "prod", "min"]),
    "anneal_temp": st.booleans(),
    "request_id": st.text(alphabet="abc-_./:%", min_size=0, max_size=70),
}
bodies = st.fixed_dictionaries({}, optional={name: st.one_of(plausible[name], json_values) for name in FIELDS})


@hyp_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
@given(body=bodies, extra=st.dictionaries(st.text(max_size=8), json_values, max_size=2))
def test_fuzzed_json_bodies_never_get_a_5xx(server, body, extra):
    answer_is_sane(server, server.post("/v1/generate", json={**extra, **body} if extra and body else body))


@hyp_settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300),
       content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]))
def test_fuzzed_raw_bodies_never_get_a_5xx(server, raw, content_type):
    answer_is_sane(server, post_raw(server, raw, content_type))


@hyp_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_id=st.text(max_size=80), index=st.text(max_size=6))
@example(request_id="0Я", index="")   # "0%2F": a trailing slash, once answered with a 307 redirect
def test_fuzzed_prefix_paths_never_get_a_5xx(server, request_id, index):
    path = "".join(c if c.isascii() and c.isalnum() else f"%{ord(c) & 0xFF:02X}" for c in request_id) or "x"
    r = server.get(f"/v1/prefix/{path}", params={"index": index})
    assert 400 <= r.status_code < 500 and r.json()["error"]["status"] == r.status_code
    assert server.get("/healthz").status_code == 200
