"""HTTP routes for PlayDiffusion speech editing: a FastAPI APIRouter factory the service mounts.

    POST /v1/speech/edit   multipart/form-data
        audio        the recording (wav / flac / ogg: anything libsndfile reads)
        input_text   what it says;  output_text   what it should say
        word_times   JSON [{"word", "start", "end"}] in seconds
        num_steps, init_temp, init_diversity, guidance, rescale, topk,
        audio_token_syllable_ratio, seed      optional; upstream's defaults and bounds
        request_id   optional: its progress on GET /v1/progress/{id}
    -> 200 audio/wav (16-bit PCM at the vocoder's rate), X-Units / X-Timings / X-Request-Id /
       X-Queue-Wait-Ms headers

Every bad request is a 4xx: 413 for a body, upload or field over its limit, more parts than
the fields above, or a clip longer than `max_audio_seconds` (read from its header, before
decoding); 408 for a body not received in time; 400 for unreadable audio, a sample rate or
channel count outside the limits, a clip shorter than the speech tokenizer's receptive field
(its conv front-end's kernel: 25 ms for XLS-R), text over `max_text_chars` or not valid
Unicode, word_times that are not JSON or nest deeper than 8 levels, and input the edit cannot
use; 422 for an unknown or repeated part, a seed outside [0, 2^62) and a setting outside its
bounds; 409 for a request_id in use; 429 when `max_pending` speech edits are in flight. The
body is read and parsed by server.body, as every route's is.

A clip at 16, 24 or 48 kHz goes to the model as it is (the pipeline's own resampling to its
16 kHz units and 24 kHz voice embedding is then a small integer ratio); any other rate is
first converted to 48 kHz with soxr, whose cost does not depend on the rate.

The speech model is a separate object, but the CPU (or GPU) is shared: an edit is a job of the
service's worker (server.jobs.Task), its `SpeechEditWork` run alone where the models are (this
process, or a Ray replica), in the same bounded queue as every other request (503 + Retry-After
when full), under the same timeout (504); a client that leaves or times out stops it after the
current unmasking step.
"""

import asyncio
import dataclasses
import json
import threading
import time
import typing as tp

import torch

from magnet_engine.audio import AudioLimits, AudioTooLongError, read_audio_upload, resample
from magnet_engine.errors import InvalidInputError, InvalidOptionError, MagnetEngineError
from magnet_engine.server.body import FormSpec, read_form
from magnet_engine.server.jobs import Jobs, Task, jobs_finder
from magnet_engine.server.models import Models
from magnet_engine.server.runner import Work
from magnet_engine.server.schema import check_seed, check_text

NATIVE_RATES = (16000, 24000, 48000)   # rates whose ratios to 16 and 24 kHz are small
CONVERT_TO = 48000
UNIT_RATE = 16000                      # the speech tokenizer's (XLS-R's) input rate
INT_SETTINGS = ("num_steps", "topk")
FLOAT_SETTINGS = ("init_temp", "init_diversity", "guidance", "rescale", "audio_token_syllable_ratio")
FIELDS = ("input_text", "output_text", "word_times", *INT_SETTINGS, *FLOAT_SETTINGS, "seed", "request_id")


@dataclasses.dataclass(frozen=True)
class SpeechLimits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_audio_seconds: float = 60.0
    max_text_chars: int = 2000
    max_pending: int = 4       # requests running or waiting; more get 429
    min_sample_rate: int = 8000
    max_sample_rate: int = 192000
    max_channels: int = 2


def receptive_field(model) -> int:
    """The fewest 16 kHz samples the speech tokenizer's conv front-end takes: one output frame
    needs 1 + sum((kernel_i - 1) * stride_0 ... stride_{i-1}) input samples (400 for XLS-R)."""
    config = getattr(getattr(getattr(getattr(model, "pipeline", None), "speech_tokenizer", None), "encoder", None),
                     "config", None)
    kernels, strides = getattr(config, "conv_kernel", (10, 3, 3, 3, 3, 2, 2)), getattr(config, "conv_stride",
                                                                                        (5, 2, 2, 2, 2, 2, 2))
    field, hop = 1, 1
    for kernel, stride in zip(kernels, strides):
        field += (kernel - 1) * hop
        hop *= stride
    return field


@dataclasses.dataclass(frozen=True)
class SpeechCard:
    """What the route reads from a PlayDiffusion, without its weights (a Ray ingress's view of
    the replicas' speech model)."""

    receptive_field: int

    @classmethod
    def of(cls, model) -> "SpeechCard":
        return model if isinstance(model, SpeechCard) else cls(receptive_field(model))


@dataclasses.dataclass(frozen=True)
class SpeechAnswer:
    wav: bytes            # 16-bit PCM WAV at the vocoder's rate
    units: int
    timings: dict         # phase -> seconds


