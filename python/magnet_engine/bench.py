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
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import torch

from magnet_engine.engine import events
from magnet_engine.engine.precision import CHOICES, PRECISIONS, cpu_info

DEFAULT_OUT = Path("benchmarks/results")
# environment switches that hold a CPU's kernel dispatch below what it has (docs/numerics.md §8)
DISPATCH_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _percentile(values: tp.Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    # Every result names its CPU: model, ISA flags, torch's dispatch level, and the dispatch
    # caps in force (a run under ATEN_CPU_CAPABILITY=avx2 on an AMX machine says so).
    cpu = cpu_info().as_dict()
    info["cpu"] = cpu.pop("model")
    info["cpu_isa"] = cpu
    info["dispatch_caps"] = {k: os.environ[k] for k in DISPATCH_CAPS if k in os.environ}
    return info


def step_flops(cfg, batch: int, frames: int, window: tp.Optional[int], gathered: tp.Optional[int]) -> float:
    """Matrix FLOPs of one fast-loop step: 2B rows x T frames, cond-only cross-attention,
    layer-0 self-attention once, band-limited attention at stages > 0, head on the
    `gathered` frames per row (all frames if None)."""
    d, n, c = cfg.dim, cfg.num_layers, cfg.card
    rows = 2 * batch * frames
    keys = frames if window is None else min(frames, 2 * window + 1)
    self_attn = 2 * (3 * d * d + d * d) * rows + 4 * rows * keys * d
    self_attn_l0 = self_attn / 2
    cross = 2 * (2 * d * d) * batch * frames
    ffn = 2 * (2 * cfg.ffn_dim * d) * rows
    head = 2 * d * c * 2 * batch * (frames if gathered is None else gathered)
    return (n - 1) * self_attn + self_attn_l0 + n * (cross + ffn) + head


def gemm_rate(d: int, ffn: int, rows: int, precision: str, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s (int8: OP/s) of plain linear layers with the transformer's shapes (rows x D @
    D x 3D, D x 4D, 4D x D) in `precision`'s matmul arithmetic; int8 through the engine's
    int8 linear kernel, activation quantization included."""
    from magnet_engine.kernels import int8

    dtype = PRECISIONS[precision][0]
    x = torch.randn(rows, d, device=device, dtype=dtype)
    h = torch.randn(rows, ffn, device=device, dtype=dtype)
    weights = [torch.randn(3 * d, d, device=device, dtype=dtype), torch.randn(ffn, d, device=device, dtype=dtype),
               torch.randn(d, ffn, device=device, dtype=dtype)]
    if precision == "int8":
        packed = [int8.quantize_weight(w, int8.weight_qmax()) for w in weights]
        layers = [lambda a, q=q, s=s: int8.int8_linear(a, q, s) for q, s in packed]
    else:
        layers = [lambda a, w=w: torch.nn.functional.linear(a, w) for w in weights]
    flops = 2 * rows * d * (3 * d + ffn) + 2 * rows * ffn * d
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        layers[0](x)
        layers[1](x)
        layers[2](h)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return flops / best


def write_report(path: Path, report: dict) -> Path:
    """Write benchmark JSON atomically (a temporary file, then a rename); shared by the scripts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


class StageTimer:
    """A run listener recording when decoding starts and each stage ends (host time, the
    device synchronised on CUDA): timestamps come from the engine's events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: tp.List[float] = []

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Started) or (isinstance(event, events.StageStep)
                                                 and event.step == event.steps - 1):
            _sync(self.device)
            self.marks.append(time.perf_counter())

    def stage_times(self) -> tp.List[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _timed_generation(model, engine: str, descriptions, seed: int) -> tp.Tuple[float, float, list]:
    """One generation through the API, on `engine`: (tokens ms, end-to-end ms, per-stage ms)."""
    timer = StageTimer(model.device)
    model.engine = engine
    _sync(model.device)
    t0 = time.perf_counter()
    tokens = model.generate_tokens(descriptions, seed=seed, on_event=timer)
    _sync(model.device)
    t1 = time.perf_counter()
    model.decode(tokens)
    _sync(model.device)
    t2 = time.perf_counter()
    return (t1 - timer.marks[0]) * 1e3, (t2 - t0) * 1e3, [s * 1e3 for s in timer.stage_times()]


def _summary(engine: str, samples: list, audio_s: float) -> dict:
    tokens_ms = [s[0] for s in samples]
    e2e_ms = [s[1] for s in samples]
    return {
        "engine": engine,
        "tokens_ms": {"p50": _percentile(tokens_ms, 0.5), "p95": _percentile(tokens_ms, 0.95), "all": tokens_ms},
        "end_to_end_ms": {"p50": _percentile(e2e_ms, 0.5), "p95": _percentile(e2e_ms, 0.95), "all": e2e_ms},
        "stage_ms_p50": [statistics.median(s[2][k] for s in samples) for k in range(len(samples[0][2]))],
        "real_time_factor": audio_s / (_percentile(e2e_ms, 0.5) / 1e3),
        "audio_seconds": audio_s,
    }


def run_cases(contenders: tp.Sequence[tp.Tuple[str, tp.Any, str]], descriptions, runs: int, warmup: int,
              seed: int) -> tp.Dict[str, dict]:
    """Time `runs` generations per contender (name, model, engine) after `warmup`,
    alternating the contenders run by run so that load from elsewhere on the machine falls
    on all alike."""
    samples: tp.Dict[str, list] = {name: [] for name, _, _ in contenders}
    for i in range(warmup + runs):
        for name, model, engine in contenders:
            result = _timed_generation(model, engine, descriptions, seed)
            if i >= warmup:
                samples[name].append(result)
    model = contenders[0][1]
    audio_s = model.frames // model.config.span_len * model.config.span_len / model.frame_rate
    return {name: _summary(engine, samples[name], audio_s) for name, _, engine in contenders}


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
    p.add_argument("--decoding-steps", type=int, nargs="+", default=[20, 10, 10, 10])
    p.add_argument("--compile", action="store_true", help="torch.compile the fast runtime (warm-up compiles)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/latency_<dev>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = args.precision or ["auto"]
    report = {"machine": machine_info(device), "git_commit": _git_commit(), "args": {
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
            flops = 0.0
            from magnet_engine.engine.schedule import spans_to_generate, stage_schedule
            kept, _, to_gen = spans_to_generate(model.frames, 0, cfg.span_len, True)
            for stage, n in enumerate(model.params.decoding_steps):
                sched = stage_schedule(n, to_gen, model.params)
                for m in sched.num_masked:
                    flops += step_flops(cfg, batch, kept, model.lm.module.window(stage), m * cfg.span_len)
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
