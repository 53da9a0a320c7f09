"""Int8 linear layer for the CPU: int8 weights per output channel, int8 activations per
token (quantized on the fly), int32 accumulation; optionally with the pre-norm before it and
GELU or the residual add after it, fused into the passes around the product.

Contract
--------
    quantize_weight(w [N, K] float, qmax) -> (qweight [N, K] int8, scale [N] fp32)
    int8_linear(x [..., K] fp32, qweight [N, K] int8, scale [N] fp32, bias [N] fp32 | None,
                norm_weight, norm_bias [K] fp32 | None, eps, gelu, residual [..., N] fp32 | None) -> [..., N] fp32

    y = (q_x @ qweightᵀ) · s_x · scale + bias, with s_x = max|x_row| / 127 per row of x,
    q_x = round(x / s_x) in [-127, 127], and the product accumulated exactly in int32;
    with norm_weight: x ← layer_norm(x, norm_weight, norm_bias, eps) first; with gelu:
    y ← gelu(y) (erf, F.gelu's default); with residual: y ← residual + y, last.

The integer product is PyTorch's own `torch._int_mm` (oneDNN on the CPU, the op torchao's
CPU int8 path calls too): measured on the model's shapes it beat `quantize_dynamic`
(fbgemm/oneDNN packed weights, per-tensor activations) and torchao's tensor subclass, whose
compiled CPU path falls back to an fp32 matmul (benchmarks/README.md, "int8").

A trap this module guards against: CPUs without VNNI (AVX2-only, AVX-512 before Cascade
Lake) multiply u8·s8 pairs with `vpmaddubsw`, which saturates its int16 pair sums. oneDNN
runs s8·s8 as (x + 128)·w there, so |w| up to 127 overflows and the "exact" int32 result is
silently wrong by up to ~1e5. `weight_qmax()` probes the running dispatch once: 127 where
the product is exact at full range, else 63 (7-bit weights: 255·63·2 < 2**15), the
choice fbgemm's `reduce_range` makes for the same reason (there on activations).

Around the product, two passes run in C++ when the extension is built (csrc/int8.cpp, one
pass over each row): the per-token quantization, with the LayerNorm before it when asked, and
the rescale, with GELU or the residual add after it. Without the extension the unfused torch
passes run (F.layer_norm, `quantize_rows`, `rescale`, F.gelu, `+`): the fallback, and the
twin the C++ passes are tested against. Where the arithmetic is the same they are bitwise that
twin (quantization, rescale, residual add); where it cannot be, the contract is a bound:

  GELU   |y - gelu₆₄(v)| <= GELU_TOLERANCE · |v| for the fp32 input v (an fp64 GELU of the
         same v). torch's vectorized erf (Sleef, FMA) is not reproducible here; ours is a
         rational erf without FMA, measured at ~2⁻²² |v|, as torch's own fp32 GELU.
  norm   the statistics in fp64 (torch's: fp32 Welford), each rounded to fp32 once, then
         torch's own normalization, (x·rstd − mean·rstd)·w + b: the normalized values are
         within NORM_ULPS fp32 ulps of F.layer_norm's (of its largest term, |x·rstd| +
         |mean·rstd|), so a code moves by one step only where x / s falls that close to a
         half, and s by as many ulps. (A row far off zero, mean ≫ std, cancels those two
         terms in fp32, torch's normalization and this one alike: its codes may differ more.)

Per layer these passes take in seven torch ops (three LayerNorms, GELU, three residual adds),
7.2% of an int8 step under AVX2 caps; fused they add ~3.4% to the two C++ passes
(benchmarks/README.md, "int8", profiled with benchmarks/int8_step_profile.py).

The op is a torch custom op (`magnet_engine::int8_linear`) so a compiled step keeps it
opaque: compiled tokens equal eager ones and the step has no graph break.
"""
from __future__ import annotations

import functools
import typing as tp

import torch
import torch.nn.functional as F

from magnet_engine.kernels import backend

ACT_QMAX = 127
GELU_TOLERANCE = 2.0 ** -21   # the fused GELU against an fp64 one, relative to |input| (contract)
NORM_ULPS = 16                # the fused LayerNorm against F.layer_norm, in ulps of its largest term
                              # (measured up to 6.6 at K <= 4096: torch's fp32 statistics, mostly)


QUANTIZE_CHUNK_BYTES = 1 << 20


def quantize_weight(weight: torch.Tensor, qmax: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w [N, K] -> (q [N, K] int8 in [-qmax, qmax], scale [N] fp32).

    Row block by row block, so no fp32 temporary is larger than QUANTIZE_CHUNK_BYTES: a model
    quantized while it loads otherwise frees a whole-matrix temporary per layer, glibc raises
    its mmap threshold to that size, and the freed blocks stay in the heap between the int8
    tensors (measured: peak RSS 2.4x the int8 weights, against 1.0x in blocks)."""
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    step = max(1, QUANTIZE_CHUNK_BYTES // (4 * cols))
    for start in range(0, rows, step):
        w = weight[start:start + step].detach().float()
        s = (w.abs().amax(dim=1) / qmax).clamp_(min=torch.finfo(torch.float32).tiny)
        scale[start:start + step] = s
        q[start:start + step] = torch.round(w / s[:, None]).clamp_(-qmax, qmax)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (q [M, K] int8, s [M, 1] fp32): symmetric, one scale per row (token)."""
    s = (x.abs().amax(dim=1, keepdim=True) / ACT_QMAX).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / s).clamp_(-ACT_QMAX, ACT_QMAX).to(torch.int8), s


