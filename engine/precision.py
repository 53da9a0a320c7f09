"""What precision the transformer runs in: the options, the choice by what this device does
fastest ("auto"), and the casts (including int8 quantization of the linear layers).

Options (name -> activations' matmul dtype, residual-stream dtype):
  fp32        exact; the reference's CPU arithmetic
  fp16-mixed  the reference's CUDA autocast: fp16 matmuls and attention, fp32 residual and norms
  bf16-mixed  the same with bf16
  bf16, fp16  the whole transformer in low precision, residual included
  int8        CPU: every linear layer of the transformer with int8 weights (per output channel)
              and int8 per-token activations, int32 accumulation (kernels/int8.py); residual,
              norms, attention softmax in fp32
Embeddings, the output norm, the stage heads and sampling stay fp32 in every mode.

"auto" (the CPU default) picks among fp32, bf16 and int8. Capability flags decide where they
can: bf16 is never a candidate on a CPU without native bf16 (AMX or avx512_bf16), where it is
emulated at a few percent of fp32's speed. The rest is measured: the model's own matmul
shapes, each candidate timed in alternating rounds (~0.1-0.3 s for the published sizes, once
per process and shape), and the most precise candidate within `AUTO_MARGIN` of the fastest
wins. Models too small for precision to matter (dim < `AUTO_MIN_DIM`) run fp32 without a
measurement: their step time is launch overhead, and the choice stays deterministic.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import typing as tp
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from magnet_engine.engine.errors import InvalidOptionError
from magnet_engine.kernels import int8 as int8_kernels

PRECISIONS: tp.Dict[str, tp.Tuple[torch.dtype, torch.dtype]] = {
    "fp32": (torch.float32, torch.float32),
    "fp16-mixed": (torch.float16, torch.float32),
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "int8": (torch.float32, torch.float32),
}
AUTO = "auto"
CHOICES = (AUTO, *PRECISIONS)        # what the API, CLI and server accept
AUTO_CANDIDATES = ("fp32", "bf16", "int8")   # most precise first
AUTO_MARGIN = 1.05   # a less precise candidate must be more than 5% faster than every more precise one
AUTO_MIN_DIM = 512   # below this model width auto is fp32 (see the module docstring)
AUTO_ROWS = 128      # rows of the measured matmuls: past ~64 rows the rate no longer depends on it
AUTO_ROUNDS = 5


class PrecisionWarning(UserWarning):
    """An explicit precision this device has no native support for (it runs, slowly)."""


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What this CPU can do, as the engine's choices and every benchmark result record it."""
    model: str
    capability: str              # torch's kernel dispatch level (ATEN_CPU_CAPABILITY caps it)
    flags: tp.Tuple[str, ...]    # the ISA extensions below that /proc/cpuinfo lists
    threads: int

    ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile",
           "avx512_fp16")

    # The bf16/fp16 instructions are AVX-512 encodings: a process whose dispatch is held to
    # AVX2 (ATEN_CPU_CAPABILITY=avx2, as CI's second pass does) emulates them like a CPU without.
    @property
    def native_bf16(self) -> bool:
        return ("amx_bf16" in self.flags or "avx512_bf16" in self.flags) and self.capability.startswith("AVX512")

    @property
    def native_fp16(self) -> bool:
        return "avx512_fp16" in self.flags and self.capability.startswith("AVX512")

    def as_dict(self) -> tp.Dict[str, tp.Any]:
        return {"model": self.model, "capability": self.capability, "threads": self.threads,
                **{f: f in self.flags for f in self.ISA}}


@functools.lru_cache(maxsize=1)
def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_info() -> CpuInfo:
    """This CPU's model name and ISA flags (Linux /proc/cpuinfo; empty elsewhere), torch's
    dispatch level and its thread count (read now: the thread count may change)."""
    model, flags = "", set()
    for line in _cpuinfo_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    if not model:
        import platform
        model = platform.processor() or platform.machine()
    return CpuInfo(model=model, capability=torch.backends.cpu.get_cpu_capability(),
                   flags=tuple(f for f in CpuInfo.ISA if f in flags), threads=torch.get_num_threads())


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """The precision a model runs in and why; `timings_ms` holds the measurement, if any."""
    precision: str
    requested: str
    reason: str
    timings_ms: tp.Mapping[str, float] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> tp.Dict[str, tp.Any]:
        return {"precision": self.precision, "requested": self.requested, "reason": self.reason,
                "timings_ms": dict(self.timings_ms)}


def default_precision(device: torch.device) -> str:
    """CUDA: fp16 matmuls with an fp32 residual stream, as the reference's autocast; CPU: auto."""
    return "fp16-mixed" if device.type == "cuda" else AUTO


