"""Self-attention of the LM: restricted to a band of frames at stages >= 1, full at stage 0
(docs/model.md §4).

Contract
--------
    attention(q, k, v, window, impl=None) -> out                   # what the model calls
    banded_attention(q, k, v, window, *, scale=None, impl=None) -> out
    full_attention(q, k, v, *, scale=None, impl=None) -> out
    reference_banded_attention(q, k, v, window, *, scale=None) -> out   # the oracle

q, k, v: [B, H, T, d], one T for queries and keys (self-attention), fp32, fp16 or bf16, all
of one dtype and device, any strides (the model passes permuted views of its packed qkv
projection; only a non-contiguous last dimension costs a copy). out: [B, H, T, d] in q's dtype; the banded
kernels write a transposed [B, T, H, d] buffer (merging heads is a view), SDPA / flash-attn their own.
scale: the softmax scale, d ** -0.5 when None (SDPA's default).

banded_attention: query i attends keys j with |i - j| <= window (inclusive: 2W+1 keys, fewer
at the edges), with the same band for every batch row and head. window >= T - 1 is full
attention; window = 0 lets each query see only itself. Every query sees at least its own
key, so no row is fully masked. Work and memory are O(T * window): no path builds a T x T
score or mask, except the oracle. MAGNeT uses window = 5 at every stage >= 1.

Implementations (`impl`, chosen by kernels/backend.py when None):
- "triton": flash-style. One program per (block of BLOCK_M queries, batch row * head); it
  visits only the keys [m0 - W, m0 + BLOCK_M + W) that meet the band, with an online softmax
  in base 2 and fp32 accumulation. fp16/bf16 feed the tensor cores directly on CUDA; under
  TRITON_INTERPRET=1 (CPU tests) every operand is upcast to fp32 after loading and the output
  is stored in fp32 and rounded by torch, because the interpreter mishandles bf16 (its
  fp32 -> bf16 cast truncates).
- "cpp" (CPU): csrc/attention.cpp, one pass per query over its 2W+1 keys in fp32, OpenMP
  over (batch row, head, block of queries). fp16/bf16 are upcast to fp32 first.
- "torch": blocked. Queries in blocks of BM rows, each against its key window of BM + 2W
  frames gathered by `unfold` (a view of the padded keys); scores [B, H, T/BM, BM, BM + 2W]
  with the band as a static mask. Computed in fp32. window >= T - 1 runs unmasked SDPA.
With impl=None and window >= T - 1, banded_attention runs full_attention.

full_attention (stage 0, no mask): impl=None uses flash-attn (`flash_attn_func`, the optional
`[gpu]` extra, imported on first use) for CUDA fp16/bf16 tensors when it is installed, and
PyTorch SDPA otherwise; "torch" is always SDPA; "triton" runs the banded kernel with
window = T - 1; there is no "cpp" full attention (SDPA's CPU flash kernel is the fast one).

attention: window None or < 0 is full_attention, otherwise banded_attention.

`impl` is an Impls from kernels/backend.py `resolve` (the engine's, resolved once) or a
name / None resolved per call. Torch ops: `magnet_engine::banded_attention(q, k, v, window,
scale, impl)` (impl 'cpp' or 'torch') and `magnet_engine::banded_attention_triton(q, k, v,
window, scale)` (a triton_op); both return the [B, T, H, d]-backed layout above, which is
what their fake implementation promises.

Measured on a 2-core CPU (benchmarks/kernels_attention.py; 2B = 2 or 8 rows, H = 16 or 24,
d = 64, T = 500 or 1500, W = 5, fp32): the C++ path is 4.7-11.9x faster than SDPA with a dense
band mask and 1.2-4.5x faster than the blocked torch path (itself 1.2-9.7x faster than the
dense mask), so it is the CPU default when the extension is built.
"""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F
from torch.library import wrap_triton

