"""The int8 linear layer against fp32 and the libraries one could use instead, on the six
linear layers of one transformer layer of the small architecture (packed q|k|v, out, cross q,
cross out, FFN in, FFN out), side by side in one process, alternating, best of --runs.

    OMP_NUM_THREADS=1 python benchmarks/int8_linear.py                    # this CPU as it is
    OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/int8_linear.py --out .../int8_linear_cpu_avx2caps.json

Cases (process CPU time, summed over the six shapes): fp32 `F.linear`; `torch._int_mm` alone (the
GEMM our int8 path calls); our whole int8 linear (per-token quantization, `_int_mm`, rescale:
kernels/int8.py, C++ passes when built); the same with the torch passes; fbgemm's
`quantized::linear_dynamic` (packed per-channel weights, per-tensor dynamic activations: a
cheaper activation scale than ours, so an upper bound of what that route could give). JSON with
the CPU (bench_common.machine_info) to benchmarks/results/int8_linear_cpu.json.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from magnet_engine.bench_common import DEFAULT_OUT, git_commit, machine_info, write_report
from magnet_engine.kernels import int8

DIM, FFN = 1024, 4096   # the small architecture
SHAPES = [(DIM, 3 * DIM), (DIM, DIM), (DIM, DIM), (DIM, DIM), (DIM, FFN), (FFN, DIM)]


def cpu_ms(fn) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1000


def cases(rows: int, gen: torch.Generator) -> dict:
    """name -> list of callables, one per shape."""
    out: dict = {"fp32": [], "int_mm": [], "int8": [], "int8_torch_passes": [], "fbgemm_dynamic": []}
    module = int8._cpp()
    for k, n in SHAPES:
        w, b = torch.randn(n, k, generator=gen) * 0.02, torch.randn(n, generator=gen) * 0.01
        x = torch.randn(rows, k, generator=gen)
        qw, scale = int8.quantize_weight(w, int8.weight_qmax())
        q, _ = int8.quantize_rows(x)
        out["fp32"].append(lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b))
        out["int_mm"].append(lambda q=q, qw=qw: torch._int_mm(q, qw.t()))
        out["int8"].append(lambda x=x, qw=qw, s=scale, b=b: int8._int8_linear(x, qw, s, b))
        if module is not None:
            def torch_passes(x=x, qw=qw, s=scale, b=b):
                q, sx = int8.quantize_rows(x)
                return int8.rescale(torch._int_mm(q, qw.t()), sx, s, b)
            out["int8_torch_passes"].append(torch_passes)
        if "fbgemm" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "fbgemm"
            qweight = torch.quantize_per_channel(w, (w.abs().amax(1) / 127).double(), torch.zeros(n, dtype=torch.long),
                                                 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qweight, b)
            out["fbgemm_dynamic"].append(lambda x=x, p=packed: torch.ops.quantized.linear_dynamic(x, p, False))
    return {name: fns for name, fns in out.items() if fns}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[200, 1000],
                    help="activation rows (2 x frames with CFG: 200 = the 2 s demo, 1000 = 10 s)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT / "int8_linear_cpu.json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")   # torch.ao's quantized ops warn that they are deprecated, on every call
    gen = torch.Generator().manual_seed(0)
    report = {"benchmark": "int8_linear", "commit": git_commit(), "machine": machine_info(torch.device("cpu")),
              "shapes": SHAPES, "weight_qmax": int8.weight_qmax(), "cpp_passes": int8._cpp() is not None,
              "runs": args.runs, "by_rows": {}}
    for rows in args.rows:
        fns = cases(rows, gen)
        best = {name: [float("inf")] * len(SHAPES) for name in fns}
        for _ in range(args.runs):               # alternating: every case once per round
            for name, shape_fns in fns.items():
                for i, fn in enumerate(shape_fns):
                    best[name][i] = min(best[name][i], cpu_ms(fn))
        totals = {name: sum(v) for name, v in best.items()}
        report["by_rows"][str(rows)] = {name: {"cpu_ms": round(t, 2), "vs_fp32": round(totals["fp32"] / t, 3)}
                                        for name, t in totals.items()}
        for name, t in totals.items():
            print(f"rows {rows:5d}  {name:18s} {t:8.2f} ms  {totals['fp32'] / t:5.2f}x fp32")
    print(f"saved {write_report(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
