"""`POST /v1/edit`: regenerate regions of an uploaded clip (infill), as a FastAPI router.

    create_app(model, settings, edit_limits=EditLimits(max_upload_bytes=20 << 20))   # mounts it

    curl -F audio=@clip.wav -F 'regions=[[4, 6], [12, 13.5]]' -F description="drum fill" \
         http://localhost:8000/v1/edit -o edited.wav

Multipart fields: `audio` (a file soundfile reads: WAV, FLAC, OGG...), `regions` (JSON list of
[start, end] seconds), optional `description`, `seed`, `decoding_steps` (JSON list), and
`request_id` (its progress on GET /v1/progress/{id}, as a generate request's). The answer is
the edited clip as audio/wav at the model's rate, with X-Request-Id, X-Seed, X-Queue-Wait-Ms and
X-Run-Ms headers. Bad input gets a 4xx JSON error {"error": {"status", "type", "message"}}:
413 for a body, upload or field over its limit or more parts than the fields above, 408 for
a body not received in time, 400 for unreadable audio, a sample rate, channel count or length
outside the limits (read from the file's header, before decoding), JSON fields that are not
JSON or nest deeper than 8 levels, a description over the service's limit or not valid
Unicode, and bad regions, 422 for an unknown or repeated part, a seed outside [0, 2^62) and
bad decoding options (at most the service's max_decoding_steps per codebook), 409 for a
request_id in use. The body is read and parsed by server.body, as every route's is. A clip
at another rate than the model's is converted (soxr) before the engine sees it.

An edit is a job of the service's worker (server.jobs.Task), its `EditWork` run alone: it waits
in the same bounded queue as generate rows (503 + Retry-After when full), under the same
timeout (504), and a client that leaves or times out stops it after the current decoding
step. The request's decoding steps apply to it alone. Without a seed one is drawn here (and
answered in X-Seed), so an edit run again (on another Ray replica) gives the same clip.
"""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import typing as tp

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response

from magnet_engine.audio import AudioLimits, read_audio_upload, resample, wav_bytes
from magnet_engine.engine.config import DecodingParams
from magnet_engine.errors import InvalidInputError, InvalidOptionError
from magnet_engine.server.body import FormSpec, read_form
from magnet_engine.server.jobs import Jobs, Task, jobs_finder
from magnet_engine.server.models import Models
from magnet_engine.server.runner import Work
from magnet_engine.server.schema import check_seed, check_text

FIELDS = ("regions", "description", "seed", "decoding_steps", "request_id")


@dataclasses.dataclass(frozen=True)
class EditLimits:
    max_upload_bytes: int = 20 << 20     # 20 MiB: a 10 s stereo 48 kHz float WAV is ~3.8 MiB
    min_sample_rate: int = 8000
    max_sample_rate: int = 192000
    max_seconds: tp.Optional[float] = None   # None: the model's window (infill does not window a clip)
    max_channels: int = 2

    def form(self) -> FormSpec:
        return FormSpec(files={"audio": self.max_upload_bytes}, fields=FIELDS)

    def audio(self, window: float) -> AudioLimits:
        longest = window if self.max_seconds is None else min(self.max_seconds, window)
        return AudioLimits(longest, self.min_sample_rate, self.max_sample_rate, self.max_channels)


def _read_clip(data: bytes, limits: AudioLimits, model_rate: int):
    """Upload bytes -> [C, samples] float32 at the model's rate; InvalidInputError if unfit.
    Converted here (soxr) so that the engine never builds a rate-pair filter bank for it."""
    samples, rate = read_audio_upload(data, limits, "the clip")
    return resample(samples, rate, model_rate)


def _regions(value) -> tp.List[tp.Tuple[float, float]]:
    if (not isinstance(value, list) or not all(isinstance(r, list) and len(r) == 2 for r in value)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in value for x in r)):
        raise InvalidInputError(f"'regions' must be a JSON list of [start, end] seconds, found {str(value)[:100]}")
    return [(float(a), float(b)) for a, b in value]


def _decoding_steps(value) -> tp.Optional[tp.Tuple[int, ...]]:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise InvalidOptionError(f"'decoding_steps' must be a JSON list of integers, found {str(value)[:100]}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class EditWork(Work):
    """The infill of one clip, run where the model is; its result is the edited clip as WAV bytes."""

    kind: tp.ClassVar[str] = "edit"
    clip: torch.Tensor                            # [C, samples] at the model's rate
    regions: tp.Tuple[tp.Tuple[float, float], ...]
    description: tp.Optional[str]
    seed: int
    params: DecodingParams

    def run(self, models, listen, emit) -> bytes:
        model = models.music
        wav = model.generate_infill(self.clip, model.sample_rate, list(self.regions), [self.description],
                                    seed=self.seed, params=self.params, on_event=listen)   # [1, C, samples]
        return wav_bytes(wav[0], model.sample_rate)


def edit_router(model, limits: EditLimits = EditLimits(), jobs: tp.Optional[Jobs] = None):
    """A router with POST /v1/edit on `model` (a loaded `MAGNeT`, or a Ray ingress's card of it);
    jobs: the service's worker (see server.jobs.jobs_finder)."""
    router = APIRouter()
    service_for = jobs_finder(jobs, Models(model))
    spec = limits.form()
    audio_limits = limits.audio(model.max_duration)

    @router.post("/v1/edit", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["audio", "regions"],
                   "properties": {"audio": {"type": "string", "format": "binary"},
                                  **{name: {"type": "string"} for name in FIELDS}}}}}}})
    async def edit(request: Request):
        arrived = time.monotonic()
        service = service_for(request)
        settings = service.settings
        channel = None
        try:
            form = await read_form(request, settings, spec)
            request_id, channel = service.channel(form.text("request_id"))   # 409 for an id in use
            form.required("regions")
            spans = _regions(form.json("regions"))
            description = check_text("the description", form.text("description"), settings.max_text_chars)
            seed = check_seed(form.integer("seed"))
            seed = secrets.randbelow(2 ** 31) if seed is None else seed
            steps = _decoding_steps(form.json("decoding_steps"))
            params = model.params if steps is None else model.params.replace(decoding_steps=steps).validate(
                model.config.n_q, card=model.config.card, max_steps=settings.max_decoding_steps)
            clip = await asyncio.to_thread(_read_clip, form.file("audio"), audio_limits, model.sample_rate)
            del form
            task = Task(request_id, EditWork(clip, tuple(spans), description, seed, params),
                        asyncio.get_running_loop(), channel)
            blob = await service.run(request, task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered as JSON (a client gone: 499)
            return service.failed("edit", exc, channel)
        timing = {"queue_ms": round(task.queue_ms, 1), "run_ms": round(task.run_ms, 1)}
        service.succeeded("edit", arrived, channel, timing)
        return Response(blob, media_type="audio/wav", headers={
            "X-Request-Id": request_id, "X-Seed": str(seed), "X-Queue-Wait-Ms": str(timing["queue_ms"]),
            "X-Run-Ms": str(timing["run_ms"]), **task.headers})

    return router