from magnet_engine.kernels import backend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch and C++ paths do not need it
    triton = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _banded_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
        num_heads, T, head_dim, window, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Grid (cdiv(T, BLOCK_M), B * H). qk_scale = scale * log2(e): scores in base 2."""
        m0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < head_dim

        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=(offs_m[:, None] < T) & d_in[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys that meet the band of queries [m0, m0 + BLOCK_M): [m0 - W, m0 + BLOCK_M + W).
        lo = tl.maximum(m0 - window, 0)
        hi = tl.minimum(m0 + BLOCK_M + window, T)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_in = offs_n < hi
            k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                        mask=n_in[None, :] & d_in[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                        mask=n_in[:, None] & d_in[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, k, input_precision="ieee") * qk_scale
            dist = offs_m[:, None] - offs_n[None, :]
            in_band = (dist <= window) & (dist >= -window) & n_in[None, :]
            s = tl.where(in_band, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Query rows past T can see no key: keep their max finite so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
        tl.store(o, acc.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < T) & d_in[None, :])


def _banded_blocks(dtype: torch.dtype, interpreted: bool) -> tp.Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) per operand dtype. tl.dot needs >= 16 per side.

    fp32 operands take the FMA path (input_precision='ieee'), whose operand layouts cost far
    more registers than the tensor cores' path: at 64 x 32 with 4 warps ptxas used 255
    registers and spilled (336 B on sm_80, 24 B on sm_90). 8 warps halve each thread's share
    of the tiles: 88-124 registers, no spills, with the tiling (and the K/V re-reads,
    (BLOCK_M + 2W) / BLOCK_M) of fp16/bf16. Counted by `python -m magnet_engine.kernels.aot`
    (tests/test_triton_aot.py fails on any spill); the speed is not measured (no GPU here).
    """
    if interpreted:
        return 16, 16, 4
    if dtype == torch.float32:
        return 64, 32, 8
    return 64, 32, 4


def _banded_launch(q, k, v, out, window, scale, interpreted):
    """(grid, args, constexprs) of the _banded_attention_kernel launch (the op and kernels/aot.py)."""
    batch, heads, frames, head_dim = q.shape
    block_m, block_n, num_warps = _banded_blocks(q.dtype, interpreted)
    args = (q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            heads, frames, head_dim, window, scale * LOG2E)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                UPCAST=interpreted or q.dtype == torch.float32, num_warps=num_warps)
    return (triton.cdiv(frames, block_m), batch * heads), args, meta


def _banded_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    batch, heads, frames, head_dim = q.shape
    interpreted = q.device.type != "cuda"
    # The interpreter casts fp32 -> bf16 by truncation, not rounding: it stores fp32 and torch rounds.
    out_dtype = torch.float32 if interpreted else q.dtype
    out = _out_buffer(q, out_dtype)
    grid, args, meta = _banded_launch(q, k, v, out, window, scale, interpreted)
    launch = wrap_triton(_banded_attention_kernel) if torch.compiler.is_compiling() else _banded_attention_kernel
    launch[grid](*args, **meta)
    if interpreted and q.dtype != torch.float32:
        return _out_buffer(q, q.dtype).copy_(out)
    return out


# ----------------------------------------------------------------------------- C++
def _banded_cpp(q, k, v, window, scale):
    batch, heads, frames, head_dim = q.shape
    # no copy for fp32; the kernel computes in fp32 (and has no autograd: inference only)
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    out = _out_buffer(q, torch.float32)
    backend.cpp_module().banded_attention(q32.numpy(), k32.numpy(), v32.numpy(), out.numpy(), window, scale)
    return out if q.dtype == torch.float32 else _out_buffer(q, q.dtype).copy_(out)


# ----------------------------------------------------------------------------- torch
def _banded_torch(q, k, v, window, scale):
    """Blocked band: O(T * (BM + 2W)) scores, batched matmuls instead of per-query work."""
    batch, heads, frames, head_dim = q.shape
    if window >= frames - 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    block = max(16, 2 * window)  # BM: keeps the (BM + 2W) / (2W + 1) wasted scores <= 3x
    n_blocks = -(-frames // block)
    pad = n_blocks * block - frames
    width = block + 2 * window
    q32, k32, v32 = (x.float() for x in (q, k, v))
    q_blocks = F.pad(q32, (0, 0, 0, pad)).view(batch, heads, n_blocks, block, head_dim)
    k_windows = F.pad(k32, (0, 0, window, window + pad)).unfold(2, width, block)  # [B, H, nb, d, BM+2W]
    v_windows = F.pad(v32, (0, 0, window, window + pad)).unfold(2, width, block).transpose(-1, -2)

    rows = torch.arange(block, device=q.device)[:, None]
    cols = torch.arange(width, device=q.device)[None, :]
    key_pos = torch.arange(n_blocks, device=q.device)[:, None, None] * block - window + cols
    # Query m0 + r sees key m0 - W + c iff |r + W - c| <= W; padding keys are outside [0, T).
    in_band = (cols - rows >= 0) & (cols - rows <= 2 * window) & (key_pos >= 0) & (key_pos < frames)

    scores = (q_blocks * scale) @ k_windows  # [B, H, nb, BM, BM + 2W]
    probs = scores.masked_fill_(~in_band, float("-inf")).softmax(dim=-1)
    out = (probs @ v_windows).view(batch, heads, n_blocks * block, head_dim)
    return out[:, :, :frames].to(q.dtype)


def reference_banded_attention(q, k, v, window: int, *, scale: float | None = None) -> torch.Tensor:
    """The oracle: SDPA with a dense [T, T] band mask, in q's dtype (O(T^2), tests only)."""
    pos = torch.arange(q.shape[-2], device=q.device)
    band = (pos[:, None] - pos[None, :]).abs() <= window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scale)


