"""Open-loop load: seeded Poisson arrivals of mixed requests against `magnet-engine serve`
configurations, side by side on the same arrivals (issue 21's serving benchmark).

    python benchmarks/arrivals.py                                   # grouped vs continuous, tiny model
    python benchmarks/arrivals.py --arch small --durations 0.5 1 --requests 40
    python benchmarks/arrivals.py --server grouped="--batching grouped" --server ray="--ray --replicas 2"

Each request draws its duration, temperature, top-k / top-p, CFG coefficients and decoding
steps from a fixed mix (MIX), so few requests share every option: what a batcher that only
groups identical options cannot batch. First the capacity: the first server configuration
(today's batcher) is driven closed-loop by --clients clients for --capacity-s seconds, and its
completed requests per second is the capacity. Then, for each load in --loads (fractions of that
capacity), the same seeded arrival schedule (exponential gaps at that rate, --requests long) is
replayed against each configuration in turn, each a fresh server process: every request opens its
progress stream (GET /v1/progress/{id}, server-sent events) before it is posted, so the time to
its first `step` event is measured from its arrival.

Reports per configuration and load: sent, answered, lost (no HTTP answer), 200s, valid WAVs of
the requested length, latency p50/p95/p99, time to first progress p50/p95, throughput, and one
step's time (a solo request's tokens time / its steps, measured after warm-up) to read the time
to first progress against. JSON (with the CPU) to benchmarks/results/arrivals_cpu_<arch>.json.
Exits 1 if any request was lost, failed or answered an invalid WAV.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import subprocess
import sys
import time
import typing as tp
import uuid
from pathlib import Path

import httpx

from load_test import PROMPTS, free_port, percentile, process_usage, stop_server, wait_healthy, wav_samples, write_json

RESULTS = Path(__file__).resolve().parent / "results"

# (weight, options): each request takes one duration and one of these option sets.
MIX: tp.List[tp.Tuple[float, dict]] = [
    (0.35, {}),                                                                   # the defaults
    (0.15, {"temperature": 2.0}),
    (0.15, {"top_k": 250, "top_p": 0.0}),
    (0.10, {"max_cfg_coef": 5.0, "min_cfg_coef": 1.0}),
    (0.15, {"decoding_steps": [10, 5, 5, 5]}),
    (0.10, {"use_sampling": False}),
]


def request_mix(n: int, rate: float, durations: tp.Sequence[float], seed: int) -> tp.List[dict]:
    """n requests with Poisson arrivals at `rate` per second: arrival offset, body (seeded)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    weights = [w for w, _ in MIX]
    for i in range(n):
        t += rng.expovariate(rate)
        options = rng.choices([o for _, o in MIX], weights)[0]
        out.append({"at": t, "body": {"description": rng.choice(PROMPTS), "seed": rng.randrange(2 ** 31),
                                      "duration": rng.choice(list(durations)), **options}})
    return out


def start(cmd_args: tp.List[str], model: tp.Optional[str], arch: str) -> tp.Tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "magnet_engine", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if model is None and arch != "tiny":     # the server's own default is the tiny demo model
        from magnet_engine.demo import DEFAULT_CACHE, cached_demo_model
        model = str(cached_demo_model(DEFAULT_CACHE, arch))
    cmd += ["--model", model] if model else []
    server = subprocess.Popen(cmd + cmd_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return server, wait_healthy(server, f"http://127.0.0.1:{port}", 600)


async def first_step(client: httpx.AsyncClient, request_id: str, opened: asyncio.Event) -> tp.Optional[float]:
    """The monotonic time of the request's first `step` event (None if it ends without one)."""
    try:
        async with client.stream("GET", f"/v1/progress/{request_id}") as response:
            opened.set()
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                    if event == "step":
                        return time.monotonic()
                    if event in ("done", "error"):
                        return None
    except httpx.HTTPError:
        return None
    finally:
        opened.set()
    return None


async def one(client: httpx.AsyncClient, body: dict, samples_per_s: int) -> dict:
    request_id = uuid.uuid4().hex
    opened = asyncio.Event()
    watcher = asyncio.create_task(first_step(client, request_id, opened))
    await opened.wait()                # subscribed before the request exists: no event is missed
    t0 = time.monotonic()
    try:
        r = await client.post("/v1/generate", json={**body, "request_id": request_id})
        status, answered = r.status_code, True
    except httpx.HTTPError as exc:
        r, status, answered = None, type(exc).__name__, False
    done = time.monotonic()
    try:
        step_at = await asyncio.wait_for(watcher, 5)
    except asyncio.TimeoutError:
        step_at = None
    # the model keeps whole spans of frames (docs/model.md): up to a few frames short of the duration
    longest, shortest = int(body["duration"] * samples_per_s), int((body["duration"] - 0.1) * samples_per_s)
    return {"status": status, "answered": answered, "latency_s": done - t0, "duration": body["duration"],
            "first_step_s": None if step_at is None else step_at - t0,
            "valid_wav": status == 200 and shortest <= wav_samples(r.content) <= longest}


async def replay(url: str, schedule: tp.List[dict], samples_per_s: int) -> tp.Tuple[tp.List[dict], float]:
    limits = httpx.Limits(max_connections=2 * len(schedule) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800), limits=limits) as client:
        start = time.monotonic()

        async def at(item):
            await asyncio.sleep(max(0.0, start + item["at"] - time.monotonic()))
            return await one(client, item["body"], samples_per_s)

        records = await asyncio.gather(*(at(item) for item in schedule))
        return list(records), time.monotonic() - start


