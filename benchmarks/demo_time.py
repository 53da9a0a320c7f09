"""How long `magnet-engine demo` takes on this machine: the whole first run (random model built
into an empty cache, loaded, decoded, written) and a second run from the cache, each in a fresh
process, as a user runs it. The decode time is the demo's own "generated ... in X s" line.

    python benchmarks/demo_time.py            # JSON: benchmarks/results/demo_time_cpu.json

Targets on 2 CPU cores: the whole first run < 60 s; decode < 25 s on a CPU with native bf16
(issue 13), <= 40 s on an AVX2-only CPU (issue 20; the demo's precision is 'auto'). Run it under
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` to approximate an
AVX2-only CPU on a bigger one; the JSON records the caps and the precision the demo chose.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from magnet_engine.bench_common import DEFAULT_OUT, git_commit, machine_info, write_report
from magnet_engine.engine.precision import cpu_info


def run_demo(cache: Path, extra) -> dict:
    out = Path(cache) / "demo.wav"
    cmd = [sys.executable, "-m", "magnet_engine", "demo", "--cache-dir", str(cache), "-q", "-o", str(out), *extra]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"demo failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    decode = float(re.search(r"generated [\d.]+ s of audio in ([\d.]+) s", proc.stdout).group(1))
    build, load_s = map(float, re.search(r"build/cache ([\d.]+) s, load ([\d.]+) s", proc.stdout).groups())
    chosen = re.search(r"^precision: (.*)$", proc.stdout, re.M)
    return {"wall_s": wall, "decode_s": decode, "precision": chosen.group(1) if chosen else None, "build_or_cache_s": build, "load_s": load_s,
            "load_avg_before": load, "stdout": proc.stdout.strip().splitlines()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT / "demo_time_cpu.json")
    ap.add_argument("demo_args", nargs="*", help="extra arguments for `magnet-engine demo` (after --)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        first = run_demo(Path(cache), args.demo_args)
        second = run_demo(Path(cache), args.demo_args)
    report = {"benchmark": "demo_time", "commit": git_commit(), "machine": machine_info(torch.device("cpu")),
              "cpus": os.cpu_count(), "demo_args": args.demo_args, "first_run": first, "cached_run": second,
              "targets": {"decode_s": 25 if cpu_info().native_bf16 else 40, "first_run_wall_s": 60}}
    for name, r in (("first run", first), ("cached run", second)):
        print(f"{name}: wall {r['wall_s']:.1f} s (build/cache {r['build_or_cache_s']:.1f} s, load {r['load_s']:.1f} s, "
              f"decode {r['decode_s']:.1f} s), load average before {r['load_avg_before']:.1f}")
    print(f"saved {write_report(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
