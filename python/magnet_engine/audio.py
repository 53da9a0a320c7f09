"""Audio files in and out (soundfile). Writes are atomic: a temporary file, then a rename."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from magnet_engine.engine.files import atomic_write
from magnet_engine.errors import InvalidInputError


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


def read_audio(path) -> tuple[torch.Tensor, int]:
    """Audio file -> ([C, samples] float32, sample_rate)."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError variants
        raise InvalidInputError(f"cannot read audio file {path}: {exc}") from exc
    return torch.from_numpy(data.T.copy()), int(sr)
