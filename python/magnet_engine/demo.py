"""Random-weight models in the published layout, for the embedded demo and for tests.

Nothing can be downloaded here, so the demo builds (once, then caches) a checkpoint
directory that the loader cannot tell from a real one: an LM of a published architecture
with seeded random weights, a real-architecture EnCodec with random weights, and a small
random T5 encoder with a sentencepiece tokenizer trained on the spot. Untrained weights
make noise, not music; point `--model` at a real checkpoint for music.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import typing as tp
from pathlib import Path

from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine.random_weights import build_random_t5, random_compression_package, random_lm_package

T5_DIR = "t5"
DEFAULT_CACHE = Path("~/.cache/magnet_engine")   # where the demo models are built, once

# name -> (LM architecture, codec n_filters, T5 (d_model, layers, heads, d_ff))
PRESETS: tp.Dict[str, dict] = {
    "tiny": dict(arch="tiny", codec_filters=4, t5=dict(d_model=32, num_layers=2, num_heads=4, d_ff=64)),
    # The real small/medium LM and the real 32 kHz codec; a 2-layer T5 of t5-base's width.
    "small": dict(arch="small", codec_filters=64, t5=dict(d_model=768, num_layers=2, num_heads=12, d_ff=3072)),
    "medium": dict(arch="medium", codec_filters=64, t5=dict(d_model=768, num_layers=2, num_heads=12, d_ff=3072)),
}


def build_random_model(directory: tp.Union[str, Path], preset: str = "tiny", *, duration: float = 10,
                       sample_rate: int = 32000, seed: int = 0, kind: str = "magnet") -> Path:
    """Write a random-weight model directory (state_dict.bin, compression_state_dict.bin, t5/).

    kind: 'magnet', 'hybrid' (hybrid-MAGNeT) or 'musicgen' (a MusicGen LM: a prefix model or
    rescorer for the others)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, found {preset!r}")
    spec = PRESETS[preset]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A `t5/` folder beside the checkpoint is picked up by the loader (see api.from_pretrained).
    build_random_t5(directory / T5_DIR, seed=seed, **spec["t5"])
    ratios = (8, 5, 4, 4) if sample_rate == 32000 else (8, 5, 4, 2)
    codec = random_compression_package(sample_rate=sample_rate, n_filters=spec["codec_filters"], ratios=ratios,
                                       seed=seed)
    lm = random_lm_package(**ckpt.ARCHITECTURES[spec["arch"]], d_t5=spec["t5"]["d_model"],
                                duration=duration, sample_rate=sample_rate, seed=seed, kind=kind)
    return ckpt.save_checkpoint(directory, lm, codec)


def cached_demo_model(cache_dir: tp.Union[str, Path], preset: str, duration: float = 10,
                      kind: str = "magnet") -> Path:
    """The demo's model directory, built on first use; a half-built one is never reused."""
    name = f"demo-{preset}-{duration:g}s" if kind == "magnet" else f"demo-{preset}-{kind}-{duration:g}s"
    return build_once(Path(cache_dir).expanduser() / name,
                      lambda staging: build_random_model(staging, preset, duration=duration, kind=kind),
                      {"preset": preset, "duration": duration, "kind": kind})


def build_once(target: Path, build: tp.Callable[[Path], tp.Any], stamp: dict) -> Path:
    """`target`, built by build(staging directory) on first use and renamed into place with
    a BUILT.json stamp; a half-built directory is never reused."""
    if (target / "BUILT.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        (staging / "BUILT.json").write_text(json.dumps(stamp))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
