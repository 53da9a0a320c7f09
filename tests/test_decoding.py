"""The fast runtime against its oracle, the reference loop."""
import ast
import copy
import inspect
import textwrap

import pytest
import torch

from magnet_engine.engine import decoding, reference
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.kernels import rng
from magnet_engine.kernels.sampling import _nucleus_keep

from test_model import tiny_lm
from test_reference import _cond




@pytest.mark.parametrize("impl", [None, "torch"])
def test_fixture_greedy_and_prompted(fixture_lm, golden, impl):
    runtime = Runtime(fixture_lm, impl=impl)
    cond = golden["conditioning"]["cond_embeds"]
    tokens = runtime.generate(cond, 100, DecodingParams(use_sampling=False))
    assert torch.equal(tokens, golden["generate_greedy"]["tokens"])
    want = golden["generate_prompted_greedy"]
    tokens = runtime.generate(cond, 100, DecodingParams(use_sampling=False), prompt=want["prompt"])
    assert torch.equal(tokens, want["tokens"])


def keyed_sampler(params: DecodingParams, seeds, frames: int):
    """The reference's sampler hook drawing exactly as the fast runtime's kernels do."""
    step = {"n": 0}

    def sample(probs, stage, i):
        b, t, c = probs.shape
        flat = probs.reshape(-1, c)
        if params.top_p > 0:
            kept = _nucleus_keep(flat, params.top_p)
        elif params.top_k > 0:
            kept = flat >= torch.topk(flat, params.top_k, dim=-1).values[:, -1:]
            flat *= kept.float()               # the reference's in-place renormalisation
            flat.div_(flat.sum(-1, keepdim=True))
        else:
            kept = torch.ones_like(flat, dtype=torch.bool)
        rows = torch.arange(t)[None].expand(b, -1).reshape(-1)
        seed = torch.tensor(seeds, dtype=torch.long).repeat_interleave(t)[:, None]
        u = rng.uniform(seed, torch.tensor(step["n"]), rows[:, None] * c + torch.arange(c))
        step["n"] += 1
        return torch.where(kept, flat / -torch.log(u), -1.0).argmax(-1).reshape(b, t)

    return sample


@pytest.mark.parametrize("params", [
    DecodingParams(decoding_steps=(5, 3, 3, 2)),                                   # nucleus, default
    DecodingParams(top_p=0.0, top_k=7, decoding_steps=(4, 2, 2, 2), span_scoring="prod"),
    DecodingParams(top_p=0.0, top_k=1, decoding_steps=(4, 2, 2, 2)),
    DecodingParams(top_p=0.0, decoding_steps=(3, 2, 2, 2), temperature=1.0, anneal_temp=False),
    DecodingParams(decoding_steps=(4, 2, 2, 2), span_arrangement="stride1"),
], ids=["top_p", "top_k_prod", "top_k_1", "categorical", "stride1"])
def test_same_draws_same_tokens_as_reference(params):
    lm = tiny_lm(seed=11, layers=2)
    cond = _cond(lm, 2, seed=3)
    seeds = [17, 99]
    prompt = torch.randint(0, lm.cfg.card, (2, 4, 5), generator=torch.Generator().manual_seed(2))
    fast = Runtime(lm).generate(cond, 28, params, prompt=prompt, seeds=seeds)
    ref = reference.generate_tokens(lm, cond, 28, params, prompt=prompt, sampler=keyed_sampler(params, seeds, 28))
    assert torch.equal(fast, ref)


def test_rows_independent_of_batch():
    lm = tiny_lm(seed=12)
    params = DecodingParams(decoding_steps=(4, 2, 2, 2))
    cond2 = _cond(lm, 2, seed=5)
    both = Runtime(lm).generate(cond2, 24, params, seeds=[7, 8])
    alone = Runtime(lm).generate(torch.cat([cond2[1:2], cond2[3:4]]), 24, params, seeds=[8])
    assert torch.equal(both[1:2], alone)


def test_buffers_reused_across_shapes_do_not_leak():
    lm = tiny_lm(seed=13)
    runtime = Runtime(lm)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    cond = _cond(lm, 1)
    first = runtime.generate(cond, 30, params, seeds=[1])
    runtime.generate(cond, 18, params, seeds=[2])
    runtime.generate(_cond(lm, 2), 30, params, seeds=[3, 4])
    again = runtime.generate(cond, 30, params, seeds=[1])
    assert torch.equal(first, again)


