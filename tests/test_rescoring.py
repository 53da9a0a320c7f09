"""Rescoring masked decoding with an external autoregressive model (docs/model.md §12)."""
import pytest
import torch

from magnet_engine.engine import hybrid, reference
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.model import causal_self_attention
from magnet_engine.engine.rescoring import BoundRescorer, ExternalLM, RescoreOptions
from magnet_engine.errors import CheckpointError, InvalidOptionError
from magnet_engine.kernels import masking

from test_decoding import keyed_sampler
from test_hybrid import HybridRunner, ar_lm
from test_model import tiny_lm
from test_reference import _cond


class FakeConditioner:
    """Stands in for the T5 conditioner: fixed condition rows (conditional, then null)."""

    def __init__(self, cond):
        self.cond = cond

    def encode(self, descriptions):
        class Out:
            embeds = self.cond
        return Out()


def bound(options: RescoreOptions, batch: int = 2, seed: int = 11) -> BoundRescorer:
    ext = ar_lm("musicgen", seed=seed)
    model = ExternalLM("tiny-musicgen", ext, FakeConditioner(_cond(ext, batch, seed=seed)))
    return BoundRescorer(model, options, [None] * batch)


def test_external_probabilities_equal_a_plain_teacher_forced_forward():
    scorer = bound(RescoreOptions(weight=0.5, cfg_coef=2.0))
    ext = scorer.model.lm
    codes = torch.randint(0, 40, (2, 4, 21))
    codes[:, 2:] = 40
    cond = scorer.model.conditioner.cond
    seq = hybrid.build_delayed(codes, ext.cfg.delays, 40)[..., :-1]
    hidden = ext.hidden(torch.cat([seq, seq]), cond, 0, attend=causal_self_attention)
    for stage in (0, 1):
        d = ext.cfg.delays[stage]
        logits = ext.linears[stage](hidden[:, d:d + 21])
        mixed = logits[2:] + (logits[:2] - logits[2:]) * 2.0
        want = torch.softmax(mixed / 0.7, -1).gather(-1, codes[:, stage, :, None])[..., 0]
        got = scorer.probabilities(codes, stage, torch.tensor(0.7))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_mix_changes_the_ranking_as_the_formula_says():
    """Two chunks of 3 frames: MAGNeT is surer of chunk 0 (max p 0.9 vs 0.6), the external
    model much surer of chunk 1. conf = w·p_magnet + (1 − w)·p_ext; 'max' scoring re-masks
    the chunk with the lower max conf first."""
    scorer = bound(RescoreOptions(weight=0.25))
    p_magnet = torch.tensor([[0.9, 0.2, 0.1, 0.6, 0.5, 0.4]])
    p_ext = torch.tensor([[0.1, 0.1, 0.1, 0.9, 0.95, 0.8]])
    mixed = scorer.mix(p_magnet, p_ext)
    assert torch.allclose(mixed, 0.25 * p_magnet + 0.75 * p_ext)
    both = torch.ones(1, 2, dtype=torch.bool)
    plain = masking.span_scores(p_magnet, both, span_len=3, arrangement="nonoverlap", scoring="max")
    rescored = masking.span_scores(mixed, both, span_len=3, arrangement="nonoverlap", scoring="max")
    assert plain.argmax() == 1 and rescored.argmax() == 0       # the re-masked chunk flips
    assert torch.allclose(rescored, 1 - torch.tensor([[0.25 * 0.9 + 0.75 * 0.1, 0.25 * 0.5 + 0.75 * 0.95]]))


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_weight_one_is_plain_decoding_bit_for_bit(engine):
    lm = ar_lm("magnet", seed=4)
    cond = _cond(lm, 2, seed=5)
    params = DecodingParams(decoding_steps=(4, 3, 2, 2))
    scorer = bound(RescoreOptions(weight=1.0))
    calls = []
    scorer.probabilities = lambda *a: calls.append(a) or 1 / 0
    if engine == "fast":
        plain = Runtime(lm).generate(cond, 30, params, seeds=[1, 2])
        rescored = Runtime(lm).generate(cond, 30, params, seeds=[1, 2], hook=scorer)
    else:
        plain = reference.generate_tokens(lm, cond, 30, params, sampler=keyed_sampler(params, [1, 2], 30))
        rescored = reference.generate_tokens(lm, cond, 30, params, sampler=keyed_sampler(params, [1, 2], 30),
                                             rescorer=scorer)
    assert torch.equal(plain, rescored) and not calls


@pytest.mark.parametrize("options", [
    RescoreOptions(weight=0.5),
    RescoreOptions(weight=0.0, temperature="raw"),
    RescoreOptions(weight=0.3, fill="greedy"),
    RescoreOptions(weight=0.7, cfg_coef=3.0, temperature="raw", fill="greedy"),
])
@pytest.mark.parametrize("arrangement", ["nonoverlap", "stride1"])
def test_rescored_fast_loop_equals_rescored_reference(options, arrangement):
    lm = tiny_lm(seed=6)
    cond = _cond(lm, 2, seed=7)
    params = DecodingParams(decoding_steps=(5, 3, 3, 2), span_arrangement=arrangement)
    scorer = bound(options)
    fast = Runtime(lm).generate(cond, 30, params, seeds=[3, 4], hook=scorer)
    trace, plain_trace = [], []
    ref = reference.generate_tokens(lm, cond, 30, params, sampler=keyed_sampler(params, [3, 4], 30), rescorer=scorer,
                                    trace=trace)
    assert torch.equal(fast, ref)
    reference.generate_tokens(lm, cond, 30, params, sampler=keyed_sampler(params, [3, 4], 30), trace=plain_trace)
    # the external model did change what was re-masked
    assert any(not torch.equal(a.masked, b.masked) for a, b in zip(trace, plain_trace))