def check_precision(precision: str) -> str:
    """A concrete precision (not 'auto'), or InvalidOptionError."""
    if precision not in PRECISIONS:
        raise InvalidOptionError(f"precision must be one of {sorted(PRECISIONS)}, found {precision!r}")
    return precision


def choose_precision(requested: tp.Optional[str], device: torch.device, dim: int, ffn_dim: int,
                     measure: tp.Optional[tp.Callable[[int, int, tp.Tuple[str, ...]], tp.Dict[str, float]]] = None
                     ) -> PrecisionChoice:
    """The precision a model of width `dim` (FFN `ffn_dim`) runs in on `device`.

    requested: None (the device's default), 'auto', or one of PRECISIONS (honoured; on a
    CPU without native support for it, a one-line PrecisionWarning). measure: the timing
    function (default `measure_matmuls`), replaceable so the rule can be tested exactly."""
    device = torch.device(device)
    requested = default_precision(device) if requested is None else requested
    if requested not in CHOICES:
        raise InvalidOptionError(f"precision must be one of {list(CHOICES)}, found {requested!r}")
    if device.type != "cpu":
        if requested == "int8":
            raise InvalidOptionError("precision 'int8' is a CPU path; on CUDA use fp16-mixed, bf16-mixed, bf16 or fp16")
        if requested == AUTO:
            return PrecisionChoice("fp16-mixed", AUTO, "fp16-mixed: CUDA's default, fp16 matmuls with an fp32 "
                                                       "residual stream, as the reference's autocast")
        return PrecisionChoice(requested, requested, f"{requested}: as requested")
    info = cpu_info()
    if requested != AUTO:
        native = {"bf16": info.native_bf16, "fp16": info.native_fp16}.get(requested.split("-")[0], True)
        if not native:
            warnings.warn(f"precision {requested!r} on a CPU without native {requested.split('-')[0]} "
                          f"({info.model}): it is emulated and runs far slower than fp32; "
                          f"'auto' picks the fastest this CPU has", PrecisionWarning, stacklevel=3)
        return PrecisionChoice(requested, requested, f"{requested}: as requested")
    if dim < AUTO_MIN_DIM:
        return PrecisionChoice("fp32", AUTO, f"fp32: a model this narrow (dim {dim} < {AUTO_MIN_DIM}) spends its "
                                             "step on overhead, not matmuls; fp32 is exact")
    candidates = tuple(c for c in AUTO_CANDIDATES if c != "bf16" or info.native_bf16)
    timings = (measure or measure_matmuls)(dim, ffn_dim, candidates)
    fastest = min(timings.values())
    chosen = next(c for c in candidates if timings[c] <= fastest * AUTO_MARGIN)
    shown = ", ".join(f"{c} {timings[c]:.1f} ms" for c in candidates)
    reason = (f"{chosen}: {timings['fp32'] / timings[chosen]:.2f}x fp32 on this model's matmul shapes "
              f"({shown}; {info.threads} threads, {info.capability})")
    if not info.native_bf16:
        reason += "; bf16 not tried: this CPU has no native bf16 (AMX or avx512_bf16)"
    return PrecisionChoice(chosen, AUTO, reason, timings)


@functools.lru_cache(maxsize=16)
def _measured(dim: int, ffn_dim: int, candidates: tp.Tuple[str, ...], threads: int,
              capability: str) -> tp.Tuple[tp.Tuple[str, float], ...]:
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(AUTO_ROWS, dim, generator=gen), torch.randn(AUTO_ROWS, ffn_dim, generator=gen)
    inputs = (x, x, h)                                                     # each weight's input rows
    weights = [torch.randn(3 * dim, dim, generator=gen) / dim ** 0.5,      # packed q|k|v
               torch.randn(ffn_dim, dim, generator=gen) / dim ** 0.5,      # linear1
               torch.randn(dim, ffn_dim, generator=gen) / ffn_dim ** 0.5]  # linear2
    runs: tp.Dict[str, tp.Callable[[], None]] = {}
    if "fp32" in candidates:
        runs["fp32"] = lambda: [F.linear(a, w) for a, w in zip(inputs, weights)]
    if "bf16" in candidates:
        pairs = [(a.bfloat16(), w.bfloat16()) for a, w in zip(inputs, weights)]
        runs["bf16"] = lambda: [F.linear(a, w) for a, w in pairs]
    if "int8" in candidates:
        qmax = int8_kernels.weight_qmax()
        packed = [(a, *int8_kernels.quantize_weight(w, qmax)) for a, w in zip(inputs, weights)]
        runs["int8"] = lambda: [int8_kernels.int8_linear(a, q, s) for a, q, s in packed]
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for name, run in runs.items():   # warm-up: first-call allocations and oneDNN primitive creation
            run()
        for _ in range(AUTO_ROUNDS):      # alternating, so a burst of load hits every candidate alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return tuple(best.items())


