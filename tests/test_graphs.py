"""The one step-state mechanism (`engine/graphs.py`): the bounded state cache and the
capture/replay path every runtime goes through, checked on the CPU with a stand-in capture
(the real CUDA capture is checked in test_gpu.py)."""
import types

import pytest
import torch

from magnet_engine.engine import graphs, hybrid
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.playdiffusion.unmasking import KeyedDraws, SpeechRuntime

from test_hybrid import ar_lm
from test_model import tiny_lm
from test_playdiffusion_step import _loop
from test_playdiffusion_step import model as speech_model   # noqa: F401 (a fixture)
from test_reference import _cond


@pytest.fixture
def captures(monkeypatch):
    """capture_step replaced by a 'graph' whose replay runs the step eagerly; returns the
    list of steps captured."""
    captured = []

    def capture(step, changed, pool=None):
        captured.append(step)
        return types.SimpleNamespace(replay=step)
    monkeypatch.setattr(graphs, "capture_step", capture)
    return captured


def test_state_cache_keeps_the_most_recent_states_and_their_graphs(captures):
    cache = graphs.StateCache(2, max_graphs=3)
    a, b, c = (cache.get(key, lambda key=key: [key]) for key in "abc")
    assert list(cache) == ["b", "c"] and cache.get("b", list) is b                # 'a' evicted, 'b' reused
    assert list(cache) == ["c", "b"]
    cache.graph(b, 1, lambda: None, ())
    cache.graph(b, 1, lambda: None, ())
    assert len(captures) == 1 and set(cache.graphs(b)) == {1}                     # captured once per shape
    cache.graph(b, 2, lambda: None, ())
    cache.graph(c, 1, lambda: None, ())
    cache.graph(c, 2, lambda: None, ())                                           # the 4th: the rest dropped
    assert dict(cache.graphs(b)) == {} and set(cache.graphs(c)) == {2}
    cache.get("d", list)                                                          # 'c' evicted with its graphs
    assert list(cache) == ["b", "d"] and dict(cache.graphs(c)) == {}


def test_cuda_graphs_refused_off_cuda():
    with pytest.raises(Exception, match="CUDA"):
        graphs.check_device(True, "cpu")
    graphs.check_device(False, "cpu")


def test_masked_replay_path_gives_the_eager_tokens(captures):
    lm = tiny_lm(seed=4)
    params = DecodingParams(decoding_steps=(4, 2, 2, 2))
    cond = _cond(lm, 1)
    eager = Runtime(lm).generate(cond, 30, params, seeds=[7])
    graphed = Runtime(lm)
    graphed.cuda_graphs = True          # the replay path, on the CPU
    assert torch.equal(graphed.generate(cond, 30, params, seeds=[7]), eager)
    count = len(captures)
    assert torch.equal(graphed.generate(cond, 30, params, seeds=[7]), eager)
    assert 0 < count == len(captures)   # every shape captured once, replayed by the second call


def test_ar_replay_path_gives_the_eager_tokens(captures):
    lm = ar_lm("musicgen", seed=2)
    cond = _cond(lm, 2)
    params = hybrid.ARParams(top_k=10)
    eager = hybrid.ARRuntime(lm).generate(cond, 14, 20, params, seeds=[5, 6]).seq.clone()
    graphed = hybrid.ARRuntime(lm)
    graphed.cuda_graphs = True
    assert torch.equal(graphed.generate(cond, 14, 20, params, seeds=[5, 6]).seq, eager)
    assert torch.equal(graphed.generate(cond, 14, 20, params, seeds=[5, 6]).seq, eager)
    assert len(captures) == 1           # one step shape per state


def test_speech_replay_path_gives_the_eager_tokens(captures, speech_model):
    eager = _loop(SpeechRuntime(speech_model), KeyedDraws(5))
    graphed = SpeechRuntime(speech_model)
    graphed.cuda_graphs = True
    assert torch.equal(_loop(graphed, KeyedDraws(5)), eager)
    count = len(captures)
    assert torch.equal(_loop(graphed, KeyedDraws(5)), eager)
    assert 0 < count == len(captures)
