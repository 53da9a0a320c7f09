"""kernels/attention.py: every implementation against SDPA with a dense band mask (the
oracle) on odd shapes, low-precision error bounded by the torch baseline's own error
(flash-attention's convention), the band property, and the dispatch of attention().

Triton runs on CUDA tensors when a GPU is present, else on CPU tensors under
TRITON_INTERPRET=1 (set by conftest), where the kernel upcasts every operand to fp32."""
import pytest
import torch

from magnet_engine.kernels import attention as attn
from magnet_engine.kernels import backend

IMPLS = ["torch", "cpp", "triton"]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def _device(impl):
    if impl == "cpp" and backend.cpp_module() is None:
        pytest.skip("C++ extension magnet_engine._C not built (python setup.py build_ext --inplace)")
    if impl == "triton":
        if not backend.triton_available():
            pytest.skip("Triton not installed")
        if torch.cuda.is_available():
            return "cuda"
        if not backend.triton_interpreted():
            pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    return "cpu"


def _qkv(batch, heads, frames, head_dim, seed=0, device="cpu", dtype=torch.float32, packed=True):
    """q, k, v [B, H, T, d]; packed=True gives the model's layout: permuted views of [B, T, 3, H, d]."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(batch, frames, 3, heads, head_dim, generator=g).to(device, dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(torch.randn(batch, heads, frames, head_dim, generator=g).to(device, dtype) for _ in range(3))


def _windows(frames):
    return [0, 5, frames + 3]


# ----------------------------------------------------------------------------- fp32 vs the oracle
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frames", [1, 7, 37, 130])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_fp32_matches_dense_band(impl, frames, batch, head_dim):
    device = _device(impl)
    q, k, v = _qkv(batch, 2, frames, head_dim, seed=frames + batch, device=device)
    for window in _windows(frames):
        out = attn.banded_attention(q, k, v, window, impl=impl)
        ref = attn.reference_banded_attention(q, k, v, window)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=f"window {window}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head_dim", [16, 32])
def test_fp32_contiguous_inputs_and_scale(impl, head_dim):
    device = _device(impl)
    q, k, v = _qkv(2, 2, 41, head_dim, seed=3, device=device, packed=False)
    out = attn.banded_attention(q, k, v, 5, scale=0.3, impl=impl)
    torch.testing.assert_close(out, attn.reference_banded_attention(q, k, v, 5, scale=0.3), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("frames,batch,head_dim", [(7, 1, 16), (37, 3, 64), (130, 1, 64)])
def test_low_precision_within_twice_torch_error(impl, dtype, frames, batch, head_dim):
    """|out - oracle| <= 2 |torch low-precision - oracle|, the oracle in fp32 on the same
    (rounded) inputs: the flash-attention convention."""
    device = _device(impl)
    q, k, v = _qkv(batch, 2, frames, head_dim, seed=7, device=device, dtype=dtype)
    for window in _windows(frames):
        out = attn.banded_attention(q, k, v, window, impl=impl)
        assert out.dtype == dtype
        oracle = attn.reference_banded_attention(q.float(), k.float(), v.float(), window)
        baseline = attn.reference_banded_attention(q, k, v, window).float()
        err = (out.float() - oracle).abs().max().item()
        torch_err = (baseline - oracle).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"window {window}: error {err} vs torch {dtype} error {torch_err}"


# ----------------------------------------------------------------------------- the band property
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [0, 5])
def test_keys_outside_the_band_do_not_matter(impl, window):
    device = _device(impl)
    frames = 37
    q, k, v = _qkv(3, 2, frames, 16, seed=11, device=device, packed=False)
    out = attn.banded_attention(q, k, v, window, impl=impl)
    g = torch.Generator().manual_seed(12)
    for i in (0, 3, frames // 2, frames - 1):
        far = (torch.arange(frames) - i).abs() > window
        k2, v2 = k.clone(), v.clone()
        k2[:, :, far] = 100 * torch.randn(k2[:, :, far].shape, generator=g).to(device)
        v2[:, :, far] = 100 * torch.randn(v2[:, :, far].shape, generator=g).to(device)
        out2 = attn.banded_attention(q, k2, v2, window, impl=impl)
        assert torch.equal(out2[:, :, i], out[:, :, i]), f"row {i} depends on keys outside the band"
        assert not torch.equal(out2, out)  # the perturbation reaches the rows that do see those keys


# ----------------------------------------------------------------------------- full attention, dispatch
@pytest.mark.parametrize("impl", [None, "torch", "triton"])
def test_full_attention(impl):
    device = _device(impl or "torch")
    q, k, v = _qkv(3, 2, 37, 16, seed=5, device=device)
    out = attn.full_attention(q, k, v, impl=impl)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn.reference_banded_attention(q, k, v, 36), ref, atol=1e-5, rtol=0)


def test_full_attention_flash_attn():
    if not torch.cuda.is_available():
        pytest.skip("flash-attn runs on CUDA fp16/bf16 tensors only (no CUDA device here)")
    pytest.importorskip("flash_attn", reason="flash-attn (the optional [gpu] extra) not installed")
    q, k, v = _qkv(2, 2, 130, 64, seed=6, device="cuda", dtype=torch.float16)
    out = attn.full_attention(q, k, v)
    oracle = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch_err = (torch.nn.functional.scaled_dot_product_attention(q, k, v).float() - oracle).abs().max().item()
    assert (out.float() - oracle).abs().max().item() <= 2 * torch_err + 1e-6


def test_attention_routes_by_window():
    q, k, v = _qkv(1, 2, 37, 16, seed=9)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for window in (None, -1):
        torch.testing.assert_close(attn.attention(q, k, v, window), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn.attention(q, k, v, 5), attn.reference_banded_attention(q, k, v, 5),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(attn.attention(q, k, v, 36), full, atol=1e-5, rtol=0)  # window >= T - 1


def test_bad_arguments_raise():
    q, k, v = _qkv(1, 2, 7, 16)
    with pytest.raises(ValueError, match="window"):
        attn.banded_attention(q, k, v, -1)
    with pytest.raises(ValueError, match="k must match q"):
        attn.banded_attention(q, k[:, :, :5], v, 2)
    with pytest.raises(ValueError, match="v must match q"):
        attn.banded_attention(q, k, v.double(), 2)
    with pytest.raises(ValueError, match="no cpp"):
        attn.full_attention(q, k, v, impl="cpp")


@pytest.mark.gpu
def test_flash_attn_stage0_when_installed():
    flash = pytest.importorskip("flash_attn")
    q, k, v = (torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    got = attn.full_attention(q, k, v).float()
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    assert (got - want).abs().max() <= 2 * (low - want).abs().max() + 1e-3, flash.__version__
