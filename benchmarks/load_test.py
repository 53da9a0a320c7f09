"""Load test of `magnet-engine serve`: K concurrent clients for M seconds against a loopback server.

    python benchmarks/load_test.py                                   # 8 and 32 clients, 2 minutes each
    python benchmarks/load_test.py --clients 8 --seconds 30          # one shorter run
    python benchmarks/load_test.py --model DIR --duration 5 --baseline  # also a max-batch 1 run
    python benchmarks/load_test.py --ray --clients 8 --seconds 30      # 1 vs 2 Ray Serve replicas
    python benchmarks/load_test.py --clients 8 --seconds 30 --edit-fraction 0.25   # a quarter are /v1/edit

For each client count, starts the server in a subprocess (the embedded random-weight 'tiny'
demo model unless --model), warms it up, then each client posts requests back to back
until M seconds have passed and waits for its last answer. Prompts are drawn from a fixed
list, so requests differ in text length as real traffic does (only equal lengths share a
batch). Counts what was sent, answered, answered 200, and answered with a valid WAV of the
requested length ("lost" = sent - answered: a request with no HTTP answer at all); reports
latency p50/p95/p99, the per-request split (queue, tokens, codec), the batch-size histogram,
and the server's RSS and open descriptors before and after. Prints the JSON and writes it to
benchmarks/results/load_test_cpu.json (atomically). Exits 1 if any request failed or was lost.

--edit-fraction F: each request is, with probability F, a POST /v1/edit of the warm-up clip
(a region from 20% to 50% of it regenerated, the same decoding steps) instead of a generate;
edits run alone on the same worker, in the same queue. The JSON then has the same counts and
latencies per kind ("by_kind") and goes to load_test_edit_mix_cpu.json.

--malformed-fraction F: a hostile mix across every POST route. The server also serves the
random-weight speech model (--speech random); each request picks a route among generate,
edit, stream and speech, and is, with probability F, one of that route's hostile cases
(HOSTILE: deep JSON in a field, a 12 h FLAC header, odd sample rates, a one-sample speech
clip, seeds past int64, lone surrogates, unknown parts, bodies over the caps, a body that
stalls). A valid request must be answered 200 with a valid WAV (a stream: 202, then `done`
with every chunk a valid WAV); a hostile one anything but a 5xx (a 200 a valid WAV). Counts
per route, case and status, 5xx, hung (no answer within --hang-s) and lost requests, and
the server's RSS before, after, and after a few idle seconds. JSON to
load_test_hostile_cpu.json; exits 1 on any 5xx, hang, loss, invalid WAV or refused valid
request.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

import httpx
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.generate import ENGINES
from magnet_engine.engine.schedule import duration_frames
from magnet_engine.server.schema import Settings

PROMPTS = [
    "warm lo-fi piano with soft vinyl crackle",
    "upbeat electronic dance track with synth bass and drums",
    "slow cinematic strings",
    "jazz saxophone swing",
    "ambient pad",
    "rock electric guitar riff with heavy distortion",
    "acoustic guitar folk song",
    "techno kick and hi hat",
]
RESULTS = Path(__file__).resolve().parent / "results" / "load_test_cpu.json"
EDIT_MIX_RESULTS = Path(__file__).resolve().parent / "results" / "load_test_edit_mix_cpu.json"
HOSTILE_RESULTS = Path(__file__).resolve().parent / "results" / "load_test_hostile_cpu.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q: float) -> float:
    """Nearest-rank percentile; q in [0, 100]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "magnet_engine.server", "--host", "127.0.0.1", "--port", str(port),
           "--engine", args.engine, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--queue-size", str(args.queue_size)]
    if args.model:
        cmd += ["--model", args.model]
    if args.malformed_fraction:
        cmd += ["--speech", "random", "--max-stream-duration", str(2 * args.duration)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return server, wait_healthy(server, f"http://127.0.0.1:{port}")


def wait_healthy(server: subprocess.Popen, url: str, seconds: float = 300) -> str:
    """`url` once the server answers /healthz (a first run builds the demo model meanwhile)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.stdout.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"server did not become healthy in {seconds:.0f} s")


def process_usage(pid: int) -> dict:
    """Resident memory (MiB) and open file descriptors of a process (Linux /proc)."""
    rss_kib = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    return {"rss_mib": round(rss_kib / 1024, 1), "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


def wav_samples(content: bytes) -> int:
    """Sample count of a 16-bit PCM WAV; -1 if it is not one."""
    try:
        info = sf.info(io.BytesIO(content))
        data, _ = sf.read(io.BytesIO(content), dtype="int16")
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a valid WAV
        return -1
    return data.shape[0] if info.subtype == "PCM_16" else -1


def edit_form(body: dict, clip: bytes, seconds: float, text: str, seed: int) -> dict:
    """POST /v1/edit arguments: regenerate 20%-50% of the clip."""
    data = {"regions": json.dumps([[round(0.2 * seconds, 3), round(0.5 * seconds, 3)]]), "description": text,
            "seed": str(seed), "decoding_steps": json.dumps(body["decoding_steps"])}
    return {"data": data, "files": {"audio": ("clip.wav", clip, "audio/wav")}}


async def client_loop(client: httpx.AsyncClient, body: dict, stop_at: float, rng: random.Random, records: list,
                      samples: dict, edit_fraction: float, clip: tp.Optional[bytes], seconds: float):
    while time.monotonic() < stop_at:
        kind = "edit" if edit_fraction and rng.random() < edit_fraction else "generate"
        text, seed = rng.choice(PROMPTS), rng.randrange(2 ** 31)
        t0 = time.monotonic()
        try:
            if kind == "edit":
                r = await client.post("/v1/edit", **edit_form(body, clip, seconds, text, seed))
            else:
                r = await client.post("/v1/generate", json={**body, "description": text, "seed": seed})
            status, headers, answered = r.status_code, r.headers, True
        except httpx.HTTPError as exc:
            status, headers, answered = type(exc).__name__, {}, False
        record = {"kind": kind, "status": status, "answered": answered, "latency_s": time.monotonic() - t0}
        if status == 200:
            record.update(queue_ms=float(headers["x-queue-wait-ms"]), valid_wav=wav_samples(r.content) == samples[kind])
            if kind == "generate":
                record.update(tokens_ms=float(headers["x-tokens-ms"]), codec_ms=float(headers["x-codec-ms"]),
                              batch_size=int(headers["x-batch-size"]))
        records.append(record)


async def drive(url: str, args, clients: int) -> tuple[list, float]:
    body = {"duration": args.duration, "decoding_steps": args.decoding_steps}
    timeout = httpx.Timeout(args.seconds + 600)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        warm = await client.post("/v1/generate", json={**body, "description": PROMPTS[0], "seed": 0})
        warm.raise_for_status()
        # every answer must have its warm-up's length (same duration; an edit keeps its clip's)
        samples = {"generate": wav_samples(warm.content)}
        assert samples["generate"] > 0, "the warm-up answer is not a WAV"
        clip = warm.content if args.edit_fraction else None
        if clip is not None:
            edited = await client.post("/v1/edit", **edit_form(body, clip, args.duration, PROMPTS[1], 0))
            edited.raise_for_status()
            samples["edit"] = wav_samples(edited.content)
        records: list = []
        start = time.monotonic()
        await asyncio.gather(*(client_loop(client, body, start + args.seconds, random.Random(i), records, samples,
                                           args.edit_fraction, clip, args.duration)
                               for i in range(clients)))
        return records, time.monotonic() - start


def server_batch_histogram(url: str) -> dict:
    """Rows-per-batch counts from the server's /metrics (cumulative buckets -> per bucket)."""
    buckets, previous = {}, 0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "magnet_batch_size_bucket":
                count = int(sample.value)
                if count > previous:
                    buckets[f"<={sample.labels['le']}"] = count - previous
                previous = count
    return buckets


def counts(records: list) -> dict:
    """sent / answered / lost / 200 / valid WAV and latency percentiles (ms) of some records."""
    ok = [r for r in records if r["status"] == 200]
    latency = [r["latency_s"] * 1000 for r in ok]
    answered = sum(r["answered"] for r in records)
    return {"sent": len(records), "answered": answered, "lost": len(records) - answered, "status_200": len(ok),
            "valid_wav": sum(r["valid_wav"] for r in ok),
            "latency_ms": {"p50": round(percentile(latency, 50), 1), "p95": round(percentile(latency, 95), 1),
                           "p99": round(percentile(latency, 99), 1)} if ok else None}


def summarise(records: list, wall_s: float, args, max_batch: int, clients: int, server_hist: dict,
              usage: dict) -> dict:
    ok = [r for r in records if r["status"] == 200]
    answered = sum(r["answered"] for r in records)
    errors: dict = {}
    for r in records:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    latency = [r["latency_s"] * 1000 for r in ok]
    batch_hist: dict = {}
    generated = [r for r in ok if r["kind"] == "generate"]
    for r in generated:
        batch_hist[str(r["batch_size"])] = batch_hist.get(str(r["batch_size"]), 0) + 1
    audio_s = len(ok) * duration_frames(args.duration, 50) / 50  # the served models' codecs run at 50 Hz

    def med(key, rows=generated):
        return round(statistics.median(r[key] for r in rows), 1) if rows else None

    return {
        "clients": clients,
        "max_batch": max_batch,
        "sent": len(records),
        "answered": answered,
        "lost": len(records) - answered,
        "status_200": len(ok),
        "valid_wav": sum(r["valid_wav"] for r in ok),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "wall_s": round(wall_s, 2),
        "throughput_rps": round(len(ok) / wall_s, 3),
        "audio_seconds_per_second": round(audio_s / wall_s, 3),
        "latency_ms": {"p50": round(percentile(latency, 50), 1), "p95": round(percentile(latency, 95), 1),
                       "p99": round(percentile(latency, 99), 1), "mean": round(statistics.mean(latency), 1),
                       "max": round(max(latency), 1)} if ok else None,
        "median_split_ms": {"queue": med("queue_ms"), "tokens": med("tokens_ms"), "codec": med("codec_ms")},
        "by_kind": {kind: {**counts(rows), "median_queue_ms": med("queue_ms", [r for r in rows if r["status"] == 200])}
                    for kind in ("generate", "edit") if (rows := [r for r in records if r["kind"] == kind])},
        "requests_by_batch_size": dict(sorted(batch_hist.items(), key=lambda kv: int(kv[0]))),
        "server_batches_by_size": server_hist,
        "server_process": usage,
    }


def run(args, max_batch: int, clients: int) -> dict:
    server, url = start_server(args, max_batch)
    try:
        before = process_usage(server.pid)          # after the warm-up request: the model is loaded
        records, wall_s = asyncio.run(drive(url, args, clients))
        after = process_usage(server.pid)
        usage = {"before": before, "after": after}
        return summarise(records, wall_s, args, max_batch, clients, server_batch_histogram(url), usage)
    finally:
        stop_server(server)


# ------------------------------------------------------------------------------ --malformed-fraction
ROUTES = ("generate", "edit", "stream", "speech")
WORDS = [{"word": "hello", "start": 0.05, "end": 0.3}, {"word": "there", "start": 0.35, "end": 0.6},
         {"word": "world", "start": 0.65, "end": 0.95}]
DEEP = "[" * 1000 + "]" * 1000


def tone(seconds: float, rate: int, fmt: str = "WAV") -> bytes:
    import numpy as np

    t = np.arange(max(1, int(round(seconds * rate)))) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def flac_claiming_hours(hours: float, rate: int) -> bytes:
    """A 0.5 s FLAC whose STREAMINFO says it lasts `hours` (decoding would take that long)."""
    data = bytearray(tone(0.5, rate, "FLAC"))
    total, i = int(hours * 3600 * rate), 8 + 13   # STREAMINFO total_samples: low 4 bits of byte 13, then 4 bytes
    data[i] = (data[i] & 0xF0) | ((total >> 32) & 0x0F)
    data[i + 1:i + 5] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


class Requests:
    """The valid request of each route, and its hostile cases, as httpx.post arguments."""

    def __init__(self, body: dict, clip: bytes, seconds: float):
        self.body, self.clip, self.seconds = body, clip, seconds
        self.speech_clip = tone(1.0, 16000)

    def valid(self, route: str, text: str, seed: int) -> tp.Tuple[str, dict]:
        if route == "generate":
            return "/v1/generate", {"json": {**self.body, "description": text, "seed": seed}}
        if route == "edit":
            return "/v1/edit", edit_form(self.body, self.clip, self.seconds, text, seed)
        if route == "stream":
            return "/v1/stream", {"json": {"description": text, "duration": self.seconds, "seed": seed,
                                           "decoding_steps": self.body["decoding_steps"]}}
        return "/v1/speech/edit", self.speech(seed=str(seed))

    def speech(self, audio: tp.Optional[bytes] = None, **fields) -> dict:
        data = {"input_text": "hello there world", "output_text": "hello big world", "word_times": json.dumps(WORDS),
                "num_steps": "2", **fields}
        return {"data": data, "files": {"audio": ("in.wav", self.speech_clip if audio is None else audio, "audio/wav")}}

    def edit(self, audio: tp.Optional[bytes] = None, **fields) -> dict:
        form = edit_form(self.body, self.clip, self.seconds, "x", 1)
        form["data"].update(fields)
        if audio is not None:
            form["files"] = {"audio": ("clip.wav", audio, "audio/wav")}
        return form

    def hostile(self, route: str, rng: random.Random) -> tp.Tuple[str, str, dict]:
        raw = lambda body, kind="application/json": {"content": body, "headers": {"content-type": kind}}  # noqa: E731
        cases = {
            "generate": [
                ("deep JSON", lambda: raw(b'{"description": ' + DEEP.encode() + b"}")),
                ("lone surrogate", lambda: raw(b'{"description": "a \\ud800"}')),
                ("seed 2^64", lambda: {"json": {"description": "a", "seed": 2 ** 64}}),
                ("body over the cap", lambda: raw(b'{"description": "' + b"a" * 100_000 + b'"}')),
                ("text/plain", lambda: raw(b'{"description": "a"}', "text/plain")),
            ],
            "edit": [
                ("deep regions", lambda: self.edit(regions=DEEP)),
                ("deep decoding_steps", lambda: self.edit(decoding_steps=DEEP)),
                ("12 h FLAC header", lambda: self.edit(flac_claiming_hours(12, 32000))),
                ("48004 Hz", lambda: self.edit(tone(self.seconds, 48004))),
                ("seed 2^64", lambda: self.edit(seed=str(2 ** 64))),
                ("unknown parts", lambda: {**self.edit(), "files": [("audio", ("c.wav", self.clip, "audio/wav"))] +
                                           [(f"junk{i}", ("j", b"x" * 1000, "x/y")) for i in range(50)]}),
                ("declared length over the cap", lambda: {"raw": (300 << 20, b"")}),
                ("stalled body", lambda: {"raw": (1000, b'--b\r\nContent-Disposition: form-data; name="seed"\r\n\r\n')}),
            ],
            "stream": [
                ("lone surrogate", lambda: raw(b'{"description": "a \\ud800", "duration": 1}')),
                ("deep JSON", lambda: raw(b'{"duration": 1, "decoding_steps": ' + DEEP.encode() + b"}")),
                ("body over the cap", lambda: raw(b'{"duration": 1, "description": "' + b"a" * 100_000 + b'"}')),
                ("duration over the limit", lambda: {"json": {"duration": 1e6}}),
            ],
            "speech": [
                ("one sample", lambda: self.speech(tone(1 / 16000, 16000))),
                ("seed 2^64", lambda: self.speech(seed=str(2 ** 64))),
                ("16001 Hz", lambda: self.speech(tone(1.0, 16001))),
                ("191999 Hz", lambda: self.speech(tone(1.0, 191999))),
                ("deep word_times", lambda: self.speech(word_times=DEEP)),
                ("12 h FLAC header", lambda: self.speech(flac_claiming_hours(12, 16000))),
                ("declared length over the cap", lambda: {"raw": (300 << 20, b"")}),
                ("stalled body", lambda: {"raw": (1000, b'--b\r\nContent-Disposition: form-data; name="seed"\r\n\r\n')}),
            ],
        }[route]
        name, make = rng.choice(cases)
        path = {"generate": "/v1/generate", "edit": "/v1/edit", "stream": "/v1/stream",
                "speech": "/v1/speech/edit"}[route]
        return name, path, make()


async def raw_status(host: str, port: int, path: str, length: int, sent: bytes) -> int:
    """The status answered to a multipart request that declares `length` body bytes and sends
    only `sent` of them: the head alone with "Expect: 100-continue" (as curl sends a large
    upload: the body only once asked), or a body that stalls after its first bytes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        expect = "" if sent else "Expect: 100-continue\r\n"
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     f"Content-Length: {length}\r\n{expect}\r\n".encode() + sent)
        await writer.drain()
        return int((await reader.readline()).split()[1])
    finally:
        writer.close()


async def stream_outcome(client: httpx.AsyncClient, run: dict) -> tp.Tuple[str, bool]:
    """A streamed run's end event and whether every chunk it announced is a valid WAV."""
    valid, end = True, "none"
    async with client.stream("GET", run["events"]) as events:
        kind = None
        async for line in events.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind is not None:
                data = json.loads(line[6:])
                if kind == "chunk":
                    chunk = await client.get(data["url"])
                    valid = valid and chunk.status_code == 200 and wav_samples(chunk.content) > 0
                elif kind in ("done", "error"):
                    end = kind
                    break
    return end, valid and end == "done"


async def hostile_client_loop(client: httpx.AsyncClient, requests: Requests, stop_at: float, rng: random.Random,
                              records: list, fraction: float, hang_s: float):
    while time.monotonic() < stop_at:
        route = rng.choice(ROUTES)
        hostile = rng.random() < fraction
        if hostile:
            case, path, kwargs = requests.hostile(route, rng)
        else:
            case = "valid"
            path, kwargs = requests.valid(route, rng.choice(PROMPTS), rng.randrange(2 ** 31))
        t0 = time.monotonic()
        record = {"kind": route, "case": case, "hostile": hostile}
        try:
            if "raw" in kwargs:
                status = await asyncio.wait_for(raw_status(client.base_url.host, client.base_url.port, path,
                                                           *kwargs["raw"]), hang_s)
                record.update(status=status, answered=True, hung=False)
            else:
                r = await asyncio.wait_for(client.post(path, **kwargs), hang_s)
                record.update(status=r.status_code, answered=True, hung=False)
                if r.status_code == 200:
                    record["valid_wav"] = wav_samples(r.content) > 0
                elif r.status_code == 202 and route == "stream":
                    end, valid = await asyncio.wait_for(stream_outcome(client, r.json()), hang_s)
                    record.update(stream_end=end, valid_wav=valid)
        except asyncio.TimeoutError:
            record.update(status="hung", answered=False, hung=True)
        except (httpx.HTTPError, OSError) as exc:    # no HTTP answer at all: lost
            record.update(status=type(exc).__name__, answered=False, hung=False)
        record["latency_s"] = time.monotonic() - t0
        records.append(record)


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run_hostile(args, clients: int) -> dict:
    server, url = start_server(args, args.max_batch)
    try:
        async def drive_hostile():
            body = {"duration": args.duration, "decoding_steps": args.decoding_steps}
            async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.hang_s + 5),
                                         limits=httpx.Limits(max_connections=clients + 4)) as client:
                warm = await client.post("/v1/generate", json={**body, "description": PROMPTS[0], "seed": 0})
                warm.raise_for_status()
                requests = Requests(body, warm.content, args.duration)
                for route in ROUTES:   # every route once, so that the "before" RSS has each path's lazy state
                    path, kwargs = requests.valid(route, PROMPTS[1], 0)
                    answer = await client.post(path, **kwargs)
                    assert answer.status_code in (200, 202), (route, answer.status_code, answer.text[:300])
                    if answer.status_code == 202:
                        await stream_outcome(client, answer.json())
                usage["before"] = process_usage(server.pid)
                records: list = []
                start = time.monotonic()
                await asyncio.gather(*(hostile_client_loop(client, requests, start + args.seconds, random.Random(i),
                                                           records, args.malformed_fraction, args.hang_s)
                                       for i in range(clients)))
                return records, time.monotonic() - start

        usage: dict = {}
        records, wall_s = asyncio.run(drive_hostile())
        usage["after"] = process_usage(server.pid)
        time.sleep(args.settle_s)
        usage["after_settle"] = process_usage(server.pid)
        alive = httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    finally:
        stop_server(server)
    by_route: dict = {}
    for r in records:
        cell = by_route.setdefault(r["kind"], {}).setdefault("hostile" if r["hostile"] else "valid", {})
        cell[str(r["status"])] = cell.get(str(r["status"]), 0) + 1
    by_case: dict = {}
    for r in records:
        if r["hostile"]:
            cell = by_case.setdefault(f"{r['kind']}: {r['case']}", {})
            cell[str(r["status"])] = cell.get(str(r["status"]), 0) + 1
    status = [r["status"] for r in records]
    ok = [r for r in records if r["status"] in (200, 202)]
    valid_refused = [r for r in records if not r["hostile"] and r["status"] not in (200, 202)]
    lost = [r for r in records if not r["answered"] and not r["hung"]]
    before, after = usage["before"]["rss_mib"], usage["after_settle"]["rss_mib"]
    return {
        "clients": clients, "sent": len(records), "wall_s": round(wall_s, 2),
        "status_counts": {k: [str(s) for s in status].count(k) for k in sorted(set(map(str, status)))},
        "by_route": by_route, "hostile_by_case": dict(sorted(by_case.items())),
        "status_5xx": sum(1 for s in status if isinstance(s, int) and s >= 500),
        "hung": sum(r["hung"] for r in records),
        "lost": len(lost), "lost_cases": sorted({f"{r['kind']}: {r['case']}" for r in lost}),
        "answered_ok": len(ok), "valid_wav": sum(bool(r.get("valid_wav")) for r in ok),
        "valid_refused": len(valid_refused),
        "server_alive_after": alive,
        "server_process": {**usage, "rss_after_settle_over_before": round(after / before, 3)},
    }


