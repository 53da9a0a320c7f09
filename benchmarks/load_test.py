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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q: float) -> float:
    """Nearest-rank percentile; q in [0, 100]."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "magnet_engine.server", "--host", "127.0.0.1", "--port", str(port),
           "--engine", args.engine, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--queue-size", str(args.queue_size)]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # the first run builds the demo model
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.stdout.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not become healthy in 300 s")


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
    audio_s = len(ok) * int(args.duration * 50) / 50  # frames at 50 Hz, as the model counts them

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
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


# ------------------------------------------------------------------------------ --ray
RAY_RESULTS = Path(__file__).resolve().parent / "results" / "load_test_ray_cpu.json"


def start_ray_server(args, replicas: int, cpus_per_replica: float) -> tuple[subprocess.Popen, str]:
    """`magnet-engine serve --ray` on a local Ray instance; returns once every replica is running."""
    port = free_port()
    cmd = [sys.executable, "-m", "magnet_engine.server", "--ray", "--host", "127.0.0.1", "--port", str(port),
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
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="K concurrent clients (one run each)")
    p.add_argument("--seconds", type=float, default=120, help="M: how long clients keep sending")
    p.add_argument("--model", default=None, help="model directory (default: the embedded tiny demo model)")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast")
    p.add_argument("--duration", type=float, default=1.0, help="seconds of audio per request")
    p.add_argument("--decoding-steps", type=int, nargs="+", default=[20, 10, 10, 10])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--baseline", action="store_true", help="also run with --max-batch 1 for comparison")
    p.add_argument("--edit-fraction", type=float, default=0.0,
                   help="share of requests that are POST /v1/edit of a clip instead of generate (0 to 1)")
    p.add_argument("--output", type=Path, default=None,
                   help="default: results/load_test_cpu.json (load_test_edit_mix_cpu.json with --edit-fraction)")
    p.add_argument("--ray", action="store_true",
                   help="1 vs 2 Ray Serve replicas and the single-process server under the same load (main_ray)")
    args = p.parse_args(argv)
    if not 0 <= args.edit_fraction <= 1:
        p.error("--edit-fraction must be in [0, 1]")
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
