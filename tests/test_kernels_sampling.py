"""kernels/sampling.py and kernels/rng.py: every implementation against the torch reference,
and the torch reference against the exact filtered distribution (frequency tests).

Triton runs under TRITON_INTERPRET=1 on CPU tensors (conftest), so its shapes stay tiny;
its draws equal the torch reference's draw for draw, which carries the frequency tests over.
"""
import math

import pytest
import torch
from hypothesis import given, HealthCheck, settings, strategies as st

from magnet_engine.kernels import backend, rng, sampling

from kernel_helpers import skip_unless_available

# The interpreter evaluates both sides of tl.where in numpy: -inf - -inf in the discarded
# branch (padding lanes, -inf in both CFG halves) warns without affecting results.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

FP32_EPS = torch.finfo(torch.float32).eps
# prob: each implementation normalises with its own exp and summation order; measured
# <= 3 ulps from torch.softmax at card 2048, bound at 8.
PROB_RTOL = 8 * FP32_EPS

MODES = {
    "greedy": dict(use_sampling=False, top_k=0, top_p=0.0),
    "top_p": dict(use_sampling=True, top_k=0, top_p=0.9),
    "top_k": dict(use_sampling=True, top_k=5, top_p=0.0),
    "categorical": dict(use_sampling=True, top_k=0, top_p=0.0),
}


def _scalars(cfg=3.0, temp=1.5, seed=1234, offset=7):
    return dict(cfg_coef=torch.tensor(cfg), temperature=torch.tensor(temp),
                seed=torch.as_tensor(seed, dtype=torch.int64), offset=torch.as_tensor(offset, dtype=torch.int64))


def _sample(cond, uncond, impl, mode="top_p", row_ids=None, **overrides):
    s = _scalars(**{k: overrides.pop(k) for k in list(overrides) if k in ("cfg", "temp", "seed", "offset")})
    kw = dict(MODES[mode], **overrides)
    return sampling.sample_tokens(cond, uncond, s["cfg_coef"], s["temperature"], seed=s["seed"],
                                  offset=s["offset"], row_ids=row_ids, impl=impl, **kw)


