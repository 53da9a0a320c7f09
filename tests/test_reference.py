"""The plain decoding loop: fixtures of the original implementation, schedule, invariants."""
import math

import pytest
import torch

from magnet_engine.engine import reference
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.schedule import duration_frames, kept_frames, stage_schedule

from test_model import tiny_lm




def test_fixture_greedy_tokens_and_trace(fixture_lm, golden):
    want = golden["generate_greedy"]
    params = DecodingParams(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in want["params"].items()})
    trace = []
    tokens = reference.generate_tokens(fixture_lm, golden["conditioning"]["cond_embeds"], want["max_gen_len"],
                                       params, trace=trace)
    assert len(trace) == len(want["trace"]) == 50
    for got, exp in zip(trace, want["trace"]):
        where = f"stage {got.stage} step {got.step}"
        assert (got.stage, got.step) == (exp["stage"], exp["step"])
        assert got.cfg_coef == pytest.approx(exp["cfg_coef"], abs=1e-12), where
        assert got.mask_p == pytest.approx(exp["mask_p"], abs=1e-7), where
        assert got.num_masked_tokens == exp["num_masked_tokens"], where
        assert torch.equal(got.masked, exp["masked"]), where
    assert torch.equal(tokens, want["tokens"])


def test_fixture_prompted_greedy(fixture_lm, golden):
    want = golden["generate_prompted_greedy"]
    params = DecodingParams(use_sampling=False)
    trace = []
    tokens = reference.generate_tokens(fixture_lm, golden["conditioning"]["cond_embeds"], want["max_gen_len"],
                                       params, prompt=want["prompt"], trace=trace)
    assert [t.num_masked_tokens for t in trace] == [t["num_masked_tokens"] for t in want["trace"]]
    assert torch.equal(tokens, want["tokens"])
    assert torch.equal(tokens[..., :20], want["prompt"])


def test_schedule_matches_spec_examples():
    params = DecodingParams()
    s20 = stage_schedule(20, 166, params)
    assert list(s20.num_masked) == [166, 165, 163, 160, 157, 152, 145, 138, 130, 122, 112, 101, 90, 79, 66, 53,
                                    40, 27, 13, 1]
    s10 = stage_schedule(10, 166, params)
    spec = [166, 163, 155, 143, 127, 106, 83, 56, 28, 1]
    assert [m for i, m in enumerate(s10.num_masked) if i != 6] == [m for i, m in enumerate(spec) if i != 6]
    # The boundary case of docs/model.md §6: cos(π/3) would make ρ_6 = 0.5, but torch's fp32 cos of
    # fp32(2/3)·π/2 gives 0.49999997 here, so m_6 = trunc(82.99999) = 82. The original loop
    # computes it with these same ops (0-d tensors), so we follow the platform, not the exact value.
    rho6 = torch.cos(torch.linspace(0, 1, 10)[6] * math.pi * 0.5)
    assert s10.mask_p[6] == float(rho6) and s10.num_masked[6] == max(int((rho6 * 166).item()), 1)
    for i, (g, t) in enumerate(zip(s10.cfg_coef, s10.temperature)):
        rho = s10.mask_p[i]
        assert g == rho * 10.0 + (1 - rho) * 1.0
        assert t == max(3.0 * ((9 - i) / 10), 0.01)   # the original associates it this way
    assert s10.cfg_coef[0] == 10.0 and s10.temperature[-1] == 0.01
    one = stage_schedule(1, 33, params)                                  # n = 1: one forward, all sampled
    assert one.num_masked == (33,) and one.cfg_coef == (10.0,) and one.temperature == (0.01,)
    flat = stage_schedule(5, 40, DecodingParams(anneal_temp=False, temperature=2.0))
    assert set(flat.temperature) == {2.0}


def test_frames_for_10s_and_30s():
    assert duration_frames(10, 50) == 500 and duration_frames(0.93, 50) == 46   # ⌊d · fps⌋
    assert kept_frames(500, 3, "nonoverlap") == 498                     # 9.96 s
    assert kept_frames(1500, 3, "nonoverlap") == 1500
    assert kept_frames(500, 3, "stride1") == 500                        # stride1 keeps T
    assert kept_frames(100, 1, "nonoverlap") == 100                     # span 1: every frame a span


def _cond(lm, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 6, lm.cfg.dim, generator=gen)
    return torch.cat([cond, torch.zeros_like(cond)])


