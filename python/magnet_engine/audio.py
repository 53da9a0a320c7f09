"""Audio files in and out (soundfile). Writes are atomic: a temporary file, then a rename.

Reads take regular files only (a FIFO, device or directory is refused before it is opened
for reading, so it cannot block or stream without end), and uploads are checked from their
header (rate, channels, length) before any sample is decoded, then decoded up to that bound
only. Resampling is soxr's (libsoxr, polyphase with a windowed-sinc design): its cost is
linear in the clip's length whatever the two rates, unlike an exact rational polyphase bank
whose size follows rate / gcd(rate, new rate).

`audio_write` is audiocraft's `audiocraft.data.audio.audio_write`, same arguments and
normalisation strategies, written through soundfile (libsndfile) instead of an ffmpeg pipe.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import stat
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


def check_input_file(path: tp.Union[str, os.PathLike], what: str, max_bytes: tp.Optional[int] = None) -> Path:
    """`path` if it names a regular file (of at most `max_bytes`); InvalidInputError saying what
    it is otherwise (missing, a directory, a FIFO, a device ...). Nothing is opened."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise InvalidInputError(f"{what} {path}: {exc.strerror}") from None
    _check_regular(st, path, what, max_bytes)
    return path


def _check_regular(st: os.stat_result, path, what: str, max_bytes: tp.Optional[int]) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise InvalidInputError(f"{what} {path}: it is {kind}; give a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise InvalidInputError(f"{what} {path}: {st.st_size} bytes; the limit is {max_bytes}")


def open_input_file(path: tp.Union[str, os.PathLike], what: str, max_bytes: tp.Optional[int] = None) -> tp.BinaryIO:
    """A regular file opened for reading, checked on the open descriptor too: a path swapped
    for a FIFO after the check cannot block the open (O_NONBLOCK) nor be read."""
    path = check_input_file(path, what, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InvalidInputError(f"{what} {path}: {exc.strerror}") from None
    try:
        _check_regular(os.fstat(fd), path, what, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_input_file(path: tp.Union[str, os.PathLike], what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (a file growing past it is refused too)."""
    with open_input_file(path, what, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidInputError(f"{what} {path}: over the limit of {max_bytes} bytes")
    return data


def read_audio(source, what: tp.Optional[str] = None) -> tuple[torch.Tensor, int]:
    """Audio file (a path to a regular file, or a binary file object such as an upload's bytes)
    -> ([C, samples] float32, sample_rate). what: how errors name it (default: the path)."""
    import soundfile as sf

    if hasattr(source, "read"):
        return _read(sf, source, what or "the audio")
    with open_input_file(source, what or "audio file") as f:
        return _read(sf, f, what or f"audio file {source}")


def _read(sf, f, what: str) -> tuple[torch.Tensor, int]:
    try:
        data, sr = sf.read(f, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError variants
        raise InvalidInputError(f"cannot read {what}: {exc}") from exc
    return torch.from_numpy(data.T.copy()), int(sr)


@dataclasses.dataclass(frozen=True)
class AudioLimits:
    """What an uploaded clip may be; `read_audio_upload` checks it from the header first."""

    max_seconds: float
    min_sample_rate: int = 8000
    max_sample_rate: int = 192000
    max_channels: int = 2


# libsndfile's frame count for a stream that does not say its length (a FLAC with total_samples 0)
_UNKNOWN_FRAMES = 2 ** 62


class AudioTooLongError(InvalidInputError):
    """A clip longer than its limit, said by its header or found while decoding."""


def read_audio_upload(data: bytes, limits: AudioLimits, what: str = "the uploaded audio") -> tuple[torch.Tensor, int]:
    """An upload's bytes -> ([C, samples] float32, rate), refused from its header (rate, channels,
    frames) before any sample is decoded, and decoded up to the limit only: a header that
    understates its length (or says nothing, as a streamed FLAC may) cannot make it decode more.
    Blocking (libsndfile): call it off the event loop."""
    import soundfile as sf

    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception as exc:  # LibsndfileError / RuntimeError: not a format libsndfile reads
        raise InvalidInputError(f"cannot read {what}: {exc}") from None
    with f:
        rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
        if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
            raise InvalidInputError(f"{what}: sample rate {rate} Hz is outside [{limits.min_sample_rate}, "
                                    f"{limits.max_sample_rate}] Hz")
        if not 1 <= channels <= limits.max_channels:
            raise InvalidInputError(f"{what}: {channels} channels; at most {limits.max_channels}")
        longest = math.floor(limits.max_seconds * rate + 1e-6)
        if longest < frames < _UNKNOWN_FRAMES:
            raise AudioTooLongError(f"{what} is {frames / rate:g} s; the limit is {limits.max_seconds:g} s")
        try:
            samples = f.read(frames=longest + 1, dtype="float32", always_2d=True)   # [samples, C]
        except Exception as exc:
            raise InvalidInputError(f"cannot decode {what}: {exc}") from None
    if samples.shape[0] > longest:
        raise AudioTooLongError(f"{what} decodes to more than the limit of {limits.max_seconds:g} s")
    if samples.shape[0] == 0:
        raise InvalidInputError(f"{what} holds no samples")
    if not np.isfinite(samples).all():
        raise InvalidInputError(f"{what} holds NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(samples.T)), rate


def resample(wav: torch.Tensor, rate: int, new_rate: int) -> torch.Tensor:
    """[C, samples] float at `rate` -> [C, about samples * new_rate / rate] float32 at `new_rate`
    (soxr's "HQ" recipe: 20-bit precision)."""
    if rate == new_rate:
        return wav
    import soxr

    out = soxr.resample(wav.detach().float().cpu().numpy().T, rate, new_rate, quality="HQ")   # [samples, C]
    return torch.from_numpy(np.ascontiguousarray(out.T))


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
