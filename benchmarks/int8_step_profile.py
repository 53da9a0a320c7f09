"""Where an int8 (or fp32) step's time goes: torch.profiler over one generation of the small
architecture at 1 thread, each op's share of the profiled run's wall time, the C++ passes
(kernels/int8.py, the banded attention) labelled, since the profiler does not see pybind calls.

    OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/int8_step_profile.py --precision int8

The shares are of wall time (the profiler's clock): on a shared machine they are inflated
alike, so read them as proportions, and the process CPU time beside them as the run's cost.
JSON to benchmarks/results/int8_step_profile_cpu.json (--out).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from magnet_engine.bench_common import DEFAULT_OUT, git_commit, machine_info, write_report
from magnet_engine.bench_precision import _load
from magnet_engine.demo import cached_demo_model
from magnet_engine.kernels import attention, int8


def _label(table, name: str, label: str) -> None:
    """Wrap table[name] (a module's function or a dict entry) in a profiler range."""
    get, put = ((table.__getitem__, table.__setitem__) if isinstance(table, dict)
                else (functools.partial(getattr, table), functools.partial(setattr, table)))
    fn = get(name)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    put(name, wrapped)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--arch", default="small")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--decoding-steps", type=int, nargs=4, default=[2, 1, 1, 1])
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/magnet_engine"))
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT / "int8_step_profile_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in ("_quantize_rows_cpp", "_rescale_cpp"):
        _label(int8, name, f"cpp::int8{name[:-4]}")
    for impl in list(attention._HOST_IMPLS):
        _label(attention._HOST_IMPLS, impl, f"{impl}::banded_attention")

    model = _load(str(cached_demo_model(args.cache_dir, args.arch)), args.precision, None)
    model.set_generation_params(duration=args.duration, decoding_steps=args.decoding_steps)
    texts = ["benchmark description number 0 with synths and drums"]
    model.generate_tokens(texts, seed=0)             # warm-up: allocations, oneDNN primitives
    cpu, wall = time.process_time(), time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate_tokens(texts, seed=0)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_us = wall * 1e6
    ops = {e.key: {"self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total_us,
                   "calls": e.count} for e in events[:args.top]}
    outside = 1 - sum(e.self_cpu_time_total for e in events) / total_us
    print(f"{args.precision} ({model.precision}): profiled run {cpu:.2f} s CPU, {wall:.2f} s wall, "
          f"profiler overhead included")
    print(f"{'op':44s} {'self ms':>10s} {'share':>7s} {'calls':>6s}")
    for key, op in ops.items():
        print(f"{key[:44]:44s} {op['self_ms']:10.1f} {op['share']:7.1%} {op['calls']:6d}")
    print(f"{'(outside every op: Python, dispatch)':44s} {'':10s} {outside:7.1%}")
    report = {"benchmark": "int8_step_profile", "commit": git_commit(), "machine": machine_info(torch.device("cpu")),
              "precision": model.precision, "arch": args.arch, "duration": args.duration,
              "decoding_steps": args.decoding_steps, "cpu_s": cpu, "wall_s": wall, "ops": ops,
              "outside_ops_share": outside}
    print(f"saved {write_report(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
