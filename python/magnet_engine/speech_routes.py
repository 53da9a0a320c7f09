"""HTTP routes for PlayDiffusion speech editing: a FastAPI APIRouter factory the service mounts.

    POST /v1/speech/edit   multipart/form-data
        audio        the recording (wav / flac / ogg: anything libsndfile reads)
        input_text   what it says;  output_text   what it should say
        word_times   JSON [{"word", "start", "end"}] in seconds
        num_steps, init_temp, init_diversity, guidance, rescale, topk,
        audio_token_syllable_ratio, seed      optional; upstream's defaults and bounds
    -> 200 audio/wav (16-bit PCM at the vocoder's rate), X-Units / X-Timings headers

Every bad request is a 4xx: 413 for an upload or clip over the limits, 400 for unreadable audio
or input the edit cannot use, 422 for a setting outside its bounds, 429 when the queue is full.
"""

import dataclasses
import io
import json
import threading
import typing as tp

from magnet_engine.errors import InvalidInputError, InvalidOptionError, MagnetEngineError


@dataclasses.dataclass(frozen=True)
class SpeechLimits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_audio_seconds: float = 60.0
    max_text_chars: int = 2000
    max_pending: int = 4       # requests running or waiting; more get 429


def make_speech_router(model: tp.Any, limits: SpeechLimits = SpeechLimits()):
    """model: a magnet_engine.PlayDiffusion (or anything with its `inpaint_audio`)."""
    from fastapi import APIRouter, File, Form, HTTPException, UploadFile
    from fastapi.responses import Response

    from magnet_engine.playdiffusion import BaseInput, InpaintInput, wav_bytes_pcm16

    router = APIRouter()
    pending = threading.BoundedSemaphore(limits.max_pending)

    def _decode(data: bytes):
        import soundfile as sf
        import torch

        try:
            array, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile errors come in several types
            raise HTTPException(400, f"audio: not a readable audio file ({e})") from None
        if array.shape[0] == 0:
            raise HTTPException(400, "audio: the file holds no samples")
        if array.shape[0] / sr > limits.max_audio_seconds:
            raise HTTPException(413, f"audio: {array.shape[0] / sr:.1f} s is over the limit of "
                                     f"{limits.max_audio_seconds:.0f} s")
        return torch.from_numpy(array.T.copy()), int(sr)

    @router.post("/v1/speech/edit")
    def speech_edit(
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
    ):
        data = audio.file.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, f"audio: upload over the limit of {limits.max_upload_bytes} bytes")
        for name, text in (("input_text", input_text), ("output_text", output_text)):
            if len(text) > limits.max_text_chars:
                raise HTTPException(413, f"{name}: over the limit of {limits.max_text_chars} characters")
        try:
            times = json.loads(word_times)
        except ValueError as e:
            raise HTTPException(400, f"word_times: not JSON ({e})") from None
        settings = {k: v for k, v in dict(num_steps=num_steps, init_temp=init_temp, init_diversity=init_diversity,
                                          guidance=guidance, rescale=rescale, topk=topk,
                                          audio_token_syllable_ratio=audio_token_syllable_ratio).items()
                    if v is not None}
        wave, sr = _decode(data)
        try:
            request = InpaintInput.model_validate(dict(audio=audio.filename or "", input_text=input_text,
                                                       output_text=output_text, input_word_times=times, **settings))
        except Exception as e:  # pydantic ValidationError
            raise HTTPException(422, f"settings: {e}") from None
        if not pending.acquire(blocking=False):
            raise HTTPException(429, "busy: too many speech edits in flight, retry later")
        try:
            result = model.inpaint_audio(wave, sr, request, seed=seed)
        except InvalidOptionError as e:
            raise HTTPException(422, str(e)) from None
        except (InvalidInputError, MagnetEngineError) as e:
            raise HTTPException(400, f"{type(e).__name__}: {e}") from None
        finally:
            pending.release()
        return Response(wav_bytes_pcm16(result.pcm, result.sample_rate), media_type="audio/wav",
                        headers={"X-Units": str(int(result.units.numel())),
                                 "X-Timings": json.dumps({k: round(v, 4) for k, v in result.timings.items()})})

    # The defaults the form falls back to, for clients: one place (the input model).
    @router.get("/v1/speech/edit/defaults")
    def speech_defaults():
        return {name: field.default for name, field in BaseInput.model_fields.items() if name != "output_text"}

    return router
