"""Memory benchmark: what loading and generating hold, against the bytes of the weights.

    magnet-engine bench --memory                       # small architecture, fp32 and bf16, CPU
    magnet-engine bench --memory --precision fp16 --device cuda
    python -m magnet_engine.bench_memory --arch tiny --out /tmp/memory.json

Each case (precision x page cache) runs in a fresh Python process, so that a peak is that
case's own: the process imports everything first (its baseline), then loads the model, then
generates twice (first call: buffers, page faults of mapped weights; second: steady state).
Per phase it records, on the CPU, the peak resident set (VmHWM, reset between phases through
/proc/self/clear_refs) and the resident set after it, split into anonymous and file-backed
pages; on CUDA the allocator's peak allocated / reserved bytes. The weights' bytes are counted
from the modules in the dtype each runs in (the transformer in the run precision; embeddings,
heads, T5 and EnCodec fp32), whatever the code holds, so the same script measures older code:
`--code-dir` puts another source tree first on the children's import path.

Activations are measured, not assumed: the peak of the steady-state call above the resident
set before it (every weight page is resident by then). The target of issue 15 is
    peak above baseline, load + generate  <=  1.2 x weights + activations.
"cold" load evicts the checkpoint files from the page cache first (posix_fadvise DONTNEED; not
a reboot, so "cold-ish"), "warm" reads them right before.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

RESULTS = Path("benchmarks/results")
CACHES = ("warm", "cold")


# ------------------------------------------------------------------- measuring (in the child)
def _status() -> tp.Dict[str, int]:
    """Resident set now and at its peak, anonymous and file-backed, in bytes (Linux /proc)."""
    from magnet_engine.memory import proc_status

    fields = proc_status("VmRSS", "VmHWM", "RssAnon", "RssFile")
    return {"rss": fields["VmRSS"], "peak_rss": fields["VmHWM"], "rss_anon": fields["RssAnon"],
            "rss_file": fields["RssFile"]}


def _reset_peak() -> None:
    """Start a new VmHWM window (Linux >= 4.0: writing 5 to clear_refs resets the peak RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def _evict(directory: Path) -> None:
    """Drop the checkpoint files' clean pages from the page cache (not from other processes' maps)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _warm(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def run_weight_bytes(model, precision: str) -> tp.Dict[str, int]:
    """Bytes of each component's tensors in the dtype it runs in, from element counts (so the
    answer does not depend on what dtype the measured code happens to hold them in)."""
    seen: tp.Set[int] = set()

    def count(module, run_bytes: tp.Callable[[str], int]) -> int:
        total = 0
        for name, tensor in [*module.named_parameters(remove_duplicate=False),
                             *module.named_buffers(remove_duplicate=False)]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * run_bytes(name)
        return total

    def lm_bytes(name: str) -> int:   # transformer matmuls 2 bytes below fp32, its norms fp32 in the mixed modes
        if precision == "int8":      # int8 weights; their per-channel scales, biases and the norms fp32
            return 1 if name.endswith(".qweight") else 4
        if not name.startswith("transformer.") or precision == "fp32":
            return 4
        return 4 if precision.endswith("-mixed") and ".norm" in name else 2

    return {"lm": count(model.lm.module, lm_bytes),
            "conditioner": count(model.conditioner, lambda name: 4),
            "codec": count(model.codec, lambda name: 4)}


def _phase(device, body: tp.Callable[[], tp.Any]) -> tp.Tuple[dict, tp.Any]:
    import torch

    gc.collect()
    _reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _status()
    t0 = time.perf_counter()
    result = body()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    after = _status()
    record = {"seconds": seconds, "peak_rss": after["peak_rss"], "rss_before": before["rss"], "rss_after": after["rss"],
              "rss_anon_after": after["rss_anon"], "rss_file_after": after["rss_file"]}
    if device.type == "cuda":
        record.update(cuda_peak_allocated=torch.cuda.max_memory_allocated(device),
                      cuda_peak_reserved=torch.cuda.max_memory_reserved(device),
                      cuda_allocated_after=torch.cuda.memory_allocated(device))
    return record, result


def run_case(case: dict) -> dict:
    """One case in this (fresh) process: baseline, load, first and steady generate."""
    import torch

    import transformers

    from magnet_engine.api import MAGNeT

    torch.set_num_threads(case["threads"])
    transformers.T5EncoderModel, transformers.T5Tokenizer   # lazy modules: imported before the baseline
    directory = Path(case["model"])
    device = torch.device(case["device"])
    if device.type == "cuda":
        torch.zeros(1, device=device)         # the CUDA context is not the model's
    (_evict if case["cache"] == "cold" else _warm)(directory)
    gc.collect()
    baseline = _status()
    load, model = _phase(device, lambda: MAGNeT.from_pretrained(directory, device=device, precision=case["precision"],
                                                                t5=case.get("t5")))
    model.set_generation_params(duration=case["duration"], decoding_steps=case["decoding_steps"])
    texts = ["memory benchmark: warm synths and drums"] * case["batch"]
    first, _ = _phase(device, lambda: model.generate(texts, seed=0))
    steady, _ = _phase(device, lambda: model.generate(texts, seed=1))
    weights = run_weight_bytes(model, case["precision"])
    total = sum(weights.values())
    peak = max(load["peak_rss"], first["peak_rss"], steady["peak_rss"])
    activations = max(steady["peak_rss"] - steady["rss_before"], 0)
    result = {**case, "baseline_rss": baseline["rss"], "weights_bytes": weights, "weights_total_bytes": total,
              "load": load, "first_generate": first, "steady_generate": steady,
              "peak_rss_above_baseline": peak - baseline["rss"],
              "activation_bytes": activations,
              "peak_over_weights": (peak - baseline["rss"]) / total,
              "peak_over_weights_plus_activations": (peak - baseline["rss"]) / (total + activations),
              "meets_target": peak - baseline["rss"] <= 1.2 * total + activations}
    if device.type == "cuda":
        cuda_peak = max(p["cuda_peak_allocated"] for p in (load, first, steady))
        result.update(cuda_peak_allocated=cuda_peak, cuda_peak_over_weights=cuda_peak / total,
                      cuda_activation_bytes=steady["cuda_peak_allocated"] - load["cuda_allocated_after"])
    if hasattr(model, "memory_stats"):
        result["memory_stats"] = model.memory_stats()
    return result


# --------------------------------------------------------------------- driving (the parent)
def _child(case: dict, code_dir: tp.Optional[Path]) -> dict:
    env = dict(os.environ)
    if code_dir is not None:   # another tree of the package first on the path (measuring older code)
        env["PYTHONPATH"] = os.pathsep.join([str(code_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    # -P: the script's folder is not put on the path (its modules would shadow top-level names)
    proc = subprocess.run([sys.executable, "-P", __file__, "--case", json.dumps(case)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(report: dict) -> tp.List[dict]:
    """One row per run and case: the numbers the issue's targets are about, in MiB and seconds.
    overhead: peak above baseline minus the weights (activations, buffers, allocator slack,
    code paged in on first use; on the old code, the second copies)."""
    rows = []
    for run in report["runs"]:
        for case in run["cases"]:
            peak, weights = case["peak_rss_above_baseline"], case["weights_total_bytes"]
            load_peak = case["load"]["peak_rss"] - case["baseline_rss"]
            rows.append({"label": run["label"], "precision": case["precision"], "cache": case["cache"],
                         "weights_mib": round(weights / 2 ** 20, 1),
                         "peak_above_baseline_mib": round(peak / 2 ** 20, 1),
                         "peak_over_weights": round(peak / weights, 3),
                         "overhead_mib": round((peak - weights) / 2 ** 20, 1),
                         "steady_activations_mib": round(case["activation_bytes"] / 2 ** 20, 1),
                         "load_peak_above_baseline_mib": round(load_peak / 2 ** 20, 1),
                         "load_s": round(case["load"]["seconds"], 2),
                         "load_plus_first_generate_s": round(case["load"]["seconds"]
                                                             + case["first_generate"]["seconds"], 2),
                         "meets_target": case["meets_target"]})
    return rows


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.0f} MiB"


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="magnet-engine bench --memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="checkpoint directory (default: random weights of --arch)")
    p.add_argument("--arch", choices=("tiny", "small", "medium"), default="small")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/magnet_engine"))
    p.add_argument("--t5", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=None, help="default: fp32 int8 (and bf16 where native) on CPU, fp16-mixed bf16 on CUDA")
    p.add_argument("--cache", nargs="+", choices=CACHES, default=list(CACHES), help="page cache state before load")
    p.add_argument("--duration", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decoding-steps", type=int, nargs="+", default=[2, 1, 1, 1],
                   help="memory does not depend on the step count; a few keep the run short")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--code-dir", type=Path, default=None,
                   help="a directory holding another `magnet_engine` package tree to measure (e.g. main's)")
    p.add_argument("--label", default=None, help="name of this run in the JSON (default: the git commit)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/memory_<dev>.json)")
    p.add_argument("--append", action="store_true", help="add this run to the JSON's runs instead of replacing it")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    import torch

    from magnet_engine.bench_common import git_commit, machine_info, write_report
    from magnet_engine.engine.precision import cpu_info
    from magnet_engine.demo import cached_demo_model

    device = torch.device(args.device)
    precisions = args.precision or (["fp16-mixed", "bf16"] if device.type == "cuda"
                                    else ["fp32", "int8"] + (["bf16"] if cpu_info().native_bf16 else []))
    directory = Path(args.model) if args.model else cached_demo_model(args.cache_dir, args.arch)
    threads = args.threads or torch.get_num_threads()
    run = {"label": args.label or git_commit(), "git_commit": git_commit(),
           "code_dir": str(args.code_dir) if args.code_dir else None, "model": str(directory),
           "arch": None if args.model else args.arch, "cases": []}
    for precision in precisions:
        for cache in args.cache:
            case = {"model": str(directory), "device": args.device, "precision": precision, "cache": cache,
                    "duration": args.duration, "batch": args.batch, "decoding_steps": args.decoding_steps,
                    "threads": threads, "t5": args.t5}
            result = _child(case, args.code_dir)
            run["cases"].append(result)
            line = (f"[{run['label']}] {precision} {cache}: weights {_mb(result['weights_total_bytes'])}, "
                    f"peak RSS above baseline {_mb(result['peak_rss_above_baseline'])} "
                    f"({result['peak_over_weights']:.2f}x weights; activations {_mb(result['activation_bytes'])}, "
                    f"target {'met' if result['meets_target'] else 'MISSED'}), "
                    f"load {result['load']['seconds']:.2f} s, "
                    f"load peak {_mb(result['load']['peak_rss'] - result['baseline_rss'])}, "
                    f"first generate {result['first_generate']['seconds']:.2f} s")
            if device.type == "cuda":
                line += f", CUDA peak allocated {_mb(result['cuda_peak_allocated'])}"
            print(line, flush=True)
    out = args.out or RESULTS / f"memory_{device.type}.json"
    report = {"machine": machine_info(device), "runs": []}
    if args.append and out.exists():
        report = json.loads(out.read_text())
    report["runs"] = [r for r in report["runs"] if r["label"] != run["label"]] + [run]
    report["summary"] = summarize(report)
    write_report(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
