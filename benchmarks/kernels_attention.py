"""Banded self-attention (stages >= 1, W = 5) against SDPA with a dense [T, T] band mask
(what the reference computes) and unmasked SDPA (stage 0), at the published shapes:
2B rows (CFG) for B in {1, 4}, T in {500, 1500} (10 s / 30 s at 50 Hz), small (H=16) and
medium (H=24) models, d = 64, inputs laid out as the model's packed qkv projection.

CPU: the C++ and blocked-torch paths, fp32. CUDA (when present): the Triton kernel and
flash-attn (when installed) too, fp16. Prints a table and writes
benchmarks/results/kernels_attention_{cpu,cuda}.json. Timings: best and median of a few
repeats after a warm-up; the best is the headline (other processes share small machines).

    python benchmarks/kernels_attention.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from magnet_engine.bench_common import write_report
from magnet_engine.kernels import attention as attn
from magnet_engine.kernels import backend

WINDOW = 5
MODELS = {"small": 16, "medium": 24}  # heads; d = 64 for both
HEAD_DIM = 64


def timed(fn, repeats: int, cuda: bool) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"best_ms": round(min(times), 3), "median_ms": round(statistics.median(times), 3)}


def packed_qkv(rows, heads, frames, device, dtype):
    """q, k, v [2B, H, T, d]: permuted views of one [2B, T, 3, H, d] tensor, as in the model."""
    qkv = torch.randn(rows, frames, 3, heads, HEAD_DIM, device=device, dtype=dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def methods(device: torch.device) -> dict:
    """name -> fn(q, k, v, dense_mask)."""
    out = {
        "sdpa_dense_band_mask": lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa_full": lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v),
        "banded_torch": lambda q, k, v, mask: attn.banded_attention(q, k, v, WINDOW, impl="torch"),
    }
    if device.type == "cpu" and backend.cpp_module() is not None:
        out["banded_cpp"] = lambda q, k, v, mask: attn.banded_attention(q, k, v, WINDOW, impl="cpp")
    if device.type == "cuda":
        if backend.triton_available():
            out["banded_triton"] = lambda q, k, v, mask: attn.banded_attention(q, k, v, WINDOW, impl="triton")
        if backend.flash_attn_available():
            out["full_flash_attn"] = lambda q, k, v, mask: attn.full_attention(q, k, v)
    return out


def machine(device: torch.device) -> dict:
    from magnet_engine.bench_common import machine_info

    info = machine_info(device)   # CPU model, ISA flags, dispatch level and caps, threads
    info.update(cpu_count=os.cpu_count(), cpp_extension=backend.cpp_module() is not None)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        if backend.triton_available():
            import triton
            info["triton"] = triton.__version__
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    fns = methods(device)

    results = []
    for model, heads in MODELS.items():
        for batch in (1, 4):
            for frames in (500, 1500):
                torch.manual_seed(0)
                q, k, v = packed_qkv(2 * batch, heads, frames, device, dtype)
                pos = torch.arange(frames, device=device)
                mask = (pos[:, None] - pos[None, :]).abs() <= WINDOW
                row = {"model": model, "batch": batch, "rows": 2 * batch, "heads": heads, "frames": frames,
                       "head_dim": HEAD_DIM, "window": WINDOW, "dtype": str(dtype).removeprefix("torch."),
                       "ms": {name: timed(lambda: fn(q, k, v, mask), args.repeats, cuda) for name, fn in fns.items()}}
                banded = {n: t["best_ms"] for n, t in row["ms"].items() if n.startswith("banded")}
                fastest = min(banded, key=banded.get)
                row["fastest_banded"] = fastest
                row["speedup_vs_dense_band_mask"] = {
                    n: round(row["ms"]["sdpa_dense_band_mask"]["best_ms"] / t, 2) for n, t in banded.items()}
                row["speedup_vs_full_sdpa"] = {n: round(row["ms"]["sdpa_full"]["best_ms"] / t, 2) for n, t in banded.items()}
                results.append(row)
                times = "  ".join(f"{n} {t['best_ms']:8.2f}" for n, t in row["ms"].items())
                print(f"{model:6s} B={batch} rows={2 * batch} T={frames:4d} | {times} | fastest {fastest}: "
                      f"{row['speedup_vs_dense_band_mask'][fastest]}x vs dense mask", flush=True)

    report = {"machine": machine(device), "device": device.type, "repeats": args.repeats,
              "timing": "best and median wall-clock ms over repeats after one warm-up", "results": results}
    path = write_report(Path(__file__).resolve().parent / "results" / f"kernels_attention_{device.type}.json",
                        report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
