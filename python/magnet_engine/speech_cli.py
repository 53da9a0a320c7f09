"""`magnet-engine speech`: PlayDiffusion from the command line.

    magnet-engine speech edit IN.wav --from "old text" --to "new text" --word-times times.json -o out.wav
    magnet-engine speech tts "Hello there." --voice voice.wav -o out.wav
    magnet-engine speech rvc SOURCE.wav --voice TARGET.wav -o out.wav

times.json: [{"word": "old", "start": 0.10, "end": 0.42}, ...] in seconds (any aligner), at
most 1 MiB. The settings flags and their defaults come from the input models
(playdiffusion.BaseInput).

Every path is checked before the model is loaded: inputs must be regular files (a FIFO, device
or directory is refused by name, never opened), and -o must be a writable file path; a missing
directory above it is created, as `magnet-engine generate` does. The output file is written
atomically, only after the whole run succeeded. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import typing as tp
from pathlib import Path


def _add_settings(p: argparse.ArgumentParser) -> None:
    from magnet_engine.playdiffusion import BaseInput

    g = p.add_argument_group("settings (names, defaults and bounds of PlayDiffusion's input models)")
    for name, field in BaseInput.model_fields.items():
        if name == "output_text":
            continue
        kind = int if field.annotation is int else float
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=field.default,
                       help=f"{field.description} (default: {field.default})")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="random",
                   help="directory with the six upstream files, a Hub id (PlayHT/inpainter), or 'random' (default: "
                        "a random-weight tiny model, no download; it makes noise, not speech)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the unmasking step whole")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the unmasking step once per shape as a CUDA graph and replay it (CUDA only)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output wav (16-bit PCM)")


def _settings(args) -> dict:
    from magnet_engine.playdiffusion import BaseInput

    return {name: getattr(args, name) for name in BaseInput.model_fields if name != "output_text"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magnet-engine speech", description="PlayDiffusion speech editing")
    sub = parser.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("edit", help="make a recording say a new text")
    e.add_argument("audio", help="input wav")
    e.add_argument("--from", dest="input_text", required=True, help="what the recording says")
    e.add_argument("--to", dest="output_text", required=True, help="what it should say")
    e.add_argument("--word-times", required=True, type=Path, help='JSON [{"word", "start", "end"}] in seconds')
    _add_model(e)
    _add_settings(e)
    t = sub.add_parser("tts", help="text to speech in the voice of a reference clip")
    t.add_argument("text")
    t.add_argument("--voice", required=True)
    _add_model(t)
    _add_settings(t)
    r = sub.add_parser("rvc", help="voice conversion: SOURCE's words in the voice of --voice")
    r.add_argument("source")
    r.add_argument("--voice", required=True)
    _add_model(r)
    return parser


MAX_WORD_TIMES_BYTES = 1 << 20   # ~20k words with their times: hours of speech


def _word_times(path: Path) -> list:
    from magnet_engine.audio import read_input_file
    from magnet_engine.errors import InvalidInputError

    data = read_input_file(path, "--word-times", MAX_WORD_TIMES_BYTES)
    try:
        data = json.loads(data)
    except (ValueError, RecursionError) as e:   # RecursionError: arrays nested thousands deep
        raise InvalidInputError(f"--word-times {path}: not a JSON file ({str(e)[:200]})") from None
    if isinstance(data, dict) and "words" in data:  # whisper-style {"words": [...]}
        data = data["words"]
    if not isinstance(data, list):
        raise InvalidInputError(f"--word-times {path}: expected a JSON list of {{word, start, end}}")
    return data


def _check_paths(args) -> None:
    """Every input a regular file and the output writable, before a model is loaded."""
    from magnet_engine.audio import check_input_file
    from magnet_engine.engine.files import check_output_path

    check_output_path(args.output)
    inputs = {"edit": [("audio", "audio")], "tts": [("voice", "--voice")],
              "rvc": [("source", "source audio"), ("voice", "--voice")]}[args.mode]
    for name, what in inputs:
        path = getattr(args, name)
        if path.startswith("file:"):     # the input models take file: URIs as well as paths
            path = path[len("file:"):].removeprefix("//")
        elif "://" in path:               # another scheme: the input model refuses it by name
            continue
        check_input_file(path, what)


def run(args) -> int:
    from magnet_engine.playdiffusion import PlayDiffusion, write_pcm16

    start = time.perf_counter()
    _check_paths(args)
    if args.mode == "edit":
        request = dict(audio=args.audio, input_text=args.input_text, output_text=args.output_text,
                       input_word_times=_word_times(args.word_times), **_settings(args))
        model = PlayDiffusion(args.model, device=args.device, compile=args.compile, cuda_graphs=args.cuda_graphs)
        sr, pcm = model.inpaint(request, seed=args.seed)
    elif args.mode == "tts":
        model = PlayDiffusion(args.model, device=args.device, compile=args.compile, cuda_graphs=args.cuda_graphs)
        sr, pcm = model.tts(dict(output_text=args.text, voice=args.voice, **_settings(args)), seed=args.seed)
    else:
        model = PlayDiffusion(args.model, device=args.device, compile=args.compile, cuda_graphs=args.cuda_graphs)
        sr, pcm = model.rvc(dict(source_speech=args.source, target_voice=args.voice))
    path = write_pcm16(args.output, pcm, sr)
    print(f"wrote {path}: {len(pcm) / sr:.2f} s at {sr} Hz in {time.perf_counter() - start:.2f} s")
    return 0


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    from magnet_engine.errors import MagnetEngineError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except MagnetEngineError as exc:   # bad input, model or option: one line, no traceback
        print(f"magnet-engine speech: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:             # the file system failed under us (disk full, permissions changed)
        print(f"magnet-engine speech: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