def test_buffer_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(decoding, "MAX_STATES", 2)
    lm = tiny_lm(seed=13)
    runtime = Runtime(lm)
    params = DecodingParams(decoding_steps=(1, 1, 1, 1))
    first = runtime.generate(_cond(lm, 1), 12, params, seeds=[5])
    for frames in (15, 18, 21):
        runtime.generate(_cond(lm, 1), frames, params, seeds=[1])
    assert [key[:2] for key in runtime._states] == [(1, 18), (1, 21)]       # the two most recently used
    assert torch.equal(runtime.generate(_cond(lm, 1), 12, params, seeds=[5]), first)   # rebuilt cleanly


def test_low_precision_agrees_with_fp32():
    lm = tiny_lm(seed=14, layers=2)
    cond = _cond(lm, 2, seed=1)
    params = DecodingParams(use_sampling=False, decoding_steps=(4, 2, 2, 2))
    fp32 = Runtime(lm).generate(cond, 30, params)
    bf16 = Runtime(lm, precision="bf16").generate(cond, 30, params)
    assert bf16.shape == fp32.shape and bf16.max() < lm.cfg.card
    assert (bf16 == fp32).float().mean() > 0.5


def test_hot_loop_reads_no_device_values():
    """Structural check (no CUDA here for set_sync_debug_mode): the loop body of
    Runtime.generate calls no .item()/.cpu()/.tolist()/.numpy(), no int()/float()/bool()
    on tensors, and branches only on host values from the precomputed schedule."""
    source = inspect.getsource(decoding.Runtime.generate)
    tree = ast.parse(textwrap.dedent(source))
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    assert loops, "expected the decoding loop"
    # the step itself, whole, and what the loop runs between steps
    loops += [ast.parse(textwrap.dedent(inspect.getsource(f))) for f in (decoding.Runtime._step, decoding.Runtime._run_step)]
    forbidden = {"item", "cpu", "tolist", "numpy", "nonzero", "synchronize", "tensor"}
    for loop in loops:
        for node in ast.walk(loop):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr not in forbidden, f"loop calls .{node.func.attr}()"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"int", "float", "bool"}, f"loop converts with {node.func.id}()"
    # the per-step scalars come from the host schedule built before the loop
    assert "stage_schedules(" in inspect.getsource(decoding.Runtime.prepare)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_logits_error_within_twice_the_reference(precision):
    """flash-attention's convention: the fast path's low-precision error against fp32 is at
    most 2x the error of the plain model run in the same precision."""
    import copy

    lm = tiny_lm(seed=15, layers=2, dim=64, heads=4)
    dtype = decoding.PRECISIONS[precision][0]
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.cfg.card + 1, (2, 4, 33), generator=gen)
    cond = torch.cat([torch.randn(2, 5, lm.cfg.dim, generator=gen), torch.zeros(2, 5, lm.cfg.dim)])
    plain_low = copy.deepcopy(lm).to(dtype)
    runtime = Runtime(copy.deepcopy(lm), precision=precision)   # it casts its LM in place; lm stays fp32
    with torch.no_grad():
        for stage in (0, 2):
            exact = lm.stage_logits(torch.cat([codes, codes]), cond, stage).double()
            plain = plain_low.stage_logits(torch.cat([codes, codes]).clone(), cond.to(dtype), stage).double()
            kv = runtime.lm.cross_kv(cond[:2].to(dtype))
            hidden = runtime._forward_hidden(codes, kv, stage)
            fast = runtime.lm.linears[stage](runtime.lm.out_norm(hidden.float())).double()
            plain_err = (plain - exact).abs().max()
            fast_err = (fast - exact).abs().max()
            assert plain_err > 0
            assert fast_err <= 2 * plain_err, (stage, float(fast_err), float(plain_err))


def test_compiled_runtime_gives_the_same_tokens():
    lm = tiny_lm(seed=16)
    cond = _cond(lm, 1)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    eager = Runtime(lm).generate(cond, 30, params, seeds=[5])
    compiled = Runtime(lm, compile=True)
    assert torch.equal(compiled.generate(cond, 30, params, seeds=[5]), eager)
    assert torch.equal(compiled.generate(cond, 30, params, seeds=[5]), eager)   # replay, no recompile needed


def test_nan_logits_raise_numerical_error():
    from magnet_engine.errors import NumericalError

    lm = tiny_lm(seed=17)
    with torch.no_grad():
        lm.linears[1].weight[3, 0] = float("nan")     # only stage 1's head, only one token
    with pytest.raises(NumericalError):
        Runtime(lm).generate(_cond(lm, 1), 24, DecodingParams(decoding_steps=(2, 2, 2, 2)), seeds=[0])


