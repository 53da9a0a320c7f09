"""Infill against plain generation of the same length, and long-form time to first audio.

    python benchmarks/infill_longform.py                       # small arch, bf16 CPU, 10/30/60 s
    python benchmarks/infill_longform.py --arch tiny --durations 10 20 --steps 3 2 2 2

Model: the demo's random-weight checkpoint of the published magnet-small architecture (10 s
window, real-size EnCodec), built once in the cache. One process, one machine, batch 1.

infill: a clip of --clip seconds (a sine) with --region regenerated, against a plain generation
of the same length with the same decoding steps, runs interleaved. Tokens-only time (the
infill's codec encode reported apart) and end-to-end time (text or clip in, waveform out).

long-form: --durations seconds decoded as `generate_stream` does (windows of max_duration
advancing extend_stride each; each window's new frames decoded by the StreamDecoder as soon
as they are final): time to first audio (the first non-empty chunk; one window: its whole
decode), time until all audio is out (the flush), each window's time (WindowReady to
WindowReady, chunk decode included) and the window count.
JSON: benchmarks/results/infill_longform_<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from magnet_engine import MAGNeT
from magnet_engine.bench_common import DEFAULT_OUT, git_commit, machine_info, write_report
from magnet_engine.demo import cached_demo_model
from magnet_engine.engine import events
from magnet_engine.engine.codec import StreamDecoder

TEXT = "benchmark description with synths and drums"


def _clip(model: MAGNeT, seconds: float) -> torch.Tensor:
    t = torch.arange(int(model.sample_rate * seconds)) / model.sample_rate
    return (0.3 * torch.sin(2 * torch.pi * 220 * t))[None, None]


def bench_infill(model: MAGNeT, clip_s: float, region, runs: int) -> dict:
    clip = _clip(model, clip_s)
    rows = {"plain_tokens": [], "infill_tokens": [], "infill_encode": [], "plain_e2e": [], "infill_e2e": []}

    def plain(run):
        t0 = time.perf_counter()
        model.generate_tokens([TEXT], seed=run, duration=clip_s)
        t1 = time.perf_counter()
        model.generate([TEXT], seed=run) if model.duration == clip_s else None
        return {"plain_tokens": t1 - t0, "plain_e2e": time.perf_counter() - t1}

    def infill(run):
        nonlocal plan
        t0 = time.perf_counter()
        codes, texts, plan, seeds = model._infill_request(clip, model.sample_rate, [region], [TEXT], run)
        t1 = time.perf_counter()
        model._tokens(texts, None, False, seeds, infill=(plan, codes))
        t2 = time.perf_counter()
        model.generate_infill(clip, model.sample_rate, [region], [TEXT], seed=run)
        return {"infill_encode": t1 - t0, "infill_tokens": t2 - t1, "infill_e2e": time.perf_counter() - t2}

    plan = None
    for run in range(runs + 1):                      # run 0 warms up; the order alternates (ABBA...)
        first, second = (plain, infill) if run % 2 == 0 else (infill, plain)
        times = {**first(run), **second(run)}
        if run:
            for key, value in times.items():
                rows[key].append(value)
    out = {key: statistics.median(v) for key, v in rows.items()}
    out.update(clip_s=clip_s, region_s=list(region), runs=runs, each_run=rows,
               region_frames=[list(r) for r in _regions(plan)],
               infill_over_plain_tokens=out["infill_tokens"] / out["plain_tokens"],
               infill_over_plain_tokens_each_run=[i / p for i, p in zip(rows["infill_tokens"], rows["plain_tokens"])])
    return out


def _regions(plan):
    fixed = plan.masked.fixed[0]
    free, at = [], 0
    for s, e in fixed:
        if s > at:
            free.append((at, s))
        at = e
    if at < plan.masked.kept:
        free.append((at, plan.masked.kept))
    return free


def bench_longform(model: MAGNeT, duration: float) -> dict:
    """What `generate_stream` does, on this thread with timestamps: each window's new frames
    go through the StreamDecoder as soon as its WindowReady arrives."""
    stream = StreamDecoder(model.codec)
    marks, chunks = [], []

    def on_event(event):
        if isinstance(event, events.WindowReady):
            marks.append(time.perf_counter())
            for wav in stream.window(event):
                chunks.append((time.perf_counter(), wav.shape[-1]))
    start = time.perf_counter()
    tokens = model.generate_tokens([TEXT], seed=0, duration=duration, on_event=on_event)
    if not chunks:                                   # one window: its audio is the whole decode
        chunks.append((time.perf_counter(), model.decode(tokens).shape[-1]))
    first = next(t for t, n in chunks if n > 0)
    windows = [b - a for a, b in zip([start] + marks[:-1], marks)]
    return dict(duration_s=duration, windows=len(marks), frames=tokens.shape[-1], first_audio_s=first - start,
                all_audio_s=chunks[-1][0] - start, window_tokens_s=windows,
                audio_s=sum(n for _, n in chunks) / model.sample_rate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("tiny", "small"), default="small")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--steps", type=int, nargs=4, default=[8, 4, 4, 4],
                        help="decoding steps per stage (default 20 in all: fewer so 60 s fits 2 CPU cores)")
    parser.add_argument("--clip", type=float, default=10.0)
    parser.add_argument("--region", type=float, nargs=2, default=[4.0, 6.0])
    parser.add_argument("--durations", type=float, nargs="+", default=[10, 30, 60])
    parser.add_argument("--extend-stride", type=float, default=None, help="default: the API's (0.6 x window)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--skip-infill", action="store_true")
    parser.add_argument("--skip-longform", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/magnet_engine"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    directory = cached_demo_model(args.cache_dir, args.arch)
    model = MAGNeT.from_pretrained(directory, device="cpu", precision=args.precision)
    model.set_generation_params(decoding_steps=args.steps, duration=args.clip)
    model.extend_stride = args.extend_stride
    report = dict(machine=machine_info(model.device), commit=git_commit(), arch=args.arch,
                  precision=args.precision, decoding_steps=args.steps, threads=torch.get_num_threads(),
                  extend_stride_s=model.extend_stride or 0.6 * model.max_duration, window_s=model.max_duration)
    if not args.skip_infill:
        report["infill"] = bench_infill(model, args.clip, tuple(args.region), args.runs)
        r = report["infill"]
        print(f"infill {args.region} of {args.clip:g} s: tokens {r['infill_tokens']:.2f} s (+ encode "
              f"{r['infill_encode']:.2f} s) vs plain {r['plain_tokens']:.2f} s = {r['infill_over_plain_tokens']:.2f}x; "
              f"end-to-end {r['infill_e2e']:.2f} s vs {r['plain_e2e']:.2f} s")
    report["longform"] = []
    for duration in ([] if args.skip_longform else args.durations):
        r = bench_longform(model, duration)
        report["longform"].append(r)
        print(f"long-form {duration:g} s: {r['windows']} windows, first audio {r['first_audio_s']:.2f} s, all audio "
              f"{r['all_audio_s']:.2f} s (window tokens {', '.join(f'{w:.1f}' for w in r['window_tokens_s'])} s)")
    out = args.out or DEFAULT_OUT / f"infill_longform_{model.device.type}.json"
    write_report(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
