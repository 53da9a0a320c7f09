"""`POST /v1/generate`: descriptions -> audio/wav (one) | application/zip of wavs (several).

The JSON body is `schema.GenerateRequest`; its rows (server.jobs.Job) join the runner's batches
by `BatchKey` (server.runner), and the answer carries the run's timing in X-* headers.
"""
from __future__ import annotations

import asyncio
import io
import secrets
import time
import typing as tp
import zipfile

from fastapi import APIRouter, Request
from fastapi.responses import Response

from magnet_engine.audio import wav_bytes
from magnet_engine.server.body import read_json_body
from magnet_engine.server.jobs import Job, Jobs
from magnet_engine.server.runner import BatchKey
from magnet_engine.server.schema import GenerateRequest, parse_body, parse_request, text_token_count


def zip_of_wavs(blobs: tp.List[bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # PCM barely compresses
        for i, blob in enumerate(blobs):
            zf.writestr(f"sample_{i}.wav", blob)
    return buf.getvalue()


def generate_router(model, jobs: Jobs) -> APIRouter:
    """A router with POST /v1/generate on `model` (a loaded `MAGNeT`, or anything with its
    interface), its rows run by `jobs` (the service's worker)."""
    router = APIRouter()
    settings = jobs.settings

    @router.post("/v1/generate", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()}}}})
    async def generate(request: Request):
        arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        channel = job = None
        try:
            body = parse_body(await read_json_body(request, settings))
            # the first POST owns an id; a second one is refused before it can touch the channel
            request_id, channel = jobs.channel(body.request_id)
            texts, params, duration = parse_request(model, settings, body)
            keys = [BatchKey(params, duration, text_token_count(model, t)) for t in texts]
            seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
            job = Job(request_id, texts, keys, seed, loop, channel)
            wavs = await jobs.run(request, job, windows=model.window_count(duration))
            blobs = await asyncio.to_thread(lambda: [wav_bytes(w, model.sample_rate) for w in wavs])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered as JSON (a client gone: 499)
            return jobs.failed("generate", exc, channel)

        timing = {"queue_ms": round(job.queue_ms, 1), "tokens_ms": round(job.tokens_ms, 1),
                  "codec_ms": round(job.codec_ms, 1), "batch_size": max(job.batch_sizes),
                  "batches": len(job.batch_sizes), "seed": seed}
        headers = {"X-Request-Id": request_id, "X-Seed": str(seed), "X-Queue-Wait-Ms": str(timing["queue_ms"]),
                   "X-Tokens-Ms": str(timing["tokens_ms"]), "X-Codec-Ms": str(timing["codec_ms"]),
                   "X-Batch-Size": str(timing["batch_size"]), "X-Batches": str(timing["batches"]), **job.headers}
        jobs.succeeded("generate", arrived, channel, timing)
        if len(blobs) == 1:
            return Response(blobs[0], media_type="audio/wav", headers=headers)
        headers["Content-Disposition"] = 'attachment; filename="magnet.zip"'
        return Response(zip_of_wavs(blobs), media_type="application/zip", headers=headers)

    return router
