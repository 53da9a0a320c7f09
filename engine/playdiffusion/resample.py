"""Band-limited resampling with torchaudio's default kernel (Hann-windowed sinc, 6 zero
crossings, rolloff 0.99), which upstream uses for both the 16 kHz units and the 24 kHz voice
embedding. torchaudio itself is not a dependency: its kernel is rebuilt here (computed in
float64 and cast to float32, as `torchaudio.transforms.Resample` does) and applied with the
same strided conv.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

WIDTH_ZEROS = 6
ROLLOFF = 0.99


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
    kernel, width = _kernel(orig, new)
    shape = wave.shape
    flat = wave.reshape(-1, shape[-1]).float()
    out = F.conv1d(F.pad(flat, (width, width + orig))[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[..., :math.ceil(new * shape[-1] / orig)]
    return out.reshape(*shape[:-1], out.shape[-1])
