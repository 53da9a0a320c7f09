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

Every bad request is a 4xx: 413 for an upload or clip over the limits, 400 for unreadable audio
or input the edit cannot use, 422 for a setting outside its bounds, 409 for a request_id in use,
429 when `max_pending` speech edits are in flight.

The speech model is a separate object, but the CPU (or GPU) is shared: an edit is a job of the
service's one worker (server.batcher.Task), run alone, in the same bounded queue as every
other request (503 + Retry-After when full), under the same timeout (504); a client that
leaves or times out stops it after the current unmasking step.
"""

import asyncio
import dataclasses
import io
import json
import threading
import time
import typing as tp

from magnet_engine.audio import read_audio
from magnet_engine.errors import InvalidInputError, InvalidOptionError, MagnetEngineError
from magnet_engine.server.batcher import Jobs, Task, jobs_finder


@dataclasses.dataclass(frozen=True)
class SpeechLimits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_audio_seconds: float = 60.0
    max_text_chars: int = 2000
    max_pending: int = 4       # requests running or waiting; more get 429


def make_speech_router(model: tp.Any, limits: SpeechLimits = SpeechLimits(), jobs: tp.Optional[Jobs] = None):
    """model: a magnet_engine.PlayDiffusion (or anything with its `inpaint_audio`); jobs: the
    service's worker (see server.batcher.jobs_finder)."""
    from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
    from fastapi.responses import Response

    from magnet_engine.playdiffusion import BaseInput, InpaintInput, wav_bytes_pcm16

    router = APIRouter()
    pending = threading.BoundedSemaphore(limits.max_pending)
    service_for = jobs_finder(jobs)

    def _decode(data: bytes):
        try:
            wave, sr = read_audio(io.BytesIO(data))
        except InvalidInputError as e:
            raise HTTPException(400, f"audio: not a readable audio file ({e.__cause__})") from None
        if wave.shape[1] == 0:
            raise HTTPException(400, "audio: the file holds no samples")
        if wave.shape[1] / sr > limits.max_audio_seconds:
            raise HTTPException(413, f"audio: {wave.shape[1] / sr:.1f} s is over the limit of "
                                     f"{limits.max_audio_seconds:.0f} s")
        return wave, sr

    def check(data: bytes, input_text: str, output_text: str, word_times: str, settings: dict):
        """The request's audio and validated input; HTTPException 4xx when unfit."""
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, f"audio: upload over the limit of {limits.max_upload_bytes} bytes")
        for name, text in (("input_text", input_text), ("output_text", output_text)):
            if len(text) > limits.max_text_chars:
                raise HTTPException(413, f"{name}: over the limit of {limits.max_text_chars} characters")
        try:
            times = json.loads(word_times)
        except ValueError as e:
            raise HTTPException(400, f"word_times: not JSON ({e})") from None
        wave, sr = _decode(data)
        try:
            request = InpaintInput.model_validate(dict(audio="", input_text=input_text, output_text=output_text,
                                                       input_word_times=times, **settings))
        except Exception as e:  # pydantic ValidationError
            raise HTTPException(422, f"settings: {e}") from None
        return wave, sr, request

    def inpaint(wave, sr, request, seed, listener):
        """On the worker: the edit, its errors as the 4xx they mean."""
        try:
            return model.inpaint_audio(wave, sr, request, seed=seed, listener=listener)
        except InvalidOptionError as e:
            raise HTTPException(422, str(e)) from None
        except (InvalidInputError, MagnetEngineError) as e:
            raise HTTPException(400, f"{type(e).__name__}: {e}") from None

    @router.post("/v1/speech/edit")
    async def speech_edit(
        request: Request,
        audio: UploadFile = File(...),
        input_text: str = Form(...),
        output_text: str = Form(...),
        word_times: str = Form(...),
        num_steps: tp.Optional[int] = Form(None),
        init_temp: tp.Optional[float] = Form(None),
        init_diversity: tp.Optional[float] = Form(None),
        guidance: tp.Optional[float] = Form(None),
        rescale: tp.Optional[float] = Form(None),
        topk: tp.Optional[int] = Form(None),
        audio_token_syllable_ratio: tp.Optional[float] = Form(None),
        seed: tp.Optional[int] = Form(None),
        request_id: tp.Optional[str] = Form(None),
    ):
        arrived = time.monotonic()
        service = service_for(request)
        channel = None
        acquired = False
        try:
            request_id, channel = service.channel(request_id)   # 409 for an id in use, before anything else
            data = await audio.read(limits.max_upload_bytes + 1)
            settings = {k: v for k, v in dict(num_steps=num_steps, init_temp=init_temp,
                                              init_diversity=init_diversity, guidance=guidance, rescale=rescale,
                                              topk=topk, audio_token_syllable_ratio=audio_token_syllable_ratio
                                              ).items() if v is not None}
            wave, sr, edit = await asyncio.to_thread(check, data, input_text, output_text, word_times, settings)
            if not pending.acquire(blocking=False):
                raise HTTPException(429, "busy: too many speech edits in flight, retry later")
            acquired = True
            task = Task(request_id, "speech_edit", lambda listen: inpaint(wave, sr, edit, seed, listen),
                        asyncio.get_running_loop(), channel)
            result = await service.run(request, task)
            blob = await asyncio.to_thread(wav_bytes_pcm16, result.pcm, result.sample_rate)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered as JSON (a client gone: 499)
            return service.failed("speech_edit", exc, channel)
        finally:
            if acquired:
                pending.release()
        timing = {"queue_ms": round(task.queue_ms, 1), "run_ms": round(task.run_ms, 1)}
        service.succeeded("speech_edit", arrived, channel, timing)
        return Response(blob, media_type="audio/wav",
                        headers={"X-Units": str(int(result.units.numel())),
                                 "X-Timings": json.dumps({k: round(v, 4) for k, v in result.timings.items()}),
                                 "X-Request-Id": request_id, "X-Queue-Wait-Ms": str(timing["queue_ms"])})

    # The defaults the form falls back to, for clients: one place (the input model).
    @router.get("/v1/speech/edit/defaults")
    def speech_defaults():
        return {name: field.default for name, field in BaseInput.model_fields.items() if name != "output_text"}

    return router
