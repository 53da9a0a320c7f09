"""The slot runtime's start-up ladder (engine/slots.py): what warming it costs per step shape,
and a step of each shape after it, per variant: eager, compile, graphs, compile+graphs.

    python benchmarks/slot_ladder.py --arch tiny --device cpu --variants eager compile
    python benchmarks/slot_ladder.py --arch small --device cuda --rows 8 --variants eager graphs

Each variant loads the model with its flags and builds the slots as `magnet-engine serve
--batching continuous` does (`MAGNeT.slot_runtime`: `default_ladders` when compiled or graphed,
exact shapes when eager), warms them (`SlotRuntime.warm`: seconds per shape), then serves --requests rows of mixed durations and options, one arriving per step,
under dynamo's fail_on_recompile stance (a compile after warm-up fails the run), timing every
step by its shape. Tokens of each variant are compared with the first variant's (equal unless
a draw sits within fp32 rounding of a tie: masked SDPA sums in another order). JSON:
benchmarks/results/slot_ladder_<device>.json.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import typing as tp
from pathlib import Path

import torch
import torch._dynamo

from magnet_engine.bench_common import add_model_args, bench_model, machine_info, percentile, sync, write_report
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.schedule import duration_frames

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
VARIANTS = {"eager": {}, "compile": {"compile": True}, "graphs": {"cuda_graphs": True},
            "compile+graphs": {"compile": True, "cuda_graphs": True}}
# (share of the window, options): durations and options differ row to row, as a service's requests do
MIX = [(1.0, {}), (0.5, {"use_sampling": False}), (0.75, {"top_k": 50, "top_p": 0.0, "temperature": 1.5}),
       (0.3, {"span_scoring": "prod"}), (0.6, {"span_arrangement": "stride1"}), (0.9, {"max_cfg_coef": 1.0,
                                                                                     "min_cfg_coef": 1.0})]


def requests(model, n: int, steps: tp.Sequence[int]) -> tp.List[tp.Tuple[torch.Tensor, int, DecodingParams, int]]:
    """n rows: (cond [2, S, D], frames, params, seed), cycling through MIX."""
    rows = []
    for i in range(n):
        share, options = MIX[i % len(MIX)]
        with torch.no_grad():
            cond = model.conditioner.encode([f"slot ladder row {i}"]).embeds.to(model.device)
        frames = duration_frames(share * model.max_duration, model.frame_rate)
        rows.append((cond, frames, DecodingParams(decoding_steps=tuple(steps), **options), i))
    return rows


def run_variant(model, rows: int, text_len: int, work) -> dict:
    """Warm the model's slots, then serve `work` (one row admitted per step while it fits)."""
    slots = model.slot_runtime(rows, text_len)
    started = time.perf_counter()
    warmed = slots.warm()
    warm_s = time.perf_counter() - started
    step_ms: tp.Dict[tp.Tuple[int, int, int], tp.List[float]] = collections.defaultdict(list)
    pending, seed_of, codes = list(work), {}, {}
    with torch.compiler.set_stance("fail_on_recompile"):
        while pending or slots.active:
            cond, frames, params, seed = pending[0] if pending else (None, 0, None, 0)
            if pending and slots.free and slots.fits(frames, params, cond.shape[1]):
                seed_of[slots.admit(cond, frames, params, seed)] = seed
                pending.pop(0)
            shape = slots.shape()
            sync(model.device)
            t0 = time.perf_counter()
            done = slots.step()
            sync(model.device)
            step_ms[(shape.rows, shape.frames, shape.text)].append((time.perf_counter() - t0) * 1000)
            for row in done:
                codes[seed_of.pop(row.slot)] = row.codes
    return {
        "ladders": {"rows": slots.ladders[0], "frames": slots.ladders[1], "text": slots.ladders[2]},
        "warm_s": warm_s,
        "warm": [{"rows": s.rows, "frames": s.frames, "text": s.text, "seconds": sec} for s, sec in warmed],
        "steps": sum(len(v) for v in step_ms.values()),
        "step_ms": [{"rows": r, "frames": f, "text": t, "count": len(v), "p50": percentile(v, 0.5), "min": min(v)}
                    for (r, f, t), v in sorted(step_ms.items())],
        "step_ms_total": sum(sum(v) for v in step_ms.values()),
        "codes": codes,
    }


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    from magnet_engine.api import MAGNeT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--rows", type=int, default=4, help="slots (serve's --max-batch)")
    p.add_argument("--text-len", type=int, default=256, help="text tokens per row (the runner's)")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--steps", type=int, nargs=4, default=[4, 2, 2, 2], help="decoding steps per stage")
    p.add_argument("--variants", nargs="+", default=None, choices=tuple(VARIANTS),
                   help="default: eager compile graphs on CUDA, eager compile elsewhere")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device, directory = bench_model(args)
    variants = args.variants or (["eager", "compile", "graphs"] if device.type == "cuda" else ["eager", "compile"])
    report: dict = {"benchmark": "slot_ladder", "machine": machine_info(device), "load_average": os.getloadavg(),
                    "arch": args.arch,
                    "rows": args.rows, "text_len": args.text_len, "requests": args.requests,
                    "decoding_steps": args.steps, "variants": {}}
    first = None
    for name in variants:
        model = MAGNeT.from_pretrained(directory, device=device, precision=args.precision, **VARIANTS[name])
        torch._dynamo.reset()
        result = run_variant(model, args.rows, args.text_len, requests(model, args.requests, args.steps))
        codes = result.pop("codes")
        first = codes if first is None else first
        result["tokens_equal_first"] = all(torch.equal(codes[k].cpu(), first[k].cpu()) for k in first)
        report["variants"][name] = result
        per_shape = ", ".join(f"{w['rows']}x{w['frames']}: {w['seconds']:.1f} s" for w in result["warm"])
        print(f"{name:>14}: warm {result['warm_s']:.1f} s ({per_shape or 'nothing to warm'}); "
              f"{result['steps']} steps {result['step_ms_total']:.0f} ms; tokens == {variants[0]}: "
              f"{result['tokens_equal_first']}", flush=True)
    report["precision"] = model.precision
    out = write_report(args.out or DEFAULT_OUT / f"slot_ladder_{device.type}.json", report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
