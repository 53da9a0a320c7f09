"""Audio files in and out (soundfile). Writes are atomic: a temporary file, then a rename.

`audio_write` is audiocraft's `audiocraft.data.audio.audio_write`, same arguments and
normalisation strategies, written through soundfile (libsndfile) instead of an ffmpeg pipe.
"""
from __future__ import annotations

import io
import logging
import math
import os
import typing as tp
from pathlib import Path

import numpy as np
import torch

from magnet_engine.engine.files import atomic_write
from magnet_engine.errors import DependencyError, InvalidInputError, InvalidOptionError

logger = logging.getLogger(__name__)

STRATEGIES = ("peak", "clip", "rms", "loudness", "none", "")
# format -> (soundfile format, subtype, suffix)
FORMATS = {"wav": ("WAV", "PCM_16", ".wav"), "flac": ("FLAC", "PCM_16", ".flac"),
           "mp3": ("MP3", "MPEG_LAYER_III", ".mp3"), "ogg": ("OGG", "VORBIS", ".ogg")}
# libsndfile picks an MP3 CBR bitrate from its compression level, 0 -> 320 kbps down to 32 kbps
# at 1 (exclusive), snapping to the nearest bitrate of the MPEG table.
_MP3_KBPS = (320, 32)
# audiocraft's normalize_loudness: below this RMS a signal is left as it is.
_ENERGY_FLOOR = 2e-3


def _frames(wav: torch.Tensor) -> np.ndarray:
    """[C, samples] float tensor -> [samples, C] float32 array, clipped to [-1, 1]."""
    if wav.dim() != 2:
        raise InvalidInputError(f"expected a waveform [channels, samples], found shape {tuple(wav.shape)}")
    return wav.detach().float().clamp(-1, 1).cpu().numpy().T


def write_wav(path, wav: torch.Tensor, sample_rate: int) -> Path:
    """Write [C, samples] as 16-bit PCM WAV at `path`, atomically."""
    import soundfile as sf

    frames = _frames(wav)
    return atomic_write(path, lambda tmp: sf.write(tmp, frames, sample_rate, subtype="PCM_16", format="WAV"),
                        suffix=".wav")


