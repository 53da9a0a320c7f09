"""Load test of `magnet-engine serve`: K concurrent clients for M seconds against a loopback server.

    python benchmarks/load_test.py --clients 8 --seconds 30            # tiny demo model
    python benchmarks/load_test.py --model DIR --duration 5 --baseline  # also a max-batch 1 run
    python benchmarks/load_test.py --ray --seconds 30                  # 1 vs 2 Ray Serve replicas

Starts the server in a subprocess (the embedded random-weight 'tiny' demo model unless
--model), warms it up, then each client posts requests back to back until M seconds have
passed and waits for its last answer. Prompts are drawn from a fixed list, so requests
differ in text length as real traffic does (only equal lengths share a batch). Reports
throughput, latency p50/p95/p99, the per-request split (queue, tokens, codec), errors and
the batch-size histogram; prints the JSON and writes it to
benchmarks/results/load_test_cpu.json (atomically). Exits 1 if any request failed.
"""
from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path

import httpx

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


async def client_loop(client: httpx.AsyncClient, body: dict, stop_at: float, rng: random.Random, records: list):
    while time.monotonic() < stop_at:
        request = {**body, "description": rng.choice(PROMPTS), "seed": rng.randrange(2 ** 31)}
        t0 = time.monotonic()
        try:
            r = await client.post("/v1/generate", json=request)
            status, headers = r.status_code, r.headers
        except httpx.HTTPError as exc:
            status, headers = type(exc).__name__, {}
        record = {"status": status, "latency_s": time.monotonic() - t0}
        if status == 200:
            record.update(queue_ms=float(headers["x-queue-wait-ms"]), tokens_ms=float(headers["x-tokens-ms"]),
                          codec_ms=float(headers["x-codec-ms"]), batch_size=int(headers["x-batch-size"]))
        records.append(record)


async def drive(url: str, args) -> tuple[list, float]:
    body = {"duration": args.duration, "decoding_steps": args.decoding_steps}
    timeout = httpx.Timeout(args.seconds + 600)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        warm = await client.post("/v1/generate", json={**body, "description": PROMPTS[0], "seed": 0})
        warm.raise_for_status()
        records: list = []
        start = time.monotonic()
        await asyncio.gather(*(client_loop(client, body, start + args.seconds, random.Random(i), records)
                               for i in range(args.clients)))
        return records, time.monotonic() - start


def server_batch_histogram(url: str) -> dict:
    """Rows-per-batch counts from the server's /metrics (cumulative buckets -> per bucket)."""
    buckets, previous = {}, 0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("magnet_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            count = int(float(line.split(" ")[1]))
            if count > previous:
                buckets[f"<={le}"] = count - previous
            previous = count
    return buckets


def summarise(records: list, wall_s: float, args, max_batch: int, server_hist: dict) -> dict:
    ok = [r for r in records if r["status"] == 200]
    errors: dict = {}
    for r in records:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    latency = [r["latency_s"] * 1000 for r in ok]
    batch_hist: dict = {}
    for r in ok:
        batch_hist[str(r["batch_size"])] = batch_hist.get(str(r["batch_size"]), 0) + 1
    audio_s = len(ok) * int(args.duration * 50) / 50  # frames at 50 Hz, as the model counts them

    def med(key):
        return round(statistics.median(r[key] for r in ok), 1) if ok else None

    return {
        "max_batch": max_batch,
        "requests": len(records),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "wall_s": round(wall_s, 2),
        "throughput_rps": round(len(ok) / wall_s, 3),
        "audio_seconds_per_second": round(audio_s / wall_s, 3),
        "latency_ms": {"p50": round(percentile(latency, 50), 1), "p95": round(percentile(latency, 95), 1),
                       "p99": round(percentile(latency, 99), 1), "mean": round(statistics.mean(latency), 1),
                       "max": round(max(latency), 1)} if ok else None,
        "median_split_ms": {"queue": med("queue_ms"), "tokens": med("tokens_ms"), "codec": med("codec_ms")},
        "requests_by_batch_size": dict(sorted(batch_hist.items(), key=lambda kv: int(kv[0]))),
        "server_batches_by_size": server_hist,
    }


def run(args, max_batch: int) -> dict:
    server, url = start_server(args, max_batch)
    try:
        records, wall_s = asyncio.run(drive(url, args))
        return summarise(records, wall_s, args, max_batch, server_batch_histogram(url))
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


def run_ray(args, replicas: int, cpus_per_replica: float) -> dict:
    server, url = start_ray_server(args, replicas, cpus_per_replica)
    try:
        records, wall_s = asyncio.run(drive(url, args))
        summary = summarise(records, wall_s, args, args.max_batch, server_batch_histogram(url))
        return {"replicas": replicas, "cpus_per_replica": cpus_per_replica, **summary}
    finally:
        server.send_signal(signal.SIGINT)   # the CLI deletes its application; its local Ray goes with it
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def main_ray(args) -> int:
    """1 vs 2 Ray Serve replicas under the same load on the same cores (1 x all vs 2 x half), and
    the single-process server beside them; JSON to benchmarks/results/load_test_ray_cpu.json."""
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
        "single_process": run(args, args.max_batch),
        "ray_1_replica": run_ray(args, 1, float(cores)),
        "ray_2_replicas": run_ray(args, 2, cores / 2),
    }
    one, two = report["ray_1_replica"]["throughput_rps"], report["ray_2_replicas"]["throughput_rps"]
    report["throughput_2_over_1_replica"] = round(two / one, 3) if one else None
    report["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(RAY_RESULTS if args.output == RESULTS else args.output, report)
    print(json.dumps(report, indent=2))
    runs = ("single_process", "ray_1_replica", "ray_2_replicas")
    return 1 if any(report[run]["errors"] for run in runs) else 0


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
    p.add_argument("--clients", type=int, default=8, help="K concurrent clients")
    p.add_argument("--seconds", type=float, default=30, help="M: how long clients keep sending")
    p.add_argument("--model", default=None, help="model directory (default: the embedded tiny demo model)")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast")
    p.add_argument("--duration", type=float, default=1.0, help="seconds of audio per request")
    p.add_argument("--decoding-steps", type=int, nargs="+", default=[20, 10, 10, 10])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--baseline", action="store_true", help="also run with --max-batch 1 for comparison")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--ray", action="store_true",
                   help="1 vs 2 Ray Serve replicas and the single-process server under the same load (main_ray)")
    args = p.parse_args(argv)
    if args.ray:
        return main_ray(args)

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
                   "queue_size": args.queue_size, "prompts": len(PROMPTS)},
        "batched": run(args, args.max_batch),
    }
    if args.baseline:
        report["baseline_max_batch_1"] = run(args, 1)
    report["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(args.output, report)
    print(json.dumps(report, indent=2))
    failed = report["batched"]["errors"] + report.get("baseline_max_batch_1", {}).get("errors", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
