"""Int8 linear layer for the CPU: int8 weights per output channel, int8 activations per
token (quantized on the fly), int32 accumulation.

Contract
--------
    quantize_weight(w [N, K] float, qmax) -> (qweight [N, K] int8, scale [N] fp32)
    int8_linear(x [..., K] fp32, qweight [N, K] int8, scale [N] fp32, bias [N] fp32 | None) -> [..., N] fp32

    y = (q_x @ qweightᵀ) · s_x · scale + bias, with s_x = max|x_row| / 127 per row of x,
    q_x = round(x / s_x) in [-127, 127], and the product accumulated exactly in int32.

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

Around the product, the per-token quantization and the rescale run in C++ when the
extension is built (csrc/int8.cpp: one pass each, bitwise the torch passes `quantize_rows`
and `rescale`, which are the fallback and the twin's): in torch they are eleven elementwise
passes, ~15% of an int8 step on an AVX2 CPU.

The op is a torch custom op (`magnet_engine::int8_linear`) so a compiled step keeps it
opaque: compiled tokens equal eager ones and the step has no graph break.
"""
from __future__ import annotations

import functools
import typing as tp

import torch

from magnet_engine.kernels import backend

ACT_QMAX = 127


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
    """The C++ twins of quantize_rows and rescale (csrc/int8.cpp), or None without the extension."""
    module = backend.cpp_module()
    return module if module is not None and hasattr(module, "int8_rescale") else None


def _quantize_rows_cpp(module, x: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=torch.int8)
    s = torch.empty(x.shape[0], 1, dtype=torch.float32)
    module.int8_quantize_rows(x.detach().numpy(), q.numpy(), s[:, 0].numpy())
    return q, s


def _rescale_cpp(module, acc: torch.Tensor, s: torch.Tensor, scale: torch.Tensor,
                 bias: tp.Optional[torch.Tensor]) -> torch.Tensor:
    # In place: the int32 product's buffer becomes the fp32 output (same size), so a step
    # does not fault in a fresh multi-MiB page range per layer.
    out = acc.view(torch.float32)
    module.int8_rescale(acc.numpy(), s[:, 0].numpy(), scale.numpy(), None if bias is None else bias.numpy(),
                        out.numpy())
    return out


def _int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: tp.Optional[torch.Tensor]) -> torch.Tensor:
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1]).float()
    module = _cpp() if x.device.type == "cpu" else None
    if module is not None:
        x = x.contiguous()
        q, s = _quantize_rows_cpp(module, x)
        y = _rescale_cpp(module, torch._int_mm(q, qweight.t()), s, scale.contiguous(),
                         None if bias is None else bias.contiguous())
    else:
        q, s = quantize_rows(x)
        y = rescale(torch._int_mm(q, qweight.t()), s, scale, bias)
    return y.view(*lead, qweight.shape[0])


def _fake(x, qweight, scale, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0], dtype=torch.float32)


_int8_linear_op = torch.library.custom_op("magnet_engine::int8_linear", _int8_linear, mutates_args=())
_int8_linear_op.register_fake(_fake)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """See the module contract."""
    return backend.call(_int8_linear_op, _int8_linear, x, qweight, scale, bias)


def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          bias: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """The plain twin: the same quantized operands multiplied in fp64 (exact for these
    sizes), then scaled; only the final fp32 rounding separates it from `int8_linear`."""
    lead = x.shape[:-1]
    q, s = quantize_rows(x.reshape(-1, x.shape[-1]).float())
    y = (q.double() @ qweight.double().t()) * s.double() * scale.double()
    if bias is not None:
        y = y + bias.double()
    return y.float().view(*lead, qweight.shape[0])


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
