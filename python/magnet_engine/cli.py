"""`magnet-engine` console command: generate, edit, demo, bench, serve.

    magnet-engine generate "lo-fi piano" --model facebook/magnet-small-10secs -o out.wav
    magnet-engine generate "lo-fi piano" --duration 60 --extend-stride 7.5 -o long.wav
    magnet-engine edit in.wav --region 4:6 --region 12:13.5 "drum fill" -o out.wav
    magnet-engine demo                       # embedded random-weight model, no download

Paths are checked before a model is loaded: input audio must be a regular file (a FIFO,
device or directory is refused by name, never opened), and each -o a writable file path; a
missing directory above it is created. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import secrets
import sys
import time
import typing as tp
from pathlib import Path

def _add_model_args(p: argparse.ArgumentParser) -> None:
    from magnet_engine.engine.generate import ENGINES
    from magnet_engine.engine.precision import CHOICES

    p.add_argument("--model", default="facebook/magnet-small-10secs",
                   help="model directory (Hugging Face layout) or Hub id")
    p.add_argument("--t5", default=None, help="T5 text encoder: local directory or Hub name (default: from checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--engine", choices=ENGINES, default="fast",
                   help="fast runtime (default) or the plain reference loop")
    p.add_argument("--precision", choices=CHOICES, default=None,
                   help="transformer precision of the fast runtime (default on CPU: auto, the fastest of fp32, "
                        "bf16 and int8 on this CPU, said on a line; on CUDA fp16-mixed: fp16 matmuls, fp32 "
                        "residual stream and norms, as the reference's autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoding step whole")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture each decoding step shape once as a CUDA graph and replay it (CUDA only)")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    # Every default and choice below is read from the engine's option dataclasses, so that the
    # command line cannot drift from the API (tests/test_defaults.py holds them together).
    from magnet_engine.engine import hybrid, rescoring
    from magnet_engine.engine.config import SPAN_ARRANGEMENTS, SPAN_SCORINGS, DecodingParams

    dec, hyb, ar, res = DecodingParams(), hybrid.HybridOptions(), hybrid.ARParams(), rescoring.RescoreOptions()
    g = p.add_argument_group("decoding (names and defaults of MAGNeT.set_generation_params)")
    g.add_argument("--duration", type=float, default=None,
                   help="seconds (default: the model's trained length; longer: decoded window by window)")
    g.add_argument("--extend-stride", type=float, default=None,
                   help="long-form: seconds each window advances (default: 0.6 x the window, e.g. 6 s of 10 s)")
    g.add_argument("--seed", type=int, default=None, help="default: a random seed")
    g.add_argument("--no-sampling", dest="use_sampling", action="store_false", default=dec.use_sampling,
                   help="greedy decoding (argmax)")
    g.add_argument("--top-k", type=int, default=dec.top_k, help="0: off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=dec.top_p, help="default: %(default)s")
    g.add_argument("--temperature", type=float, default=dec.temperature, help="default: %(default)s")
    g.add_argument("--max-cfg-coef", type=float, default=dec.max_cfg_coef, help="default: %(default)s")
    g.add_argument("--min-cfg-coef", type=float, default=dec.min_cfg_coef, help="default: %(default)s")
    g.add_argument("--decoding-steps", type=int, nargs="+", default=list(dec.decoding_steps), metavar="N",
                   help="per codebook (default: %(default)s)")
    g.add_argument("--span-arrangement", choices=SPAN_ARRANGEMENTS, default=dec.span_arrangement)
    g.add_argument("--span-scoring", choices=SPAN_SCORINGS, default=dec.span_scoring)
    g.add_argument("--no-anneal-temp", dest="anneal_temp", action="store_false", default=dec.anneal_temp)
    h = p.add_argument_group("hybrid AR + masked decoding (hybrid-MAGNeT, or two-model with --prefix-model)")
    h.add_argument("--hybrid-prefix-seconds", type=float, default=hyb.prefix_seconds,
                   help=f"seconds generated autoregressively first (hybrid checkpoints: default "
                        f"{hybrid.DEFAULT_PREFIX_SECONDS:g}, capped at half the clip; plain MAGNeT: needs "
                        "--prefix-model)")
    h.add_argument("--hybrid-handoff", choices=hybrid.HANDOFFS, default=hyb.handoff)
    h.add_argument("--hybrid-prefix-attention", choices=hybrid.PREFIX_ATTENTIONS, default=hyb.prefix_attention)
    h.add_argument("--prefix-model", default=None,
                   help="MusicGen / AudioGen checkpoint that makes the prefix for a plain MAGNeT "
                        "(two-model hybrid, not the paper's model)")
    h.add_argument("--ar-top-k", type=int, default=ar.top_k, help="default: %(default)s")
    h.add_argument("--ar-top-p", type=float, default=ar.top_p, help="0: off (default: %(default)s)")
    h.add_argument("--ar-temperature", type=float, default=ar.temperature, help="default: %(default)s")
    h.add_argument("--ar-cfg-coef", type=float, default=None, help="default: the checkpoint's inference_coef")
    r = p.add_argument_group("rescoring with an external AR model (docs/model.md §12)")
    r.add_argument("--rescorer", default=None, help="MusicGen / AudioGen checkpoint that rescores each step")
    r.add_argument("--rescore-weight", type=float, default=res.weight,
                   help="w in w*p_magnet + (1-w)*p_ext, 1: off (default: %(default)s)")
    r.add_argument("--rescore-temperature", choices=rescoring.TEMPERATURES, default=res.temperature)
    r.add_argument("--rescore-fill", choices=rescoring.FILLS, default=res.fill)
    r.add_argument("--rescore-cfg-coef", type=float, default=res.cfg_coef, help="default: conditional only (1x)")


def _generation_params(args) -> dict:
    return dict(use_sampling=args.use_sampling, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                max_cfg_coef=args.max_cfg_coef, min_cfg_coef=args.min_cfg_coef,
                decoding_steps=args.decoding_steps, span_arrangement=args.span_arrangement,
                duration=args.duration, span_scoring=args.span_scoring, anneal_temp=args.anneal_temp,
                hybrid_prefix_seconds=args.hybrid_prefix_seconds, hybrid_handoff=args.hybrid_handoff,
                hybrid_prefix_attention=args.hybrid_prefix_attention, prefix_model=args.prefix_model,
                ar_top_k=args.ar_top_k, ar_top_p=args.ar_top_p, ar_temperature=args.ar_temperature,
                ar_cfg_coef=args.ar_cfg_coef, rescorer=args.rescorer, rescore_weight=args.rescore_weight,
                rescore_temperature=args.rescore_temperature, rescore_fill=args.rescore_fill,
                rescore_cfg_coef=args.rescore_cfg_coef)


def _load(args, model: tp.Optional[str] = None):
    import warnings

    from magnet_engine.api import MAGNeT
    from magnet_engine.engine.precision import PrecisionWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionWarning)
        model = MAGNeT.get_pretrained(model or args.model, device=args.device, t5=args.t5, engine=args.engine,
                                      precision=args.precision, compile=args.compile, cuda_graphs=args.cuda_graphs)
    for warning in caught:
        print(f"magnet-engine: warning: {warning.message}", file=sys.stderr)
    print(f"precision: {model.precision_choice.reason}")
    return model


def _output_paths(output: Path, n: int) -> tp.List[Path]:
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix or '.wav'}") for i in range(n)]


def _checked_outputs(args, n: int) -> tp.List[Path]:
    """The output paths, checked before any generation: a bad -o fails in a second, not
    after minutes of decoding."""
    from magnet_engine.engine.files import check_output_path

    paths = _output_paths(Path(args.output), n)
    if getattr(args, "prefix_output", None):
        paths += _output_paths(Path(args.prefix_output), n)
    for path in paths:
        check_output_path(path)
    return paths[:n]


def _draw_seed(args) -> None:
    """No --seed: one from the OS, below MAX_SEED as any caller's (the API would draw from torch's
    default generator, which starts the same in every process)."""
    from magnet_engine.engine.config import MAX_SEED

    if args.seed is None:
        args.seed = secrets.randbelow(MAX_SEED)


def _generate(model, args, paths: tp.List[Path]) -> tp.Tuple[tp.List[Path], float]:
    from magnet_engine.audio import read_audio, write_wav

    _draw_seed(args)
    texts = args.texts or [None]
    model.set_generation_params(**_generation_params(args))
    model.extend_stride = getattr(args, "extend_stride", None)
    start = time.perf_counter()
    if getattr(args, "prompt", None):
        wav_in, sr = read_audio(args.prompt)
        wav = model.generate_continuation(wav_in[None].expand(len(texts), -1, -1), sr, texts,
                                          progress=not args.quiet, seed=args.seed)
    else:
        first = {}

        def on_prefix(prefix_wav):   # hybrid: the AR prefix is audio before the tail is decoded
            first["s"] = time.perf_counter() - start
            if getattr(args, "prefix_output", None):
                for path, one in zip(_output_paths(Path(args.prefix_output), prefix_wav.shape[0]), prefix_wav):
                    write_wav(path, one, model.sample_rate)
            if not args.quiet:
                print(f"first audio ({prefix_wav.shape[-1] / model.sample_rate:.2f} s prefix) after {first['s']:.2f} s",
                      file=sys.stderr)
        wav = model.generate(texts, progress=not args.quiet, seed=args.seed,
                             on_prefix=on_prefix if model.prefix_frames() else None)
        if "s" in first:
            print(f"time to first audio: {first['s']:.2f} s")
    elapsed = time.perf_counter() - start
    for path, one in zip(paths, wav):
        write_wav(path, one, model.sample_rate)
    return paths, elapsed


def _check_prompt(args) -> None:
    """--prompt a regular file, before loading (a FIFO or device would block or never end)."""
    from magnet_engine.audio import check_input_file

    if getattr(args, "prompt", None):
        check_input_file(args.prompt, "--prompt")


def cmd_generate(args) -> int:
    paths = _checked_outputs(args, max(1, len(args.texts)))   # before loading: a model may take minutes to fetch
    _check_prompt(args)
    model = _load(args)
    paths, elapsed = _generate(model, args, paths)
    seconds = model.frames / model.frame_rate
    for p in paths:
        print(f"wrote {p}")
    print(f"{len(paths)} x {seconds:.2f} s of audio at {model.sample_rate} Hz in {elapsed:.2f} s "
          f"(real-time factor {seconds / elapsed:.2f})")
    return 0


def _region(text: str) -> tp.Tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a region is START:END in seconds (e.g. 4:6.5), found {text!r}") from None
    return start, end


def cmd_edit(args) -> int:
    from magnet_engine.audio import check_input_file, write_wav
    from magnet_engine.engine.files import check_output_path

    check_output_path(Path(args.output))      # before loading, as generate does
    check_input_file(args.input, "input audio")
    model = _load(args)
    params = _generation_params(args)
    params["duration"] = None
    model.set_generation_params(**params)
    start = time.perf_counter()
    _draw_seed(args)
    wav = model.generate_infill(args.input, None, args.region, [args.text], progress=not args.quiet, seed=args.seed)
    elapsed = time.perf_counter() - start
    write_wav(args.output, wav[0], model.sample_rate)
    print(f"wrote {args.output} ({wav.shape[-1] / model.sample_rate:.2f} s, regions "
          f"{', '.join(f'{a:g}-{b:g} s' for a, b in args.region)} regenerated in {elapsed:.2f} s)")
    return 0


def cmd_demo(args) -> int:
    from magnet_engine.demo import cached_demo_model

    args.texts = args.texts or ["warm lo-fi piano with soft vinyl crackle"]
    paths = _checked_outputs(args, len(args.texts))
    _check_prompt(args)
    kind = "hybrid-MAGNeT " if args.kind == "hybrid" else ""
    print(f"magnet-engine demo: a random-weight '{args.preset}' {kind}model of the published architecture.\n"
          "Untrained weights make noise, not music. For music, run e.g.\n"
          "  magnet-engine generate 'lo-fi piano' --model facebook/magnet-small-10secs  (or a local directory)")
    t0 = time.perf_counter()
    directory = cached_demo_model(args.cache_dir, args.preset, kind=args.kind)
    t1 = time.perf_counter()
    model = _load(args, model=str(directory))
    t2 = time.perf_counter()
    paths, elapsed = _generate(model, args, paths)
    print(f"model dir: {directory} (build/cache {t1 - t0:.1f} s, load {t2 - t1:.1f} s)")
    for p in paths:
        print(f"wrote {p}")
    print(f"generated {model.frames / model.frame_rate:.2f} s of audio in {elapsed:.2f} s "
          f"(engine {args.engine}, device {model.device}, precision {model.precision})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from magnet_engine.demo import DEFAULT_CACHE

    parser = argparse.ArgumentParser(prog="magnet-engine", description="Fast MAGNeT inference")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text (and optional audio prompt) -> wav")
    g.add_argument("texts", nargs="*", help="one or more descriptions (none: unconditional)")
    g.add_argument("-o", "--output", default="magnet.wav", help="output wav (several texts: name_0.wav ...)")
    g.add_argument("--prompt", default=None, help="audio file to continue (its frames stay fixed)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--prefix-output", default=None,
                   help="hybrid decoding: also write the AR prefix audio here as soon as it exists")
    _add_model_args(g)
    _add_decoding_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="generate with an embedded random-weight model (no download)")
    d.add_argument("texts", nargs="*")
    d.add_argument("--preset", choices=("tiny", "small", "medium"), default="small",
                   help="architecture of the random model (small = the published magnet-small)")
    d.add_argument("--kind", choices=("magnet", "hybrid"), default="magnet",
                   help="plain MAGNeT, or hybrid-MAGNeT (AR prefix, then masked decoding)")
    d.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    d.add_argument("-o", "--output", default="magnet_demo.wav")
    d.add_argument("-q", "--quiet", action="store_true")
    d.add_argument("--prompt", default=None)
    _add_model_args(d)
    _add_decoding_args(d)
    d.set_defaults(func=cmd_demo, duration=2.0)

    # Listed for --help; main() hands their arguments to their own parsers.
    sub.add_parser("edit", help="regenerate regions of an audio clip in place, infill (edit --help)", add_help=False)
    sub.add_parser("bench", help="latency benchmark, fast vs reference loop (bench --help)", add_help=False)
    sub.add_parser("serve", help="HTTP service with dynamic batching and the demo page (serve --help)",
                   add_help=False)
    sub.add_parser("speech", help="PlayDiffusion speech editing / TTS / voice conversion (speech --help)",
                   add_help=False)
    return parser


def build_edit_parser() -> argparse.ArgumentParser:
    """`edit` has its own parser: its text may follow the options (IN.wav --region 4:6 "text"),
    which needs intermixed parsing, and that does not work through subparsers."""
    e = argparse.ArgumentParser(prog="magnet-engine edit", description="regenerate regions of an audio clip (infill)")
    e.add_argument("input", help="audio file to edit (at most the model's window long)")
    e.add_argument("text", nargs="?", default=None, help="description of the result (none: unconditional)")
    e.add_argument("--region", type=_region, action="append", required=True, metavar="START:END",
                   help="seconds to regenerate; repeat for several (snapped outward to whole spans)")
    e.add_argument("-o", "--output", default="magnet_edit.wav")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_args(e)
    _add_decoding_args(e)
    e.set_defaults(func=cmd_edit)
    return e


def serve_on_ray(argv: tp.List[str]) -> int:
    """`serve --ray`: the same routes on Ray Serve replicas. Decided here, above both: the
    cluster runs the server's app, so the server cannot hand over to the cluster itself."""
    from magnet_engine.server.serve import build_parser, options

    try:
        from magnet_engine.cluster import main as cluster_main
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("ray"):
            raise
        print(f"magnet-engine serve --ray: needs Ray Serve (pip install magnet-engine[cluster]): {exc}",
              file=sys.stderr)
        return 2
    return cluster_main(argv, build_parser(), options)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    from magnet_engine.errors import MagnetEngineError

    argv = list(sys.argv[1:] if argv is None else argv)
    # serve and bench own their flags: hand them over before argparse reads any of them.
    handoff = {"serve": "magnet_engine.server", "bench": "magnet_engine.bench", "speech": "magnet_engine.speech_cli"}
    if argv[:1] == ["serve"] and "--ray" in argv[1:]:
        return serve_on_ray(argv[1:])
    if argv[:1] and argv[0] in handoff:
        import importlib
        return importlib.import_module(handoff[argv[0]]).main(argv[1:])
    if argv[:1] == ["edit"]:
        args = build_edit_parser().parse_intermixed_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MagnetEngineError as exc:   # bad input, model or option: one line, no traceback
        print(f"magnet-engine: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:             # the file system failed under us (disk full, permissions changed)
        print(f"magnet-engine: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
