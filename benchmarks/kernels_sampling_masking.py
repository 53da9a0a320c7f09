"""Timings of kernels/sampling.py `sample_tokens` and kernels/masking.py `remask` per
implementation at the published shapes: B in {1, 4}, T in {500, 1500} frames (10 s / 30 s
at 50 Hz), card 2048, so N = B * T rows to sample (every row, as at a stage's first step).

    python benchmarks/kernels_sampling_masking.py [--repeats 5] [--out PATH]

Prints a table and writes JSON (machine, versions, per implementation the median and the
minimum milliseconds over the repeats, speed-up over the torch reference computed from the
minima, which other load on a shared machine can only inflate). Triton timings run only
when CUDA is present.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from magnet_engine.bench_common import sync, write_report
from magnet_engine.kernels import backend, masking, sampling

CARD = 2048
SHAPES = [(1, 500), (4, 500), (1, 1500), (4, 1500)]
# (name, use_sampling, top_k, top_p, temperature): the API default (nucleus 0.9) at the
# first step of a 10-step stage (t = 3.0 * 9/10) and at the last (t clamped to 0.01).
SAMPLING_CASES = [
    ("greedy", False, 0, 0.0, 2.7),
    ("top_p=0.9 t=2.7", True, 0, 0.9, 2.7),
    ("top_p=0.9 t=0.01", True, 0, 0.9, 0.01),
    ("top_k=250 t=2.7", True, 250, 0.0, 2.7),
]
MASKING_CASES = [("nonoverlap L=3", 3, "nonoverlap"), ("stride1 L=3", 3, "stride1")]


def timings_ms(fn, device, repeats):
    """(median, min) wall milliseconds of fn() over `repeats` runs after one warm-up."""
    fn()  # warm-up (and Triton compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def impls_for(device):
    if device.type == "cuda":
        return ["triton", "torch"] if backend.triton_available() else ["torch"]
    return ["cpp", "torch"] if backend.cpp_module() is not None else ["torch"]


def bench_sampling(device, repeats):
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch, frames in SHAPES:
        n = batch * frames
        cond = (torch.randn(n, CARD, generator=g) * 3).to(device)
        uncond = (torch.randn(n, CARD, generator=g) * 3).to(device)
        cfg = torch.tensor(10.0, device=device)
        seed = torch.tensor(1234, dtype=torch.int64, device=device)
        offset = torch.tensor(0, dtype=torch.int64, device=device)
        for name, use_sampling, top_k, top_p, temp in SAMPLING_CASES:
            temperature = torch.tensor(temp, device=device)
            row = {"kernel": "sample_tokens", "case": name, "B": batch, "T": frames, "rows": n, "card": CARD}
            for impl in impls_for(device):
                row[f"{impl}_ms"], row[f"{impl}_min_ms"] = timings_ms(
                    lambda: sampling.sample_tokens(cond, uncond, cfg, temperature, use_sampling=use_sampling,
                                                   top_k=top_k, top_p=top_p, seed=seed, offset=offset, impl=impl),
                    device, repeats if impl != "torch" else max(1, repeats // 2))
            rows.append(row)
    return rows


def bench_masking(device, repeats):
    rows = []
    g = torch.Generator().manual_seed(1)
    for batch, frames in SHAPES:
        for name, span_len, arrangement in MASKING_CASES:
            n = masking.num_spans(frames, span_len, arrangement)
            scores = torch.rand(batch, n, generator=g).to(device)
            num_masked = torch.tensor(n // 2, dtype=torch.int64, device=device)
            codes = torch.randint(0, CARD, (batch, frames), generator=g).to(device)
            row = {"kernel": "remask", "case": name, "B": batch, "T": frames, "spans": n}
            for impl in impls_for(device):
                row[f"{impl}_ms"], row[f"{impl}_min_ms"] = timings_ms(
                    lambda: masking.remask(codes, scores, num_masked, span_len=span_len, arrangement=arrangement,
                                           prompt_len=0, mask_id=CARD, impl=impl),
                    device, repeats * 4)
            rows.append(row)
    return rows


def machine_info(device):
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        "cpp_extension": backend.cpp_module() is not None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        if backend.triton_available():
            import triton
            info["triton"] = triton.__version__
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or Path(__file__).resolve().parent / "results" / f"kernels_sampling_masking_{device.type}.json"

    rows = bench_sampling(device, args.repeats) + bench_masking(device, args.repeats)
    fast = impls_for(device)[0]
    for row in rows:
        if fast != "torch":
            row[f"speedup_{fast}_vs_torch"] = row["torch_min_ms"] / row[f"{fast}_min_ms"]
        size = f"rows={row['rows']}" if "rows" in row else f"spans={row['spans']}"
        timings = "  ".join(f"{impl} {row[f'{impl}_min_ms']:8.3f} (median {row[f'{impl}_ms']:8.3f}) ms"
                            for impl in impls_for(device))
        ratio = f"  x{row[f'speedup_{fast}_vs_torch']:.1f}" if fast != "torch" else ""
        print(f"{row['kernel']:13s} {row['case']:18s} B={row['B']} T={row['T']:4d} {size:11s} {timings}{ratio}")

    result = {"machine": machine_info(device), "repeats": args.repeats, "results": rows}
    print(f"wrote {write_report(out, result)}")


if __name__ == "__main__":
    main()
