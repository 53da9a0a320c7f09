"""Launches per masked decoding step: eager vs compiled vs CUDA graphs, counted with torch.profiler.

    python benchmarks/step_launches.py [--arch small] [--frames 498] [--device cuda]

One step of stage 1 (the banded stage; stage 0 differs only in its attention) is prepared
once and run under the profiler in each variant:
  * eager: every aten op is at least one kernel launch on a GPU (counted on the CPU too);
  * compiled: the whole step as one torch.compile graph (`Torch-Compiled Region` events, and
    the aten / kernel calls inside it);
  * graphs (CUDA only): the captured step, `cudaGraphLaunch` calls per step (the target: 1)
    against `cudaLaunchKernel` calls made outside a graph.
JSON goes to benchmarks/results/step_launches_<device>.json.
"""
from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from magnet_engine.bench_common import add_model_args, bench_model, machine_info, write_report
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.schedule import duration_frames

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _count(prof, names: tp.Iterable[str]) -> tp.Dict[str, int]:
    events = prof.events()
    # a compiled region's event carries its frame id ("Torch-Compiled Region: 0/3"): match prefixes
    counts = {name: sum(1 for e in events if e.name.startswith(name)) for name in names}
    counts["aten_ops"] = sum(1 for e in events if e.name.startswith("aten::"))
    counts["custom_ops"] = sum(1 for e in events if e.name.startswith("magnet_engine::"))
    return counts


def measure(runtime: Runtime, cond: torch.Tensor, frames: int, params: DecodingParams, steps: int) -> dict:
    """Profile `steps` replays of one stage-1 step shape of `runtime` (state restored each time)."""
    st, shapes = runtime.prepare(cond, frames, params, seeds=[0] * (cond.shape[0] // 2))
    shape = shapes[1][0]
    st.scores.copy_(st.init_scores[1])
    saved = [t.clone() for t in (st.codes, st.prob, st.scores, st.cursor)]

    def one() -> None:
        for t, s in zip((st.codes, st.prob, st.scores, st.cursor), saved):
            t.copy_(s)
        runtime._run_step(st, shape, params, None, None)

    for _ in range(2):                     # warm-up: compile / capture outside the profile
        one()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
    counts = _count(prof, ("Torch-Compiled Region", "cudaGraphLaunch", "cudaLaunchKernel", "aten::copy_"))
    # the restore copies are the harness's, not the step's
    restore = 4 * steps
    per_step = {k: v / steps for k, v in counts.items()}
    per_step["aten_ops_in_step"] = (counts["aten_ops"] - counts["aten::copy_"]) / steps + \
        (counts["aten::copy_"] - restore) / steps
    return {"shape": {"stage": shape.stage, "count": shape.count, "with_cfg": shape.with_cfg}, "per_step": per_step}


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    from magnet_engine.api import MAGNeT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=5, help="profiled steps per variant")
    p.add_argument("--variants", nargs="+", default=None, help="eager compile graphs (default: what the device runs)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device, directory = bench_model(args)
    model = MAGNeT.from_pretrained(directory, device=device, precision=args.precision)
    frames = duration_frames(min(args.duration, model.max_duration), model.frame_rate)
    params = DecodingParams()
    with torch.no_grad():
        cond = model.conditioner.encode(["launch count"]).embeds.to(device)
    variants = args.variants or (["eager", "compile", "graphs"] if device.type == "cuda" else ["eager", "compile"])
    report: dict = {"benchmark": "step_launches", "machine": machine_info(device), "frames": frames,
                    "precision": model.precision, "variants": {}}
    for variant in variants:
        runtime = Runtime(model.lm.module, precision=model.precision, compile="compile" in variant,
                          cuda_graphs=variant == "graphs")
        with torch.no_grad():
            report["variants"][variant] = measure(runtime, cond, frames, params, args.steps)
        per = report["variants"][variant]["per_step"]
        print(f"{variant:>8}: {per['aten_ops_in_step']:.0f} aten ops, {per['custom_ops']:.0f} kernel ops, "
              f"{per['Torch-Compiled Region']:.0f} compiled regions, {per['cudaGraphLaunch']:.0f} graph launches, "
              f"{per['cudaLaunchKernel']:.0f} kernel launches per step", flush=True)
    out = write_report(args.out or DEFAULT_OUT / f"step_launches_{device.type}.json", report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
