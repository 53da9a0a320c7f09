"""What a client may send and what it gets back on error: the server's limits (`Settings`),
the POST /v1/generate body, its validation, and the one error shape of every endpoint:

    {"error": {"status": 422, "type": "InvalidOptionError", "message": "top_p must be ..."}}
"""
from __future__ import annotations

import dataclasses
import json
import typing as tp

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from magnet_engine.engine.config import (MAX_DECODING_STEPS, MAX_SEED, SPAN_ARRANGEMENTS, SPAN_SCORINGS,
                                         DecodingParams)
from magnet_engine.errors import InvalidInputError, InvalidOptionError

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"

# The fields every JSON body with a seed or an id declares, so that each bound is stated once.
Seed = tp.Annotated[int, Field(ge=0, lt=MAX_SEED)]
RequestId = tp.Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Server limits. `max_duration` None: the model's window (its trained length); a longer
    limit lets /v1/generate decode long-form, window by window (the request timeout then
    counts once per window).

    The HTTP limits hold against hostile clients: a body is read up to `max_body_bytes`
    (a generate request is a few hundred bytes), a request head may have at most
    `max_headers` fields and `max_header_bytes` in all, a client must send its whole head
    within `header_timeout_s` and its body within `body_timeout_s` with no gap longer than
    `body_idle_timeout_s` (server.body; a multipart route's body limit is its parts'), an
    idle keep-alive connection is closed after `keepalive_timeout_s`, and at most
    `max_connections` are open at once (more get 503 from uvicorn)."""

    max_batch: int = 8               # rows per generation batch, and descriptions per request
    max_wait_ms: float = 20.0        # how long the oldest row waits for batch companions
    # 'grouped': rows of equal options start together, nothing joins a running batch;
    # 'continuous': plain generate rows join a running batch between steps (server.runner)
    batching: str = "grouped"
    queue_size: int = 64             # requests waiting (not yet started) before 503
    max_text_chars: int = 500
    max_duration: tp.Optional[float] = None
    max_decoding_steps: int = 100    # per codebook; the engine's own bound is MAX_DECODING_STEPS
    request_timeout_s: float = 300.0  # queue + generation, then 504
    progress_ttl_s: float = 60.0      # how long finished progress streams stay replayable
    max_body_bytes: int = 64 * 1024
    max_headers: int = 100
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    body_idle_timeout_s: float = 5.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 1024
    note: str = ""                    # shown by the demo page (e.g. "random weights: noise")

    def __post_init__(self):
        for name in ("max_batch", "queue_size", "max_text_chars", "max_body_bytes", "max_headers",
                     "max_header_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.batching not in ("grouped", "continuous"):
            raise InvalidOptionError(f"batching must be 'grouped' or 'continuous', found {self.batching!r}")
        if not 1 <= self.max_decoding_steps <= MAX_DECODING_STEPS:
            raise InvalidOptionError(f"max_decoding_steps must be in [1, {MAX_DECODING_STEPS}] (the engine's "
                                     f"bound), found {self.max_decoding_steps}")


# ------------------------------------------------------------------------------ request body
# The decoding options a request may set: every DecodingParams field. An omitted one is None
# and takes the dataclass's default, which its OpenAPI description states.
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(DecodingParams))
_DEFAULTS = DecodingParams()


def _option(name: str):
    return Field(None, description=f"default: {json.dumps(getattr(_DEFAULTS, name))}")


class GenerateRequest(BaseModel):
    """POST /v1/generate body. Omitted options take MAGNeT.set_generation_params defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    description: tp.Optional[str] = None
    descriptions: tp.Optional[tp.List[tp.Optional[str]]] = None
    duration: tp.Optional[float] = None
    seed: tp.Optional[Seed] = None
    use_sampling: tp.Optional[bool] = _option("use_sampling")
    top_k: tp.Optional[int] = _option("top_k")
    top_p: tp.Optional[float] = _option("top_p")
    temperature: tp.Optional[float] = _option("temperature")
    max_cfg_coef: tp.Optional[float] = _option("max_cfg_coef")
    min_cfg_coef: tp.Optional[float] = _option("min_cfg_coef")
    decoding_steps: tp.Optional[tp.List[int]] = _option("decoding_steps")
    span_arrangement: tp.Optional[str] = _option("span_arrangement")
    span_scoring: tp.Optional[str] = _option("span_scoring")
    anneal_temp: tp.Optional[bool] = _option("anneal_temp")
    request_id: tp.Optional[RequestId] = None


class ErrorResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a message that quotes client input (a
    field name with a lone surrogate, say) still encodes."""

    def render(self, content: tp.Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    """An HTTP error answered as JSON {"error": {"status", "type", "message"}}."""

    def __init__(self, status: int, kind: str, message: str, headers: tp.Optional[dict] = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}

    def body(self) -> dict:
        return {"status": self.status, "type": self.kind, "message": self.message}

    def response(self) -> ErrorResponse:
        return ErrorResponse({"error": self.body()}, status_code=self.status, headers=self.headers)


def api_error_from(exc: BaseException) -> ApiError:
    """Map an exception to its HTTP answer: bad input 400, bad option 422, anything else 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidInputError):
        return ApiError(400, type(exc).__name__, str(exc))
    if isinstance(exc, InvalidOptionError):
        return ApiError(422, type(exc).__name__, str(exc))
    return ApiError(500, type(exc).__name__, f"generation failed: {exc}")


def describe_validation_error(errors: tp.Sequence[dict], schema: tp.Optional[tp.Type[BaseModel]] = None) -> str:
    """Pydantic / FastAPI errors -> one line naming each offending field (schema: the body's
    model, whose fields an unknown field's message lists; default GenerateRequest)."""
    parts = []
    for err in errors:
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{field}' (allowed: {', '.join((schema or GenerateRequest).model_fields)})")
        else:
            parts.append(f"'{field}': {err['msg']}")
    return "; ".join(parts)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} does not fit a 64-bit float")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), counted in
    one pass without recursion: a hostile depth is refused before the parser recurses into it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads_json(text: tp.Union[str, bytes], max_depth: tp.Optional[int] = None) -> tp.Any:
    """JSON text -> value, or ValueError: finite numbers only (no NaN / Infinity literals, no
    float overflow, no integer of thousands of digits), at most `max_depth` levels deep."""
    try:
        if max_depth is not None and json_depth(text.decode("utf-8") if isinstance(text, bytes) else text) > max_depth:
            raise ValueError(f"nested deeper than {max_depth} levels")
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:   # arrays nested thousands deep, when no max_depth was given
        raise ValueError("nested too deep") from None


# No request body nests deeper than 2 levels (a list of descriptions, of decoding steps). The
# bound is checked before parsing: the parser's own guard is Python's recursion limit, which
# torch.compile raises process-wide, so a hostile depth would otherwise be a 400 or a 422
# depending on what the process had compiled.
MAX_JSON_BODY_DEPTH = 16


def parse_json_body(raw: bytes, schema: tp.Type[BaseModel]):
    """Request bytes -> a `schema` instance; ApiError 400 (not JSON, or nested deeper than
    MAX_JSON_BODY_DEPTH) / 422 (not the schema)."""
    try:
        data = loads_json(raw, MAX_JSON_BODY_DEPTH)
    except ValueError as exc:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, "InvalidJSON", f"body is not valid JSON: {str(exc)[:200]}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "ValidationError", describe_validation_error(exc.errors(), schema)) from None


def parse_body(raw: bytes) -> GenerateRequest:
    return parse_json_body(raw, GenerateRequest)


def check_text(what: str, text: tp.Optional[str], max_chars: int) -> tp.Optional[str]:
    """A description (or any text a request carries): at most `max_chars` characters of valid
    Unicode (JSON's "\\ud800" decodes to a lone surrogate, which is no character); InvalidInputError."""
    if text is None:
        return None
    if len(text) > max_chars:
        raise InvalidInputError(f"{what} has {len(text)} characters; the limit is {max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{what} is not valid Unicode ({exc.reason} at index {exc.start})") from None
    return text