def _logits(n, card, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, card, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------- RNG
if backend.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _uniform_kernel(seed_ptr, offset_ptr, index_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        k1, k2 = rng.rng_key(seed_ptr, offset_ptr)
        index = tl.load(index_ptr + offs, mask=offs < n, other=0)
        tl.store(out_ptr + offs, rng.uniform_triton(k1, k2, index), mask=offs < n)


KEYS = [(0, 0), (1234, 7), (-5, 2**40 + 3), (2**63 - 1, -(2**63))]


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("seed,offset", KEYS)
def test_rng_bit_identical_to_torch(impl, seed, offset):
    skip_unless_available(impl)
    index = torch.cat([torch.arange(0, 3000, dtype=torch.int64), torch.tensor([2**32 - 1, 2**32, 2**40 + 17])])
    seed_t, offset_t = torch.tensor(seed, dtype=torch.int64), torch.tensor(offset, dtype=torch.int64)
    expected = rng.uniform(seed_t, offset_t, index)
    out = torch.empty_like(expected)
    if impl == "cpp":
        backend.cpp_module().uniform(seed, offset, index.numpy(), out.numpy())
    else:
        _uniform_kernel[(triton.cdiv(index.numel(), 1024),)](seed_t, offset_t, index, out, index.numel(), BLOCK=1024)
    assert torch.equal(out, expected)


def test_rng_per_row_seed_broadcasts_over_index():
    seeds = torch.tensor([s for s, _ in KEYS], dtype=torch.int64)
    index = torch.arange(4)[:, None] * 37 + torch.arange(37)
    offset = torch.tensor(7)
    u = rng.uniform(seeds[:, None], offset, index)
    assert u.shape == index.shape
    for i, seed in enumerate(seeds):
        assert torch.equal(u[i], rng.uniform(seed, offset, index[i]))


def test_rng_range_and_moments():
    index = torch.arange(200_000, dtype=torch.int64)
    u = rng.uniform(torch.tensor(3), torch.tensor(11), index).double()
    assert u.min() > 0 and u.max() < 1
    n = u.numel()
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    # neighbouring indices, and the same index under neighbouring offsets, are uncorrelated
    v = rng.uniform(torch.tensor(3), torch.tensor(12), index).double()
    for a, b in ((u[:-1], u[1:]), (u, v)):
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(corr) < 5 / math.sqrt(n)


# ----------------------------------------------------------------------------- vs reference
CPP_SHAPES = [(1, 37), (3, 37), (67, 2048), (5, 1000)]
TRITON_SHAPES = [(1, 37), (3, 37), (2, 2048)]


@pytest.mark.parametrize("impl,shape", [("cpp", s) for s in CPP_SHAPES] + [("triton", s) for s in TRITON_SHAPES])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("cfg", [True, False])
def test_matches_torch_reference(impl, shape, mode, cfg):
    skip_unless_available(impl)
    n, card = shape
    cond = _logits(n, card, seed=1)
    uncond = _logits(n, card, seed=2) if cfg else None
    tokens, prob = _sample(cond, uncond, impl, mode)
    ref_tokens, ref_prob = _sample(cond, uncond, "torch", mode)
    assert tokens.dtype == torch.int64 and prob.dtype == torch.float32
    assert tokens.shape == prob.shape == (n,)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(prob, ref_prob, rtol=PROB_RTOL, atol=0)


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_top_p_exact_boundary_keeps_the_token_that_reaches_it(impl):
    """pi = [1/2, 1/4, 1/8, 1/8] exactly (dyadic: softmax and the sums are exact) and
    top_p = 1/2: token 1 has exactly 1/2 of the mass above it, so it is kept (the reference
    drops j only when cumsum_j - pi_j > p); tokens 2 and 3 have 3/4 above them. 64 rows of
    independent draws: token 1 (chance 1/3 per row) appears, tokens 2 and 3 never do."""
    skip_unless_available(impl)
    cond = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])).expand(64, 4).contiguous()
    tokens, prob = _sample(cond, None, impl, "top_p", top_p=0.5, temp=1.0)
    assert set(tokens.tolist()) == {0, 1}
    assert torch.equal(prob, torch.where(tokens == 0, 0.5, 0.25))


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["greedy", "top_p", "top_k"])
def test_low_precision_logits_are_computed_in_fp32(impl, dtype, mode):
    skip_unless_available(impl)
    cond, uncond = _logits(3, 37, dtype, seed=3), _logits(3, 37, dtype, seed=4)
    tokens, prob = _sample(cond, uncond, impl, mode)
    ref_tokens, ref_prob = _sample(cond.float(), uncond.float(), "torch", mode)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(prob, ref_prob, rtol=PROB_RTOL, atol=0)


def test_cfg_formula_and_none_uncond():
    cond, uncond = _logits(4, 37, seed=5), _logits(4, 37, seed=6)
    g = 2.5
    mixed = uncond + (cond - uncond) * torch.tensor(g)
    tokens, prob = _sample(cond, uncond, "torch", "greedy", cfg=g, temp=0.7)
    assert torch.equal(tokens, mixed.argmax(-1))
    torch.testing.assert_close(prob, torch.softmax(mixed / torch.tensor(0.7), -1).gather(-1, tokens[:, None])[:, 0])
    tokens_none, _ = _sample(cond, None, "torch", "greedy")
    assert torch.equal(tokens_none, cond.argmax(-1))


