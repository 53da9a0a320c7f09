"""PlayDiffusion latency on random-weight models in the real file formats: one edit (the
fixture's 3 s clip, a 2-word change: "brown" -> "red", "dog" -> "cat") and ~10 s of TTS, per
phase (tokenize = XLS-R units + voice embedding, plan, unmask, vocode), per precision of the
inpainter, with the real-time factor (seconds of output audio per second of wall time).

    python benchmarks/playdiffusion.py --preset small --precision fp32 bf16
    python benchmarks/playdiffusion.py --preset default --inpainter-forward-only
    python benchmarks/playdiffusion.py --preset small --precision fp32 --variants eager compile --repeats 2

--variants runs the requests through each way of running the unmasking step (eager; compile:
the whole step through torch.compile(fullgraph=True); graphs: CUDA graphs; compile+graphs),
interleaved request by request after one warm-up each (compiles, captures), in place of the
single runs, and reports per variant the unmask phase side by side and the RTF, with whether
its units equal the first variant's.

--preset default writes upstream's default sizes (several GB); on a small CPU use --preset
small (sizes printed and saved) and --inpainter-forward-only, which times one forward of the
default-size inpainter at the sequence lengths of both requests to scale the unmask phase.
Prints a table and saves JSON to benchmarks/results/playdiffusion_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

from magnet_engine.bench_common import machine_info
from magnet_engine.engine.playdiffusion import random_weights
from magnet_engine.engine.playdiffusion.inpainter import Inpainter, InpainterConfig
from magnet_engine.engine.playdiffusion.pipeline import PlayDiffusionPipeline, Precision
from magnet_engine.engine.playdiffusion.reference import reference_generate
from magnet_engine.engine.playdiffusion.unmasking import GeneratorDraws, SpeechRuntime, UnmaskOptions

FIXTURES = Path(os.environ.get("MAGNET_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
TTS_TEXT = ("The engine fills every masked position of a short speech clip in thirty steps, "
            "keeping the left and right context fixed. It runs on any processor.")  # 40 syllables: 10.0 s
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = {"eager": {}, "compile": dict(compile=True), "graphs": dict(cuda_graphs=True),
            "compile+graphs": dict(compile=True, cuda_graphs=True)}

# Smaller than upstream's defaults so a 2-core CPU finishes: same layer types, the real
# codebook (10000 units) and XLS-R depth (35 layers), narrower and shallower elsewhere.
random_weights.PRESETS["small"] = random_weights.Sizes(
    dict(codebook_size=10000, num_layers_lm=8, num_heads=8, num_kv_heads=8, hidden_size=512),
    xlsr_dim=256, xlsr_conv=256, xlsr_heads=4, xlsr_ffn=1024, xlsr_pos_kernel=128, xlsr_pos_groups=16,
    voice_dim=256, voice_depth=2, vocoder=random_weights._vocoder_params(256, 256, 256))


def edit_request():
    """The fixture's e2e clip and words when present, else a same-shaped synthetic clip."""
    golden = FIXTURES / "playdiffusion" / "golden.pt"
    if golden.exists():
        e = torch.load(golden, weights_only=True)["e2e_inpaint"]
        return e["input_waveform"], e["input_sample_rate"], e["input_text"], e["output_text"], e["input_word_times"]
    words = "the quick brown fox jumps over the lazy dog".split()
    starts = [0.1, 0.25, 0.55, 0.85, 1.75, 2.05, 2.25, 2.35, 2.65]
    ends = starts[1:4] + [1.15] + starts[5:] + [2.95]
    times = [dict(word=w, start=s, end=t) for w, s, t in zip(words, starts, ends)]
    wave = 0.1 * torch.randn(48000, generator=torch.Generator().manual_seed(0))
    return wave, 16000, " ".join(words), "the quick red fox jumps over the lazy cat", times


def request(pipe: PlayDiffusionPipeline, mode: str, options: UnmaskOptions, seed: int):
    """-> (SpeechResult, wall seconds) of one edit or TTS request."""
    draws = GeneratorDraws(torch.Generator(device=pipe.device).manual_seed(seed))
    start = time.perf_counter()
    if mode == "edit":
        wave, sr, text_in, text_out, times = edit_request()
        result = pipe.inpaint(wave, sr, text_in, text_out, times, options, draws=draws)
    else:
        voice, sr = edit_request()[:2]
        result = pipe.tts(TTS_TEXT, voice, sr, options, draws=draws)
    return result, time.perf_counter() - start