def check_seed(seed: tp.Optional[int]) -> tp.Optional[int]:
    """A request's seed: None, or an int in [0, MAX_SEED) (InvalidOptionError 422)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED):
        raise InvalidOptionError(f"seed must be an integer in [0, 2^{MAX_SEED.bit_length() - 1}), "
                                 f"found {str(seed)[:40]}")
    return seed


def text_token_count(model, text: tp.Optional[str]) -> tp.Optional[int]:
    """Length of a description's T5 token sequence (EOS included); None for no text."""
    if text is None:
        return None
    return int(model.conditioner.tokenize([text])[0].shape[-1])


def check_duration(model, settings: Settings, duration: tp.Optional[float]) -> float:
    """The request's duration (default: the longest allowed), validated by the model."""
    limit = settings.max_duration or model.max_duration   # past the window: long-form, window by window
    return limit if duration is None else model.check_duration(duration, limit=limit)


def parse_request(model, settings: Settings, body: GenerateRequest):
    """Validated (texts, params, duration); raises InvalidInputError / InvalidOptionError."""
    if (body.description is None) == (body.descriptions is None):
        raise InvalidInputError("give exactly one of 'description' (a string) or 'descriptions' (a list)")
    texts = [body.description] if body.descriptions is None else body.descriptions
    if not texts:
        raise InvalidInputError("'descriptions' must not be empty")
    if len(texts) > settings.max_batch:
        raise InvalidInputError(f"at most {settings.max_batch} descriptions per request, found {len(texts)}")
    for i, text in enumerate(texts):
        check_text(f"description {i}", text, settings.max_text_chars)
    options = {name: getattr(body, name) for name in OPTION_FIELDS if getattr(body, name) is not None}
    params = DecodingParams().replace(**options).validate(model.config.n_q, card=model.config.card,
                                                          max_steps=settings.max_decoding_steps)
    return texts, params, check_duration(model, settings, body.duration)


def _memory(model) -> tp.Optional[dict]:
    """Weight bytes per component (in their run precision) and the process's memory."""
    stats = getattr(model, "memory_stats", None)
    return None if stats is None else stats()


def model_info(model, settings: Settings, max_batch: int) -> dict:
    return {
        "name": model.name,
        "engine": model.engine,
        "device": str(model.device),
        "precision": getattr(model, "precision", None),
        # what 'auto' chose and why (measured timings included), as the CLI prints it
        "precision_choice": model.precision_choice.as_dict() if hasattr(model, "precision_choice") else None,
        "compile": getattr(model, "compile", False),
        "cuda_graphs": getattr(model, "cuda_graphs", False),
        "memory": _memory(model),
        "sample_rate": model.sample_rate,
        "frame_rate": model.frame_rate,
        "channels": model.config.channels,
        "n_q": model.config.n_q,
        "hybrid": model.config.is_hybrid,   # AR prefix first: progress events with stage "prefix"
        "max_duration": check_duration(model, settings, None),
        "defaults": {**dataclasses.asdict(DecodingParams()), "duration": check_duration(model, settings, None)},
        "choices": {"span_arrangement": list(SPAN_ARRANGEMENTS), "span_scoring": list(SPAN_SCORINGS)},
        "limits": {"max_descriptions": settings.max_batch, "max_text_chars": settings.max_text_chars,
                   "max_batch": max_batch, "queue_size": settings.queue_size,
                   "max_decoding_steps": settings.max_decoding_steps, "max_body_bytes": settings.max_body_bytes,
                   "request_timeout_s": settings.request_timeout_s, "body_timeout_s": settings.body_timeout_s,
                   "body_idle_timeout_s": settings.body_idle_timeout_s},
        "batching": settings.batching,
        "note": settings.note,
    }
