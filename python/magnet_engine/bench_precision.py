"""CPU precisions side by side: speed (`bench --precisions`) and quality (`bench --quality`).

    magnet-engine bench --precisions --arch small --duration 10 --runs 3   # fp32 / bf16 / int8 / auto
    magnet-engine bench --quality --model DIR                              # bf16 and int8 against fp32

Speed: one process loads the model once per precision (bf16 only where the CPU has it
natively: elsewhere it is emulated, hundreds of times slower, and 'auto' never picks it),
then times the generations alternating precision run by run, so load from elsewhere falls on
all alike. Reported per precision: tokens time (p50), its ratio to fp32, and the share of the
same precision's plain matmul rate the whole step reaches (int8: of the int8 linear kernel's
rate on the model's shapes, activation quantization included).

Quality: the same inputs (descriptions, partly masked canvases, every stage) through each
precision's runtime, against fp32: the logits' error distribution (in units of the fp32
logits' standard deviation), greedy-token agreement, the total-variation distance of the
sampling distributions (the defaults: temperature, top-p; CFG at the schedule's start and
end), and a sampling-frequency test (tokens drawn from the low-precision distribution
against the fp32 probabilities, beside the same test of fp32 draws: the noise floor).
Random weights behave differently from trained ones: run it on your checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
import typing as tp
from pathlib import Path

import torch

from magnet_engine.bench_common import (DEFAULT_OUT, gemm_rate, git_commit, machine_info, percentile, tokens_flops,
                                        write_report)
from magnet_engine.engine.precision import AUTO_CANDIDATES, cpu_info


def _model_dir(args) -> str:
    from magnet_engine.demo import cached_demo_model

    return str(args.model or cached_demo_model(args.cache_dir, args.arch))


def _load(directory: str, precision: str, t5: tp.Optional[str]):
    from magnet_engine.api import MAGNeT

    model = MAGNeT.from_pretrained(directory, device="cpu", t5=t5, precision=precision)
    model._fast_runtime()     # cast now, not inside the first timed run
    return model


def _candidates(requested: tp.Optional[tp.Sequence[str]]) -> tp.List[str]:
    names = list(requested or [*AUTO_CANDIDATES, "auto"])
    if "bf16" in names and not cpu_info().native_bf16 and requested is None:
        names.remove("bf16")
    return names


def speed(args) -> int:
    directory = _model_dir(args)
    names = _candidates(args.candidates)
    models = {name: _load(directory, name, args.t5) for name in names}
    for model in models.values():
        model.set_generation_params(duration=args.duration)
        if args.decoding_steps:
            model.set_generation_params(duration=args.duration, decoding_steps=args.decoding_steps)
    texts = [f"benchmark description number {i} with synths and drums" for i in range(args.batch)]
    timings = _timed_rounds(models, texts, args.runs, args.warmup, args.seed)
    report = {"benchmark": "precision_speed", "machine": machine_info(torch.device("cpu")), "git_commit": git_commit(),
              "model": directory, "duration": args.duration, "batch": args.batch,
              "decoding_steps": list(models[names[0]].params.decoding_steps),
              "choices": {n: m.precision_choice.as_dict() for n, m in models.items()}, "cases": {}}
    base = timings["fp32"]["tokens_ms"]["p50"] if "fp32" in timings else None
    for name, model in models.items():
        t = timings[name]["tokens_ms"]["p50"]
        cfg = model.config
        flops, kept = tokens_flops(model, args.batch)
        rate = flops / (t / 1e3)
        gemm = gemm_rate(cfg.dim, cfg.ffn_dim, 2 * args.batch * kept, model.precision, torch.device("cpu"))
        case = {"runs_precision": model.precision, "tokens_ms": timings[name]["tokens_ms"],
                "tokens_cpu_ms": timings[name]["tokens_cpu_ms"], "achieved_gop_s": rate / 1e9,
                "matmul_gop_s_same_shapes": gemm / 1e9, "share_of_matmul_rate": rate / gemm,
                "speedup_vs_fp32": base / t if base else None}
        report["cases"][name] = case
        print(f"{name:5s} (runs {model.precision}): tokens p50 {t / 1e3:.2f} s"
              + (f" = {case['speedup_vs_fp32']:.2f}x fp32" if base else "")
              + f", {rate / 1e9:.0f} GOP/s = {case['share_of_matmul_rate']:.0%} of its matmul rate "
                f"({gemm / 1e9:.0f} GOP/s)", flush=True)
    if base:
        report["speedup_vs_fp32_cpu_time"] = {n: timings["fp32"]["tokens_cpu_ms"]["p50"] / timings[n]["tokens_cpu_ms"]["p50"]
                                              for n in names}
        print("by process CPU time (less sensitive to other load): "
              + ", ".join(f"{n} {v:.2f}x" for n, v in report["speedup_vs_fp32_cpu_time"].items()))
    if "auto" in models:
        for clock in ("tokens_ms", "tokens_cpu_ms"):
            best = min(timings[n][clock]["p50"] for n in names if n != "auto")
            report[f"auto_over_best_{clock}"] = timings["auto"][clock]["p50"] / best
        print(f"auto: {models['auto'].precision_choice.reason}\nauto / best single precision: "
              f"{report['auto_over_best_tokens_ms']:.3f} (wall), {report['auto_over_best_tokens_cpu_ms']:.3f} (CPU time)")
    out = write_report(args.out or DEFAULT_OUT / "precision_speed_cpu.json", report)
    print(f"wrote {out}")
    return 0


def _timed_rounds(models: tp.Dict[str, tp.Any], texts, runs: int, warmup: int, seed: int) -> tp.Dict[str, dict]:
    """Tokens-only wall and process CPU time per model, alternating models run by run. CPU time
    moves less than wall time when other processes share the machine (each run's own work)."""
    samples: tp.Dict[str, tp.List[tp.Tuple[float, float]]] = {name: [] for name in models}
    for i in range(warmup + runs):
        for name, model in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            model.generate_tokens(texts, seed=seed)
            if i >= warmup:
                samples[name].append(((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3))

    def summary(values: tp.List[float]) -> dict:
        return {"p50": percentile(values, 0.5), "min": min(values), "all": values}
    return {name: {"tokens_ms": summary([w for w, _ in s]), "tokens_cpu_ms": summary([c for _, c in s])}
            for name, s in samples.items()}


# ----------------------------------------------------------------------------- quality
def _sampling_probs(cond: torch.Tensor, uncond: torch.Tensor, coef: float, temperature: float,
                    top_p: float) -> torch.Tensor:
    """The distribution a step samples from (CFG mix, temperature, nucleus), [N, card] fp64."""
    logits = (uncond + (cond - uncond) * coef).double() / temperature
    probs = logits.softmax(-1)
    ordered, order = probs.sort(-1, descending=True)
    keep = (ordered.cumsum(-1) - ordered) < top_p          # the smallest prefix reaching top_p
    kept = torch.zeros_like(probs).scatter_(-1, order, ordered * keep)
    return kept / kept.sum(-1, keepdim=True)


def _frequency_test(probs: torch.Tensor, target: torch.Tensor, draws: int, gen: torch.Generator) -> float:
    """Mean over positions of the total-variation distance between `draws` tokens sampled from
    `probs` and the `target` distribution (both [N, card])."""
    samples = torch.multinomial(probs.float(), draws, replacement=True, generator=gen)
    counts = torch.zeros_like(probs).scatter_add_(-1, samples, torch.ones_like(samples, dtype=probs.dtype))
    return float((counts / draws - target).abs().sum(-1).mean() / 2)


def quality_figures(reference, candidate, cond: torch.Tensor, canvases: tp.Sequence[torch.Tensor],
                    params, draws: int = 4000, positions: int = 64, seed: int = 0) -> dict:
    """`candidate` against `reference` (Runtimes) on the same inputs; see the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    errors, agree, total = [], 0, 0
    tv = {"cfg_max": [], "cfg_min": []}
    freq, floor = [], []
    for stage, codes in enumerate(canvases):
        ref = reference.stage_logits(codes, cond, stage)
        low = candidate.stage_logits(codes, cond, stage)
        b = codes.shape[0]
        errors.append(((low - ref) / ref.std()).abs().flatten())
        agree += int((low[:b].argmax(-1) == ref[:b].argmax(-1)).sum())
        total += low[:b, :, 0].numel()
        for key, coef in (("cfg_max", params.max_cfg_coef), ("cfg_min", params.min_cfg_coef)):
            p_ref = _sampling_probs(ref[:b], ref[b:], coef, params.temperature, params.top_p).flatten(0, 1)
            p_low = _sampling_probs(low[:b], low[b:], coef, params.temperature, params.top_p).flatten(0, 1)
            tv[key].append((p_low - p_ref).abs().sum(-1) / 2)
            if key == "cfg_max":
                pick = torch.randperm(p_ref.shape[0], generator=gen)[:positions]
                freq.append(_frequency_test(p_low[pick], p_ref[pick], draws, gen))
                floor.append(_frequency_test(p_ref[pick], p_ref[pick], draws, gen))
    err = torch.cat(errors)
    quantiles = torch.quantile(err[torch.randperm(err.numel(), generator=gen)[:1_000_000]].double(),
                               torch.tensor([0.5, 0.99], dtype=torch.float64))
    return {
        "logit_error_in_std": {"p50": float(quantiles[0]), "p99": float(quantiles[1]), "max": float(err.max()),
                               "mean": float(err.mean())},
        "greedy_agreement": agree / total,
        "sampling_tv": {k: {"mean": float(torch.cat(v).mean()), "max": float(torch.cat(v).max())} for k, v in tv.items()},
        "frequency_test_tv": sum(freq) / len(freq),
        "frequency_test_noise_floor_tv": sum(floor) / len(floor),
        "draws_per_position": draws, "positions_per_stage": positions,
    }


def _canvases(model, batch: int, masked: float, seed: int) -> tp.List[torch.Tensor]:
    """Per stage: random codes [B, K, T] with the stage's row and all later rows partly masked,
    the earlier stages complete, as a canvas looks mid-decoding."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    out = []
    for stage in range(cfg.n_q):
        codes = torch.randint(0, cfg.card, (batch, cfg.n_q, model.frames), generator=gen)
        hole = torch.rand(batch, cfg.n_q, model.frames, generator=gen) < masked
        hole[:, :stage] = False
        hole[:, stage + 1:] = True
        out.append(codes.masked_fill(hole, cfg.mask_id))
    return out


def quality(args) -> int:
    directory = _model_dir(args)
    reference = _load(directory, "fp32", args.t5)
    reference.set_generation_params(duration=args.duration)
    texts = [f"quality probe {i}: warm synths, drums and bass" for i in range(args.batch)]
    cond = reference.conditioner.encode(texts).embeds     # [2B, S, D]: the texts, then the null rows
    canvases = _canvases(reference, args.batch, args.masked, args.seed)
    report = {"benchmark": "precision_quality", "machine": machine_info(torch.device("cpu")),
              "git_commit": git_commit(), "model": directory, "duration": args.duration, "batch": args.batch,
              "masked_fraction": args.masked, "params": {"temperature": reference.params.temperature,
                                                         "top_p": reference.params.top_p,
                                                         "cfg": [reference.params.max_cfg_coef,
                                                                 reference.params.min_cfg_coef]},
              "against_fp32": {}}
    names = [n for n in (args.candidates or ["bf16", "int8"]) if n != "fp32"]
    for name in names:
        model = _load(directory, name, args.t5)
        figures = quality_figures(reference._fast_runtime(), model._fast_runtime(), cond, canvases, reference.params,
                                  seed=args.seed)
        report["against_fp32"][name] = figures
        e = figures["logit_error_in_std"]
        print(f"{name}: logit error (x fp32 std) p50 {e['p50']:.4f} p99 {e['p99']:.4f} max {e['max']:.3f}; "
              f"greedy agreement {figures['greedy_agreement']:.2%}; sampling TV mean "
              f"{figures['sampling_tv']['cfg_max']['mean']:.4f} (CFG max) {figures['sampling_tv']['cfg_min']['mean']:.4f} "
              f"(CFG min); frequency test TV {figures['frequency_test_tv']:.4f} vs fp32's own "
              f"{figures['frequency_test_noise_floor_tv']:.4f}", flush=True)
        del model
    out = write_report(args.out or DEFAULT_OUT / "precision_quality_cpu.json", report)
    print(f"wrote {out}")
    return 0


def main(argv: tp.Optional[tp.Sequence[str]] = None, mode: str = "speed") -> int:
    p = argparse.ArgumentParser(prog=f"magnet-engine bench --{'precisions' if mode == 'speed' else 'quality'}",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: random weights of --arch)")
    p.add_argument("--arch", choices=("tiny", "small", "medium"), default="small")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/magnet_engine"))
    p.add_argument("--t5", default=None)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decoding-steps", type=int, nargs="+", default=None,
                   help="speed: steps per stage (default: the model's, 20 10 10 10); every step of a stage has "
                        "the same shape, so fewer steps give the same ratios sooner")
    p.add_argument("--candidates", nargs="+", choices=(*AUTO_CANDIDATES, "auto"), default=None,
                   help="speed: default fp32 bf16 int8 auto (bf16 only where native); quality: default bf16 int8")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--masked", type=float, default=0.5, help="quality: fraction of the stage's cells masked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    return speed(args) if mode == "speed" else quality(args)


if __name__ == "__main__":
    sys.exit(main())
