"""The unit vocoder, "LDM-BigVGAN" (docs/model.md §13.7): units + speaker embedding -> waveform.

    x = Linear(centroids[units])ᵀ              [1, ar_tokens_dim, T]; nearest ×(codes_hop / ar_tokens_hop)
    x = x * scaler                              (use_scaler)
    x = mrf or simple upsampler(x)              [1, num_mels, T'] ("mel simulation")
    x = x * γ(s) + β(s)                         FiLM with the speaker embedding s
    x = BigVGAN(x)                              conv_pre, per rate: transposed conv + mean of AMP blocks,
                                                anti-aliased SnakeBeta, conv_post, tanh
Every size comes from the checkpoint's `params`. Weight-norm: the BigVGAN body's is folded
into plain weights once at load (upstream's remove_weight_norm); the upsampler's is kept and
recomputed on every call in the model's dtype, as upstream (quirk 11, docs/model.md §13.11).
"""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from magnet_engine.engine.errors import CheckpointError, ConfigError

LRELU_SLOPE = 0.1


class WNConv(nn.Module):
    """Conv1d / ConvTranspose1d with weight-norm parameters (weight_g, weight_v) over dim 0."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1, padding: int = 0,
                 transpose: bool = False, output_padding: int = 0, bias: bool = True):
        super().__init__()
        shape = (c_in, c_out, kernel) if transpose else (c_out, c_in, kernel)
        self.weight_v = nn.Parameter(torch.empty(shape))
        self.weight_g = nn.Parameter(torch.ones(shape[0], 1, 1))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.register_buffer("folded", None, persistent=False)
        self.transpose, self.stride, self.dilation = transpose, stride, dilation
        self.padding, self.output_padding = padding, output_padding

    def fold(self) -> None:
        """remove_weight_norm: compute g·v/‖v‖ once (in fp32, before any cast)."""
        self.folded = torch._weight_norm(self.weight_v, self.weight_g, 0).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.folded if self.folded is not None else torch._weight_norm(self.weight_v, self.weight_g, 0)
        if self.transpose:
            return F.conv_transpose1d(x, w, self.bias, self.stride, self.padding, self.output_padding)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation)


def same_padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class SnakeBeta(nn.Module):
    """x + sin²(αx) / (β + 1e-9); α = exp(α̃), β = exp(β̃) with log-scale parameters.
    Snake (no β) uses α for both."""

    def __init__(self, channels: int, logscale: bool, beta: bool):
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels)) if beta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        beta = alpha if self.beta is None else self.beta[None, :, None]
        if self.logscale:
            alpha, beta = torch.exp(alpha), torch.exp(beta)
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class _Filter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("filter", torch.zeros(1, 1, 12))  # Kaiser-sinc taps, from the checkpoint


class _Down(nn.Module):
    def __init__(self):
        super().__init__()
        self.lowpass = _Filter()


class Activation1d(nn.Module):
    """Anti-aliased activation: ×2 upsample (12-tap filter), act, low-pass ×2 downsample."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act
        self.upsample = _Filter()
        self.downsample = _Down()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (5, 5), mode="replicate")
        x = 2 * F.conv_transpose1d(x, self.upsample.filter.expand(c, -1, -1), stride=2, groups=c)
        x = self.act(x[..., 15:-15])
        x = F.pad(x, (5, 6), mode="replicate")
        return F.conv1d(x, self.downsample.lowpass.filter.expand(c, -1, -1), stride=2, groups=c)


class AMPBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tp.Sequence[int], activation: str, logscale: bool):
        super().__init__()
        self.convs1 = nn.ModuleList(WNConv(channels, channels, kernel, dilation=d, padding=same_padding(kernel, d))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(WNConv(channels, channels, kernel, padding=same_padding(kernel))
                                    for _ in dilations)
        self.activations = nn.ModuleList(
            Activation1d(SnakeBeta(channels, logscale, beta=activation == "snakebeta")) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            x = c2(self.activations[2 * j + 1](c1(self.activations[2 * j](x)))) + x
        return x


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tp.Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(WNConv(channels, channels, kernel, dilation=d, padding=same_padding(kernel, d))
                                   for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(F.leaky_relu(x, LRELU_SLOPE)) + x
        return x


class MRFUpsampler(nn.Module):
    KERNELS, DILATIONS = (3, 5, 7), ((1, 2), (2, 6), (3, 12))

    def __init__(self, channels: int, num_mels: int, stages: int, leaky: bool, mel_simulation: bool):
        super().__init__()
        self.leaky = leaky
        self.ups = nn.ModuleList(WNConv(channels >> i, channels >> (i + 1), 4, stride=2, padding=1, transpose=True)
                                 for i in range(stages))
        self.resblocks = nn.ModuleList(ResBlock2(channels >> (i + 1), k, d)
                                       for i in range(stages) for k, d in zip(self.KERNELS, self.DILATIONS))
        c1, c2 = channels >> stages, channels >> (stages + 1)
        outs = (c1, c1) if not mel_simulation else (c2, num_mels)
        self.post = nn.ModuleList([WNConv(c1, outs[0], 7, padding=3), WNConv(outs[0], outs[1], 7, padding=3)])

    def _act(self, x):
        return F.leaky_relu(x, LRELU_SLOPE) if self.leaky else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.KERNELS)
        for i, up in enumerate(self.ups):
            x = self._act(up(x))
            xs = self.resblocks[i * n](x)
            for j in range(1, n):
                xs += self.resblocks[i * n + j](x)
            x = xs / n
        x = self._act(x)
        for post in self.post:
            x = self._act(post(x))
        return x


class SimpleUpsampler(nn.Module):
    def __init__(self, ar_tokens_dim: int, num_mels: int, stages: int):
        super().__init__()
        self.scale = 2 ** stages
        self.projection = nn.Linear(ar_tokens_dim, num_mels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.projection(x.permute(0, 2, 1)).permute(0, 2, 1)


class _FiLMBranch(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.add_module("0", nn.Linear(c_in, c_out))

    def forward(self, s):
        return self._modules["0"](s)


class FiLM(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.gamma_nn = _FiLMBranch(c_in, c_out)
        self.beta_nn = _FiLMBranch(c_in, c_out)


class LookupTable(nn.Module):
    def __init__(self, codebook: int, width: int, ar_tokens_dim: int, scale: float | None):
        super().__init__()
        self.register_buffer("centroids", torch.zeros(codebook, width))
        self.projection = nn.Linear(width, ar_tokens_dim)
        self.scale = scale

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        x = self.projection(self.centroids[units]).permute(0, 2, 1)
        if self.scale is not None:  # scale_factor semantics (not size=): frame j reads ⌊j / scale⌋
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return x


class Vocoder(nn.Module):
    def __init__(self, h: dict, codebook: int, centroid_dim: int):
        super().__init__()
        try:
            self.sample_rate = int(h["sampling_rate"])
            ar_dim, num_mels = int(h["ar_tokens_dim"]), int(h["num_mels"])
            rates, kernels = list(h["upsample_rates"]), list(h["upsample_kernel_sizes"])
            ch0 = int(h["upsample_initial_channel"])
            rb_kernels, rb_dilations = list(h["resblock_kernel_sizes"]), list(h["resblock_dilation_sizes"])
            activation, logscale = h["activation"], bool(h["snake_logscale"])
            codes_hop, ar_hop, hop = int(h["codes_hop_size"]), int(h["ar_tokens_hop_size"]), int(h["hop_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"vocoder params: missing or malformed entry ({e})") from None
        if activation not in ("snake", "snakebeta"):
            raise ConfigError(f"vocoder params: activation {activation!r} is not supported (snake, snakebeta)")
        if h.get("use_snake_pre_processing", False):
            raise ConfigError("vocoder params: use_snake_pre_processing upsamplers are not supported")
        mel_simulation = not h.get("no_mel_simulation", False)
        body_in = num_mels if mel_simulation else ar_dim // 2
        self.lookup_table = LookupTable(codebook, centroid_dim, ar_dim,
                                        codes_hop / ar_hop if codes_hop != ar_hop else None)
        self.scaler = nn.Parameter(torch.full((1, 1), 0.02)) if h.get("use_scaler", False) else None
        stages = ar_hop // (2 * hop)
        self.upsampler: nn.Module | None = None
        if h.get("add_upsampler", True):
            self.upsampler = (MRFUpsampler(ar_dim, num_mels, stages, h.get("add_leaky_relu_in_mrf", True),
                                           mel_simulation)
                              if h.get("use_mrf", False) else SimpleUpsampler(ar_dim, num_mels, stages))
        self.cond_layer = (FiLM(int(h["speaker_cond_dim"]), body_in)
                           if h.get("use_ar_speaker_cond", False) else None)
        self.conv_pre = WNConv(body_in, ch0, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ModuleList([WNConv(ch0 >> i, ch0 >> (i + 1), k, stride=u, padding=u // 2 + u % 2,
                                  output_padding=u % 2, transpose=True)])
            for i, (u, k) in enumerate(zip(rates, kernels)))
        self.resblocks = nn.ModuleList(AMPBlock(ch0 >> (i + 1), k, d, activation, logscale)
                                       for i in range(len(rates)) for k, d in zip(rb_kernels, rb_dilations))
        ch = ch0 >> len(rates)
        self.activation_post = Activation1d(SnakeBeta(ch, logscale, beta=activation == "snakebeta"))
        self.conv_post = WNConv(ch, 1, 7, padding=3, bias=h.get("use_bias_at_final", True))
        self.tanh = h.get("use_tanh_at_final", True)
        self.num_kernels = len(rb_kernels)

    def fold_body_weight_norm(self) -> None:
        for module in [self.conv_pre, self.conv_post, *(u[0] for u in self.ups)]:
            module.fold()
        for block in self.resblocks:
            for conv in [*block.convs1, *block.convs2]:
                conv.fold()

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_pre.weight_v.dtype

    @torch.inference_mode()
    def forward(self, units: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        """units [1, T] int64 in [0, A), speaker [1, C] -> waveform [1, 1, samples] in [-1, 1]."""
        speaker = speaker.to(self.dtype)
        x = self.lookup_table(units)
        if self.scaler is not None:
            x = x * self.scaler
        if self.upsampler is not None:
            x = self.upsampler(x)
        if self.cond_layer is not None:
            x = x * self.cond_layer.gamma_nn(speaker)[:, :, None] + self.cond_layer.beta_nn(speaker)[:, :, None]
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs += self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x) if self.tanh else torch.clamp(x, -1.0, 1.0)


def load_vocoder(package: dict, dtype: torch.dtype = torch.float32) -> Vocoder:
    """From `v090_g_01105000`'s {"params", "generator"}: strict load, fold the body's
    weight-norm in fp32, then cast (upstream: fp16)."""
    if not isinstance(package, dict) or "params" not in package or "generator" not in package:
        raise CheckpointError("vocoder checkpoint: expected a dict with 'params' and 'generator'")
    state = package["generator"]
    centroids = state.get("lookup_table.centroids")
    if centroids is None or centroids.dim() != 2:
        raise CheckpointError("vocoder checkpoint: no 'lookup_table.centroids' [A, D] buffer")
    model = Vocoder(dict(package["params"]), centroids.shape[0], centroids.shape[1])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"vocoder checkpoint does not match its params: {e}") from None
    model.fold_body_weight_norm()
    return model.eval().to(dtype)
