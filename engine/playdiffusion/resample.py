"""Band-limited resampling with torchaudio's default kernel (Hann-windowed sinc, 6 zero
crossings, rolloff 0.99), which upstream uses for both the 16 kHz units and the 24 kHz voice
embedding. torchaudio itself is not a dependency: its kernel is rebuilt here (computed in
float64 and cast to float32, as `torchaudio.transforms.Resample` does) and applied with the
same strided conv.

That kernel has (new / gcd) x (orig / gcd) phases: cheap between the usual rates (48 -> 16 kHz:
3 x 1) and enormous between coprime ones (16001 -> 16000 Hz: 256M taps, gigabytes). Rates whose
kernel would exceed `MAX_PHASES` first go to `BRIDGE_RATE` through libsoxr (polyphase, cost
independent of the gcd), then take the upstream kernel from there.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

WIDTH_ZEROS = 6
ROLLOFF = 0.99
MAX_PHASES = 1 << 22   # ~ kernel taps: 16 MB of fp32; 44.1 kHz -> 16 kHz needs 70k
BRIDGE_RATE = 48000


@functools.lru_cache(maxsize=16)
def _kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    base = min(orig, new) * ROLLOFF
    width = math.ceil(WIDTH_ZEROS * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t *= base
    t = t.clamp_(-WIDTH_ZEROS, WIDTH_ZEROS)
    window = torch.cos(t * math.pi / WIDTH_ZEROS / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0, dtype=torch.float64), t.sin() / t)
    kernels *= window * (base / orig)
    return kernels.float(), width


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """wave [..., N] float -> [..., ceil(N · new / orig)] at new_freq."""
    if orig_freq == new_freq:
        return wave
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    if orig * new > MAX_PHASES and orig_freq != BRIDGE_RATE:
        return resample(_soxr(wave, orig_freq, BRIDGE_RATE), BRIDGE_RATE, new_freq)
    kernel, width = _kernel(orig, new)
    shape = wave.shape
    flat = wave.reshape(-1, shape[-1]).float()
    out = F.conv1d(F.pad(flat, (width, width + orig))[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[..., :math.ceil(new * shape[-1] / orig)]
    return out.reshape(*shape[:-1], out.shape[-1])


def _soxr(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    import soxr

    flat = wave.reshape(-1, wave.shape[-1]).float().cpu().numpy().T          # [N, channels]
    out = torch.from_numpy(soxr.resample(flat, orig_freq, new_freq, quality="HQ").T.copy())
    return out.reshape(*wave.shape[:-1], out.shape[-1]).to(wave.device)
