"""Reading and parsing request bodies under the service's limits, the one layer every POST
route goes through (JSON for /v1/generate and /v1/stream, multipart for /v1/edit and
/v1/speech/edit).

A body is read chunk by chunk: over its byte limit it is refused (413) as soon as the
declared Content-Length or the bytes received so far say so, never after the whole body
was read or spooled to disk; it must arrive within `Settings.body_timeout_s` and with no
gap longer than `Settings.body_idle_timeout_s` (408 either way). A multipart body is parsed
as it arrives: only the route's named parts (422 for another), each at most once (so the
part count is bounded) and within its own byte limit (413), part headers bounded by the
parser (python-multipart: 8 headers of at most 4 KiB per part). Form values are then parsed
by the same rules as a JSON body's: strict UTF-8 text, integers and finite floats of bounded
length, JSON fields of bounded size and nesting depth (a field nested 1000 deep is a 400,
not a RecursionError).
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import typing as tp

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from magnet_engine.errors import InvalidInputError
from magnet_engine.server.jobs import ClientGone
from magnet_engine.server.schema import ApiError, Settings, loads_json

CLOSE = {"Connection": "close"}   # a refused body is not read to its end: the connection cannot be reused
MAX_JSON_FIELD_DEPTH = 8          # regions [[a, b], ...] and word_times [{...}] need 3
_INTEGER = re.compile(r"[+-]?[0-9]{1,40}")
_FLOAT_CHARS = 64


def media_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def too_large(message: str) -> ApiError:
    return ApiError(413, "PayloadTooLarge", message, headers=CLOSE)


async def body_chunks(request, settings: Settings, limit: int) -> tp.AsyncIterator[bytes]:
    """The request body's chunks as they arrive: 413 once the declared or received size passes
    `limit`, 408 past `body_timeout_s` in all or `body_idle_timeout_s` without a byte,
    ClientGone when the client leaves."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large(f"body of {declared[:20]} bytes; the limit is {limit}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.body_timeout_s
    stream = request.stream().__aiter__()
    size = 0
    while True:
        remaining = deadline - loop.time()
        wait = min(remaining, settings.body_idle_timeout_s)
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            idle = remaining > settings.body_idle_timeout_s
            raise ApiError(408, "RequestTimeout",
                           f"no body bytes for {settings.body_idle_timeout_s:g} s" if idle else
                           f"body not received within {settings.body_timeout_s:g} s", headers=CLOSE) from None
        except ClientDisconnect:
            raise ClientGone() from None
        size += len(chunk)
        if size > limit:
            raise too_large(f"body larger than the limit of {limit} bytes")
        if chunk:
            yield chunk


async def read_json_body(request, settings: Settings) -> bytes:
    """A JSON request's body, up to `max_body_bytes`; a JSON content type is required (415:
    a cross-site HTML form can only send text/plain, urlencoded or multipart)."""
    kind = media_type(request)
    if kind != "application/json":
        raise ApiError(415, "UnsupportedMediaType", f"Content-Type must be application/json, found {kind or 'none'!r}")
    chunks = [chunk async for chunk in body_chunks(request, settings, settings.max_body_bytes)]
    return b"".join(chunks)


# ------------------------------------------------------------------------------ multipart
@dataclasses.dataclass(frozen=True)
class FormSpec:
    """A multipart route's parts: `files` name -> byte limit, `fields` the text fields' names
    (each at most `max_field_bytes`). Any other part, or a second part of the same name, is
    refused (422) as soon as its headers are read, as an unknown field of a JSON body is: a
    body has at most `max_parts` parts."""

    files: tp.Mapping[str, int]
    fields: tp.Tuple[str, ...]
    max_field_bytes: int = 64 * 1024

    @property
    def max_parts(self) -> int:
        return len(self.files) + len(self.fields)

    @property
    def max_body_bytes(self) -> int:
        # every part at its limit, plus each part's boundary and headers (bounded by the parser)
        return sum(self.files.values()) + len(self.fields) * self.max_field_bytes + self.max_parts * 8192