# ----------------------------------------------------------------------------- ops
def _out_buffer(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, d] over a [B, T, H, d] buffer: every implementation's output layout (merging
    heads is then a view), and what the ops' fake implementation promises."""
    batch, heads, frames, head_dim = q.shape
    return torch.empty(batch, frames, heads, head_dim, dtype=dtype, device=q.device).transpose(1, 2)


_HOST_IMPLS = {"cpp": _banded_cpp, "torch": _banded_torch}


def _banded_host(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float, impl: str
                 ) -> torch.Tensor:
    """The C++ (impl='cpp', CPU) and torch (impl='torch') implementations."""
    out = _HOST_IMPLS[impl](q, k, v, window, scale)
    if out.stride() != _out_buffer(q[:0], q.dtype).stride():
        out = _out_buffer(q, q.dtype).copy_(out)
    return out


_banded_op = torch.library.custom_op("magnet_engine::banded_attention", _banded_host, mutates_args=())


def _banded_fake(q, k, v, window, scale, impl=None):
    return _out_buffer(q, q.dtype)


_banded_op.register_fake(_banded_fake)

if triton is not None:
    _banded_triton_op = backend.register_triton_op(
        "magnet_engine::banded_attention_triton", _banded_attention_kernel, _banded_triton, mutates_args=(),
        fake=_banded_fake)


def _check(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.dtype not in DTYPES:
        raise ValueError(f"{name}: q must be [B, H, T, d] fp32/fp16/bf16, found {q.dtype} shape {tuple(q.shape)}")
    for label, x in (("k", k), ("v", v)):
        if x.shape != q.shape or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name}: {label} must match q ({q.dtype} {tuple(q.shape)} on {q.device}), "
                             f"found {x.dtype} {tuple(x.shape)} on {x.device}")


def _contiguous_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *,
    scale: float | None = None, impl: backend.Impls | str | None = None,
) -> torch.Tensor:
    """Attention of query i to keys |i - j| <= window; see the module docstring.

    q, k, v: [B, H, T, d] fp32/fp16/bf16, any strides; window >= 0
    -> out [B, H, T, d] in q's dtype.
    """
    _check("banded_attention", q, k, v)
    if window < 0:
        raise ValueError(f"banded_attention: window must be >= 0 (use full_attention for none), found {window}")
    frames = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    window = min(window, max(frames - 1, 0))  # the same band; keeps kernel indices in int32
    impls = backend.pick(impl, q.device)
    if impls.requested is None and window >= frames - 1:
        return full_attention(q, k, v, scale=scale, impl=impls)
    if q.numel() == 0:
        return torch.empty_like(q)
    q, k, v = (_contiguous_last(x) for x in (q, k, v))
    if impls.banded_attention == "triton":
        return backend.call(_banded_triton_op, _banded_triton, q, k, v, window, scale)
    return backend.call(_banded_op, _banded_host, q, k, v, window, scale, impls.banded_attention)


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
    impl: backend.Impls | str | None = None,
) -> torch.Tensor:
    """Unmasked bidirectional attention (stage 0); see the module docstring.

    q, k, v: [B, H, T, d] fp32/fp16/bf16 -> out [B, H, T, d] in q's dtype.
    """
    _check("full_attention", q, k, v)
    if impl == "cpp":
        raise ValueError("full_attention: no cpp implementation (available: triton, torch; "
                         "SDPA's CPU flash kernel is the fast one)")
    impls = backend.pick(impl, q.device)
    if impls.full_attention == "triton":
        return banded_attention(q, k, v, max(q.shape[2] - 1, 0), scale=scale, impl=impls)
    head_dim = q.shape[-1]
    if (impls.full_attention == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256):
        from flash_attn import flash_attn_func  # resolve() found it importable

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)  # [B, T, H, d] -> [B, H, T, d]
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
    impl: backend.Impls | str | None = None,
) -> torch.Tensor:
    """The model's self-attention: full when window is None or < 0 (stage 0, or W = -1),
    else banded. q, k, v: [B, H, T, d] -> out [B, H, T, d] in q's dtype."""
    if window is None or window < 0:
        return full_attention(q, k, v, impl=impl)
    return banded_attention(q, k, v, window, impl=impl)