def test_greedy_is_deterministic_and_complete():
    lm = tiny_lm(seed=2)
    params = DecodingParams(use_sampling=False, decoding_steps=(4, 2, 2, 2))
    a = reference.generate_tokens(lm, _cond(lm, 2), 40, params)
    b = reference.generate_tokens(lm, _cond(lm, 2), 40, params)
    assert torch.equal(a, b) and a.shape == (2, 4, 39)
    assert a.max() < lm.cfg.card and a.min() >= 0        # no mask id left


@pytest.mark.parametrize("arrangement,scoring", [("nonoverlap", "max"), ("nonoverlap", "prod"),
                                                 ("stride1", "max")])
def test_invariants_sampled(arrangement, scoring):
    lm = tiny_lm(seed=4)
    frames, p_len = 31, 7
    prompt = torch.randint(0, lm.cfg.card, (2, 4, p_len), generator=torch.Generator().manual_seed(9))
    params = DecodingParams(decoding_steps=(6, 3, 3, 2), span_arrangement=arrangement, span_scoring=scoring)
    trace = []
    gen = torch.Generator().manual_seed(0)
    out = reference.generate_tokens(lm, _cond(lm, 2), frames, params, prompt=prompt, generator=gen, trace=trace)
    kept = frames if arrangement == "stride1" else 30
    assert out.shape == (2, 4, kept)
    assert torch.equal(out[..., :p_len], prompt)
    assert out.max() < lm.cfg.card
    assert len(trace) == sum(params.decoding_steps)
    if arrangement == "nonoverlap":
        for stage in range(4):
            steps = [t for t in trace if t.stage == stage]
            for prev, cur in zip(steps, steps[1:]):
                assert not (cur.masked & ~prev.masked).any()     # nested, non-increasing
            for cur in steps:
                # exactly m_i chunks per row: 3 m_i frames, one fewer when the chunk straddling
                # the 7-frame prompt is chosen (its prompt frame is restored)
                per_row = cur.masked.sum(dim=1).tolist()
                assert all(n in (3 * cur.num_masked, 3 * cur.num_masked - 1) for n in per_row), per_row
            assert steps[-1].num_masked == 1


def test_stages_leave_other_rows_alone():
    lm = tiny_lm(seed=6)
    params = DecodingParams(use_sampling=False, decoding_steps=(3, 2, 2, 2))
    seen = []

    def spy(stage_logits):
        def wrapped(codes, cond, stage, **kw):
            seen.append((stage, codes.clone()))
            return stage_logits(codes, cond, stage, **kw)
        return wrapped

    lm.stage_logits = spy(lm.stage_logits)
    reference.generate_tokens(lm, _cond(lm, 1), 21, params)
    final_rows = {}
    for stage, codes in seen:
        assert (codes[:, stage + 1:] == lm.cfg.mask_id).all()          # rows > s untouched (all mask)
        if stage > 0:
            assert (codes[:, :stage] != lm.cfg.mask_id).all()
            if stage in final_rows:
                assert torch.equal(codes[:, :stage], final_rows[stage])   # rows < s unchanged
            final_rows[stage] = codes[:, :stage].clone()
    assert len(seen) == sum(params.decoding_steps)


def test_top_p_tiny_equals_greedy():
    lm = tiny_lm(seed=8)
    cond = _cond(lm, 1)
    greedy = reference.generate_tokens(lm, cond, 24, DecodingParams(use_sampling=False, decoding_steps=(3, 2, 2, 2)))
    nucleus = reference.generate_tokens(lm, cond, 24, DecodingParams(top_p=1e-9, decoding_steps=(3, 2, 2, 2)),
                                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, nucleus)


def test_least_probable_spans_matches_spec_search():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = int(torch.randint(6, 30, (1,), generator=gen))
        scores = torch.rand(t, generator=gen)
        m = int(torch.randint(1, t, (1,), generator=gen))
        mask = reference.least_probable_spans(scores, m, 3)
        # covered set is a union of the top-u spans for some u
        span_scores = scores.unfold(0, 3, 1).sum(-1)
        order = torch.argsort(span_scores, descending=True)
        covers = [reference.span_cover(order[:u], t, 3) for u in range(0, len(order) + 1)]
        assert any(torch.equal(mask, c) for c in covers)
        assert mask.sum() >= 3                                  # at least one whole span