def run_case(pipe: PlayDiffusionPipeline, mode: str, options: UnmaskOptions, seed: int) -> dict:
    result, wall = request(pipe, mode, options, seed)
    seconds = len(result.pcm) / result.sample_rate
    return dict(mode=mode, wall_s=round(wall, 3), audio_s=round(seconds, 3), rtf=round(seconds / wall, 4),
                phases_s={k: round(v, 3) for k, v in result.timings.items()}, units=int(result.units.numel()))


def region0_loops(pipe: PlayDiffusionPipeline, options: UnmaskOptions) -> dict:
    """The edit's first region through the fast loop (one batched [2, S] CFG forward per step)
    and the plain reference loop (two forwards per step), same draws: same tokens, both timed."""
    from magnet_engine.engine.playdiffusion.pipeline import generate_units
    from magnet_engine.engine.playdiffusion.planner import plan_edit

    wave, sr, text_in, text_out, times = edit_request()
    units = pipe.units(wave[None], sr)
    region = plan_edit(text_in, text_out, times, units.numel()).regions[0]
    left = units[region.buf_start_frame:region.start_frame]
    right = units[region.end_frame:region.buf_end_frame]
    where = dict(code=torch.cat([left, left.new_zeros(region.n_frames), right]),
                 start_frame=left.numel(), end_frame=left.numel() + region.n_frames)
    text = pipe._text(region.text)
    out, seconds = {}, {}
    for name, loop, model in (("fast", generate_units, pipe.runtime),
                              ("reference", reference_generate, pipe.inpainter)):
        start = time.perf_counter()
        draws = GeneratorDraws(torch.Generator(device=pipe.device).manual_seed(0))
        out[name] = loop(model, text, options, draws, **where)
        seconds[name] = round(time.perf_counter() - start, 3)
    return dict(seq_len=text.numel() + 2 + where["code"].numel() + 1, unmask_s=seconds,
                same_tokens=bool(torch.equal(out["fast"], out["reference"])))


def compare_variants(pipe: PlayDiffusionPipeline, options: UnmaskOptions, variants: list[str], modes: list[str],
                     repeats: int) -> list[dict]:
    """Each request through each step variant, interleaved (variant by variant within a
    repeat, so load drift hits all alike) after one warm-up each (compiles, captures): per
    variant, the unmask phase and the whole request (RTF of the median wall time)."""
    runtimes = {v: SpeechRuntime(pipe.inpainter, **VARIANTS[v]) for v in variants}
    warmup, runs, units = {}, {}, {}
    for r in range(repeats + 1):
        for mode in modes:
            for v in variants:
                pipe.runtime = runtimes[v]
                result, wall = request(pipe, mode, options, 0)
                if r == 0:
                    warmup[mode, v] = round(result.timings["unmask"], 3)
                    units[mode, v] = result.units
                else:
                    runs.setdefault((mode, v), []).append((result, wall))
    rows = []
    for mode in modes:
        for v in variants:
            unmask = sorted(round(res.timings["unmask"], 3) for res, _ in runs[mode, v])
            walls = sorted(round(wall, 3) for _, wall in runs[mode, v])
            res = runs[mode, v][0][0]
            audio = len(res.pcm) / res.sample_rate
            rows.append(dict(mode=f"{mode}_variant", variant=v, unmask_s=unmask,
                             unmask_median_s=round(statistics.median(unmask), 3), unmask_min_s=unmask[0],
                             wall_s=walls, audio_s=round(audio, 3), rtf=round(audio / statistics.median(walls), 4),
                             warmup_unmask_s=warmup[mode, v],
                             same_units_as_first=bool(torch.equal(units[mode, v], units[mode, variants[0]]))))
            row = rows[-1]
            print(f"{mode:5s} {v:15s} unmask median {row['unmask_median_s']:7.2f} s  min {unmask[0]:7.2f} s  "
                  f"runs {unmask}  RTF {row['rtf']:.4f}  warm-up {warmup[mode, v]:.2f} s  "
                  f"same units: {row['same_units_as_first']}")
    return rows