def test_rescoring_skips_each_stages_last_step():
    lm = ar_lm("magnet", seed=6)
    scorer = bound(RescoreOptions(weight=0.5))
    seen = []
    original = scorer.probabilities
    scorer.probabilities = lambda codes, stage, t: seen.append(stage) or original(codes, stage, t)
    Runtime(lm).generate(_cond(lm, 2), 30, DecodingParams(decoding_steps=(5, 3, 1, 2)), hook=scorer)
    assert seen == [0] * 4 + [1] * 2 + [3] * 1


def test_rescoring_in_the_hybrid_tail():
    lm = ar_lm("hybrid", seed=3)
    cond = _cond(lm, 2, seed=1)
    params = DecodingParams(decoding_steps=(4, 3, 2, 2))
    hy = HybridRunner(Runtime(lm))
    plain = hy.generate(cond, 36, params, hybrid.ARParams(top_k=10), 9, seeds=[1, 2])
    rescored = hy.generate(cond, 36, params, hybrid.ARParams(top_k=10), 9, seeds=[1, 2],
                           rescorer=bound(RescoreOptions(weight=0.2)))
    assert torch.equal(plain[..., :6], rescored[..., :6]) and not torch.equal(plain, rescored)
    with pytest.raises(InvalidOptionError, match="greedy"):
        hy.generate(cond, 36, params, hybrid.ARParams(), 9, rescorer=bound(RescoreOptions(weight=0.2, fill="greedy")))


def test_options_and_model_checks():
    for bad in (dict(weight=1.5), dict(weight=float("nan")), dict(temperature="hot"), dict(fill="zeros"),
                dict(cfg_coef=float("inf"))):
        with pytest.raises(InvalidOptionError):
            RescoreOptions(**bad).validate()
    with pytest.raises(CheckpointError, match="autoregressive"):
        ExternalLM("plain", ar_lm("magnet"), FakeConditioner(None))
    ext = ExternalLM("mg", ar_lm("musicgen", card=40), FakeConditioner(None))
    with pytest.raises(InvalidOptionError, match="match"):
        ext.check_compatible(ar_lm("magnet", card=48).cfg)


def test_long_form_rescores_every_window(tmp_path, monkeypatch):
    """duration past the window with a rescorer: the external LM rescores each window's canvas
    (the previous window's tail included, fixed, as causal context) at every step but each
    stage's last, in every window; the clip has the plain long-form's frame count."""
    from magnet_engine import MAGNeT
    from magnet_engine.demo import build_random_model
    from magnet_engine.engine import events

    magnet = MAGNeT.from_pretrained(build_random_model(tmp_path / "m", "tiny", duration=1), device="cpu")
    magnet.set_generation_params(decoding_steps=[3, 2, 2, 2])
    magnet.extend_stride = 0.6
    plain = magnet.generate_tokens(["a"], seed=4, duration=2.5)
    magnet.set_generation_params(decoding_steps=[3, 2, 2, 2], rescore_weight=0.5,
                                 rescorer=str(build_random_model(tmp_path / "mg", "tiny", duration=1, seed=1,
                                                                 kind="musicgen")))
    window, calls = [0], []
    original = BoundRescorer.probabilities
    monkeypatch.setattr(BoundRescorer, "probabilities", lambda self, codes, stage, t: calls.append(
        (window[0], stage, codes.shape[-1])) or original(self, codes, stage, t))

    def watch(event):      # the hook runs inside a step, before its event: count windows as they end
        if isinstance(event, events.WindowReady):
            window[0] = event.index + 1
    rescored = magnet.generate_tokens(["a"], seed=4, duration=2.5, on_event=watch)
    assert rescored.shape == plain.shape == (1, 4, 123)          # 4 windows of 50 frames, 30 new each
    per_window = [[(stage, frames) for w, stage, frames in calls if w == i] for i in range(4)]
    assert [[s for s, _ in calls_i] for calls_i in per_window] == [[0, 0, 1, 2, 3]] * 4   # steps - 1 per stage
    assert all(frames <= 50 for _, _, frames in calls)            # a window's canvas, never the whole clip
    assert not torch.equal(rescored, plain)


def test_long_form_rescores_each_window_against_its_own_text(tmp_path, monkeypatch):
    """Per-window descriptions: window i is rescored by a rescorer bound to window i's texts."""
    from magnet_engine import MAGNeT
    from magnet_engine.demo import build_random_model

    magnet = MAGNeT.from_pretrained(build_random_model(tmp_path / "m", "tiny", duration=1), device="cpu")
    magnet.set_generation_params(decoding_steps=[2, 2, 2, 2], duration=2.5, rescore_weight=0.5,
                                 rescorer=str(build_random_model(tmp_path / "mg", "tiny", duration=1, seed=1,
                                                                 kind="musicgen")))
    magnet.extend_stride = 0.6
    bind, order = BoundRescorer.__init__, []

    def init(self, model, options, descriptions):
        bind(self, model, options, descriptions)
        self.texts = tuple(descriptions)
    original = BoundRescorer.probabilities

    def probabilities(self, codes, stage, t):
        if not order or order[-1] != self.texts:
            order.append(self.texts)
        return original(self, codes, stage, t)
    monkeypatch.setattr(BoundRescorer, "__init__", init)
    monkeypatch.setattr(BoundRescorer, "probabilities", probabilities)
    wav = magnet.generate([["w0 a", "w1 a", "w2 a", "w3 a"], ["w0 b", "w1 b", "w2 b", "w3 b"]], seed=1)
    assert wav.shape[0] == 2
    assert order == [(f"w{i} a", f"w{i} b") for i in range(4)]     # 4 windows, in order, each its own texts
