"""What every benchmark shares: the machine a result names, percentiles, device syncs, the
JSON report writer, and the timed-generation loop (`run_cases`) that `magnet-engine bench` and
`bench --precisions` both use. The bench modules (`bench`, `bench_hybrid`, `bench_memory`,
`bench_precision`) and the scripts in benchmarks/ import this; it imports none of them.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
import typing as tp
from pathlib import Path

import torch

from magnet_engine.engine import events
from magnet_engine.engine.files import atomic_write
from magnet_engine.engine.precision import PRECISIONS, cpu_info

DEFAULT_OUT = Path("benchmarks/results")
# environment switches that hold a CPU's kernel dispatch below what it has (docs/numerics.md §8)
DISPATCH_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def percentile(values: tp.Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
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


def tokens_flops(model, batch: int) -> tp.Tuple[float, int]:
    """(matrix FLOPs of one generation's decoding steps, frames kept) for a loaded MAGNeT at its
    current generation params: `step_flops` summed over the schedule's steps."""
    from magnet_engine.engine.schedule import stage_schedule
    from magnet_engine.kernels.masking import num_spans

    cfg = model.config
    kept = model.plan(batch).masked.kept
    to_gen = num_spans(kept, cfg.span_len, model.params.span_arrangement)
    flops = 0.0
    for stage, n in enumerate(model.params.decoding_steps):
        for m in stage_schedule(n, to_gen, model.params).num_masked:
            flops += step_flops(cfg, batch, kept, model.lm.module.window(stage), m * cfg.span_len)
    return flops, kept


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
        sync(device)
        t0 = time.perf_counter()
        layers[0](x)
        layers[1](x)
        layers[2](h)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return flops / best


def write_report(path: Path, report: dict) -> Path:
    """Write benchmark JSON atomically (`files.atomic_write`); shared by the scripts."""
    text = json.dumps(report, indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), suffix=".json")


class StageTimer:
    """A run listener recording when decoding starts and each stage ends (host time, the
    device synchronised on CUDA): timestamps come from the engine's events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: tp.List[float] = []

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Started) or (isinstance(event, events.StageStep)
                                                 and event.step == event.steps - 1):
            sync(self.device)
            self.marks.append(time.perf_counter())

    def stage_times(self) -> tp.List[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed_generation(model, engine: str, descriptions, seed: int) -> tp.Tuple[float, float, list]:
    """One generation through the API, on `engine`: (tokens ms, end-to-end ms, per-stage ms)."""
    timer = StageTimer(model.device)
    model.engine = engine
    sync(model.device)
    t0 = time.perf_counter()
    tokens = model.generate_tokens(descriptions, seed=seed, on_event=timer)
    sync(model.device)
    t1 = time.perf_counter()
    model.decode(tokens)
    sync(model.device)
    t2 = time.perf_counter()
    return (t1 - timer.marks[0]) * 1e3, (t2 - t0) * 1e3, [s * 1e3 for s in timer.stage_times()]


def summary(engine: str, samples: list, audio_s: float) -> dict:
    tokens_ms = [s[0] for s in samples]
    e2e_ms = [s[1] for s in samples]
    return {
        "engine": engine,
        "tokens_ms": {"p50": percentile(tokens_ms, 0.5), "p95": percentile(tokens_ms, 0.95), "all": tokens_ms},
        "end_to_end_ms": {"p50": percentile(e2e_ms, 0.5), "p95": percentile(e2e_ms, 0.95), "all": e2e_ms},
        "stage_ms_p50": [statistics.median(s[2][k] for s in samples) for k in range(len(samples[0][2]))],
        "real_time_factor": audio_s / (percentile(e2e_ms, 0.5) / 1e3),
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
            result = timed_generation(model, engine, descriptions, seed)
            if i >= warmup:
                samples[name].append(result)
    model = contenders[0][1]
    audio_s = model.plan().out_frames / model.frame_rate
    return {name: summary(engine, samples[name], audio_s) for name, _, engine in contenders}


def add_model_args(parser) -> None:
    """The model options every single-model benchmark script takes; `bench_model(args)` resolves them."""
    parser.add_argument("--arch", default="small", choices=("tiny", "small", "medium"))
    parser.add_argument("--model", default=None, help="a model directory instead of the cached random one")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/magnet_engine"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None)


def bench_model(args) -> tp.Tuple[torch.device, Path]:
    """(device, model directory) of `add_model_args`' options: CUDA when present, else the CPU;
    the named directory, else the cached random-weight model of --arch (built on first use)."""
    from magnet_engine.demo import cached_demo_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, Path(args.model) if args.model else cached_demo_model(args.cache_dir, args.arch)