@dataclasses.dataclass(frozen=True)
class SpeechEditWork(Work):
    """One speech edit, run where the speech model is; its errors are the 4xx they mean."""

    kind: tp.ClassVar[str] = "speech_edit"
    canvas: tp.ClassVar[bool] = False
    wave: torch.Tensor    # [C, N] float32
    sample_rate: int
    edit: tp.Any          # playdiffusion.InpaintInput
    seed: tp.Optional[int]

    def run(self, models, listen, emit) -> SpeechAnswer:
        from fastapi import HTTPException

        from magnet_engine.playdiffusion import wav_bytes_pcm16

        try:
            result = models.speech.inpaint_audio(self.wave, self.sample_rate, self.edit, seed=self.seed,
                                                 listener=listen)
        except InvalidOptionError as e:
            raise HTTPException(422, str(e)) from None
        except (InvalidInputError, MagnetEngineError) as e:
            raise HTTPException(400, f"{type(e).__name__}: {e}") from None
        return SpeechAnswer(wav_bytes_pcm16(result.pcm, result.sample_rate), int(result.units.numel()),
                            {k: round(v, 4) for k, v in result.timings.items()})


def make_speech_router(model: tp.Any, limits: SpeechLimits = SpeechLimits(), jobs: tp.Optional[Jobs] = None):
    """model: a magnet_engine.PlayDiffusion (or anything with its `inpaint_audio`; a Ray ingress
    passes its SpeechCard); jobs: the service's worker (see server.jobs.jobs_finder)."""
    from fastapi import APIRouter, HTTPException, Request
    from fastapi.responses import Response

    from magnet_engine.playdiffusion import BaseInput, InpaintInput

    router = APIRouter()
    pending = threading.BoundedSemaphore(limits.max_pending)
    service_for = jobs_finder(jobs, Models(None, model))
    spec = FormSpec(files={"audio": limits.max_upload_bytes}, fields=FIELDS,
                    max_field_bytes=max(64 * 1024, 4 * limits.max_text_chars))
    audio_limits = AudioLimits(limits.max_audio_seconds, limits.min_sample_rate, limits.max_sample_rate,
                               limits.max_channels)
    shortest = SpeechCard.of(model).receptive_field

    def decode(data: bytes):
        """Upload bytes -> ([C, N] float32, rate) at a rate the pipeline resamples cheaply; on a thread."""
        try:
            wave, sr = read_audio_upload(data, audio_limits, "audio")
        except AudioTooLongError as e:
            raise HTTPException(413, str(e)) from None
        if wave.shape[1] * UNIT_RATE < shortest * sr:
            raise InvalidInputError(f"audio: {wave.shape[1]} samples at {sr} Hz ({wave.shape[1] / sr * 1000:.3g} ms) "
                                    f"is shorter than the speech tokenizer's receptive field, {shortest} samples at "
                                    f"{UNIT_RATE} Hz ({shortest / UNIT_RATE * 1000:g} ms)")
        if sr not in NATIVE_RATES:
            wave, sr = resample(wave, sr, CONVERT_TO), CONVERT_TO
        return wave, sr

    openapi = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["audio", "input_text", "output_text", "word_times"],
        "properties": {"audio": {"type": "string", "format": "binary"},
                       **{name: {"type": "string"} for name in FIELDS}}}}}}}

    @router.post("/v1/speech/edit", openapi_extra=openapi)
    async def speech_edit(request: Request):
        arrived = time.monotonic()
        service = service_for(request)
        channel = None
        acquired = False
        try:
            form = await read_form(request, service.settings, spec)
            request_id, channel = service.channel(form.text("request_id"))   # 409 for an id in use
            texts = {name: check_text(name, form.required(name), limits.max_text_chars)
                     for name in ("input_text", "output_text")}
            form.required("word_times")
            times = form.json("word_times")
            settings = {name: form.integer(name) for name in INT_SETTINGS}
            settings.update({name: form.number(name) for name in FLOAT_SETTINGS})
            seed = check_seed(form.integer("seed"))
            try:
                edit = InpaintInput.model_validate(dict(audio="", input_word_times=times, **texts,
                                                        **{k: v for k, v in settings.items() if v is not None}))
            except Exception as e:  # pydantic ValidationError
                raise HTTPException(422, f"settings: {str(e)[:500]}") from None
            wave, sr = await asyncio.to_thread(decode, form.file("audio"))
            del form
            if not pending.acquire(blocking=False):
                raise HTTPException(429, "busy: too many speech edits in flight, retry later")
            acquired = True
            task = Task(request_id, SpeechEditWork(wave, sr, edit, seed), asyncio.get_running_loop(), channel)
            answer = await service.run(request, task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered as JSON (a client gone: 499)
            return service.failed("speech_edit", exc, channel)
        finally:
            if acquired:
                pending.release()
        timing = {"queue_ms": round(task.queue_ms, 1), "run_ms": round(task.run_ms, 1)}
        service.succeeded("speech_edit", arrived, channel, timing)
        return Response(answer.wav, media_type="audio/wav",
                        headers={"X-Units": str(answer.units), "X-Timings": json.dumps(answer.timings),
                                 "X-Request-Id": request_id, "X-Queue-Wait-Ms": str(timing["queue_ms"]),
                                 **task.headers})

    # The defaults the form falls back to, for clients: one place (the input model).
    @router.get("/v1/speech/edit/defaults")
    def speech_defaults():
        return {name: field.default for name, field in BaseInput.model_fields.items() if name != "output_text"}

    return router