def rescale(acc: torch.Tensor, s: torch.Tensor, scale: torch.Tensor, bias: tp.Optional[torch.Tensor]) -> torch.Tensor:
    """acc [M, N] int32 -> acc · s [M, 1] · scale [N] (+ bias [N]), fp32, rounded after each operation."""
    y = acc.to(torch.float32).mul_(s).mul_(scale)
    return y if bias is None else y.add_(bias)


def _cpp():
    """The C++ passes (csrc/int8.cpp: quantize_rows and rescale, with the fused norm, GELU and
    residual add), or None without the extension."""
    module = backend.cpp_module()
    return module if module is not None and hasattr(module, "int8_rescale") else None


def _quantize_rows_cpp(module, x: torch.Tensor, norm_weight: tp.Optional[torch.Tensor] = None,
                       norm_bias: tp.Optional[torch.Tensor] = None,
                       eps: float = 1e-5) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=torch.int8)
    s = torch.empty(x.shape[0], 1, dtype=torch.float32)
    if norm_weight is None:
        module.int8_quantize_rows(x.detach().numpy(), q.numpy(), s[:, 0].numpy())
    else:
        module.int8_quantize_rows(x.detach().numpy(), q.numpy(), s[:, 0].numpy(),
                                  norm_weight.detach().contiguous().numpy(), norm_bias.detach().contiguous().numpy(),
                                  eps)
    return q, s


def _rescale_cpp(module, acc: torch.Tensor, s: torch.Tensor, scale: torch.Tensor,
                 bias: tp.Optional[torch.Tensor], residual: tp.Optional[torch.Tensor] = None,
                 gelu: bool = False) -> torch.Tensor:
    # In place: the int32 product's buffer becomes the fp32 output (same size), so a step
    # does not fault in a fresh multi-MiB page range per layer.
    out = acc.view(torch.float32)
    module.int8_rescale(acc.numpy(), s[:, 0].numpy(), scale.numpy(), None if bias is None else bias.numpy(),
                        out.numpy(), None if residual is None else residual.detach().numpy(), gelu)
    return out


def _int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: tp.Optional[torch.Tensor],
                 norm_weight: tp.Optional[torch.Tensor] = None, norm_bias: tp.Optional[torch.Tensor] = None,
                 eps: float = 1e-5, gelu: bool = False, residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    lead, n = x.shape[:-1], qweight.shape[0]
    x = x.reshape(-1, x.shape[-1]).float()
    res = None if residual is None else residual.reshape(-1, n).float()
    module = _cpp() if x.device.type == "cpu" else None
    if module is not None:
        q, s = _quantize_rows_cpp(module, x.contiguous(), norm_weight, norm_bias, eps)
        y = _rescale_cpp(module, torch._int_mm(q, qweight.t()), s, scale.contiguous(),
                         None if bias is None else bias.contiguous(), None if res is None else res.contiguous(), gelu)
    else:   # the unfused passes: the fallback, and the twin of the fused ones
        if norm_weight is not None:
            x = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        q, s = quantize_rows(x)
        y = rescale(torch._int_mm(q, qweight.t()), s, scale, bias)
        if gelu:
            y = F.gelu(y)
        if res is not None:
            y = res + y
    return y.view(*lead, n)


def _fake(x, qweight, scale, bias, norm_weight=None, norm_bias=None, eps=1e-5, gelu=False, residual=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0], dtype=torch.float32)


_int8_linear_op = torch.library.custom_op("magnet_engine::int8_linear", _int8_linear, mutates_args=())
_int8_linear_op.register_fake(_fake)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: tp.Optional[torch.Tensor] = None, norm_weight: tp.Optional[torch.Tensor] = None,
                norm_bias: tp.Optional[torch.Tensor] = None, eps: float = 1e-5, gelu: bool = False,
                residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """See the module contract: residual + gelu(layer_norm(x) @ W + b), the norm, GELU and
    residual each optional."""
    return backend.call(_int8_linear_op, _int8_linear, x, qweight, scale, bias, norm_weight, norm_bias, eps, gelu,
                        residual)


def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          bias: tp.Optional[torch.Tensor] = None, norm_weight: tp.Optional[torch.Tensor] = None,
                          norm_bias: tp.Optional[torch.Tensor] = None, eps: float = 1e-5, gelu: bool = False,
                          residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """The plain twin: torch's fp32 layer_norm, the same quantized operands multiplied in fp64
    (exact for these sizes), then scaled, GELU and the residual added in fp64; only fp32
    roundings (and the norm's statistics, see the contract) separate it from `int8_linear`."""
    lead, n = x.shape[:-1], qweight.shape[0]
    x = x.reshape(-1, x.shape[-1]).float()
    if norm_weight is not None:
        x = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
    q, s = quantize_rows(x)
    y = (q.double() @ qweight.double().t()) * s.double() * scale.double()
    if bias is not None:
        y = y + bias.double()
    if gelu:
        y = F.gelu(y)
    if residual is not None:
        y = residual.reshape(-1, n).double() + y
    return y.float().view(*lead, n)


@functools.lru_cache(maxsize=None)
def weight_qmax() -> int:
    """127 when `torch._int_mm` is exact at full int8 range on this process's dispatch, else 63.
    Probed with the worst case (|x| = |w| = 127, both signs), once per process."""
    a = torch.full((16, 64), ACT_QMAX, dtype=torch.int8)
    a[8:] = -ACT_QMAX
    b = torch.full((64, 16), ACT_QMAX, dtype=torch.int8)
    b[:, 8:] = -ACT_QMAX
    expected = a.to(torch.int64) @ b.to(torch.int64)
    return 127 if torch.equal(torch._int_mm(a, b).to(torch.int64), expected) else 63
