"""`POST /v1/edit`: regenerate regions of an uploaded clip (infill), as a FastAPI router.

    app.include_router(edit_router(model, EditLimits(max_upload_bytes=20 << 20)))

    curl -F audio=@clip.wav -F 'regions=[[4, 6], [12, 13.5]]' -F description="drum fill" \
         http://localhost:8000/v1/edit -o edited.wav

Multipart fields: `audio` (a file soundfile reads: WAV, FLAC, OGG...), `regions` (JSON list of
[start, end] seconds), optional `description`, `seed`, `decoding_steps` (JSON list). The
answer is the edited clip as audio/wav at the model's rate. Bad input gets a 4xx JSON error
{"error": {"status", "type", "message"}}: 413 for an upload over the size limit, 400 for
unreadable audio, a sample rate or length outside the limits and bad regions, 422 for bad
decoding options. The model's own lock serialises this with the service's generation worker; the request's
decoding steps apply to it alone.
"""
from __future__ import annotations

import dataclasses
import io
import json
import typing as tp

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from magnet_engine.audio import wav_bytes
from magnet_engine.errors import InvalidInputError, InvalidOptionError


@dataclasses.dataclass(frozen=True)
class EditLimits:
    max_upload_bytes: int = 20 << 20     # 20 MiB: a 10 s stereo 48 kHz float WAV is ~3.8 MiB
    min_sample_rate: int = 8000
    max_sample_rate: int = 192000
    max_seconds: tp.Optional[float] = None   # None: the model's window (infill does not window a clip)


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "type": kind, "message": message}}, status_code=status)


def _read_clip(data: bytes, limits: EditLimits, window: float):
    """Upload bytes -> ([C, samples] float32 tensor, sample rate); InvalidInputError if unfit."""
    import soundfile as sf
    import torch

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors have no common type
        raise InvalidInputError(f"cannot read the uploaded audio: {exc}") from exc
    if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
        raise InvalidInputError(f"sample rate {rate} Hz is outside [{limits.min_sample_rate}, "
                                f"{limits.max_sample_rate}] Hz")
    longest = window if limits.max_seconds is None else min(limits.max_seconds, window)
    if samples.shape[0] == 0 or samples.shape[0] / rate > longest + 1e-9:
        raise InvalidInputError(f"the clip is {samples.shape[0] / rate:g} s; it must be in (0, {longest:g}] s")
    return torch.from_numpy(samples.T.copy()), int(rate)


def _json_field(name: str, text: tp.Optional[str]):
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"'{name}' must be JSON ({exc.msg})") from None


def edit_router(model, limits: EditLimits = EditLimits()):
    """A router with POST /v1/edit on `model` (a loaded `MAGNeT`)."""
    router = APIRouter()

    @router.post("/v1/edit")
    async def edit(audio: UploadFile = File(...), regions: str = Form(...),
                   description: tp.Optional[str] = Form(None), seed: tp.Optional[int] = Form(None),
                   decoding_steps: tp.Optional[str] = Form(None)):
        data = await audio.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            return _error(413, "PayloadTooLarge", f"the upload is over {limits.max_upload_bytes} bytes")
        try:
            clip, rate = _read_clip(data, limits, model.max_duration)
            spans = _json_field("regions", regions)
            if not isinstance(spans, list) or not all(isinstance(r, list) for r in spans):
                raise InvalidInputError(f"'regions' must be a JSON list of [start, end] seconds, found {regions!r}")
            if seed is not None and not 0 <= seed < 2 ** 62:
                raise InvalidOptionError(f"seed must be in [0, 2^62), found {seed}")
            steps = _json_field("decoding_steps", decoding_steps)
            params = model.params if steps is None else model.params.replace(
                decoding_steps=tuple(steps) if isinstance(steps, list) else steps).validate(model.config.n_q, card=model.config.card)
            wav = await run_in_threadpool(lambda: model.generate_infill(
                clip, rate, [tuple(r) for r in spans], [description], seed=seed, params=params))
        except InvalidInputError as exc:
            return _error(400, type(exc).__name__, str(exc))
        except InvalidOptionError as exc:
            return _error(422, type(exc).__name__, str(exc))
        return Response(wav_bytes(wav[0], model.sample_rate), media_type="audio/wav")

    return router