def main_hostile(args) -> int:
    import torch

    report = {
        "benchmark": "load_test --malformed-fraction",
        "model": args.model or "embedded demo 'tiny' (random weights); speech: PlayDiffusion 'random' (tiny)",
        "engine": args.engine, "device": "cpu",
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "loadavg_1m_before": round(os.getloadavg()[0], 2)},
        "config": {"clients": args.clients, "seconds": args.seconds, "duration_s": args.duration,
                   "decoding_steps": args.decoding_steps, "malformed_fraction": args.malformed_fraction,
                   "hang_s": args.hang_s, "settle_s": args.settle_s, "routes": list(ROUTES)},
        "runs": [run_hostile(args, clients) for clients in args.clients],
    }
    report["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(args.output, report)
    print(json.dumps(report, indent=2))
    bad = any(r["status_5xx"] or r["hung"] or r["lost"] or r["valid_wav"] != r["answered_ok"] or r["valid_refused"]
              or not r["server_alive_after"] for r in report["runs"])
    return 1 if bad else 0


# ------------------------------------------------------------------------------ --ray
RAY_RESULTS = Path(__file__).resolve().parent / "results" / "load_test_ray_cpu.json"


def start_ray_server(args, replicas: int, cpus_per_replica: float) -> tuple[subprocess.Popen, str]:
    """`magnet-engine serve --ray` on a local Ray instance; returns once every replica is running."""
    port = free_port()
    cmd = [sys.executable, "-m", "magnet_engine", "serve", "--ray", "--host", "127.0.0.1", "--port", str(port),
           "--engine", args.engine, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--queue-size", str(args.queue_size), "--replicas", str(replicas),
           "--cpus-per-replica", str(cpus_per_replica), "--gpus-per-replica", "0"]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in server.stdout:   # serve.run has returned, every replica running, when the CLI prints this
        if "replica(s)," in line:
            threading.Thread(target=server.stdout.read, daemon=True).start()   # keep the pipe drained
            return server, f"http://127.0.0.1:{port}"
    raise RuntimeError(f"magnet-engine serve --ray exited with {server.wait()} before it was ready")


def run_ray(args, replicas: int, cpus_per_replica: float, clients: int) -> dict:
    server, url = start_ray_server(args, replicas, cpus_per_replica)
    try:
        records, wall_s = asyncio.run(drive(url, args, clients))
        # the replicas are processes of their own: the CLI's usage would say nothing about them
        summary = summarise(records, wall_s, args, args.max_batch, clients, server_batch_histogram(url), {})
        return {"replicas": replicas, "cpus_per_replica": cpus_per_replica, **summary}
    finally:
        server.send_signal(signal.SIGINT)   # the CLI deletes its application; its local Ray goes with it
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def main_ray(args) -> int:
    """1 vs 2 Ray Serve replicas under the same load on the same cores (1 x all vs 2 x half), and
    the single-process server beside them, for each --clients; JSON to
    benchmarks/results/load_test_ray_cpu.json."""
    import torch

    cores = os.cpu_count() or 2
    report = {
        "benchmark": "load_test --ray",
        "model": args.model or "embedded demo 'tiny' (random weights)",
        "engine": args.engine,
        "device": "cpu",
        "machine": {"cpu_count": cores, "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_1m_before": round(os.getloadavg()[0], 2)},
        "config": {"clients": args.clients, "seconds": args.seconds, "duration_s": args.duration,
                   "decoding_steps": args.decoding_steps, "max_batch": args.max_batch,
                   "max_wait_ms": args.max_wait_ms, "queue_size": args.queue_size, "prompts": len(PROMPTS)},
        "runs": [],
    }
    for clients in args.clients:
        one, two = run_ray(args, 1, float(cores), clients), run_ray(args, 2, cores / 2, clients)
        report["runs"].append({"clients": clients, "single_process": run(args, args.max_batch, clients),
                               "ray_1_replica": one, "ray_2_replicas": two,
                               "throughput_2_over_1_replica": round(two["throughput_rps"] / one["throughput_rps"], 3)
                               if one["throughput_rps"] else None})
    report["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(args.output, report)
    print(json.dumps(report, indent=2))
    runs = [run[kind] for run in report["runs"] for kind in ("single_process", "ray_1_replica", "ray_2_replicas")]
    return 1 if any(r["errors"] or r["lost"] or r["valid_wav"] != r["sent"] for r in runs) else 0


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    served = Settings()   # the service's own defaults, so that a run measures what `serve` runs
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="K concurrent clients (one run each)")
    p.add_argument("--seconds", type=float, default=120, help="M: how long clients keep sending")
    p.add_argument("--model", default=None, help="model directory (default: the embedded tiny demo model)")
    p.add_argument("--engine", choices=ENGINES, default="fast")
    p.add_argument("--duration", type=float, default=1.0, help="seconds of audio per request")
    p.add_argument("--decoding-steps", type=int, nargs="+", default=list(DecodingParams().decoding_steps))
    p.add_argument("--max-batch", type=int, default=served.max_batch)
    p.add_argument("--max-wait-ms", type=float, default=served.max_wait_ms)
    p.add_argument("--queue-size", type=int, default=served.queue_size)
    p.add_argument("--baseline", action="store_true", help="also run with --max-batch 1 for comparison")
    p.add_argument("--edit-fraction", type=float, default=0.0,
                   help="share of requests that are POST /v1/edit of a clip instead of generate (0 to 1)")
    p.add_argument("--malformed-fraction", type=float, default=0.0,
                   help="hostile mix across generate/edit/stream/speech: this share of requests is malformed")
    p.add_argument("--hang-s", type=float, default=120.0, help="--malformed-fraction: no answer by then is a hang")
    p.add_argument("--settle-s", type=float, default=5.0,
                   help="--malformed-fraction: idle seconds before the last RSS reading")
    p.add_argument("--output", type=Path, default=None,
                   help="default: results/load_test_cpu.json (load_test_edit_mix_cpu.json with --edit-fraction, "
                        "load_test_hostile_cpu.json with --malformed-fraction)")
    p.add_argument("--ray", action="store_true",
                   help="1 vs 2 Ray Serve replicas and the single-process server under the same load (main_ray)")
    args = p.parse_args(argv)
    if not 0 <= args.edit_fraction <= 1:
        p.error("--edit-fraction must be in [0, 1]")
    if not 0 <= args.malformed_fraction <= 1:
        p.error("--malformed-fraction must be in [0, 1]")
    if args.malformed_fraction:
        if args.ray or args.edit_fraction:
            p.error("--malformed-fraction mixes every route itself: not with --ray or --edit-fraction")
        args.output = args.output or HOSTILE_RESULTS
        return main_hostile(args)
    if args.ray:
        if args.edit_fraction:
            p.error("--edit-fraction: the Ray deployment serves /v1/generate only")
        args.output = args.output or RAY_RESULTS
        return main_ray(args)
    args.output = args.output or (EDIT_MIX_RESULTS if args.edit_fraction else RESULTS)

    import torch

    report = {
        "benchmark": "load_test",
        "model": args.model or "embedded demo 'tiny' (random weights)",
        "engine": args.engine,
        "device": "cpu",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_1m_before": round(os.getloadavg()[0], 2)},  # other work on the box skews numbers
        "config": {"clients": args.clients, "seconds": args.seconds, "duration_s": args.duration,
                   "decoding_steps": args.decoding_steps, "max_wait_ms": args.max_wait_ms,
                   "queue_size": args.queue_size, "prompts": len(PROMPTS), "edit_fraction": args.edit_fraction},
        "runs": [],
    }
    for clients in args.clients:
        report["runs"].append(run(args, args.max_batch, clients))
        if args.baseline:
            report["runs"].append(run(args, 1, clients))
    report["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(args.output, report)
    print(json.dumps(report, indent=2))
    return 1 if any(r["errors"] or r["lost"] or r["valid_wav"] != r["sent"] for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