@dataclasses.dataclass
class Form:
    """A parsed multipart body: text fields (strict UTF-8) and file parts (bytes)."""

    fields: tp.Dict[str, str]
    files: tp.Dict[str, bytes]

    def text(self, name: str) -> tp.Optional[str]:
        return self.fields.get(name)

    def required(self, name: str) -> str:
        value = self.fields.get(name)
        if value is None:
            raise ApiError(422, "ValidationError", f"'{name}': field required")
        return value

    def file(self, name: str) -> bytes:
        value = self.files.get(name)
        if value is None:
            raise ApiError(422, "ValidationError", f"'{name}': file part required")
        return value

    def integer(self, name: str) -> tp.Optional[int]:
        """A field as an integer of at most 40 digits (422 otherwise); None when absent."""
        text = self.fields.get(name)
        if text is None:
            return None
        if not _INTEGER.fullmatch(text.strip()):
            raise ApiError(422, "ValidationError", f"'{name}': expected an integer, found {text[:40]!r}")
        return int(text)

    def number(self, name: str) -> tp.Optional[float]:
        """A field as a finite float (422 otherwise); None when absent."""
        text = self.fields.get(name)
        if text is None:
            return None
        try:
            if len(text) > _FLOAT_CHARS:
                raise ValueError
            value = float(text)
        except ValueError:
            raise ApiError(422, "ValidationError", f"'{name}': expected a number, found {text[:40]!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ApiError(422, "ValidationError", f"'{name}': expected a finite number, found {text[:40]!r}")
        return value

    def json(self, name: str, max_depth: int = MAX_JSON_FIELD_DEPTH) -> tp.Any:
        """A field as JSON of at most `max_depth` levels (InvalidInputError 400 otherwise);
        None when absent."""
        text = self.fields.get(name)
        if text is None:
            return None
        try:
            return loads_json(text, max_depth)
        except ValueError as exc:
            raise InvalidInputError(f"'{name}' must be JSON ({str(exc)[:200]})") from None


class _FormReader:
    """python-multipart callbacks that keep the spec's parts, each within its limit."""

    def __init__(self, spec: FormSpec):
        self.spec = spec
        self.form = Form({}, {})
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: tp.Dict[bytes, bytes] = {}
        self.name: tp.Optional[str] = None
        self.data = bytearray()
        self.limit = 0
        self.kind = "field"
        self.ended = False

    def callbacks(self) -> dict:
        return dict(on_part_begin=self.part_begin, on_header_field=self.header_field_data,
                    on_header_value=self.header_value_data, on_header_end=self.header_end,
                    on_headers_finished=self.headers_finished, on_part_data=self.part_data,
                    on_part_end=self.part_end, on_end=self.end)

    def part_begin(self) -> None:
        self.headers, self.name, self.data = {}, None, bytearray()

    def header_field_data(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def header_value_data(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field, self.header_value = bytearray(), bytearray()

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        try:
            name = options.get(b"name", b"").decode("utf-8")
        except UnicodeDecodeError:
            name = repr(options.get(b"name"))
        if name in self.spec.files:
            kind, limit = "file", self.spec.files[name]
        elif name in self.spec.fields:
            kind, limit = "field", self.spec.max_field_bytes
        else:
            raise ApiError(422, "ValidationError", f"unknown part {name[:64]!r} (allowed: "
                           f"{', '.join([*self.spec.files, *self.spec.fields])})")
        if name in self.form.files or name in self.form.fields:
            raise ApiError(422, "ValidationError", f"part {name!r} given twice")
        self.name, self.limit, self.kind = name, limit, kind

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if len(self.data) + end - start > self.limit:
            raise too_large(f"{self.kind} {self.name!r} is over its limit of {self.limit} bytes")
        self.data += data[start:end]

    def part_end(self) -> None:
        if self.name is None:
            return
        if self.kind == "file":
            self.form.files[self.name] = bytes(self.data)
        else:
            try:
                self.form.fields[self.name] = self.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"'{self.name}' is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        self.data = bytearray()

    def end(self) -> None:
        self.ended = True


async def read_form(request, settings: Settings, spec: FormSpec) -> Form:
    """A multipart/form-data body parsed as it arrives, under the body limits and the spec's."""
    kind = media_type(request)
    if kind != "multipart/form-data":
        raise ApiError(415, "UnsupportedMediaType", f"Content-Type must be multipart/form-data, found {kind or 'none'!r}")
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 200:
        raise ApiError(400, "BadRequest", "multipart/form-data needs a boundary of 1 to 200 characters")
    reader = _FormReader(spec)
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        async for chunk in body_chunks(request, settings, spec.max_body_bytes):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "BadRequest", f"malformed multipart body: {str(exc)[:200]}") from None
    if not reader.ended:
        raise ApiError(400, "BadRequest", "malformed multipart body: it ends before its closing boundary")
    return reader.form