def wav_bytes(wav: torch.Tensor, sample_rate: int) -> bytes:
    """[C, samples] -> the bytes of a 16-bit PCM WAV file."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, _frames(wav), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def read_audio(source, what: tp.Optional[str] = None) -> tuple[torch.Tensor, int]:
    """Audio file (a path, or a binary file object such as an upload's bytes) -> ([C, samples]
    float32, sample_rate). what: how errors name it (default: the path)."""
    import soundfile as sf

    try:
        data, sr = sf.read(source if hasattr(source, "read") else str(source), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError variants
        raise InvalidInputError(f"cannot read {what or f'audio file {source}'}: {exc}") from exc
    return torch.from_numpy(data.T.copy()), int(sr)


def audio_write(stem_name: tp.Union[str, os.PathLike], wav: torch.Tensor, sample_rate: int, format: str = "wav",
                mp3_rate: int = 320, ogg_rate: tp.Optional[int] = None, normalize: bool = True,
                strategy: str = "peak", peak_clip_headroom_db: float = 1, rms_headroom_db: float = 18,
                loudness_headroom_db: float = 14, loudness_compressor: bool = False, log_clipping: bool = True,
                make_parent_dir: bool = True, add_suffix: bool = True) -> Path:
    """Normalise wav [C, samples] (or [samples]) and write it to `stem_name` + suffix, atomically.

    audiocraft's contract: strategy 'peak' scales the peak to -peak_clip_headroom_db dBFS,
    'clip' clips there, 'rms' scales the mono RMS to -rms_headroom_db dBFS then clips,
    'loudness' scales to -loudness_headroom_db LUFS (ITU-R BS.1770-4, measured by pyloudnorm;
    tanh soft clipping with loudness_compressor) then clips, 'none' writes as is. With
    normalize=False, 'peak' and 'rms' only ever scale down. Returns the path written.
    """
    if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
        raise InvalidInputError(f"wav must be a float tensor, found {getattr(wav, 'dtype', type(wav).__name__)}")
    if wav.dim() == 1:
        wav = wav[None]
    elif wav.dim() != 2:
        raise InvalidInputError(f"wav must be [channels, samples] or [samples], found shape {tuple(wav.shape)}")
    if wav.shape[-1] == 0 or not bool(torch.isfinite(wav).all()):
        raise InvalidInputError("wav must hold at least one sample, all finite")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise InvalidInputError(f"sample_rate must be a positive int, found {sample_rate!r}")
    if format not in FORMATS:
        raise InvalidOptionError(f"format must be one of {sorted(FORMATS)}, found {format!r}")
    sf_format, subtype, suffix = FORMATS[format]
    options: tp.Dict[str, tp.Any] = {}
    if format == "mp3":
        high, low = _MP3_KBPS
        if isinstance(mp3_rate, bool) or not isinstance(mp3_rate, int) or not low <= mp3_rate <= high:
            raise InvalidOptionError(f"mp3_rate must be kbps in [{low}, {high}], found {mp3_rate!r}")
        options = dict(bitrate_mode="CONSTANT", compression_level=min((high - mp3_rate) / (high - low), 0.999))
    if format == "ogg" and ogg_rate is not None:
        raise InvalidOptionError("ogg_rate is not supported: libsndfile's Vorbis encoder picks the bitrate "
                                 "(audiocraft's default, ogg_rate=None, leaves it to the encoder too)")
    wav = normalize_audio(wav.detach().float().cpu(), normalize, strategy, peak_clip_headroom_db,
                          rms_headroom_db, loudness_headroom_db, loudness_compressor,
                          log_clipping=log_clipping, sample_rate=sample_rate, stem_name=str(stem_name))
    path = Path(str(stem_name) + (suffix if add_suffix else ""))
    if make_parent_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, _pcm16(wav), sample_rate, sf_format, subtype, options)
    return path


def normalize_audio(wav: torch.Tensor, normalize: bool = True, strategy: str = "peak",
                    peak_clip_headroom_db: float = 1, rms_headroom_db: float = 18, loudness_headroom_db: float = 14,
                    loudness_compressor: bool = False, log_clipping: bool = False,
                    sample_rate: tp.Optional[int] = None, stem_name: tp.Optional[str] = None) -> torch.Tensor:
    """wav [C, samples] float -> normalised by `strategy` (see `audio_write`); a new tensor."""
    if strategy not in STRATEGIES:
        raise InvalidOptionError(f"strategy must be one of {STRATEGIES}, found {strategy!r}")
    scale_peak = 10 ** (-peak_clip_headroom_db / 20)
    if strategy == "peak":
        peak = float(wav.abs().max())
        # silence stays silence (audiocraft would divide by zero)
        if peak > 0 and (normalize or scale_peak / peak < 1):
            wav = wav * (scale_peak / peak)
    elif strategy == "clip":
        wav = wav.clamp(-scale_peak, scale_peak)
    elif strategy == "rms":
        rms = float(wav.mean(dim=0).pow(2).mean().sqrt())
        rescaling = 10 ** (-rms_headroom_db / 20) / rms if rms > 0 else 1.0
        if normalize or rescaling < 1:
            wav = wav * rescaling
        wav = _clip(wav, log_clipping, stem_name)
    elif strategy == "loudness":
        if sample_rate is None:
            raise InvalidOptionError("loudness normalisation needs the sample rate")
        wav = _clip(normalize_loudness(wav, sample_rate, loudness_headroom_db, loudness_compressor),
                    log_clipping, stem_name)
    elif float(wav.abs().max()) >= 1:
        raise InvalidInputError(f"strategy {strategy!r} writes the samples as they are, so they must lie in "
                                f"(-1, 1); found a peak of {float(wav.abs().max()):.3g}")
    return wav


def normalize_loudness(wav: torch.Tensor, sample_rate: int, loudness_headroom_db: float = 14,
                       loudness_compressor: bool = False) -> torch.Tensor:
    """Scale wav [C, samples] to -loudness_headroom_db LUFS (integrated, gated, ITU-R BS.1770-4)."""
    if float(wav.pow(2).mean().sqrt()) < _ENERGY_FLOOR:
        return wav
    try:
        import pyloudnorm
    except ImportError as exc:
        raise DependencyError("strategy='loudness' needs pyloudnorm: pip install pyloudnorm") from exc
    meter = pyloudnorm.Meter(sample_rate)
    if wav.shape[-1] < meter.block_size * sample_rate:
        raise InvalidInputError(f"loudness is measured over {meter.block_size:g} s blocks; this clip has "
                                f"{wav.shape[-1] / sample_rate:.3g} s")
    loudness = meter.integrated_loudness(wav.double().numpy().T)
    if not math.isfinite(loudness):     # every block gated out as silence
        return wav
    out = wav * 10.0 ** ((-loudness_headroom_db - loudness) / 20.0)
    return torch.tanh(out) if loudness_compressor else out


def _clip(wav: torch.Tensor, log_clipping: bool, stem_name: tp.Optional[str]) -> torch.Tensor:
    peak = float(wav.abs().max())
    if log_clipping and peak > 1:
        logger.warning("CLIPPING %s happening with proba (a bit of clipping is okay): %s maximum scale: %s",
                       stem_name or "", float((wav.abs() > 1).float().mean()), peak)
    return wav.clamp(-1, 1)


def _pcm16(wav: torch.Tensor) -> np.ndarray:
    """[C, samples] float -> [samples, C] int16 as ffmpeg converts f32 to s16 (scale 2^15, round, saturate)."""
    return (wav.double() * 32768).round().clamp(-32768, 32767).to(torch.int16).numpy().T


def _atomic_write(path: Path, data: np.ndarray, sample_rate: int, sf_format: str, subtype: str,
                  options: tp.Dict[str, tp.Any]) -> None:
    import soundfile as sf

    atomic_write(path, lambda tmp: sf.write(tmp, data, sample_rate, subtype=subtype, format=sf_format, **options),
                 suffix=path.suffix)