def default_forward(lengths: list[int], precisions: list[str]) -> list[dict]:
    """One batched CFG forward ([2, S]) + head of upstream's default-size inpainter (docs/model.md §13.5)."""
    cfg = InpainterConfig(vocab_size=13512, codebook_size=10000, num_layers=20, num_heads=16, num_kv_heads=16,
                          hidden_size=1024)
    model = Inpainter(cfg).eval()
    rows = []
    for name in precisions:
        model.to(DTYPES[name])
        for s in lengths:
            ids = torch.randint(0, cfg.vocab_size, (2, s))
            with torch.inference_mode():
                model(ids)  # warm-up
                start = time.perf_counter()
                model(ids)
            rows.append(dict(precision=name, seq_len=s, cfg_forward_s=round(time.perf_counter() - start, 3)))
            print(f"default inpainter, {name}, S={s}: {rows[-1]['cfg_forward_s']:.2f} s per CFG forward")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(random_weights.PRESETS))
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU path is untested)")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/magnet_engine").expanduser())
    p.add_argument("--compare-loops", nargs="*", default=["fp32"], choices=sorted(DTYPES),
                   help="precisions at which the edit's first region also runs through the reference loop")
    p.add_argument("--modes", nargs="*", default=["edit", "tts"], choices=["edit", "tts"])
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                   help="compare ways of running the unmasking step (the first is the baseline), interleaved")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (--variants)")
    p.add_argument("--inpainter-forward-only", action="store_true",
                   help="also time single forwards of the default-size inpainter (no files written)")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/playdiffusion_<device>.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.cache_dir / f"playdiffusion-random-{args.preset}"
    if not (root / "v090_g_01105000").exists():
        print(f"writing the random '{args.preset}' model to {root} ...")
        random_weights.write_random_model(root, args.preset, seed=0)
    options = UnmaskOptions(steps=args.steps)  # the API defaults otherwise
    results = []
    for name in args.precision:
        pipe = PlayDiffusionPipeline.load(root, args.device, Precision(inpainter=DTYPES[name]))
        if args.variants:  # in place of the single runs: the first variant is the plain pipeline
            results += [dict(precision=name, **row)
                        for row in compare_variants(pipe, options, args.variants, args.modes, args.repeats)]
            pipe.runtime = SpeechRuntime(pipe.inpainter)
        else:
            run_case(pipe, "edit", dataclasses.replace(options, steps=2), 0)  # warm-up
        for mode in [] if args.variants else args.modes:
            row = dict(precision=name, **run_case(pipe, mode, options, 0))
            results.append(row)
            print(f"{name:5s} {mode:5s} audio {row['audio_s']:5.2f} s  wall {row['wall_s']:7.2f} s  "
                  f"RTF {row['rtf']:.3f}  " + "  ".join(f"{k} {v:.2f}" for k, v in row["phases_s"].items()))
        if name in args.compare_loops:
            row = dict(precision=name, mode="edit_region0_fast_vs_reference", **region0_loops(pipe, options))
            results.append(row)
            print(f"{name} first region of the edit (S={row['seq_len']}): fast {row['unmask_s']['fast']:.2f} s, "
                  f"reference {row['unmask_s']['reference']:.2f} s, same tokens: {row['same_tokens']}")
    sizes = dataclasses.asdict(random_weights.PRESETS[args.preset])
    report = dict(benchmark="playdiffusion", preset=args.preset, sizes=sizes, steps=args.steps,
                  device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
                  machine=machine_info(torch.device(args.device)), cpus=os.cpu_count(), load_average=os.getloadavg(), results=results,
                  notes="random weights; text tokenizer is a character-level stand-in (more text ids than the "
                        "real 16k BPE); rtf = output seconds / wall seconds")
    if args.inpainter_forward_only:
        report["default_inpainter_forward"] = default_forward([250, 560], args.precision)
    args.out = args.out or Path(__file__).parent / "results" / f"playdiffusion_{torch.device(args.device).type}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