async def closed_loop(url: str, clients: int, seconds: float, durations, seed: int, samples_per_s: int) -> float:
    """Completed requests per second with `clients` clients posting back to back: the capacity."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800)) as client:
        stop_at = time.monotonic() + seconds
        done = [0]

        async def loop(i):
            mix = request_mix(10 ** 4, 1.0, durations, seed + 1000 + i)
            for item in mix:
                if time.monotonic() >= stop_at:
                    return
                r = await one(client, item["body"], samples_per_s)
                done[0] += r["status"] == 200

        start = time.monotonic()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        return done[0] / (time.monotonic() - start)


async def step_seconds(url: str) -> float:
    """One decoding step's time for a solo default request (tokens time / steps), warm."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600)) as client:
        model = (await client.get("/v1/model")).json()
        steps = sum(model.get("defaults", {}).get("decoding_steps", [20, 10, 10, 10]))
        best = None
        for seed in range(3):
            r = await client.post("/v1/generate", json={"description": PROMPTS[0], "seed": seed, "duration": 1.0})
            r.raise_for_status()
            t = float(r.headers["x-tokens-ms"]) / 1000 / steps
            best = t if best is None else min(best, t)
        return best


def summary(records: tp.List[dict], wall_s: float) -> dict:
    ok = [r for r in records if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    first = [r["first_step_s"] for r in ok if r["first_step_s"] is not None]
    pct = lambda xs, q: round(percentile(xs, q), 3) if xs else None   # noqa: E731
    return {"sent": len(records), "answered": sum(r["answered"] for r in records),
            "lost": sum(not r["answered"] for r in records), "status_200": len(ok),
            "valid_wav": sum(r["valid_wav"] for r in ok),
            "errors_by_status": {str(s): sum(r["status"] == s for r in records)
                                 for s in {r["status"] for r in records} if s != 200},
            "latency_s": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99)},
            "first_step_s": {"p50": pct(first, 50), "p95": pct(first, 95), "seen": len(first)},
            "throughput_rps": round(len(ok) / wall_s, 3), "wall_s": round(wall_s, 2)}


def parse_servers(items: tp.Sequence[str]) -> tp.List[tp.Tuple[str, tp.List[str]]]:
    out = []
    for item in items:
        name, _, args = item.partition("=")
        out.append((name, shlex.split(args)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", action="append", default=None,
                   help="NAME=SERVE_ARGS, repeatable; the first is the baseline whose capacity sets the rates "
                        "(default: grouped='--batching grouped' continuous='--batching continuous')")
    p.add_argument("--arch", default="tiny", help="demo architecture when no --model (tiny, small)")
    p.add_argument("--model", default=None)
    p.add_argument("--durations", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--requests", type=int, default=60, help="arrivals per configuration and load")
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8], help="fractions of the measured capacity")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients for the capacity run")
    p.add_argument("--capacity-s", type=float, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    servers = parse_servers(args.server or ["grouped=--batching grouped", "continuous=--batching continuous"])

    import torch

    from magnet_engine.bench_common import git_commit, machine_info
    report = {"benchmark": "arrivals", "commit": git_commit(), "machine": machine_info(torch.device("cpu")),
              "server_threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
              "model": args.model or f"demo '{args.arch}' (random weights)", "mix": MIX,
              "durations": args.durations, "requests": args.requests, "seed": args.seed,
              "servers": {name: cmd for name, cmd in servers}, "runs": []}
    base_name, base_cmd = servers[0]
    server, url = start(base_cmd, args.model, args.arch)
    try:
        samples_per_s = int((httpx.get(f"{url}/v1/model").json()).get("sample_rate", 32000))
        report["step_s"] = asyncio.run(step_seconds(url))
        capacity = asyncio.run(closed_loop(url, args.clients, args.capacity_s, args.durations, args.seed,
                                           samples_per_s))
    finally:
        stop_server(server)
    report["capacity_rps"] = round(capacity, 3)
    print(f"{base_name}: capacity {capacity:.3f} requests/s with {args.clients} clients; one step {report['step_s'] * 1000:.1f} ms")
    for load in args.loads:
        schedule = request_mix(args.requests, load * capacity, args.durations, args.seed + int(load * 100))
        for name, cmd in servers:
            server, url = start(cmd, args.model, args.arch)
            try:
                asyncio.run(step_seconds(url))          # warm: the first requests compile and allocate
                load_before = os.getloadavg()[0]
                records, wall = asyncio.run(replay(url, schedule, samples_per_s))
                usage = process_usage(server.pid)
            finally:
                stop_server(server)
            run = {"server": name, "load": load, "rate_rps": round(load * capacity, 3), **summary(records, wall),
                   "server_process": usage, "load_avg_before": round(load_before, 2),
                   "load_avg_after": round(os.getloadavg()[0], 2)}
            report["runs"].append(run)
            print(f"load {load:.0%} {name}: p50 {run['latency_s']['p50']} s, p95 {run['latency_s']['p95']} s, "
                  f"first step p95 {run['first_step_s']['p95']} s, {run['throughput_rps']} req/s, "
                  f"lost {run['lost']}, valid {run['valid_wav']}/{run['sent']}")
    out = args.out or RESULTS / f"arrivals_cpu_{args.arch if not args.model else 'model'}.json"
    write_json(out, report)
    print(f"saved {out}")
    bad = any(r["lost"] or r["valid_wav"] != r["sent"] for r in report["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
