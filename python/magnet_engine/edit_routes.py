"""`POST /v1/edit`: regenerate regions of an uploaded clip (infill), as a FastAPI router.

    create_app(model, settings, edit_limits=EditLimits(max_upload_bytes=20 << 20))   # mounts it

    curl -F audio=@clip.wav -F 'regions=[[4, 6], [12, 13.5]]' -F description="drum fill" \
         http://localhost:8000/v1/edit -o edited.wav

Multipart fields: `audio` (a file soundfile reads: WAV, FLAC, OGG...), `regions` (JSON list of
[start, end] seconds), optional `description`, `seed`, `decoding_steps` (JSON list), and
`request_id` (its progress on GET /v1/progress/{id}, as a generate request's). The answer is
the edited clip as audio/wav at the model's rate, with X-Request-Id, X-Queue-Wait-Ms and
X-Run-Ms headers. Bad input gets a 4xx JSON error {"error": {"status", "type", "message"}}:
413 for an upload over the size limit, 400 for unreadable audio, a sample rate or length
outside the limits, a description over the service's limit and bad regions, 422 for bad
decoding options (at most the service's max_decoding_steps per codebook), 409 for a
request_id in use.

An edit is a job of the service's one worker (server.batcher.Task), run alone: it waits in
the same bounded queue as generate rows (503 + Retry-After when full), under the same
timeout (504), and a client that leaves or times out stops it after the current decoding
step. The request's decoding steps apply to it alone.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
import typing as tp

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from magnet_engine.audio import read_audio, wav_bytes
from magnet_engine.errors import InvalidInputError, InvalidOptionError
from magnet_engine.server.batcher import Jobs, Task, jobs_finder
from magnet_engine.server.schema import ApiError


@dataclasses.dataclass(frozen=True)
class EditLimits:
    max_upload_bytes: int = 20 << 20     # 20 MiB: a 10 s stereo 48 kHz float WAV is ~3.8 MiB
    min_sample_rate: int = 8000
    max_sample_rate: int = 192000
    max_seconds: tp.Optional[float] = None   # None: the model's window (infill does not window a clip)


def _read_clip(data: bytes, limits: EditLimits, window: float):
    """Upload bytes -> ([C, samples] float32 tensor, sample rate); InvalidInputError if unfit."""
    samples, rate = read_audio(io.BytesIO(data), "the uploaded audio")
    if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
        raise InvalidInputError(f"sample rate {rate} Hz is outside [{limits.min_sample_rate}, "
                                f"{limits.max_sample_rate}] Hz")
    longest = window if limits.max_seconds is None else min(limits.max_seconds, window)
    if samples.shape[1] == 0 or samples.shape[1] / rate > longest + 1e-9:
        raise InvalidInputError(f"the clip is {samples.shape[1] / rate:g} s; it must be in (0, {longest:g}] s")
    return samples, rate


def _json_field(name: str, text: tp.Optional[str]):
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"'{name}' must be JSON ({exc.msg})") from None


def edit_router(model, limits: EditLimits = EditLimits(), jobs: tp.Optional[Jobs] = None):
    """A router with POST /v1/edit on `model` (a loaded `MAGNeT`); jobs: the service's worker (see
    server.batcher.jobs_finder)."""
    router = APIRouter()
    service_for = jobs_finder(jobs)

    @router.post("/v1/edit")
    async def edit(request: Request, audio: UploadFile = File(...), regions: str = Form(...),
                   description: tp.Optional[str] = Form(None), seed: tp.Optional[int] = Form(None),
                   decoding_steps: tp.Optional[str] = Form(None), request_id: tp.Optional[str] = Form(None)):
        arrived = time.monotonic()
        service = service_for(request)
        channel = None
        try:
            request_id, channel = service.channel(request_id)   # 409 for an id in use, before anything else
            data = await audio.read(limits.max_upload_bytes + 1)
            if len(data) > limits.max_upload_bytes:
                raise ApiError(413, "PayloadTooLarge", f"the upload is over {limits.max_upload_bytes} bytes")
            clip, rate = _read_clip(data, limits, model.max_duration)
            spans = _json_field("regions", regions)
            if not isinstance(spans, list) or not all(isinstance(r, list) for r in spans):
                raise InvalidInputError(f"'regions' must be a JSON list of [start, end] seconds, found {regions!r}")
            if description is not None and len(description) > service.settings.max_text_chars:
                raise InvalidInputError(f"the description has {len(description)} characters; the limit is "
                                        f"{service.settings.max_text_chars}")
            if seed is not None and not 0 <= seed < 2 ** 62:
                raise InvalidOptionError(f"seed must be in [0, 2^62), found {seed}")
            steps = _json_field("decoding_steps", decoding_steps)
            params = model.params if steps is None else model.params.replace(
                decoding_steps=tuple(steps) if isinstance(steps, list) else steps).validate(
                    model.config.n_q, card=model.config.card, max_steps=service.settings.max_decoding_steps)
            task = Task(request_id, "edit", lambda listen: model.generate_infill(
                clip, rate, [tuple(r) for r in spans], [description], seed=seed, params=params, on_event=listen),
                asyncio.get_running_loop(), channel, mask_id=model.config.card)
            wav = await service.run(request, task)                                  # [1, C, samples]
            blob = await asyncio.to_thread(wav_bytes, wav[0], model.sample_rate)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered as JSON (a client gone: 499)
            return service.failed("edit", exc, channel)
        timing = {"queue_ms": round(task.queue_ms, 1), "run_ms": round(task.run_ms, 1)}
        service.succeeded("edit", arrived, channel, timing)
        return Response(blob, media_type="audio/wav", headers={
            "X-Request-Id": request_id, "X-Queue-Wait-Ms": str(timing["queue_ms"]), "X-Run-Ms": str(timing["run_ms"])})

    return router
