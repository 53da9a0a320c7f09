"""Latency benchmark: the fast runtime against the plain reference loop, side by side.

    magnet-engine bench --arch small --duration 2 --batch 1 --precision fp32 bf16
    python benchmarks/latency.py --model /path/to/magnet-small-10secs --runs 5
    magnet-engine bench hybrid --prefixes 1 3   # hybrid vs plain, rescoring, time to first audio
    magnet-engine bench --memory                # peak memory against the weights (bench_memory.py)

Both loops run in one process on the same model, inputs, settings and machine; the ratio
is the headline. Reports p50/p95 of tokens-only and end-to-end latency, time per stage,
real-time factor and peak memory, plus, on CPU, the achieved FLOP/s of the fast loop
against a plain GEMM of the same shapes measured in the same run. JSON goes to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import resource
import sys
import typing as tp
from pathlib import Path

import torch

from magnet_engine.bench_common import (DEFAULT_OUT, gemm_rate, git_commit, machine_info, run_cases, tokens_flops,
                                        write_report)
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.precision import CHOICES

VARIANTS = ("eager", "compile", "graphs", "compile+graphs")


def _load_model(args, precision: str, variant: str = "eager"):
    from magnet_engine.api import MAGNeT
    from magnet_engine.demo import cached_demo_model

    directory = args.model or cached_demo_model(args.cache_dir, args.arch)
    return MAGNeT.from_pretrained(directory, device=args.device, t5=args.t5, precision=precision,
                                  compile=args.compile or "compile" in variant, cuda_graphs="graphs" in variant)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hybrid"]:   # hybrid vs plain, rescoring cost, time to first audio
        from magnet_engine.bench_hybrid import main as hybrid_main
        return hybrid_main(argv[1:])
    if "--precisions" in argv or "--quality" in argv:   # CPU precisions: speed, or quality against fp32
        from magnet_engine.bench_precision import main as precision_main
        return precision_main([a for a in argv if a not in ("--precisions", "--quality")],
                              mode="quality" if "--quality" in argv else "speed")
    if "--memory" in argv:        # peak memory of load and generate against the weights' bytes
        from magnet_engine.bench_memory import main as memory_main
        return memory_main([a for a in argv if a != "--memory"])
    p = argparse.ArgumentParser(prog="magnet-engine bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: random weights of --arch)")
    p.add_argument("--arch", choices=("tiny", "small", "medium"), default="small")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/magnet_engine"))
    p.add_argument("--t5", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--precision", nargs="+", default=None, choices=CHOICES,
                   help="precisions timed in turn (default: auto on CPU, fp16-mixed on CUDA); "
                        "see also `bench --precisions` for fp32/bf16/int8/auto side by side")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["eager"],
                   help="fast-runtime variants timed side by side: eager, compile (the whole step through "
                        "torch.compile), graphs (CUDA graphs), compile+graphs")
    p.add_argument("--decoding-steps", type=int, nargs="+", default=list(DecodingParams().decoding_steps))
    p.add_argument("--compile", action="store_true", help="torch.compile the fast runtime (warm-up compiles)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/latency_<dev>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = args.precision or ["auto"]
    report = {"machine": machine_info(device), "git_commit": git_commit(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "cases": []}
    reference_cache: tp.Dict[int, dict] = {}
    for precision in precisions:
        models = {v: _load_model(args, precision, v) for v in args.variants}
        for model in models.values():
            model.set_generation_params(duration=args.duration, decoding_steps=args.decoding_steps)
        model = models[args.variants[0]]
        precision = model.precision
        report.setdefault("precision_choices", []).append(model.precision_choice.as_dict())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for batch in args.batch:
            texts = [f"benchmark description number {i} with synths and drums" for i in range(batch)]
            # The reference loop always runs the fp32 weights: it is timed (interleaved with
            # the fast loop) the first time a batch size comes up, and reused after.
            contenders = [(v, m, "fast") for v, m in models.items()]
            if not (args.no_reference or batch in reference_cache):
                contenders.append(("reference", model, "reference"))
            timings = run_cases(contenders, texts, args.runs, args.warmup, args.seed)
            fast = timings[args.variants[0]]
            if "reference" in timings:
                reference_cache[batch] = timings["reference"]
            case = {"precision": precision, "batch": batch, "frames": model.frames, "fast": fast,
                    "variants": {v: timings[v] for v in args.variants}}
            if not args.no_reference:
                ref = reference_cache[batch]
                case["reference"] = ref
                case["speedup_tokens_p50"] = ref["tokens_ms"]["p50"] / fast["tokens_ms"]["p50"]
                case["speedup_end_to_end_p50"] = ref["end_to_end_ms"]["p50"] / fast["end_to_end_ms"]["p50"]
                case["speedup_tokens_p50_by_variant"] = {
                    v: ref["tokens_ms"]["p50"] / timings[v]["tokens_ms"]["p50"] for v in args.variants}
            cfg = model.config
            flops, kept = tokens_flops(model, batch)
            case["tokens_tflop"] = flops / 1e12
            case["achieved_tflops"] = flops / (fast["tokens_ms"]["p50"] / 1e3) / 1e12
            case["gemm_tflops_same_shapes"] = gemm_rate(cfg.dim, cfg.ffn_dim, 2 * batch * kept, precision, device) / 1e12
            case["fraction_of_gemm"] = case["achieved_tflops"] / case["gemm_tflops_same_shapes"]
            if device.type == "cuda":
                case["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            else:
                case["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            report["cases"].append(case)
            line = (f"{precision} B={batch} T={model.frames}: fast tokens p50 {fast['tokens_ms']['p50']:.0f} ms "
                    f"(p95 {fast['tokens_ms']['p95']:.0f}), e2e p50 {fast['end_to_end_ms']['p50']:.0f} ms, "
                    f"RTF {fast['real_time_factor']:.2f}, {case['achieved_tflops']:.3f} TFLOP/s "
                    f"= {case['fraction_of_gemm']:.0%} of GEMM")
            if "reference" in case:
                line += (f" | reference tokens p50 {case['reference']['tokens_ms']['p50']:.0f} ms -> "
                         f"speedup {case['speedup_tokens_p50']:.2f}x tokens, "
                         f"{case['speedup_end_to_end_p50']:.2f}x end-to-end")
            for v in args.variants[1:]:
                line += f" | {v} tokens p50 {timings[v]['tokens_ms']['p50']:.0f} ms"
            print(line, flush=True)
        del model, models
    out = write_report(args.out or DEFAULT_OUT / f"latency_{device.type}.json", report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
