"""Latency of hybrid decoding, rescoring and the two-model hybrid against plain MAGNeT.

    magnet-engine bench hybrid                           # mid-size random model, 5 s, bf16 on CPU
    python benchmarks/hybrid.py                          # the same
    python benchmarks/hybrid.py --arch tiny --runs 1 --duration 2 --prefixes 0.5 1
    python benchmarks/hybrid.py --arch small --device cuda --precision fp16

Builds (once, cached) random-weight checkpoints of one architecture in three kinds: a plain
MAGNeT, a hybrid-MAGNeT (delay layout) and a MusicGen LM of the same size (the rescorer and
the two-model hybrid's prefix model), all sharing one random T5 and one EnCodec. Then, in
one process on one machine, it times these configurations interleaved run by run (so load
from elsewhere falls on all alike), batch 1, default decoding parameters:

  plain              plain MAGNeT, masked decoding only
  hybrid-<s>s        hybrid-MAGNeT with an s-second AR prefix (staircase hand-off, cached prefix)
  hybrid-<s>s-bidir  the same with prefix_attention='bidirectional' (every row recomputed
                     each masked step): what reusing the AR phase's keys/values saves
  rescored           plain MAGNeT with the MusicGen rescorer at weight w (default 0.7)
  two-model-<s>s     plain MAGNeT continuing an s-second MusicGen prefix (not the paper's model)

Per configuration: p50/p95 of tokens-only latency (after the text encoder, prefix codec
decode excluded) and end-to-end latency (text in, waveform out, prefix decode included as
the API does it with `on_prefix`), time to first audio (call -> decoded AR prefix; for
plain decoding that is the full end-to-end time), and ratios against plain. For rescoring,
the extra time per rescored step (total delta / rescored steps) and the directly timed
external forward. The timed runs call the engine the way `MAGNeT.generate` does, with
timestamps in between; the warm-up runs go through `MAGNeT.generate` itself, and the script
checks that both give the same tokens. JSON goes to benchmarks/results/hybrid_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import shutil
import statistics
import sys
import time
import typing as tp
from pathlib import Path

import torch

from magnet_engine.bench_common import DEFAULT_OUT, git_commit, machine_info, percentile, sync, write_report
from magnet_engine.demo import PRESETS, build_once
from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.precision import CHOICES

# A reduced architecture for a 2-core CPU (magnet-small at 5 s takes minutes per run there).
BENCH_ARCHS: tp.Dict[str, dict] = {"mid": dict(dim=512, num_heads=8, num_layers=8), **ckpt.ARCHITECTURES}
# arch -> demo preset whose codec and T5 it borrows
_PRESET_OF = {"tiny": "tiny", "mid": "small", "small": "small", "medium": "medium"}
KINDS = ("magnet", "hybrid", "musicgen")
DESCRIPTION = "benchmark description with synths and drums"


# ------------------------------------------------------------------------- models
def build_models(cache_dir: Path, arch: str, segment: float) -> Path:
    """<cache>/hybrid-bench-<arch>-<segment>s/{t5, magnet, hybrid, musicgen}: three LMs of one
    architecture sharing one random T5 (passed to the loader) and one EnCodec. Built once; a
    half-built directory is never reused."""
    from magnet_engine.engine.random_weights import build_random_t5, random_compression_package, random_lm_package

    spec = PRESETS[_PRESET_OF[arch]]

    def build(staging: Path) -> None:
        build_random_t5(staging / "t5", seed=0, **spec["t5"])
        codec = random_compression_package(sample_rate=32000, n_filters=spec["codec_filters"], ratios=(8, 5, 4, 4),
                                           seed=0)
        for seed, kind in enumerate(KINDS):   # no t5/ inside: all load the shared one
            lm = random_lm_package(**BENCH_ARCHS[arch], d_t5=spec["t5"]["d_model"], duration=segment,
                                        sample_rate=32000, seed=seed, kind=kind)
            if seed == 0:
                ckpt.save_checkpoint(staging / kind, lm, codec)
                continue
            ckpt.atomic_save(lm, staging / kind / ckpt.LM_FILE)
            try:    # one codec file on disk (the real-size EnCodec package is ~230 MB)
                os.link(staging / KINDS[0] / ckpt.CODEC_FILE, staging / kind / ckpt.CODEC_FILE)
            except OSError:
                shutil.copyfile(staging / KINDS[0] / ckpt.CODEC_FILE, staging / kind / ckpt.CODEC_FILE)

    return build_once(Path(cache_dir).expanduser() / f"hybrid-bench-{arch}-{segment:g}s", build,
                      {"arch": arch, "segment": segment, **BENCH_ARCHS[arch]})


# -------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    name: str
    label: str
    model: str                          # 'magnet' | 'hybrid'
    settings: dict                      # extra set_generation_params arguments
    kind: str                           # 'plain' | 'hybrid' | 'rescored' | 'two-model'


def make_cases(args, musicgen_dir: Path) -> tp.List[Case]:
    cases = [Case("plain", "plain MAGNeT (masked decoding only)", "magnet", {}, "plain")]
    for s in args.prefixes:
        cases.append(Case(f"hybrid-{s:g}s", f"hybrid-MAGNeT, {s:g} s AR prefix (staircase, cached prefix)", "hybrid",
                          dict(hybrid_prefix_seconds=s), "hybrid"))
    if args.bidirectional_prefix is not None and args.bidirectional_prefix > 0:
        s = args.bidirectional_prefix
        cases.append(Case(f"hybrid-{s:g}s-bidir", f"hybrid-MAGNeT, {s:g} s AR prefix (staircase, bidirectional prefix)",
                          "hybrid", dict(hybrid_prefix_seconds=s, hybrid_prefix_attention="bidirectional"), "hybrid"))
    if args.rescore_weight is not None and args.rescore_weight != 1.0:
        cases.append(Case("rescored", f"plain MAGNeT + MusicGen rescorer (w = {args.rescore_weight:g})", "magnet",
                          dict(rescorer=str(musicgen_dir), rescore_weight=args.rescore_weight), "rescored"))
    if args.two_model_prefix is not None and args.two_model_prefix > 0:
        s = args.two_model_prefix
        cases.append(Case(f"two-model-{s:g}s", f"two-model hybrid (not the paper's model): MusicGen {s:g} s prefix "
                          "+ plain MAGNeT", "magnet", dict(hybrid_prefix_seconds=s, prefix_model=str(musicgen_dir)),
                          "two-model"))
    return cases


def configure(model, case: Case, args) -> None:
    """Reset every option (set_generation_params starts from defaults), then the case's."""
    model.set_generation_params(duration=args.duration, decoding_steps=args.decoding_steps, **case.settings)