def measure_matmuls(dim: int, ffn_dim: int, candidates: tp.Tuple[str, ...]) -> tp.Dict[str, float]:
    """Best-of-rounds milliseconds of one layer's projections (q|k|v, linear1, linear2) on
    `AUTO_ROWS` rows per candidate precision; cached per process, shape and thread count."""
    return dict(_measured(dim, ffn_dim, tuple(candidates), torch.get_num_threads(),
                          torch.backends.cpu.get_cpu_capability()))


# ----------------------------------------------------------------------------- int8 layers
class Int8Linear(nn.Module):
    """A linear layer with int8 weights per output channel (kernels/int8.py). `rows` selects a
    contiguous block of output channels, as the packed attention projection needs (q | k | v)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: tp.Optional[torch.Tensor]):
        super().__init__()
        self.register_buffer("qweight", qweight)   # [N, K] int8
        self.register_buffer("scale", scale)       # [N] fp32
        self.register_buffer("bias", bias)         # [N] fp32 or None
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: tp.Optional[torch.Tensor]) -> "Int8Linear":
        qweight, scale = int8_kernels.quantize_weight(weight, int8_kernels.weight_qmax())
        return cls(qweight, scale, None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor, rows: slice = slice(None), norm: tp.Optional[nn.LayerNorm] = None,
                gelu: bool = False, residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """residual + gelu(norm(x) @ Wᵀ + b), each part optional, in one fused op (kernels/int8.py)."""
        bias = None if self.bias is None else self.bias[rows]
        weight, shift, eps = (None, None, 1e-5) if norm is None else (norm.weight, norm.bias, norm.eps)
        return int8_kernels.int8_linear(x, self.qweight[rows], self.scale[rows], bias, weight, shift, eps, gelu,
                                        residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears_(module: nn.Module, release: tp.Callable[[torch.Tensor], None] = lambda t: None) -> nn.Module:
    """Replace every nn.Linear inside `module` by an Int8Linear, one at a time, in place;
    `release(weight)` is called on each fp32 weight once quantized (a memory-mapped
    checkpoint hands its pages back), so the fp32 copy never exists whole."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_weight(child.weight, child.bias))
            release(child.weight)
        else:
            quantize_linears_(child, release)
    return module


def fused_linear(linear: nn.Module, x: torch.Tensor, norm: tp.Optional[nn.LayerNorm] = None, gelu: bool = False,
                 residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """residual + gelu(linear(norm(x))), each part optional: an int8 layer fuses the norm into
    its activation quantization and GELU or the residual add into its rescale (one op, no fp32
    pass of its own); any other layer runs the parts in sequence, as the model reads."""
    if isinstance(linear, Int8Linear):
        return linear(x, norm=norm, gelu=gelu, residual=residual)
    x = x if norm is None else norm(x)
    y = linear(x.to(input_dtype(linear)))
    y = F.gelu(y) if gelu else y
    return y if residual is None else residual + y


def input_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer's input must be cast to (an int8 layer takes fp32)."""
    return torch.float32 if isinstance(linear, Int8Linear) else linear.weight.dtype


def is_quantized_module(module: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in module.modules())


def is_quantized(lm: nn.Module) -> bool:
    """True when a MAGNeT LM's transformer holds int8 layers."""
    return is_quantized_module(lm.transformer)


def cast_for_precision(lm: nn.Module, precision: str,
                       release: tp.Callable[[torch.Tensor], None] = lambda t: None) -> nn.Module:
    """Cast a MAGNeT LM's transformer IN PLACE for `precision` and return the LM: one copy of
    the weights, in the run precision (the runtime owns the LM; pass a copy to keep an fp32
    one). Embeddings, the output norm and the heads stay fp32, like the reference's autocast
    (docs/model.md §4); in the mixed modes the norms stay fp32 too (only matmul
    weights are cast); 'int8' quantizes every linear layer of the transformer, layer by layer,
    calling `release` on each fp32 weight once it is no longer needed. A no-op when the
    layers already are in `precision` (`from_pretrained` loads them so)."""
    matmul, residual = PRECISIONS[check_precision(precision)]
    if precision == "int8":
        if not is_quantized(lm):
            for layer in lm.transformer.layers:
                for attention in (layer.self_attn, layer.cross_attention):
                    attention.quantize_(release)
                quantize_linears_(layer, release)
        return lm
    if is_quantized(lm):
        raise InvalidOptionError(f"this LM was quantized to int8; it cannot run in {precision}")
    if residual == matmul:
        lm.transformer.to(matmul)
        return lm
    for layer in lm.transformer.layers:
        for part in (layer.self_attn, layer.cross_attention, layer.linear1, layer.linear2):
            part.to(matmul)
    return lm