def test_cfg_coefficient_one_skips_the_null_half_exactly():
    lm = tiny_lm(seed=18)
    cond = _cond(lm, 2)
    params = DecodingParams(max_cfg_coef=1.0, min_cfg_coef=1.0, decoding_steps=(3, 2, 2, 2))
    fast = Runtime(lm).generate(cond, 24, params, seeds=[1, 2])
    ref = reference.generate_tokens(lm, cond, 24, params, sampler=keyed_sampler(params, [1, 2], 24))
    assert torch.equal(fast, ref)


def test_mixed_precision_error_within_twice_autocasts():
    """The CUDA default ('fp16-mixed': low-precision matmuls, fp32 residual stream and norms)
    is what the reference's autocast computes: its logits error against fp32 is at most 2x
    that of the plain model run under torch.autocast on the same inputs. On the CPU the same
    mode in bf16 (CPU autocast's dtype) stands in for fp16."""
    lm = tiny_lm(seed=15, layers=2, dim=64, heads=4)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.cfg.card + 1, (2, 4, 33), generator=gen)
    cond = torch.cat([torch.randn(2, 5, lm.cfg.dim, generator=gen), torch.zeros(2, 5, lm.cfg.dim)])
    runtime = Runtime(copy.deepcopy(lm), precision="bf16-mixed")     # it casts its LM in place
    layer = runtime.lm.transformer.layers[0]
    assert layer.linear1.weight.dtype == torch.bfloat16 and layer.norm1.weight.dtype == torch.float32
    with torch.no_grad():
        for stage in (0, 2):
            exact = lm.stage_logits(torch.cat([codes, codes]), cond, stage).double()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = lm.stage_logits(torch.cat([codes, codes]), cond, stage).double()
            hidden = runtime._forward_hidden(codes, runtime.lm.cfg_cross_kv(cond, torch.bfloat16), stage)
            assert hidden.dtype == torch.float32                              # the residual stream
            fast = runtime.lm.linears[stage](runtime.lm.out_norm(hidden)).double()
            auto_err, fast_err = (auto - exact).abs().max(), (fast - exact).abs().max()
            assert auto_err > 0
            assert fast_err <= 2 * auto_err, (stage, float(fast_err), float(auto_err))


# ----------------------------------------------------------------------------- on CUDA (marker gpu)
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16-mixed"])
@pytest.mark.parametrize("arrangement", ["nonoverlap", "stride1"])
def test_cuda_graph_tokens_equal_eager(precision, arrangement):
    cuda = torch.device("cuda")
    lm = tiny_lm(seed=3).to(cuda)
    params = DecodingParams(decoding_steps=(5, 3, 3, 3), span_arrangement=arrangement)
    cond = _cond(lm, 2).to(cuda)
    eager = Runtime(lm, precision=precision).generate(cond, 40, params, seeds=[1, 2])
    graphs = Runtime(lm, precision=precision, cuda_graphs=True)
    assert torch.equal(graphs.generate(cond, 40, params, seeds=[1, 2]), eager)
    assert torch.equal(graphs.generate(cond, 40, params, seeds=[1, 2]), eager)     # replayed, not recaptured
    other = _cond(lm, 2, seed=5).to(cuda)                                       # new inputs, same graphs
    assert torch.equal(graphs.generate(other, 40, params, seeds=[3, 4]),
                       Runtime(lm, precision=precision).generate(other, 40, params, seeds=[3, 4]))


@pytest.mark.gpu
def test_compiled_and_graphed_tokens_equal_eager():
    cuda = torch.device("cuda")
    lm = tiny_lm(seed=4).to(cuda)
    params = DecodingParams(decoding_steps=(4, 2, 2, 2))
    cond = _cond(lm, 1).to(cuda)
    eager = Runtime(lm).generate(cond, 30, params, seeds=[7])
    assert torch.equal(Runtime(lm, compile=True).generate(cond, 30, params, seeds=[7]), eager)
    assert torch.equal(Runtime(lm, compile=True, cuda_graphs=True).generate(cond, 30, params, seeds=[7]), eager)


@pytest.mark.gpu
def test_triton_is_the_default_on_cuda_and_matches_torch():
    cuda = torch.device("cuda")
    lm = tiny_lm(seed=5).to(cuda)
    params = DecodingParams(use_sampling=False, decoding_steps=(4, 2, 2, 2))
    cond = _cond(lm, 2).to(cuda)
    fast = Runtime(lm)
    assert fast.impl.sample_tokens == "triton"
    assert torch.equal(fast.generate(cond, 30, params), Runtime(lm, impl="torch").generate(cond, 30, params))
