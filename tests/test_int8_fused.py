"""The passes fused around the int8 product (kernels/int8.py, csrc/int8.cpp) against their
unfused torch twins: the residual add bitwise (the same fp32 additions), GELU within the bound
the contract states against an fp64 GELU (torch's vectorized erf is not reproducible here),
the LayerNorm bitwise its fp64-statistics twin and within the stated ulps of F.layer_norm;
odd widths, strided operands, zero and non-finite rows; and the fused layers against the
unfused ones on the int8 LM."""
import copy

import pytest
import torch
import torch.nn.functional as F

from magnet_engine.kernels import int8

needs_cpp = pytest.mark.skipif(int8._cpp() is None, reason="the C++ extension is not built")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaNs in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _operands(rows: int, n: int, seed: int):
    """acc [rows, n] int32, s [rows, 1] (row 1: a NaN token's scale), scale [n], bias [n]."""
    gen = torch.Generator().manual_seed(seed)
    acc = torch.randint(-2 ** 20, 2 ** 20, (rows, n), generator=gen, dtype=torch.int32)
    s = torch.rand(rows, 1, generator=gen) * 1e-5
    if rows > 1:
        s[1] = float("nan")
        acc[0] = 0
    return acc, s, torch.rand(n, generator=gen), torch.randn(n, generator=gen)


@needs_cpp
@pytest.mark.parametrize("rows,n", [(1, 1), (5, 13), (7, 67), (300, 1024)])
def test_rescale_with_residual_is_the_torch_add_bitwise(rows, n):
    """out = residual + rescale(acc): torch's `x + linear(...)`, the same fp32 additions."""
    acc, s, scale, bias = _operands(rows, n, rows)
    residual = torch.randn(rows, n + 5, generator=torch.Generator().manual_seed(9))[:, 5:] * 4   # strided rows
    if rows > 2:
        residual[2, 0] = float("inf")
        residual[2, -1] = float("nan")
    module = int8._cpp()
    for b in (bias, None):
        expected = residual + int8.rescale(acc.clone(), s, scale, b)
        got = int8._rescale_cpp(module, acc.clone(), s, scale, b, residual=residual)
        assert _same(got, expected)