# ----------------------------------------------------------------------------- RNG keys
@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_draw_depends_only_on_key_and_row_id(impl):
    skip_unless_available(impl)
    n, card = (6, 37)
    cond = _logits(n, card, seed=7, scale=0.5)  # flat: draws are far from argmax
    tokens, _ = _sample(cond, None, impl, "categorical")
    subset = torch.tensor([4, 1])
    sub_tokens, _ = _sample(cond[subset], None, impl, "categorical", row_ids=subset)
    assert torch.equal(sub_tokens, tokens[subset])
    again, _ = _sample(cond, None, impl, "categorical")
    assert torch.equal(again, tokens)
    other_offset, _ = _sample(cond, None, impl, "categorical", offset=8)
    assert not torch.equal(other_offset, tokens)


# Per-row seeds: extreme int64 values too (their high and low halves both enter the key).
ROW_SEEDS = [1234, -5, 2**63 - 1, -(2**63), 0, 99]
SAMPLED_MODES = ["top_p", "top_k", "categorical"]


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("mode", SAMPLED_MODES)
def test_per_row_seeds_match_torch_reference(impl, mode):
    skip_unless_available(impl)
    cond = _logits(len(ROW_SEEDS), 37, seed=13, scale=0.5)
    tokens, prob = _sample(cond, None, impl, mode, seed=ROW_SEEDS)
    ref_tokens, ref_prob = _sample(cond, None, "torch", mode, seed=ROW_SEEDS)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(prob, ref_prob, rtol=PROB_RTOL, atol=0)


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("mode", SAMPLED_MODES)
def test_equal_per_row_seeds_draw_as_the_scalar_seed(impl, mode):
    skip_unless_available(impl)
    cond = _logits(5, 37, seed=14, scale=0.5)
    row_ids = torch.tensor([3, 0, 8, 1, 2])
    per_row = _sample(cond, None, impl, mode, seed=[1234] * 5, row_ids=row_ids)
    scalar = _sample(cond, None, impl, mode, seed=1234, row_ids=row_ids)
    assert torch.equal(per_row[0], scalar[0]) and torch.equal(per_row[1], scalar[1])


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_row_draw_does_not_depend_on_its_batch(impl):
    """The server's invariant: a request's row (seed s, row id r) draws the same token alone
    as inside any batch, whatever the other rows' seeds."""
    skip_unless_available(impl)
    cond = _logits(len(ROW_SEEDS), 37, seed=15, scale=0.5)
    row_ids = torch.tensor([5, 0, 5, 2, 9, 1])  # two requests may use the same row id
    tokens, prob = _sample(cond, None, impl, "categorical", seed=ROW_SEEDS, row_ids=row_ids)
    for i, seed in enumerate(ROW_SEEDS):
        alone = _sample(cond[i:i + 1], None, impl, "categorical", seed=seed, row_ids=row_ids[i:i + 1])
        assert tokens[i] == alone[0][0] and prob[i] == alone[1][0]


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_different_seeds_give_different_draws(impl):
    skip_unless_available(impl)
    n, card = 32, 37
    cond = torch.zeros(n, card)  # the same uniform row at the same row id: only the seed varies
    row_ids = torch.zeros(n, dtype=torch.int64)
    same, _ = _sample(cond, None, impl, "categorical", seed=[7] * n, row_ids=row_ids)
    assert (same == same[0]).all()
    tokens, _ = _sample(cond, None, impl, "categorical", seed=list(range(n)), row_ids=row_ids)
    assert len(set(tokens.tolist())) > n // 4


