"""GPU-only checks: CUDA graphs, compiled Triton kernels, flash-attn and the CUDA default
precision, on tiny random models. Skipped where there is no CUDA device (this project's CI);
`benchmarks/gpu_suite.sh` runs them on a lent GPU."""
import pytest
import torch

from magnet_engine.engine import generate, hybrid
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.playdiffusion.plan import plan_speech
from magnet_engine.engine.precision import default_precision

from test_hybrid import HybridRunner, ar_lm
from test_model import tiny_lm
from test_reference import _cond

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _on_cuda(lm):
    return lm.to(CUDA)


@pytest.mark.parametrize("precision", ["fp32", "fp16-mixed"])
@pytest.mark.parametrize("arrangement", ["nonoverlap", "stride1"])
def test_cuda_graph_tokens_equal_eager(precision, arrangement):
    lm = _on_cuda(tiny_lm(seed=3))
    params = DecodingParams(decoding_steps=(5, 3, 3, 3), span_arrangement=arrangement)
    cond = _cond(lm, 2).to(CUDA)
    eager = Runtime(lm, precision=precision).generate(cond, 40, params, seeds=[1, 2])
    graphs = Runtime(lm, precision=precision, cuda_graphs=True)
    assert torch.equal(graphs.generate(cond, 40, params, seeds=[1, 2]), eager)
    assert torch.equal(graphs.generate(cond, 40, params, seeds=[1, 2]), eager)     # replayed, not recaptured
    other = _cond(lm, 2, seed=5).to(CUDA)                                       # new inputs, same graphs
    assert torch.equal(graphs.generate(other, 40, params, seeds=[3, 4]),
                       Runtime(lm, precision=precision).generate(other, 40, params, seeds=[3, 4]))


def test_compiled_and_graphed_tokens_equal_eager():
    lm = _on_cuda(tiny_lm(seed=4))
    params = DecodingParams(decoding_steps=(4, 2, 2, 2))
    cond = _cond(lm, 1).to(CUDA)
    eager = Runtime(lm).generate(cond, 30, params, seeds=[7])
    assert torch.equal(Runtime(lm, compile=True).generate(cond, 30, params, seeds=[7]), eager)
    assert torch.equal(Runtime(lm, compile=True, cuda_graphs=True).generate(cond, 30, params, seeds=[7]), eager)


def test_ar_graph_equals_eager_and_is_reused():
    lm = _on_cuda(ar_lm("musicgen", seed=2))
    cond = _cond(lm, 2).to(CUDA)
    params = hybrid.ARParams(top_k=10)
    eager = hybrid.ARRuntime(lm).generate(cond, 14, 20, params, seeds=[5, 6]).seq.clone()
    graphed = hybrid.ARRuntime(lm, cuda_graphs=True)
    assert torch.equal(graphed.generate(cond, 14, 20, params, seeds=[5, 6]).seq, eager)
    state = next(iter(graphed._states.values()))
    graph = graphed._states.graphs(state)[None]
    assert torch.equal(graphed.generate(cond, 14, 20, params, seeds=[5, 6]).seq, eager)
    assert graphed._states.graphs(state)[None] is graph                          # captured once


def test_hybrid_with_graphs_equals_eager():
    lm = _on_cuda(ar_lm("hybrid", seed=7))
    cond = _cond(lm, 1, seed=1).to(CUDA)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    eager = HybridRunner(Runtime(lm)).generate(cond, 36, params, hybrid.ARParams(top_k=10), 9, seeds=[0])
    runner = HybridRunner(Runtime(lm, cuda_graphs=True))
    runner.ar = hybrid.ARRuntime(lm, cuda_graphs=True)
    assert torch.equal(runner.generate(cond, 36, params, hybrid.ARParams(top_k=10), 9, seeds=[0]), eager)