def _gelu_error(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """|y - gelu64(v)| / |v| elementwise (0 where both are 0), v the fp32 GELU input."""
    exact = F.gelu(v.double())
    return (y.double() - exact).abs() / v.double().abs().clamp(min=torch.finfo(torch.float32).tiny)


@needs_cpp
@pytest.mark.parametrize("rows,n", [(1, 1), (5, 13), (7, 67), (300, 1024)])
def test_rescale_with_gelu_is_within_the_stated_bound_of_fp64(rows, n):
    """out = gelu(rescale(acc)): the rescale bitwise the torch one, then GELU within
    GELU_TOLERANCE |v| of an fp64 GELU of the same fp32 input v, everywhere (torch's own
    fp32 GELU is checked against the same bound: it is the baseline, not a magic number)."""
    acc, s, scale, bias = _operands(rows, n, rows + 1)
    module = int8._cpp()
    for b in (bias, None):
        v = int8.rescale(acc.clone(), s, scale, b)
        got = int8._rescale_cpp(module, acc.clone(), s, scale, b, gelu=True)
        finite = v.isfinite()
        assert torch.equal(got.isnan(), v.isnan())
        assert bool((_gelu_error(got[finite], v[finite]) <= int8.GELU_TOLERANCE).all())
        assert bool((_gelu_error(F.gelu(v[finite]), v[finite]) <= int8.GELU_TOLERANCE).all())
        if rows > 1 and b is None:
            assert not bool(got[0].any())    # an all-zero product: gelu(0) = 0 exactly


@needs_cpp
def test_gelu_over_the_whole_range_and_at_the_edges():
    """Every fp32 magnitude that matters (1e-30 to 1e4, both signs), the clamp of erf's
    argument at ±4, zero, ±inf and NaN: the bound, and the fp64 GELU's non-finite values."""
    mags = torch.logspace(-30, 4, 20001, dtype=torch.float64).float()
    v = torch.cat([mags, -mags, torch.linspace(-8, 8, 4001), torch.tensor([0.0, -0.0, 4 * 2 ** 0.5, -4 * 2 ** 0.5])])
    n = v.numel()
    acc = torch.ones(1, n, dtype=torch.int32)
    got = int8._rescale_cpp(int8._cpp(), acc, torch.ones(1, 1), v.clone(), None, gelu=True)[0]
    assert bool((_gelu_error(got, v) <= int8.GELU_TOLERANCE).all())
    assert got[-4] == 0 and got[-3] == 0
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    got = int8._rescale_cpp(int8._cpp(), torch.ones(1, 3, dtype=torch.int32), torch.ones(1, 1), special.clone(),
                            None, gelu=True)[0]
    assert _same(got, F.gelu(special.double()).float())


def _layer_norm_fp64_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused norm's arithmetic in torch: fp64 statistics rounded to fp32 once, then
    torch's normalization, (x·rstd + (−mean·rstd))·w + b, one fp32 rounding per operation."""
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    rstd = (1.0 / ((x64 - mean).square().mean(-1, keepdim=True) + eps).sqrt()).float()
    return (x * rstd + -mean.float() * rstd) * weight + bias


def _norm_rows(rows: int, cols: int, seed: int):
    """x [rows, cols] strided, with an all-zero row, a constant row, a row far off zero (mean
    ≫ std: fp32 moments lose digits there), a NaN row and an inf row; LN weight and bias."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols + 3, generator=gen) * 2 + 0.3)[:, 3:]
    if rows > 5:
        x[1] = 0.0
        x[2] = 1.5
        x[3] = x[3] * 1e-3 + 1e3
        x[4, cols // 2] = float("nan")
        x[5, 0] = float("inf")
    return x, torch.randn(cols, generator=gen) * 0.5 + 1, torch.randn(cols, generator=gen) * 0.1


@needs_cpp
@pytest.mark.parametrize("rows,cols", [(1, 1), (6, 13), (9, 67), (300, 1024)])
def test_norm_quantize_is_the_fp64_statistics_twin_bitwise(rows, cols):
    """The fused LayerNorm + quantization pass is quantize_rows of `_layer_norm_fp64_stats`:
    the same codes and scales (NaN and inf rows: a NaN scale, as the unfused pass gives)."""
    x, w, b = _norm_rows(rows, cols, rows)
    q, s = int8._quantize_rows_cpp(int8._cpp(), x, w, b, 1e-5)
    q_twin, s_twin = int8.quantize_rows(_layer_norm_fp64_stats(x, w, b, 1e-5))
    finite = ~s_twin[:, 0].isnan()
    assert torch.equal(s.isnan(), s_twin.isnan()) and torch.equal(s[finite], s_twin[finite])
    assert torch.equal(q[finite], q_twin[finite])
    if rows > 5:
        assert bool(s[4:6].isnan().all())


@pytest.mark.parametrize("rows,cols", [(9, 13), (9, 67), (300, 1024)])
def test_fp64_statistics_norm_is_within_the_stated_ulps_of_torch(rows, cols):
    """The contract's norm bound: against F.layer_norm, within NORM_ULPS fp32 ulps of each
    element's largest term, (|x·rstd| + |mean·rstd|)·|w| + |b| (torch's own fp32 statistics
    are the larger part of it); then codes within one step, scales within as many ulps."""
    x, w, b = _norm_rows(rows, cols, rows + 7)
    x = torch.cat([x[1:4], x[6:]])   # the finite rows: zero, constant, far off zero, random
    ours, torch_ln = _layer_norm_fp64_stats(x, w, b, 1e-5), F.layer_norm(x, (cols,), w, b, 1e-5)
    x64 = x.double()
    mean, rstd = x64.mean(-1, keepdim=True), 1 / (x64.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    term = ((x64 * rstd).abs() + (mean * rstd).abs()) * w.double().abs() + b.double().abs()
    assert bool(((ours.double() - torch_ln.double()).abs() <= int8.NORM_ULPS * 2.0 ** -24 * term).all())
    if int8._cpp() is not None:
        # codes and scales where the largest term is the normalized value's own size: not on
        # the far-off row, whose x·rstd and mean·rstd (~5e5) cancel to ~1 in fp32, torch's and
        # ours alike, so both carry errors of ~0.03 there and the codes may differ by more
        kept = torch.tensor([0, 1, *range(3, x.shape[0])])
        q, s = int8._quantize_rows_cpp(int8._cpp(), x[kept], w, b, 1e-5)
        q_torch, s_torch = int8.quantize_rows(torch_ln[kept])
        assert int((q.int() - q_torch.int()).abs().max()) <= 1
        bound = int8.NORM_ULPS * 2.0 ** -24 * term[kept].max(-1, keepdim=True)[0] / 127
        assert bool(((s - s_torch).abs() <= bound).all())


@pytest.mark.parametrize("cpp", [True, False] if int8._cpp() is not None else [False])
@pytest.mark.parametrize("shape,n,bias", [((1, 64), 32, True), ((3, 5, 72), 40, False), ((130, 260), 96, True)])
def test_fused_linear_against_the_unfused_layer(monkeypatch, cpp, shape, n, bias):
    """int8_linear(..., residual=r) is r + int8_linear(...) bitwise, and int8_linear(...,
    gelu=True) is F.gelu(int8_linear(...)) within the GELU bound (bitwise on the torch path,
    which is that composition), on the C++ passes and on the torch fallback alike; the fp64
    twin takes the same options."""
    if not cpp:
        monkeypatch.setattr(int8, "_cpp", lambda: None)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(*shape, generator=gen) * 3
    q, s = int8.quantize_weight(torch.randn(n, shape[-1], generator=gen), int8.weight_qmax())
    b = torch.randn(n, generator=gen) if bias else None
    r = torch.randn(*shape[:-1], n, generator=gen)
    plain = int8.int8_linear(x, q, s, b)
    assert _same(int8.int8_linear(x, q, s, b, residual=r), r + plain)
    fused = int8.int8_linear(x, q, s, b, gelu=True)
    if cpp:
        assert bool((_gelu_error(fused, plain) <= int8.GELU_TOLERANCE).all())
    else:
        assert torch.equal(fused, F.gelu(plain))
    torch.testing.assert_close(fused, int8.int8_linear_reference(x, q, s, b, gelu=True), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(int8.int8_linear(x, q, s, b, residual=r),
                               int8.int8_linear_reference(x, q, s, b, residual=r), rtol=2e-6, atol=2e-6)
    # the norm: codes may move one step where the statistics' rounding crosses a half (the
    # contract), so the bound is one step of one activation per row on top of the rounding
    w_ln, b_ln = torch.randn(shape[-1], generator=gen) * 0.5 + 1, torch.randn(shape[-1], generator=gen) * 0.1
    normed = int8.int8_linear(x, q, s, b, w_ln, b_ln, 1e-5)
    twin = int8.int8_linear_reference(x, q, s, b, w_ln, b_ln, 1e-5)
    _, s_x = int8.quantize_rows(F.layer_norm(x, shape[-1:], w_ln, b_ln, 1e-5).reshape(-1, shape[-1]))
    step = (s_x.max() * s.max() * q.abs().max()).item()
    assert (normed - twin).abs().max() <= step + 2e-6 * twin.abs().max()
    if not cpp:
        assert torch.equal(normed, int8.int8_linear(F.layer_norm(x, shape[-1:], w_ln, b_ln, 1e-5), q, s, b))


def test_int8_lm_fused_layers_equal_the_unfused_ones(monkeypatch):
    """The int8 LM with the fused passes (the pre-norms into the quantization of q|k|v, cross
    q and linear1; residual adds into out_proj / linear2's rescale, GELU into linear1's) against the same LM through the unfused torch passes: the logits
    agree to the bounds propagated (a code moved by one step at most here and there), and a generation's
    tokens are the same."""
    from magnet_engine.engine.config import DecodingParams
    from magnet_engine.engine.decoding import Runtime
    from magnet_engine.engine.precision import cast_for_precision
    from test_model import tiny_lm

    lm = cast_for_precision(tiny_lm(layers=2, bias=True, dim=64, heads=4, card=40), "int8")
    codes = torch.randint(0, 41, (2, lm.cfg.n_q, 30), generator=torch.Generator().manual_seed(1))
    cond = torch.randn(2, 7, lm.cfg.dim, generator=torch.Generator().manual_seed(2))
    params = DecodingParams(decoding_steps=[3, 2, 2, 2])
    with torch.no_grad():
        fused = lm.stage_logits(codes, cond, stage=1)
        tokens = Runtime(copy.deepcopy(lm), precision="int8").generate(cond, frames=20, params=params, seeds=[5])
        monkeypatch.setattr(int8, "_cpp", lambda: None)
        unfused = lm.stage_logits(codes, cond, stage=1)
        tokens_unfused = Runtime(copy.deepcopy(lm), precision="int8").generate(cond, frames=20, params=params,
                                                                               seeds=[5])
    assert (fused - unfused).abs().max() <= 1e-4 * unfused.abs().max()
    assert torch.equal(tokens, tokens_unfused)