def rescored_steps(decoding_steps: tp.Sequence[int]) -> int:
    """Steps that rescore: all but each stage's last (`BoundRescorer.active`)."""
    return sum(max(n - 1, 0) for n in decoding_steps)


class _ForwardTimer:
    """Counts (and on CPU times) the external model's forwards by wrapping its runtime's
    `hidden` on this instance. On CUDA it does not synchronise (that would stall the loop),
    so it only counts."""

    def __init__(self, runtime, device: torch.device):
        self.runtime, self.device, self.inner = runtime, device, runtime.hidden
        self.calls, self.seconds = 0, 0.0

    def __enter__(self) -> "_ForwardTimer":
        def hidden(*a, **k):
            self.calls += 1
            t0 = time.perf_counter()
            out = self.inner(*a, **k)
            if self.device.type != "cuda":
                self.seconds += time.perf_counter() - t0
            return out
        self.runtime.hidden = hidden
        return self

    def __exit__(self, *exc) -> None:
        del self.runtime.hidden       # back to the class's method


# ------------------------------------------------------------------------ timing
def _loadavg() -> tp.Optional[float]:
    """1-minute load average before a run (the machine may be shared: a hint for outliers)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def timed_run(model, case: Case, descriptions: tp.List[str], seed: int) -> tp.Tuple[dict, torch.Tensor]:
    """One generation through the API, timestamped from the run's events (ms): tokens
    (decoding only, the prefix codec decode taken out), e2e (text in -> waveform out, prefix
    decode included), first_audio (call -> decoded prefix; hybrid only), ar / masked phases,
    the decodes, and for rescoring the external forwards."""
    import contextlib

    from magnet_engine.engine import events

    device = model.device
    marks: tp.Dict[str, float] = {}
    info: tp.Dict[str, tp.Any] = {"loadavg_1m": _loadavg()}
    prefix_frames = model.prefix_frames(options=model.hybrid)
    tail = model.plan().masked.tail
    if tail is not None:   # hybrid: the rows each masked step recomputes, query_start..seq_len
        info.update(recomputed_rows=tail.seq_len - tail.query_start, sequence_rows=tail.seq_len)

    def listen(event) -> None:
        if isinstance(event, events.Started):
            sync(device)
            marks["start"] = time.perf_counter()
        elif isinstance(event, events.PrefixReady):
            sync(device)
            marks["ar_done"] = time.perf_counter()
            wav = model.codec.decode(event.codes)
            sync(device)
            marks["first_audio"] = time.perf_counter()
            info["prefix_audio_s"] = wav.shape[-1] / model.sample_rate

    rescoring = model.rescorer is not None and model.rescore.weight != 1.0
    timer = _ForwardTimer(model.rescorer.runtime, device) if rescoring else contextlib.nullcontext()
    sync(device)
    t0 = time.perf_counter()
    with timer:
        tokens = model.generate_tokens(descriptions, seed=seed, on_event=listen)
    sync(device)
    t1 = time.perf_counter()
    model.decode(tokens)
    sync(device)
    t2 = time.perf_counter()
    ms = lambda a, b: (b - a) * 1e3  # noqa: E731
    prefix_decode = ms(marks["ar_done"], marks["first_audio"]) if "ar_done" in marks else 0.0
    sample = {
        "tokens_ms": ms(marks["start"], t1) - prefix_decode,
        "end_to_end_ms": ms(t0, t2),
        "encode_ms": ms(t0, marks["start"]),
        "codec_decode_ms": ms(t1, t2),
        **{k: v for k, v in info.items() if k != "prefix_audio_s"},
    }
    if "ar_done" in marks:
        sample.update(first_audio_ms=ms(t0, marks["first_audio"]), ar_ms=ms(marks["start"], marks["ar_done"]),
                      prefix_decode_ms=prefix_decode, masked_ms=ms(marks["first_audio"], t1),
                      prefix_audio_s=info["prefix_audio_s"], prefix_frames=prefix_frames)
    if rescoring:
        sample["rescore_calls"] = timer.calls
        if device.type != "cuda":
            sample["rescore_forward_ms"] = timer.seconds * 1e3
    return sample, tokens


def api_run(model, descriptions: tp.List[str], seed: int) -> tp.Tuple[torch.Tensor, tp.Optional[float], float]:
    """A warm-up generation through the public API: (tokens, prefix audio seconds or None, ms)."""
    got: tp.List[torch.Tensor] = []
    t0 = time.perf_counter()
    _, tokens = model.generate(descriptions, seed=seed, return_tokens=True, on_prefix=got.append)
    sync(model.device)
    elapsed = (time.perf_counter() - t0) * 1e3
    return tokens, (got[0].shape[-1] / model.sample_rate if got else None), elapsed


# ------------------------------------------------------------------------ summary
def _stats(values: tp.Sequence[float]) -> dict:
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "all": list(values)}


def summarise(case: Case, samples: tp.List[dict], model, args) -> dict:
    out: tp.Dict[str, tp.Any] = {"name": case.name, "label": case.label, "checkpoint": case.model,
                                 "settings": case.settings, "frames": model.frames, "runs": len(samples)}
    for key in ("tokens_ms", "end_to_end_ms", "first_audio_ms"):
        if key in samples[0]:
            out[key] = _stats([s[key] for s in samples])
    for key in ("encode_ms", "codec_decode_ms", "ar_ms", "prefix_decode_ms", "masked_ms", "rescore_forward_ms"):
        if key in samples[0]:
            out[key + "_p50"] = statistics.median(s[key] for s in samples)
            out[key + "_all"] = [s[key] for s in samples]
    out["loadavg_1m_all"] = [s["loadavg_1m"] for s in samples]
    for key in ("prefix_frames", "prefix_audio_s", "rescore_calls", "recomputed_rows", "sequence_rows"):
        if key in samples[0]:
            out[key] = samples[0][key]
    audio_s = model.plan().out_frames / model.frame_rate
    out["audio_seconds"] = audio_s
    out["real_time_factor"] = audio_s / (out["end_to_end_ms"]["p50"] / 1e3)
    return out


def add_comparisons(report: dict, args) -> None:
    cases = {c["name"]: c for c in report["cases"]}
    plain = cases["plain"]
    p_tok, p_e2e = plain["tokens_ms"]["p50"], plain["end_to_end_ms"]["p50"]
    for c in report["cases"]:
        first = c["first_audio_ms"]["p50"] if "first_audio_ms" in c else c["end_to_end_ms"]["p50"]
        c["vs_plain"] = {"tokens_p50": c["tokens_ms"]["p50"] / p_tok,
                         "end_to_end_p50": c["end_to_end_ms"]["p50"] / p_e2e,
                         "first_audio_p50_over_plain_e2e_p50": first / p_e2e}
    if "rescored" in cases:
        r = cases["rescored"]
        n = rescored_steps(args.decoding_steps)
        delta = r["tokens_ms"]["p50"] - p_tok
        report["rescoring"] = {
            "weight": args.rescore_weight, "rescored_steps_expected": n, "rescored_steps_counted": r.get("rescore_calls"),
            "tokens_delta_ms_p50": delta, "extra_ms_per_rescored_step": delta / n,
            "external_forward_ms_per_step_p50": (r["rescore_forward_ms_p50"] / n if "rescore_forward_ms_p50" in r
                                                 else None),
            "plain_ms_per_step_p50": p_tok / sum(args.decoding_steps),
        }
    s = args.bidirectional_prefix
    cached, bidir = cases.get(f"hybrid-{s:g}s"), cases.get(f"hybrid-{s:g}s-bidir")
    if cached and bidir:
        report["prefix_kv_reuse"] = {
            "prefix_seconds": s,
            "masked_ms_p50_cached": cached["masked_ms_p50"], "masked_ms_p50_bidirectional": bidir["masked_ms_p50"],
            "masked_saved_ms": bidir["masked_ms_p50"] - cached["masked_ms_p50"],
            "masked_ratio_bidirectional_over_cached": bidir["masked_ms_p50"] / cached["masked_ms_p50"],
            "tokens_ratio_bidirectional_over_cached": bidir["tokens_ms"]["p50"] / cached["tokens_ms"]["p50"],
        }


def print_table(report: dict) -> None:
    def s(ms: float) -> str:
        return f"{ms / 1e3:.2f} s"

    rows = [("config", "tokens p50 (p95)", "e2e p50 (p95)", "first audio p50", "AR phase", "masked phase",
             "tokens x plain",
             "e2e x plain", "1st audio / plain e2e")]
    for c in report["cases"]:
        first = c.get("first_audio_ms")
        rows.append((c["name"], f"{s(c['tokens_ms']['p50'])} ({s(c['tokens_ms']['p95'])})",
                     f"{s(c['end_to_end_ms']['p50'])} ({s(c['end_to_end_ms']['p95'])})",
                     s(first["p50"]) if first else "(= e2e)",
                     s(c["ar_ms_p50"]) if "ar_ms_p50" in c else "-",
                     s(c["masked_ms_p50"]) if "masked_ms_p50" in c else "-",
                     f"{c['vs_plain']['tokens_p50']:.2f}x", f"{c['vs_plain']['end_to_end_p50']:.2f}x",
                     f"{c['vs_plain']['first_audio_p50_over_plain_e2e_p50']:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for c in report["cases"]:
        print(f"  {c['name']}: {c['label']}")
    if "rescoring" in report:
        r = report["rescoring"]
        ext = r["external_forward_ms_per_step_p50"]
        print(f"rescoring (w = {r['weight']:g}): {r['rescored_steps_counted']} rescored steps "
              f"(expected {r['rescored_steps_expected']}); tokens +{r['tokens_delta_ms_p50']:.0f} ms = "
              f"{r['extra_ms_per_rescored_step']:.1f} ms per rescored step"
              + (f" (external forward timed directly: {ext:.1f} ms/step)" if ext is not None else "")
              + f"; a plain step costs {r['plain_ms_per_step_p50']:.1f} ms")
    if "prefix_kv_reuse" in report:
        k = report["prefix_kv_reuse"]
        print(f"prefix KV reuse at {k['prefix_seconds']:g} s: masked phase {s(k['masked_ms_p50_cached'])} cached vs "
              f"{s(k['masked_ms_p50_bidirectional'])} bidirectional ({k['masked_ratio_bidirectional_over_cached']:.2f}x,"
              f" saves {s(k['masked_saved_ms'])})")


def _versions() -> dict:
    out = {}
    for dist in ("magnet-engine", "transformers", "numpy", "sentencepiece", "encodec"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    if out["magnet-engine"] is None:
        import magnet_engine
        out["magnet-engine"] = getattr(magnet_engine, "__version__", None)
    return out


# --------------------------------------------------------------------------- main
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="magnet-engine bench hybrid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(BENCH_ARCHS), default="mid",
                   help="LM architecture of the random checkpoints (mid = dim 512, 8 heads, 8 layers; "
                        "tiny/small/medium as engine.checkpoint.ARCHITECTURES)")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/magnet_engine"))
    p.add_argument("--device", default=None)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of audio per generation")
    p.add_argument("--precision", default=None, choices=CHOICES,
                   help="default: auto on CPU (what this CPU runs fastest), fp16 on CUDA")
    p.add_argument("--decoding-steps", type=int, nargs=4, default=list(DecodingParams().decoding_steps))
    p.add_argument("--prefixes", type=float, nargs="+", default=[1.0, 3.0], help="hybrid AR prefix lengths (s)")
    p.add_argument("--bidirectional-prefix", type=float, default=None,
                   help="prefix (s) also run with bidirectional prefix attention (default: the largest "
                        "of --prefixes; 0 = skip)")
    p.add_argument("--rescore-weight", type=float, default=0.7, help="rescorer weight w (1 = skip the case)")
    p.add_argument("--two-model-prefix", type=float, default=None,
                   help="MusicGen prefix (s) of the two-model hybrid (default: the largest of --prefixes; 0 = skip)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, through MAGNeT.generate (checked "
                                                          "against the timed runs' tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/hybrid_<dev>.json)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if args.bidirectional_prefix is None:
        args.bidirectional_prefix = max(args.prefixes)
    if args.two_model_prefix is None:
        args.two_model_prefix = max(args.prefixes)

    from magnet_engine.api import MAGNeT

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("fp16" if device.type == "cuda" else "auto")
    segment = max(10.0, float(args.duration))
    t_build = time.perf_counter()
    root = build_models(args.cache_dir, args.arch, segment)
    build_s = time.perf_counter() - t_build
    t5 = str(root / "t5")
    models = {kind: MAGNeT.from_pretrained(root / kind, device=device, t5=t5, precision=args.precision)
              for kind in ("magnet", "hybrid")}
    cases = make_cases(args, root / "musicgen")
    for case in cases:       # validates every setting (and loads the MusicGen LM) before any timing
        configure(models[case.model], case, args)
    cfg = models["magnet"].config
    print(f"{args.arch}: dim {cfg.dim}, {cfg.num_heads} heads, {cfg.num_layers} layers; {args.duration:g} s = "
          f"{models['magnet'].frames} frames, {models['magnet'].precision_choice.reason}, {device}, {torch.get_num_threads()} threads; "
          f"models in {root} ({build_s:.0f} s to build/find)", flush=True)

    descriptions = [DESCRIPTION]
    samples: tp.Dict[str, tp.List[dict]] = {c.name: [] for c in cases}
    api_check: tp.Dict[str, dict] = {}
    t_start = time.perf_counter()
    for i in range(args.warmup + args.runs):
        order = cases[i % len(cases):] + cases[:i % len(cases)]     # rotate the order round by round
        for case in order:
            model = models[case.model]
            configure(model, case, args)
            if i < args.warmup:
                _, prefix_s, ms = api_run(model, descriptions, args.seed)
                api_check[case.name] = {"api_warmup_ms": ms, "api_prefix_audio_s": prefix_s}
                print(f"  warm-up {i + 1} {case.name}: {ms / 1e3:.2f} s (MAGNeT.generate)", flush=True)
                continue
            sample, _ = timed_run(model, case, descriptions, args.seed)
            samples[case.name].append(sample)
            extra = f", first audio {sample['first_audio_ms'] / 1e3:.2f} s" if "first_audio_ms" in sample else ""
            print(f"  run {i - args.warmup + 1}/{args.runs} {case.name}: tokens {sample['tokens_ms'] / 1e3:.2f} s, "
                  f"e2e {sample['end_to_end_ms'] / 1e3:.2f} s{extra}", flush=True)

    report = {
        "benchmark": "hybrid", "machine": machine_info(device), "versions": _versions(), "git_commit": git_commit(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "precision_choice": models["magnet"].precision_choice.as_dict(),
        "architecture": {"name": args.arch, **BENCH_ARCHS[args.arch], "segment_duration": segment,
                         "t5": PRESETS[_PRESET_OF[args.arch]]["t5"],
                         "codec_filters": PRESETS[_PRESET_OF[args.arch]]["codec_filters"]},
        "batch": len(descriptions), "wall_s": time.perf_counter() - t_start,
        "cases": [summarise(c, samples[c.name], models[c.model], args) for c in cases],
        "api_check": api_check,
    }
    add_comparisons(report, args)
    print_table(report)
    out = write_report(args.out or DEFAULT_OUT / f"hybrid_{device.type}.json", report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
