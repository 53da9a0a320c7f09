"""The kernels as torch custom ops: a function calling every kernel the way a decoding step
does traces whole under torch.compile (0 graph breaks, fullgraph=True), and its compiled
results equal the eager ones bit for bit, for each implementation resolved once as an Impls.

Break counting uses the 'eager' backend and the comparison 'aot_eager' (which functionalises
the in-place re-masking op): no inductor code generation, so these stay fast on the CPU.
Triton runs interpreted here, behind an opaque op; the real triton_op registration is traced
in a subprocess by tests/test_triton_aot.py.
"""
import pytest
import torch

from magnet_engine.kernels import attention, backend, masking, sampling

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

BATCH, FRAMES, CARD, SPAN = 2, 12, 37, 3
SAMPLING = [dict(use_sampling=False, top_k=0, top_p=0.0), dict(use_sampling=True, top_k=5, top_p=0.0),
            dict(use_sampling=True, top_k=0, top_p=0.9), dict(use_sampling=True, top_k=0, top_p=0.0)]


def _impls(name):
    if name == "cpp" and backend.cpp_module() is None:
        pytest.skip("C++ extension magnet_engine._C not built")
    if name == "triton" and not backend.triton_interpreted():
        pytest.skip("Triton not installed, or its kernels are not interpreted on this CPU-only run")
    return backend.resolve("cpu", name)


def _inputs():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(BATCH, FRAMES, 3, 2, 16, generator=g).permute(2, 0, 3, 1, 4)  # the model's views
    return dict(
        cond=torch.randn(BATCH * FRAMES, CARD, generator=g) * 2, uncond=torch.randn(BATCH * FRAMES, CARD, generator=g),
        coefs=torch.tensor([3.0, 2.0, 1.5]), temps=torch.tensor([1.0, 0.8, 0.6]),
        seed=torch.tensor([5, 6], dtype=torch.long), offsets=torch.arange(3), num_masked=torch.tensor([4, 3, 2]),
        canvas=torch.full((BATCH, 2, FRAMES), 99, dtype=torch.long), q=qkv[0], k=qkv[1], v=qkv[2],
    )


def _step(impls, cond, uncond, coefs, temps, seed, offsets, num_masked, canvas, q, k, v):
    """Every kernel as a step calls it; scalars are 0-d views of per-step tensors (coefs[1])."""
    rows = torch.arange(BATCH * FRAMES)
    seeds = seed.repeat_interleave(FRAMES)
    out = []
    for options in SAMPLING:
        for u in (uncond, None):
            out += sampling.sample_tokens(cond, u, coefs[1], temps[1], seed=seeds, offset=offsets[1],
                                          row_ids=rows, impl=impls, **options)
    tokens, prob = out[2].view(BATCH, FRAMES), out[3].view(BATCH, FRAMES)
    for stage, arrangement in enumerate(("nonoverlap", "stride1")):
        options = dict(span_len=SPAN, arrangement=arrangement)
        row = canvas[:, stage]
        scores = masking.initial_span_scores(BATCH, FRAMES, prompt_len=2, device=cond.device, **options)
        masked = masking.remask(row, scores, num_masked[0], prompt_len=2, mask_id=99, impl=impls, **options)
        row.copy_(torch.where(row == 99, tokens, row))
        scores = masking.span_scores(prob, masked, scoring="max", **options)
        masked = masking.remask(row, scores, num_masked[1], prompt_len=2, mask_id=99, impl=impls, **options)
        out += [masked, scores]
    out += [canvas.clone(), attention.attention(q, k, v, 2, impl=impls), attention.attention(q, k, v, None, impl=impls)]
    return out


@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_step_traces_without_graph_breaks_and_compiled_equals_eager(name):
    impls = _impls(name)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_step)(impls, **_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    eager = _step(impls, **_inputs())
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")(impls, **_inputs())
    assert len(compiled) == len(eager)
    for got, want in zip(compiled, eager):
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_an_impl_given_by_name_resolves_at_trace_time():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_step)(None, **_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_resolve_once():
    impls = backend.resolve("cpu", "torch")
    assert impls is backend.resolve(torch.device("cpu"), "torch")
    assert (impls.sample_tokens, impls.remask, impls.remask_stride1, impls.banded_attention,
            impls.full_attention) == ("torch", "torch", "torch", "torch", "sdpa")
    if backend.cpp_module() is not None:
        assert backend.resolve("cpu").sample_tokens == "cpp"
    if backend.triton_interpreted():
        triton_impls = backend.resolve("cpu", "triton")
        assert (triton_impls.remask, triton_impls.remask_stride1, triton_impls.full_attention) == \
            ("triton", "torch", "triton")
    with pytest.raises(ValueError, match="impl"):
        backend.resolve("cpu", "cuda")


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_fake_implementations_match_real_layouts(name):
    """Inductor plans with the fake tensors' shapes and strides: they must be the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _impls(name)
    x = _inputs()
    ops = torch.ops.magnet_engine
    n = FRAMES // SPAN
    calls = [
        (ops.sample_tokens, (x["cond"], x["uncond"], x["coefs"][1], x["temps"][1], x["seed"].repeat_interleave(FRAMES),
                             x["offsets"][1], torch.arange(BATCH * FRAMES), sampling.TOP_P, 0, 0.9, name)),
        (ops.remask, (x["canvas"][:, 0], torch.rand(BATCH, n), x["num_masked"][0], masking.CHUNK, SPAN, 2, 99, name)),
        (ops.remask, (x["canvas"][:, 1], torch.rand(BATCH, FRAMES), x["num_masked"][0], masking.STRIDE1, SPAN, 2, 99,
                      name)),
        (ops.remask, (x["canvas"][:, 0], torch.rand(BATCH, n), x["num_masked"][0], masking.CHUNK, SPAN, 2, 99, name,
                      torch.arange(BATCH) + n - BATCH)),                # rows of their own span counts
        (ops.span_scores, (torch.rand(BATCH, FRAMES), torch.ones(BATCH, n, dtype=torch.bool), masking.CHUNK, SPAN,
                           "max")),
        (ops.banded_attention, (x["q"], x["k"], x["v"], 2, 0.25, name)),
        (ops.banded_attention, (x["q"], x["k"], x["v"], FRAMES, 0.25, name)),  # the torch path's SDPA branch
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real, fake = (out if isinstance(out, (tuple, list)) else [out] for out in (real, fake))
        for got, want in zip(fake, real, strict=True):
            assert (got.dtype, got.shape, got.stride()) == (want.dtype, want.shape, want.stride()), op