def test_triton_is_the_default_and_matches_torch():
    lm = _on_cuda(tiny_lm(seed=5))
    params = DecodingParams(use_sampling=False, decoding_steps=(4, 2, 2, 2))
    cond = _cond(lm, 2).to(CUDA)
    fast = Runtime(lm)
    assert fast.impl.sample_tokens == "triton"
    assert torch.equal(fast.generate(cond, 30, params), Runtime(lm, impl="torch").generate(cond, 30, params))


def test_default_precision_on_cuda_is_mixed_fp16():
    assert default_precision(CUDA) == "fp16-mixed"
    lm = _on_cuda(tiny_lm(seed=6, dim=64, heads=4))
    runtime = Runtime(lm, precision="fp16-mixed")
    layer = runtime.lm.transformer.layers[0]
    assert layer.linear1.weight.dtype == torch.float16 and layer.norm1.weight.dtype == torch.float32
    p = generate.plan(lm.cfg, DecodingParams(decoding_steps=(3, 2, 2, 2)), batch=1, frames=30)
    codes = generate.run(p, generate.Models(runtime=runtime), _cond(lm, 1).to(CUDA), seeds=[0])
    assert codes.shape == (1, 4, 30) and (codes < lm.cfg.card).all()


def test_flash_attn_stage0_when_installed():
    flash = pytest.importorskip("flash_attn")
    from magnet_engine.kernels import attention

    q, k, v = (torch.randn(2, 4, 100, 64, device=CUDA, dtype=torch.float16) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    got = attention.full_attention(q, k, v).float()
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    assert (got - want).abs().max() <= 2 * (low - want).abs().max() + 1e-3, flash.__version__


# ----------------------------------------------------------------------------- PlayDiffusion's step
def _speech_model():
    from magnet_engine.engine.playdiffusion.inpainter import Inpainter, InpainterConfig

    torch.manual_seed(0)
    cfg = InpainterConfig(vocab_size=40, codebook_size=64, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=32)
    return Inpainter(cfg).eval().to(CUDA)


def _speech_loop(runtime, draws, options, target=9):
    gen = torch.Generator().manual_seed(0)
    text, left, right = (torch.randint(0, n, (k,), generator=gen).to(CUDA) for n, k in ((38, 5), (64, 6), (64, 7)))
    p = plan_speech(runtime.cfg, options, [(5, 6, target, 7)])
    return generate.run(p, generate.Models(speech=runtime), [(text, left, right)], draws=draws)[0]


@pytest.mark.parametrize("compile", [False, True])
def test_speech_cuda_graph_tokens_equal_eager(compile):
    """PlayDiffusion's unmasking step captured once per shape (greedy or not) and replayed:
    the eager tokens, from a seeded CUDA generator (keyed draws inside the step), from the
    keyed RNG and from host-given uniforms."""
    from magnet_engine.engine.playdiffusion.unmasking import (GeneratorDraws, KeyedDraws, RecordedDraws,
                                                              SpeechRuntime, UnmaskOptions)

    model = _speech_model()
    options = UnmaskOptions(steps=8, topk=12)
    eager, graphed = SpeechRuntime(model), SpeechRuntime(model, compile=compile, cuda_graphs=True)
    assert eager.impl.sample_tokens == "triton"
    recorded = RecordedDraws([torch.rand(1, 9, 64, device=CUDA) for _ in range(8)],
                             [torch.rand(1, 9, device=CUDA) for _ in range(8)])
    for make in (lambda: GeneratorDraws(torch.Generator(device=CUDA).manual_seed(3)), lambda: KeyedDraws(5),
                 lambda: recorded):
        want = _speech_loop(eager, make(), options)
        assert torch.equal(_speech_loop(graphed, make(), options), want)
        assert torch.equal(_speech_loop(graphed, make(), options), want)            # replayed, not recaptured
    state = next(iter(graphed._states.values()))
    # greedy or not, per draw source: 'keyed' (a CUDA generator seeds the keyed RNG) and 'given'
    assert len(graphed._states.graphs(state)) == 2 * 2
