"""Speaker embedding for the vocoder: Tacotron mel + conditioning encoder (docs/model.md §13.6).

    wave [L] @ 24 kHz -> 30 s chunks (tail dropped; a short clip zero-padded to 30 s)
      -> per chunk: peak-normalise -> mel [100, 2813] -> encoder -> mean over time [C]
      -> mean over chunks -> [1, C]

Encoder: Conv1d(mel -> C, k5, s2, p3), then `depth` blocks of
    x += proj(attn(qkv(GroupNorm x)))     heads = C / 64, "legacy" head-major q|k|v split
    x += W_down gelu(W_up dwconv3(GroupNorm x))
Upstream runs the attention and MLP halves under `torch.autocast(device)`: bf16 on CPU,
fp16 on CUDA; GroupNorm and the residual stay fp32. `autocast=False` runs everything in fp32.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magnet_engine.engine.errors import CheckpointError, InvalidInputError

SAMPLE_RATE = 24000
CLIP_SECONDS = 30.0
N_FFT, HOP, N_MELS, F_MAX = 1024, 256, 100, 12000.0
MEL_MIN, MEL_MAX = -11.512925148010254, 2.3143386840820312  # "Tacotron" normalisation range
# Per-bin mean / std after the range normalisation ("UNIV_MEL"), as upstream ships them.
UNIV_MEL_MEAN = [
    -0.362987, -0.275609, -0.214799, -0.176162, -0.176303, -0.195624, -0.188264, -0.217266, -0.206322, -0.236198,
    -0.230255, -0.242623, -0.248435, -0.250025, -0.271565, -0.264910, -0.300047, -0.295445, -0.324223, -0.327090,
    -0.338537, -0.347669, -0.342723, -0.363253, -0.345126, -0.369813, -0.355268, -0.369003, -0.365699, -0.368747,
    -0.369996, -0.378038, -0.367995, -0.379941, -0.379833, -0.381345, -0.383270, -0.384336, -0.384647, -0.384184,
    -0.385162, -0.388269, -0.384823, -0.394650, -0.391810, -0.397424, -0.396999, -0.400669, -0.406701, -0.411146,
    -0.415520, -0.415664, -0.417809, -0.416316, -0.415557, -0.414445, -0.416581, -0.419495, -0.425628, -0.434221,
    -0.445579, -0.454643, -0.460440, -0.463075, -0.465277, -0.466486, -0.467568, -0.471848, -0.478277, -0.488004,
    -0.499497, -0.512124, -0.523796, -0.534602, -0.545295, -0.555952, -0.564757, -0.571438, -0.574683, -0.576825,
    -0.578338, -0.582372, -0.587675, -0.591264, -0.594200, -0.597116, -0.601883, -0.608677, -0.614729, -0.622859,
    -0.636373, -0.629170, -0.639739, -0.663590, -0.689774, -0.711324, -0.729637, -0.757470, -0.792535, -0.827708,
]
UNIV_MEL_STD = [
    0.484793, 0.558647, 0.617948, 0.650929, 0.653919, 0.645172, 0.652674, 0.635840, 0.642193, 0.624010,
    0.627954, 0.620662, 0.618184, 0.617792, 0.604684, 0.606978, 0.583991, 0.584550, 0.566241, 0.563311,
    0.555793, 0.549769, 0.551699, 0.538963, 0.548138, 0.532589, 0.539796, 0.531262, 0.532754, 0.531231,
    0.530600, 0.526173, 0.532573, 0.526033, 0.525931, 0.524744, 0.523234, 0.521965, 0.521219, 0.521147,
    0.519988, 0.517817, 0.519525, 0.513181, 0.514215, 0.510456, 0.510157, 0.507440, 0.503230, 0.499716,
    0.496558, 0.496374, 0.495435, 0.496737, 0.497759, 0.499278, 0.498958, 0.497970, 0.494302, 0.488204,
    0.479295, 0.471905, 0.466698, 0.464347, 0.463399, 0.463593, 0.463878, 0.462138, 0.458525, 0.451914,
    0.443669, 0.434572, 0.426364, 0.418768, 0.411126, 0.403654, 0.398076, 0.395058, 0.394470, 0.394390,
    0.393910, 0.391522, 0.387822, 0.386098, 0.385490, 0.384492, 0.380791, 0.375684, 0.373089, 0.368683,
    0.359776, 0.373195, 0.379856, 0.377202, 0.370769, 0.364200, 0.355851, 0.338883, 0.313291, 0.283525,
]


class TacotronMel(nn.Module):
    """wave [B, L] in [-10, 10] -> normalised log-mel [B, 100, 1 + L // 256]."""

    def __init__(self):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        eye = np.fft.fft(np.eye(N_FFT))
        cutoff = N_FFT // 2 + 1
        basis = np.vstack([np.real(eye[:cutoff]), np.imag(eye[:cutoff])])
        n = np.arange(N_FFT)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)  # scipy get_window('hann', fftbins=True)
        basis = torch.tensor(basis[:, None, :], dtype=torch.float32) * torch.tensor(window, dtype=torch.float32)
        self.register_buffer("stft_basis", basis, persistent=False)  # [2 * 513, 1, 1024]
        mel = mel_filter_bank(num_frequency_bins=cutoff, num_mel_filters=N_MELS, min_frequency=0.0,
                              max_frequency=F_MAX, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        self.register_buffer("mel_basis", torch.tensor(mel.T, dtype=torch.float32), persistent=False)  # [100, 513]
        self.register_buffer("mean", torch.tensor(UNIV_MEL_MEAN).view(1, -1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(UNIV_MEL_STD).view(1, -1, 1), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.abs().max() > 10:
            raise InvalidInputError("voice encoder: audio samples must lie in [-10, 10]")
        wave = wave.clamp(-1, 1)
        padded = F.pad(wave[:, None, None], (N_FFT // 2, N_FFT // 2, 0, 0), mode="reflect")[:, :, 0]
        ft = F.conv1d(padded, self.stft_basis, stride=HOP)
        cutoff = N_FFT // 2 + 1
        magnitude = torch.sqrt(ft[:, :cutoff] ** 2 + ft[:, cutoff:] ** 2)
        magnitude = torch.nan_to_num(magnitude, nan=0.0, posinf=0.0, neginf=0.0)
        mel = torch.log(torch.clamp(torch.matmul(self.mel_basis, magnitude), min=1e-5))
        mel = 2 * ((mel - MEL_MIN) / (MEL_MAX - MEL_MIN)) - 1
        return (mel - self.mean) / self.std


def group_count(channels: int) -> int:
    groups = 32 if channels > 64 else 16 if channels > 16 else 8
    while channels % groups:
        groups //= 2
    return groups


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.heads = channels // 64
        self.attn_norm = nn.GroupNorm(group_count(channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attn_proj_out = nn.Conv1d(channels, channels, 1)
        self.ffnorm = nn.GroupNorm(group_count(channels), channels)
        self.mlp = nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1, groups=channels),
                                 nn.Conv1d(channels, 4 * channels, 1), nn.GELU(), nn.Conv1d(4 * channels, channels, 1))

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        b, width, t = qkv.shape
        ch = width // (3 * self.heads)
        q, k, v = qkv.reshape(b * self.heads, 3 * ch, t).split(ch, dim=1)  # heads split before q|k|v
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, t)

    def forward(self, x: torch.Tensor, autocast: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=autocast):
            h = self.attn_proj_out(self.attention(self.qkv(self.attn_norm(x))))
        x = x + h
        with torch.autocast(x.device.type, enabled=autocast):
            h = self.mlp(self.ffnorm(x))
        return x + h


class VoiceEncoder(nn.Module):
    def __init__(self, mel_dim: int, model_dim: int, depth: int):
        super().__init__()
        if model_dim % 64:
            raise CheckpointError(f"voice encoder: model_dim {model_dim} must be a multiple of 64 (heads = C / 64)")
        self.init = nn.Sequential(nn.Conv1d(mel_dim, model_dim, kernel_size=5, padding=3, stride=2))
        self.attn = nn.ModuleList(Block(model_dim) for _ in range(depth))
        self.mel = TacotronMel()

    def encode(self, mel: torch.Tensor, autocast: bool = True) -> torch.Tensor:
        """mel [B, 100, F] -> [B, C]."""
        h = self.init(mel)
        for block in self.attn:
            h = block(h, autocast)
        return h.mean(dim=2)

    @torch.inference_mode()
    def forward(self, wave: torch.Tensor, autocast: bool = True) -> torch.Tensor:
        """wave [C_audio, L] @ 24 kHz -> embedding [1, C] fp32 (docs/model.md §13.6 steps 1-3)."""
        clip = int(SAMPLE_RATE * CLIP_SECONDS)
        if wave.dim() != 2 or wave.shape[-1] == 0:
            raise InvalidInputError(f"voice encoder: expected audio [channels, samples], found {tuple(wave.shape)}")
        if wave.shape[-1] > clip:  # whole 30 s chunks only: the tail is dropped (upstream)
            n = wave.shape[-1] // clip
            chunks = torch.stack([wave[:, i * clip:(i + 1) * clip] for i in range(n)])
        else:
            chunks = F.pad(wave, (0, clip - wave.shape[-1]))[None]
        chunks = chunks.float().mean(1, keepdim=True)  # [n, 1, clip] mono
        embeddings = []
        for chunk in chunks:
            peak = chunk.abs().max()
            if peak == 0:
                continue
            emb = self.encode(self.mel(chunk / peak), autocast)
            if not torch.isnan(emb).any():
                embeddings.append(emb)
        if not embeddings:
            raise InvalidInputError("voice encoder: the voice audio is silent (or gives NaN): no embedding")
        return torch.cat(embeddings).mean(0, keepdim=True)


def load_voice_encoder(package: dict) -> VoiceEncoder:
    """From `voice_encoder_1992000.pt`'s {"config", "model_state_dict"}, strictly."""
    try:
        cfg = package["config"]
        model = VoiceEncoder(int(cfg["mel_dim"]), int(cfg["model_dim"]), int(cfg["voice_encoder_depth"]))
        state = package["model_state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"voice encoder checkpoint: expected config (mel_dim, model_dim, voice_encoder_depth) "
                              f"and model_state_dict ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"voice encoder checkpoint does not match its config: {e}") from None
    return model.eval()