# ----------------------------------------------------------------------------- frequencies
def _chi2_critical(df: int, z: float = 4.5) -> float:
    """Wilson-Hilferty upper quantile of chi2(df) at the normal quantile z (z=4.5: 3.4e-6)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _exact_distribution(logits_row: torch.Tensor, temp: float, mode: str, top_k: int, top_p: float):
    """float64 target distribution of the filtered sampler (ties kept, module docstring)."""
    pi32 = torch.softmax(logits_row / torch.tensor(temp), -1)
    if mode == "top_p":
        mass_above = torch.stack([pi32[pi32 > v].double().sum() for v in pi32])
        kept = mass_above <= torch.tensor(top_p, dtype=torch.float32).double()
    elif mode == "top_k":
        kept = pi32 >= torch.topk(pi32, top_k).values[-1]
    else:
        kept = torch.ones_like(pi32, dtype=torch.bool)
    target = torch.where(kept, pi32.double(), 0.0)
    return target / target.sum(), kept


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("mode,top_k,top_p", [("top_p", 0, 0.8), ("top_k", 6, 0.0), ("categorical", 0, 0.0)])
def test_frequencies_match_exact_filtered_distribution(impl, mode, top_k, top_p):
    skip_unless_available(impl)
    card, draws, temp = 20, 60_000, 1.3
    row = torch.linspace(-2.0, 2.0, card)[torch.randperm(card, generator=torch.Generator().manual_seed(0))]
    cond = row.expand(draws, card)
    tokens, _ = _sample(cond, None, impl, mode, temp=temp, top_k=top_k, top_p=top_p)
    target, kept = _exact_distribution(row, temp, mode, top_k, top_p)
    counts = torch.bincount(tokens, minlength=card).double()
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    expected = target[kept] * draws
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    assert chi2 < _chi2_critical(int(kept.sum()) - 1), f"chi2 {chi2:.1f} over {int(kept.sum()) - 1} dof"


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_top_k_prob_is_renormalised_and_top_p_prob_is_not(impl):
    skip_unless_available(impl)
    row = torch.linspace(-1.0, 1.0, 20)
    cond = row.expand(50, 20)
    pi = torch.softmax(row, -1)
    tokens_k, prob_k = _sample(cond, None, impl, "top_k", temp=1.0, top_k=4)
    tokens_p, prob_p = _sample(cond, None, impl, "top_p", temp=1.0, top_p=0.5)
    kept_k = pi >= torch.topk(pi, 4).values[-1]
    torch.testing.assert_close(prob_k, pi[tokens_k] / pi[kept_k].sum(), rtol=PROB_RTOL, atol=0)
    torch.testing.assert_close(prob_p, pi[tokens_p], rtol=PROB_RTOL, atol=0)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_top_k_1_and_tiny_top_p_and_low_temperature_give_argmax(impl):
    skip_unless_available(impl)
    cond, uncond = _logits(5, 37, seed=8), _logits(5, 37, seed=9)
    mixed = uncond + (cond - uncond) * torch.tensor(3.0)
    argmax = mixed.argmax(-1)
    assert torch.equal(_sample(cond, uncond, impl, "top_k", top_k=1)[0], argmax)
    assert torch.equal(_sample(cond, uncond, impl, "top_p", top_p=1e-9)[0], argmax)
    # 37 logits 1.0 apart: at t = 0.01 every other pi underflows far below the race's range
    spread = torch.stack([torch.randperm(37, generator=torch.Generator().manual_seed(i)).float() for i in range(5)])
    for mode in ("top_p", "top_k", "categorical"):
        tokens, prob = _sample(spread, None, impl, mode, temp=0.01, top_k=10)
        assert torch.equal(tokens, spread.argmax(-1))
        assert torch.equal(prob, torch.ones(5))


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_tiny_top_p_keeps_every_tied_top_token(impl):
    skip_unless_available(impl)
    row = torch.full((37,), -3.0)
    row[[4, 30]] = 2.0  # two tokens tied for the top
    tokens, prob = _sample(row.expand(64, 37), None, impl, "top_p", top_p=1e-9, temp=1.0)
    assert set(tokens.tolist()) == {4, 30}
    pi = torch.softmax(row, -1)
    torch.testing.assert_close(prob, pi[tokens], rtol=PROB_RTOL, atol=0)
    # greedy on ties: first index, as torch.argmax
    assert (_sample(row.expand(3, 37), None, impl, "greedy")[0] == 4).all()


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("mode", list(MODES))
def test_neg_inf_entries_never_give_nan(impl, mode):
    skip_unless_available(impl)
    inf = float("inf")
    cond, uncond = _logits(4, 37, seed=10), _logits(4, 37, seed=11)
    cond[0, :30] = -inf                      # -inf in the cond half only
    cond[1, 5:] = -inf                       # -inf in both halves at the same places
    uncond[1, 5:] = -inf
    cond[2, :] = -inf                        # all -inf but one, in both halves
    uncond[2, :] = -inf
    cond[2, 17] = 1.0
    uncond[2, 17] = 0.5
    cond[3, ::2] = -inf                      # no CFG row below
    tokens, prob = _sample(cond, uncond, impl, mode, top_k=3)
    assert not torch.isnan(prob).any()
    assert tokens[1] < 5
    assert tokens[2] == 17 and prob[2] == 1.0
    tokens, prob = _sample(cond, None, impl, mode, top_k=3)
    assert not torch.isnan(prob).any()
    assert torch.isfinite(cond.gather(-1, tokens[:, None])).all()
    assert tokens[2] == 17 and prob[2] == 1.0


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("mode", list(MODES))
def test_rows_without_a_distribution_give_token_0_and_nan_prob(impl, mode):
    skip_unless_available(impl)
    cond = _logits(4, 37, seed=12)
    cond[0, 9] = float("nan")
    cond[2, :] = float("-inf")
    cond[3, 3] = float("inf")
    tokens, prob = _sample(cond, None, impl, mode)
    assert tokens.tolist()[0] == 0 and tokens.tolist()[2:] == [0, 0]
    assert torch.isnan(prob[[0, 2, 3]]).all()
    ref_tokens, ref_prob = _sample(cond[1:2], None, "torch", mode, row_ids=torch.tensor([1]))
    assert tokens[1] == ref_tokens[0] and not torch.isnan(prob[1])


def test_rejects_bad_arguments():
    cond = _logits(2, 37)
    s = _scalars()
    with pytest.raises(ValueError, match="0-d"):
        sampling.sample_tokens(cond, None, torch.tensor([3.0]), s["temperature"], use_sampling=True, top_k=0,
                               top_p=0.9, seed=s["seed"], offset=s["offset"])
    with pytest.raises(ValueError, match="shape"):
        sampling.sample_tokens(cond, cond[:1], s["cfg_coef"], s["temperature"], use_sampling=True, top_k=0,
                               top_p=0.9, seed=s["seed"], offset=s["offset"])
    for seed in (torch.tensor([1, 2, 3]), torch.tensor([[1], [2]]), torch.tensor(1, dtype=torch.int32)):
        with pytest.raises(ValueError, match="seed must be a 0-d or \\[N\\] int64"):
            sampling.sample_tokens(cond, None, s["cfg_coef"], s["temperature"], use_sampling=True, top_k=0,
                                   top_p=0.9, seed=seed, offset=s["offset"])
    with pytest.raises(ValueError, match="impl"):
        _sample(cond, None, "cuda")


# ----------------------------------------------------------------------------- per-row values
# One row per (mode, CFG) combination a continuous batch mixes: coefficients of exactly 1
# (no CFG) beside CFG rows, every mode, top_k beyond the card, rows at different steps.
ROWS = [  # (cfg, temp, use_sampling, top_k, top_p, seed, offset)
    (3.0, 1.5, True, 0, 0.9, 1234, 7),
    (1.0, 0.7, True, 0, 0.9, -5, 0),
    (2.5, 1.0, False, 0, 0.0, 2**63 - 1, 3),
    (1.0, 1.0, False, 5, 0.8, 0, 19),
    (10.0, 0.3, True, 5, 0.0, 99, 1),
    (1.0, 2.0, True, 100, 0.0, 7, 2),       # top_k > C: every token kept
    (3.0, 1.2, True, 0, 0.0, -(2**63), 7),  # categorical
    (1.5, 0.9, True, 3, 0.5, 42, 11),       # top_p wins over top_k
    (1.0, 0.01, True, 0, 0.0, 8, 4),
]


def _row_tensors(rows):
    cfg, temp, use, top_k, top_p, seed, offset = zip(*rows)
    return dict(cfg_coef=torch.tensor(cfg), temperature=torch.tensor(temp), use_sampling=torch.tensor(use),
                top_k=torch.tensor(top_k), top_p=torch.tensor(top_p), seed=torch.tensor(seed),
                offset=torch.tensor(offset))


def _sample_rows(cond, uncond, impl, row_ids, values):
    return sampling.sample_tokens(cond, uncond, values["cfg_coef"], values["temperature"],
                                  use_sampling=values["use_sampling"], top_k=values["top_k"], top_p=values["top_p"],
                                  seed=values["seed"], offset=values["offset"], row_ids=row_ids, impl=impl)


def _sample_alone(cond_row, uncond_row, impl, row_id, row):
    """One row with 0-d values and scalar options, as a request alone calls it (no uncond
    half when its coefficient is 1)."""
    cfg, temp, use, top_k, top_p, seed, offset = row
    return sampling.sample_tokens(cond_row[None], None if cfg == 1.0 else uncond_row[None], torch.tensor(cfg),
                                  torch.tensor(temp), use_sampling=use, top_k=top_k, top_p=top_p,
                                  seed=torch.tensor(seed), offset=torch.tensor(offset), row_ids=row_id[None],
                                  impl=impl)


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_per_row_batch_equals_each_row_alone(impl):
    """The continuous-batching invariant: a row's (token, prob) in a batch of per-row values
    and options is, bit for bit, the row sampled alone with scalars."""
    skip_unless_available(impl)
    n, card = len(ROWS), 37
    cond, uncond = _logits(n, card, seed=20, scale=1.0), _logits(n, card, seed=21, scale=1.0)
    row_ids = torch.tensor([4, 0, 9, 2, 2, 7, 1, 3, 30])
    tokens, prob = _sample_rows(cond, uncond, impl, row_ids, _row_tensors(ROWS))
    assert tokens.dtype == torch.int64 and prob.dtype == torch.float32 and tokens.shape == prob.shape == (n,)
    for i, row in enumerate(ROWS):
        alone_tokens, alone_prob = _sample_alone(cond[i], uncond[i], impl, row_ids[i], row)
        assert tokens[i] == alone_tokens[0], f"row {i}"
        assert prob[i].view(torch.int32) == alone_prob[0].view(torch.int32), f"row {i}"


@pytest.mark.parametrize("impl,shape", [("cpp", (len(ROWS), 37)), ("cpp", (len(ROWS), 2048)),
                                        ("triton", (len(ROWS), 37))])
def test_per_row_matches_torch_reference(impl, shape):
    skip_unless_available(impl)
    n, card = shape
    cond, uncond = _logits(n, card, seed=22), _logits(n, card, seed=23)
    values = _row_tensors(ROWS)
    tokens, prob = _sample_rows(cond, uncond, impl, None, values)
    ref_tokens, ref_prob = _sample_rows(cond, uncond, "torch", None, values)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(prob, ref_prob, rtol=PROB_RTOL, atol=0)


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("mode", list(MODES))
def test_per_row_values_all_equal_sample_as_the_scalars(impl, mode):
    """[N] tensors whose entries all equal v (and per-row options all equal) draw exactly as
    the 0-d v and the scalar options: the per-row path is the scalar path, row by row."""
    skip_unless_available(impl)
    n = 5
    cond, uncond = _logits(n, 37, seed=24), _logits(n, 37, seed=25)
    options = MODES[mode]
    scalar = _sample(cond, uncond, impl, mode, cfg=3.0, temp=1.5, seed=1234, offset=7)
    full = lambda v, dtype=None: torch.full((n,), v, dtype=dtype)  # noqa: E731
    per_row = sampling.sample_tokens(
        cond, uncond, full(3.0), full(1.5), use_sampling=full(options["use_sampling"]),
        top_k=full(options["top_k"], torch.int64), top_p=full(options["top_p"], torch.float32),
        seed=full(1234, torch.int64), offset=full(7, torch.int64), impl=impl)
    assert torch.equal(per_row[0], scalar[0])
    assert torch.equal(per_row[1].view(torch.int32), scalar[1].view(torch.int32))


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("per_row", [False, True])
def test_cfg_coef_1_samples_the_cond_logits_exactly(impl, per_row):
    """g == 1 means no CFG, uncond given or not: u + (c - u) * 1 is not c in fp32 (these
    logits include a pair where it rounds to 0), so the kernels take c itself."""
    skip_unless_available(impl)
    n, card = 6, 37
    cond, uncond = _logits(n, card, seed=26, scale=0.5), _logits(n, card, seed=27, scale=0.5)
    cond[:, 3], uncond[:, 3] = 1e-8, 1.0  # (1e-8 - 1) + 1 == 0 in fp32
    one = torch.tensor(1.0)
    assert not torch.equal(uncond + (cond - uncond) * one, cond)
    for mode in MODES:
        options = MODES[mode]
        if per_row:
            options = dict(use_sampling=torch.full((n,), options["use_sampling"]),
                           top_k=torch.full((n,), options["top_k"]), top_p=torch.full((n,), options["top_p"]))
        coef = torch.ones(n) if per_row else one
        got = sampling.sample_tokens(cond, uncond, coef, torch.tensor(0.8), seed=torch.tensor(5),
                                     offset=torch.tensor(3), impl=impl, **options)
        want = sampling.sample_tokens(cond, None, coef, torch.tensor(0.8), seed=torch.tensor(5),
                                      offset=torch.tensor(3), impl=impl, **options)
        assert torch.equal(got[0], want[0]), mode
        assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32)), mode


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_per_row_offset_is_each_rows_own_step(impl):
    """Rows at different steps: row i with offset o_i draws as the whole call at offset o_i."""
    skip_unless_available(impl)
    n = 4
    cond = _logits(n, 37, seed=28, scale=0.5)
    offsets = torch.tensor([0, 5, 5, 2**40 + 1])
    tokens, _ = _sample(cond, None, impl, "categorical", offset=offsets)
    for i, offset in enumerate(offsets.tolist()):
        assert tokens[i] == _sample(cond, None, impl, "categorical", offset=offset)[0][i]


def test_per_row_options_rejected_unless_all_tensors_of_one_per_row():
    cond = _logits(3, 37)
    s = _scalars()

    def call(**kw):
        options = dict(use_sampling=torch.ones(3, dtype=torch.bool), top_k=torch.zeros(3, dtype=torch.int64),
                       top_p=torch.full((3,), 0.9))
        values = dict(cfg_coef=s["cfg_coef"], temperature=s["temperature"], seed=s["seed"], offset=s["offset"])
        for k, v in kw.items():
            (options if k in options else values)[k] = v
        return sampling.sample_tokens(cond, None, values.pop("cfg_coef"), values.pop("temperature"), **values,
                                      **options)

    call()  # the valid per-row call
    with pytest.raises(ValueError, match="all Python scalars or all \\[N\\] tensors"):
        call(top_k=5)
    with pytest.raises(ValueError, match="all Python scalars or all \\[N\\] tensors"):
        call(use_sampling=True)
    with pytest.raises(ValueError, match="top_k must be an \\[N\\] int64 tensor"):
        call(top_k=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="top_p must be an \\[N\\] float32 tensor"):
        call(top_p=torch.tensor(0.9))
    with pytest.raises(ValueError, match="use_sampling must be an \\[N\\] bool tensor"):
        call(use_sampling=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be a 0-d or \\[N\\] float32"):
        call(temperature=torch.ones(4))
    with pytest.raises(ValueError, match="offset must be a 0-d or \\[N\\] int64"):
        call(offset=torch.zeros(3, dtype=torch.int32))


_ROW = st.tuples(
    st.sampled_from([1.0, 0.5, 3.0, 10.0]),                 # cfg (1.0: no CFG)
    st.sampled_from([0.01, 0.3, 1.0, 2.5]),                 # temperature
    st.booleans(), st.integers(0, 50), st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9, 1.0]),
    st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**40),  # seed, offset
)


@pytest.mark.parametrize("impl,examples", [("torch", 40), ("cpp", 60), ("triton", 6)])
def test_row_independence_property(impl, examples):
    """Any mix of per-row values and options, any logits (ties and -inf included): each row
    of the batch equals the row alone with scalars, bit for bit."""
    skip_unless_available(impl)

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(rows=st.lists(_ROW, min_size=1, max_size=6), card=st.integers(1, 40), data_seed=st.integers(0, 2**16),
           ties=st.booleans())
    def check(rows, card, data_seed, ties):
        n = len(rows)
        cond, uncond = _logits(n, card, seed=data_seed), _logits(n, card, seed=data_seed + 1)
        if ties:  # few distinct values, and -inf in both halves at a few places
            cond, uncond = cond.round(), uncond.round()
            cond[:, ::3], uncond[:, ::3] = float("-inf"), float("-inf")
            cond[:, 0], uncond[:, 0] = 1.0, 0.5  # a finite column: the rows keep a distribution
        row_ids = torch.randperm(3 * n, generator=torch.Generator().manual_seed(data_seed))[:n]
        tokens, prob = _sample_rows(cond, uncond, impl, row_ids, _row_tensors(rows))
        for i, row in enumerate(rows):
            alone_tokens, alone_prob = _sample_alone(cond[i], uncond[i], impl, row_ids[i], row)
            assert tokens[i] == alone_tokens[0], (i, row)
            assert prob[i].view(torch.int32) == alone_prob[0].view(torch.int32), (i, row)

    check()


def test_per_row_step_compiles_without_graph_breaks():
    """A continuous-batching step's sampling (per-row values and options) traces whole for
    each implementation, and compiled equals eager bit for bit (tests/test_kernels_compile.py
    does the same for the scalar calls)."""
    n, card = len(ROWS), 37
    cond, uncond = _logits(n, card, seed=29), _logits(n, card, seed=30)
    values = _row_tensors(ROWS)
    row_ids = torch.arange(n)
    for name in ("torch", "cpp", "triton"):
        if name == "cpp" and backend.cpp_module() is None or name == "triton" and not backend.triton_interpreted():
            continue
        impls = backend.resolve("cpu", name)

        def step(cond, uncond, values, row_ids):
            return _sample_rows(cond, uncond, impls, row_ids, values)

        torch._dynamo.reset()
        explanation = torch._dynamo.explain(step)(cond, uncond, values, row_ids)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        eager = step(cond, uncond, values, row_ids)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(cond, uncond, values, row_ids)
        for got, want in zip(compiled, eager, strict=True):
            assert torch.equal(got, want), name


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_per_row_fake_matches_real_layout(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    skip_unless_available(name)
    n = len(ROWS)
    v = _row_tensors(ROWS)
    args = (_logits(n, 37), _logits(n, 37, seed=1), v["cfg_coef"], v["temperature"], v["seed"], v["offset"],
            torch.arange(n), v["use_sampling"], v["top_k"], v["top_p"], name)
    real = torch.ops.magnet_engine.sample_tokens_rows(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.magnet_engine.sample_tokens_rows(*[mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                            else a for a in args])
    for got, want in zip(fake, real, strict=True):
        assert (got.dtype, got.shape, got.stride()) == (want.dtype, want.shape, want.stride())
