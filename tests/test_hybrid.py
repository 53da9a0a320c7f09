"""Autoregressive decoding on a static KV cache, and hybrid AR + masked decoding."""
import ast
import inspect
import textwrap

import pytest
import torch

from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine import random_weights
from magnet_engine.engine import events, generate, hybrid, reference
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.model import MagnetLM, causal_self_attention
from magnet_engine.errors import InvalidOptionError, NumericalError

from test_reference import _cond


def ar_lm(kind: str, seed: int = 0, dim: int = 32, layers: int = 2, card: int = 40) -> MagnetLM:
    """A tiny random LM in the hybrid-MAGNeT or MusicGen layout, loaded like a checkpoint."""
    loaded = ckpt.read_lm_package(random_weights.random_lm_package(dim, 4, layers, d_t5=8, card=card, kind=kind, seed=seed),
                                  frame_rate=50)
    lm = MagnetLM(loaded.cfg)
    lm.load_state_dict(loaded.lm_state, strict=True)
    return lm.eval()


class HybridRunner:
    """Drives a hybrid (or two-model) generation the way the API does: a plan, then a run."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.ar = hybrid.ARRuntime(runtime.lm, runtime.dtype)

    def generate(self, cond, frames, params, ar_params, prefix_frames, *, handoff="staircase",
                 prefix_attention="cached", seeds=None, listener=None, rescorer=None):
        batch = cond.shape[0] // 2
        p = generate.plan(self.runtime.cfg, params, batch=batch, frames=frames, prefix_frames=prefix_frames,
                          hybrid=hybrid.HybridOptions(None, handoff, prefix_attention, ar_params),
                          rescore_fill=rescorer.options.fill if rescorer is not None else "special")
        return generate.run(p, generate.Models(runtime=self.runtime, ar=self.ar), cond,
                            seeds=seeds or [0] * batch, hook=rescorer, listener=listener)

    def tail_forward(self, plan, ar):
        return hybrid.tail_forward(self.runtime, plan, ar)


AR_PARAMS = [hybrid.ARParams(top_k=10), hybrid.ARParams(top_k=0, top_p=0.8, temperature=1.5),
             hybrid.ARParams(use_sampling=False), hybrid.ARParams(top_k=0, cfg_coef=1.0)]


@pytest.mark.parametrize("delays", [(0, 1, 2, 3), (0, 2, 1, 3), (0, 0, 0, 0)])
def test_delay_layout_round_trip(delays):
    codes = torch.randint(0, 40, (2, 4, 11))
    seq = hybrid.build_delayed(codes, delays, special=40)
    assert seq.shape == (2, 4, 11 + max(delays) + 1)
    assert (seq[..., 0] == 40).all()                          # the leading special step
    for k, d in enumerate(delays):                            # position p holds frame p - 1 - d_k
        assert torch.equal(seq[:, k, 1 + d:12 + d], codes[:, k])
        assert (seq[:, k, :1 + d] == 40).all() and (seq[:, k, 12 + d:] == 40).all()
    assert torch.equal(hybrid.revert_delayed(seq, delays, 11), codes)


@pytest.mark.parametrize("kind", ["musicgen", "hybrid"])
@pytest.mark.parametrize("params", AR_PARAMS)
def test_kv_cached_ar_equals_full_causal_recomputation(kind, params):
    lm = ar_lm(kind, seed=3)
    cond = _cond(lm, 2, seed=4)
    runtime = hybrid.ARRuntime(lm)
    got = runtime.generate(cond, 14, 20, params, seeds=[5, 6])
    logits_ref = []
    want = reference.reference_ar_generate(lm, cond, 14, 20, params, seeds=[5, 6], logits_out=logits_ref)
    assert torch.equal(got.seq, want)
    # cells outside the delay staircase hold the special id; generated ones are tokens
    assert (got.seq[..., 15:] == 40).all() and (got.seq[:, 3, :4] == 40).all()
    assert (got.seq[:, 0, 1:15] < 40).all()
    # step by step through the cache: each step's logits equal the full recomputation's
    cache = lm.new_cache(4, 20)
    positions = torch.arange(20)
    for p in range(14):
        mask = positions[None, :] <= p
        h = runtime.hidden(got.seq[:, :, p:p + 1], positions[p:p + 1], runtime.cross_kv(cond), cache, mask)
        assert torch.allclose(lm.head_logits(h)[:, :, 0], logits_ref[p], atol=1e-4, rtol=0), p


def test_ar_cache_reuse_across_calls_is_clean():
    lm = ar_lm("musicgen", seed=1)
    runtime = hybrid.ARRuntime(lm)
    params = hybrid.ARParams(top_k=10)
    first = runtime.generate(_cond(lm, 2, seed=1), 12, 20, params, seeds=[1, 2]).seq.clone()
    runtime.generate(_cond(lm, 2, seed=9), 19, 20, params, seeds=[7, 8])      # fills every slot
    runtime.generate(_cond(lm, 1, seed=5), 30, 40, params, seeds=[3])          # another shape
    again = runtime.generate(_cond(lm, 2, seed=1), 12, 20, params, seeds=[1, 2]).seq
    assert torch.equal(first, again)


def test_ar_step_reads_no_device_values():
    """The AR step goes through device tensors only: no .item()/.tolist()/.cpu(), no
    bool()/int()/float() of a tensor, so it never waits and can be captured as a graph."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(hybrid.ARRuntime._step)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in ("item", "tolist", "cpu", "numpy"), node.func.attr
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("bool", "int", "float"), node.func.id
    loop = [n for n in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(hybrid.ARRuntime.generate))))
            if isinstance(n, ast.For)]
    assert len(loop) == 1
    calls = {n.func.attr for n in ast.walk(loop[0]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not calls & {"item", "tolist", "cpu", "numpy"}


def test_ar_nan_weights_raise():
    lm = ar_lm("musicgen")
    with torch.no_grad():
        lm.linears[1].weight.fill_(float("nan"))
    with pytest.raises(NumericalError):
        hybrid.ARRuntime(lm).generate(_cond(lm, 1), 5, 12, hybrid.ARParams())


def test_ar_errors():
    with pytest.raises(InvalidOptionError, match="delay"):
        hybrid.ARRuntime(ar_lm("magnet"))
    with pytest.raises(InvalidOptionError, match="CUDA"):
        hybrid.ARRuntime(ar_lm("musicgen"), cuda_graphs=True)
    with pytest.raises(InvalidOptionError, match="steps"):
        hybrid.ARRuntime(ar_lm("musicgen")).generate(_cond(ar_lm("musicgen"), 1), 20, 20, hybrid.ARParams())
    with pytest.raises(InvalidOptionError, match="top_k"):
        hybrid.ARParams(top_k=-1).validate()
    with pytest.raises(InvalidOptionError, match="prefix model"):
        generate.plan(ar_lm("magnet").cfg, DecodingParams(), batch=1, frames=30, prefix_frames=5)
    with pytest.raises(InvalidOptionError, match="prefix model: its codes"):  # card 48 vs 40
        generate.plan(ar_lm("magnet").cfg, DecodingParams(), batch=1, frames=30, prefix_frames=5,
                      prefix_cfg=ar_lm("musicgen", card=48).cfg)


@pytest.mark.parametrize("handoff,steps,lens", [("staircase", 10, (10, 9, 8, 7)), ("rectangle", 13, (10,) * 4)])
def test_handoff_plan(handoff, steps, lens):
    lm = ar_lm("hybrid")
    plan = hybrid.plan_hybrid(lm.cfg, 50, 10, DecodingParams(), handoff)
    assert (plan.ar_steps, plan.prompt_lens, plan.frames, plan.seq_len) == (steps, lens, 48, 52)
    # first generated chunk of codebook k starts at 3*floor(P_k/3); its row is that + d_k
    assert plan.query_start == min(3 * (n // 3) + d for n, d in zip(lens, lm.cfg.delays))
    assert hybrid.plan_hybrid(lm.cfg, 50, 10, DecodingParams(), handoff, "bidirectional").query_start == 0
    with pytest.raises(InvalidOptionError, match="prefix"):
        hybrid.plan_hybrid(lm.cfg, 50, 48, DecodingParams(), handoff)
    with pytest.raises(InvalidOptionError, match="hybrid_handoff"):
        hybrid.plan_hybrid(lm.cfg, 50, 10, DecodingParams(), "triangle")


@pytest.mark.parametrize("handoff", hybrid.HANDOFFS)
@pytest.mark.parametrize("arrangement", ["nonoverlap", "stride1"])
def test_hybrid_prefix_cells_fixed_through_masked_decoding(handoff, arrangement):
    lm = ar_lm("hybrid", seed=2)
    cond = _cond(lm, 2, seed=3)
    params = DecodingParams(decoding_steps=(4, 3, 2, 2), span_arrangement=arrangement)
    ar_params = hybrid.ARParams(top_k=10)
    plan = hybrid.plan_hybrid(lm.cfg, 40, 11, params, handoff)
    ar_seq = hybrid.ARRuntime(lm).generate(cond, plan.ar_steps, plan.seq_len, ar_params, seeds=[1, 2]).seq
    prefix = hybrid.revert_delayed(ar_seq, lm.cfg.delays, 11)

    runtime = Runtime(lm)
    seen, first = [], []

    def check(event):   # read the runtime's canvas after every masked step
        if isinstance(event, events.PrefixReady):
            first.append(event.codes)
        if not isinstance(event, (events.ARStep, events.StageStep)):
            return
        seen.append(event.done)
        if isinstance(event, events.StageStep):
            for k, n in enumerate(plan.prompt_lens):
                assert torch.equal(event.canvas[:, k, :n], prefix[:, k, :n]), (event.done, k)

    handed = {}
    masked_decoding = runtime.generate

    def record(*args, **kwargs):   # what the hand-off gives masked decoding
        handed.update(prompt=kwargs["prompt"].clone(), lens=kwargs["prompt_lens"])
        return masked_decoding(*args, **kwargs)

    runtime.generate = record
    out = HybridRunner(runtime).generate(cond, 40, params, ar_params, 11, handoff=handoff, seeds=[1, 2],
                                         listener=check)
    assert handed["lens"] == plan.prompt_lens and handed["prompt"].shape == (2, 4, 11)
    for k, n in enumerate(plan.prompt_lens):   # exactly the fixed cells: AR tokens, then the mask id
        assert torch.equal(handed["prompt"][:, k, :n], prefix[:, k, :n])
        assert (handed["prompt"][:, k, n:] == lm.cfg.mask_id).all()
    assert seen[-1] == plan.ar_steps + 11
    for k, n in enumerate(plan.prompt_lens):
        assert torch.equal(out[:, k, :n], prefix[:, k, :n])
    assert (out >= 0).all() and (out < 40).all() and out.shape == (2, 4, plan.frames)
    assert torch.equal(first[0], prefix[..., :plan.audio_frames])
    assert plan.audio_frames == (11 - 3 if handoff == "staircase" else 11)


@pytest.mark.parametrize("handoff", hybrid.HANDOFFS)
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_prefix_kv_reuse_equals_causal_recomputation(handoff, stage):
    """The cached tail forward (prefix rows' keys/values from the AR phase, queries from
    query_start on) gives the logits of recomputing every row, prefix causally, each step."""
    lm = ar_lm("hybrid", seed=5)
    cond = _cond(lm, 2, seed=6)
    params = DecodingParams()
    plan = hybrid.plan_hybrid(lm.cfg, 45, 12, params, handoff)
    runtime = Runtime(lm)
    hy = HybridRunner(runtime)
    ar = hy.ar.generate(cond, plan.ar_steps, plan.seq_len, hybrid.ARParams(top_k=10), seeds=[3, 4])
    codes = torch.randint(0, 40, (2, 4, plan.frames))          # a mid-decoding canvas
    codes[:, stage, ::2] = 40
    codes[:, stage + 1:] = 40
    prefix = hybrid.revert_delayed(ar.seq, lm.cfg.delays, 12)
    for k, n in enumerate(plan.prompt_lens):
        codes[:, k, :n] = prefix[:, k, :n]
    fast = lm.out_norm(hy.tail_forward(plan, ar)(codes, stage, False))         # [2B, T', D] per frame
    full = reference.reference_tail_hidden(lm, codes, cond, plan, stage)             # [2B, seq_len, D] per row
    d = lm.cfg.delays[stage]
    frames = torch.arange(plan.frames)
    used = frames + d >= plan.query_start
    want = full[:, (frames + d)[used]]
    assert torch.allclose(lm.linears[stage](fast[:, used]), lm.linears[stage](want), atol=1e-4, rtol=0)
    # the bidirectional variant is a different model of the prefix rows
    bi = hybrid.plan_hybrid(lm.cfg, 45, 12, params, handoff, "bidirectional")
    other = reference.reference_tail_hidden(lm, codes, cond, bi, stage)[:, (frames + d)[used]]
    assert not torch.allclose(other, want, atol=1e-3)


def test_bidirectional_prefix_attention_runs_and_differs():
    lm = ar_lm("hybrid", seed=7)
    cond = _cond(lm, 1, seed=1)
    params = DecodingParams(use_sampling=False, decoding_steps=(3, 2, 2, 2))
    hy = HybridRunner(Runtime(lm))
    ar_params = hybrid.ARParams(use_sampling=False)
    cached = hy.generate(cond, 36, params, ar_params, 9, seeds=[0])
    bidir = hy.generate(cond, 36, params, ar_params, 9, prefix_attention="bidirectional", seeds=[0])
    assert torch.equal(cached[:, 0, :9], bidir[:, 0, :9])      # same AR prefix
    assert not torch.equal(cached, bidir)


def test_hybrid_low_precision_runs():
    lm = ar_lm("hybrid", seed=8)
    cond = _cond(lm, 2, seed=2)
    params = DecodingParams(use_sampling=False, decoding_steps=(3, 2, 2, 2))
    ar_params = hybrid.ARParams(use_sampling=False)
    exact = HybridRunner(Runtime(lm)).generate(cond, 30, params, ar_params, 8)
    low = HybridRunner(Runtime(lm, precision="bf16")).generate(cond, 30, params, ar_params, 8)
    assert low.shape == exact.shape and (low >= 0).all() and (low < 40).all()
    assert (low == exact).float().mean() > 0.5


def test_masked_stage_band_is_in_frames_of_the_stage_codebook():
    """One layer, stage 2: changing codebook 2's token at frame t' changes the stage's
    logits exactly at frames |t − t'| <= W (the band, moved into the delay layout)."""
    lm = ar_lm("hybrid", seed=9, layers=1)
    cond = _cond(lm, 1, seed=3)
    plan = hybrid.plan_hybrid(lm.cfg, 60, 6, DecodingParams(), "staircase", "bidirectional")
    codes = torch.randint(0, 40, (1, 4, plan.frames))
    codes[:, 3:] = 40
    d, t_changed = lm.cfg.delays[2], 30
    other = codes.clone()
    other[0, 2, t_changed] = (codes[0, 2, t_changed] + 1) % 40
    rows = torch.arange(plan.frames) + d
    a = reference.reference_tail_hidden(lm, codes, cond, plan, 2)[:1, rows]
    b = reference.reference_tail_hidden(lm, other, cond, plan, 2)[:1, rows]
    changed = (a - b).abs().amax(dim=(0, 2)) > 0
    expect = (torch.arange(plan.frames) - t_changed).abs() <= lm.cfg.subcodes_context
    assert torch.equal(changed, expect)


@pytest.mark.parametrize("impl", [None, "torch", "triton"])
@pytest.mark.parametrize("prefix_attention", hybrid.PREFIX_ATTENTIONS)
@pytest.mark.parametrize("window", [None, 0, 2, 5])
def test_tail_attention_equals_the_dense_stage_mask(impl, prefix_attention, window):
    """The shifted-query banded path (and its prefix / last-row pieces) against SDPA with the
    dense [seq_len, seq_len] mask of stage_attention_mask."""
    import dataclasses
    import torch.nn.functional as F

    cfg = dataclasses.replace(ar_lm("hybrid").cfg, subcodes_context=-1 if window is None else window)
    plan = hybrid.plan_hybrid(cfg, 40, 10, DecodingParams(), "staircase", prefix_attention)
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 3, plan.seq_len, 16, generator=gen) for _ in range(2))
    q = torch.randn(2, 3, plan.seq_len - plan.query_start, 16, generator=gen)
    mask = reference.stage_attention_mask(cfg, plan, 1, window, "cpu")[plan.query_start:]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = hybrid.tail_attention(plan, window, impl)(q, k, v)
    assert torch.allclose(got, want, atol=2e-5, rtol=0)


def test_tail_forward_conditional_rows_alone():
    lm = ar_lm("hybrid", seed=5)
    cond = _cond(lm, 2, seed=6)
    plan = hybrid.plan_hybrid(lm.cfg, 45, 12, DecodingParams())
    hy = HybridRunner(Runtime(lm))
    with torch.no_grad():
        ar = hy.ar.generate(cond, plan.ar_steps, plan.seq_len, hybrid.ARParams(top_k=10), seeds=[3, 4])
        codes = torch.randint(0, 40, (2, 4, plan.frames))
        forward = hy.tail_forward(plan, ar)
        both, alone = forward(codes, 1, False), forward(codes, 1, True)
    assert both.shape[0] == 4 and alone.shape[0] == 2
    assert torch.allclose(alone, both[:2], atol=1e-5, rtol=0)


def test_hybrid_rows_independent_of_batch():
    """Per-row seeds and row-keyed draws: a row's hybrid sample does not depend on which
    other rows share its batch (AR phase and masked tail alike)."""
    lm = ar_lm("hybrid", seed=4)
    params = DecodingParams(decoding_steps=(4, 2, 2, 2))
    cond2 = _cond(lm, 2, seed=8)
    hy = HybridRunner(Runtime(lm))
    both = hy.generate(cond2, 33, params, hybrid.ARParams(top_k=10), 9, seeds=[7, 8])
    alone = hy.generate(torch.cat([cond2[1:2], cond2[3:4]]), 33, params, hybrid.ARParams(top_k=10), 9, seeds=[8])
    assert torch.equal(both[1:2], alone)


def test_plain_masked_decoding_refuses_a_delay_layout_checkpoint():
    lm = ar_lm("hybrid")
    with pytest.raises(InvalidOptionError, match="hybrid plan"):
        Runtime(lm).generate(_cond(lm, 1), 30, DecodingParams())
    from magnet_engine.engine import reference
    with pytest.raises(InvalidOptionError, match="parallel layout"):
        reference.generate_tokens(lm, _cond(lm, 1), 30, DecodingParams())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_cached_logits_error_within_twice_the_plain_model(precision):
    """The KV-cached AR step and the cached hybrid tail in low precision: their logits' error
    against fp32 is at most 2x that of the plain model run whole in the same precision."""
    import copy
    from magnet_engine.engine import decoding

    lm = ar_lm("hybrid", seed=10, dim=64)
    dtype = decoding.PRECISIONS[precision][0]
    cond = _cond(lm, 2, seed=2)
    plain_low = copy.deepcopy(lm).to(dtype)
    params = DecodingParams()
    plan = hybrid.plan_hybrid(lm.cfg, 30, 9, params)
    exact_ar = HybridRunner(Runtime(lm))
    low_rt = Runtime(copy.deepcopy(lm), precision=precision)   # it casts its LM in place; lm stays fp32
    low = HybridRunner(low_rt)
    with torch.no_grad():
        ar = exact_ar.ar.generate(cond, plan.ar_steps, plan.seq_len, hybrid.ARParams(top_k=10), seeds=[1, 2])
        codes = torch.randint(0, 40, (2, 4, plan.frames))
        prefix = hybrid.revert_delayed(ar.seq, lm.cfg.delays, 9)
        for k, n in enumerate(plan.prompt_lens):
            codes[:, k, :n] = prefix[:, k, :n]
        # AR steps: replay the exact sequence through the low-precision cache, step by step
        positions = torch.arange(plan.seq_len)
        cache = low_rt.lm.new_cache(4, plan.seq_len, dtype)
        low_kv = low.ar.cross_kv(cond)
        for p in range(plan.ar_steps):
            seq = ar.seq[:, :, :p + 1]
            mask = positions[None, :] <= p
            got = low_rt.lm.head_logits(low.ar.hidden(ar.seq[:, :, p:p + 1], positions[p:p + 1], low_kv, cache, mask))
            exact = lm.head_logits(lm.hidden(torch.cat([seq, seq]), cond, 0, attend=causal_self_attention)[:, -1:])
            plain = plain_low.head_logits(plain_low.hidden(torch.cat([seq, seq]), cond.to(dtype), 0,
                                                           attend=causal_self_attention)[:, -1:])
            fast_err = (got.double() - exact.double()).abs().max()
            plain_err = (plain.double() - exact.double()).abs().max()
            assert fast_err <= 2 * plain_err, (p, float(fast_err), float(plain_err))
        # the masked tail over that low-precision cache (now holding the prefix rows 0..F-1)
        tail = low.tail_forward(plan, hybrid.ARResult(ar.seq, cache, low_kv, plan.ar_steps))
        for stage in (0, 2):
            d = lm.cfg.delays[stage]
            frames = torch.arange(plan.frames)
            used = frames + d >= plan.query_start
            rows = (frames + d)[used]
            got = lm.linears[stage](lm.out_norm(tail(codes, stage, False)[:, used].float())).double()
            exact = lm.linears[stage](reference.reference_tail_hidden(lm, codes, cond, plan, stage)[:, rows]).double()
            plain_rows = reference.reference_tail_hidden(plain_low, codes, cond.to(dtype), plan, stage)[:, rows]
            plain = plain_low.linears[stage](plain_rows).double()
            fast_err = (got - exact).abs().max()
            plain_err = (plain - exact).abs().max()
            assert plain_err > 0
            assert fast_err <= 2 * plain_err, (stage, float(fast_err), float(plain_err))


# ----------------------------------------------------------------------------- on CUDA (marker gpu)
@pytest.mark.gpu
def test_ar_graph_equals_eager_and_is_reused():
    cuda = torch.device("cuda")
    lm = ar_lm("musicgen", seed=2).to(cuda)
    cond = _cond(lm, 2).to(cuda)
    params = hybrid.ARParams(top_k=10)
    eager = hybrid.ARRuntime(lm).generate(cond, 14, 20, params, seeds=[5, 6]).seq.clone()
    graphed = hybrid.ARRuntime(lm, cuda_graphs=True)
    assert torch.equal(graphed.generate(cond, 14, 20, params, seeds=[5, 6]).seq, eager)
    state = next(iter(graphed._states.values()))
    graph = graphed._states.graphs(state)[None]
    assert torch.equal(graphed.generate(cond, 14, 20, params, seeds=[5, 6]).seq, eager)
    assert graphed._states.graphs(state)[None] is graph                          # captured once


@pytest.mark.gpu
def test_hybrid_with_graphs_equals_eager():
    cuda = torch.device("cuda")
    lm = ar_lm("hybrid", seed=7).to(cuda)
    cond = _cond(lm, 1, seed=1).to(cuda)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    eager = HybridRunner(Runtime(lm)).generate(cond, 36, params, hybrid.ARParams(top_k=10), 9, seeds=[0])
    runner = HybridRunner(Runtime(lm, cuda_graphs=True))
    runner.ar = hybrid.ARRuntime(lm, cuda_graphs=True)
    assert torch.equal(runner.generate(cond, 36, params, hybrid.ARParams(top_k=10), 9, seeds=[0]), eager)
