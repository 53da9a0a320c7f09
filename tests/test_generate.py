"""engine/generate.py: `plan` (every mode's phases, built on the host before any device work)
and `run` (the phases walked, typed events in order, cancellation by a raising listener), on
tiny random models. The speech plan is PlayDiffusion's (tests/test_playdiffusion_step.py);
what each runtime computes inside a phase is tested beside it (test_decoding, test_hybrid,
test_infill, test_reference)."""
import pytest
import torch

from magnet_engine.engine import events, generate, hybrid
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.errors import InvalidOptionError, RegionError

from test_hybrid import ar_lm
from test_model import tiny_lm
from test_reference import _cond


def fixed_mask(n_q, frames, intervals):
    """[K, T] bool: the cells of every codebook inside the half-open frame `intervals`."""
    mask = torch.zeros(n_q, frames, dtype=torch.bool)
    for s, e in intervals:
        mask[:, s:e] = True
    return mask


class Cancelled(Exception):
    pass


def cancel_at(done: int, count: list):
    """A listener that records each masked step's `done` in `count` and raises Cancelled at `done`
    (a client gone): the run must stop right after that step."""
    def listen(event):
        if isinstance(event, events.StageStep):
            count.append(event.done)
            if event.done == done:
                raise Cancelled
    return listen


# ------------------------------------------------------------------ plan: every mode
def test_plan_of_each_masked_mode():
    lm, mg = tiny_lm(seed=1), ar_lm("musicgen", seed=2)
    params = DecodingParams(decoding_steps=(4, 2, 2, 2))
    plain = generate.plan(lm.cfg, params, batch=2, frames=30)
    assert (plain.mode, plain.ar, plain.total_steps, plain.masked.prompt_lens) == ("plain", None, 10, (0,) * 4)
    prompt = generate.plan(lm.cfg, params, batch=1, frames=30, prompt_frames=9)
    assert (prompt.mode, prompt.masked.prompt_lens) == ("prompt", (9,) * 4)
    two = generate.plan(lm.cfg, params, batch=1, frames=30, prefix_frames=7, prefix_cfg=mg.cfg)
    assert (two.mode, two.ar.steps, two.total_steps, two.masked.prompt_lens) == ("two_model", 10, 20, (7,) * 4)
    hy_lm = ar_lm("hybrid")
    hy = generate.plan(hy_lm.cfg, params, batch=1, frames=36, prefix_frames=9)
    assert (hy.mode, hy.ar.steps, hy.masked.prompt_lens) == ("hybrid", 9, (9, 8, 7, 6))
    assert [hy.stage_of(d) for d in (10, 13, 14, 19)] == [(0, 0), (0, 3), (1, 0), (3, 1)]
    with pytest.raises(InvalidOptionError, match="exclusive"):
        generate.plan(hy_lm.cfg, params, batch=1, frames=36, prefix_frames=9, prompt_frames=3)
    with pytest.raises(InvalidOptionError, match="AR prefix"):
        generate.plan(hy_lm.cfg, params, batch=1, frames=36)
    with pytest.raises(InvalidOptionError, match="greedy"):
        generate.plan(hy_lm.cfg, params, batch=1, frames=36, prefix_frames=9, rescore_fill="greedy")
    with pytest.raises(InvalidOptionError, match="fast engine"):
        generate.plan(hy_lm.cfg, params, batch=1, frames=36, prefix_frames=9, engine="reference")


def test_the_prefix_rules_are_check_prefix_and_the_plan_applies_them():
    """One statement of the AR prefix rules (`check_prefix`, which the API asks before it keeps
    its options); `plan` refuses by it, with its words."""
    magnet, hy, mg = tiny_lm(seed=1).cfg, ar_lm("hybrid").cfg, ar_lm("musicgen", seed=2).cfg
    params = DecodingParams(decoding_steps=(4, 2, 2, 2))
    cases = [(hy, 36, 9, mg, "prefix_model is for a plain MAGNeT"),
             (hy, 36, 0, None, "at least one frame"),
             (magnet, 30, 7, None, "needs a prefix model"),
             (magnet, 30, 30 - magnet.span_len + 1, mg, "at least one span"),
             (hy, 36, 36 - hy.span_len + 1, None, "at least one span")]
    for cfg, frames, prefix, prefix_cfg, message in cases:
        with pytest.raises(InvalidOptionError, match=message):
            generate.check_prefix(cfg, frames, prefix, prefix_cfg)
        with pytest.raises(InvalidOptionError, match=message):
            generate.plan(cfg, params, batch=1, frames=frames, prefix_frames=prefix, prefix_cfg=prefix_cfg)
    last = 30 - magnet.span_len                                   # exactly one span left to decode
    generate.check_prefix(magnet, 30, last, mg)
    assert generate.plan(magnet, params, batch=1, frames=30, prefix_frames=last, prefix_cfg=mg).mode == "two_model"
    assert generate.plan(magnet, params, batch=1, frames=30, prefix_cfg=mg).mode == "plain"   # no prefix asked


def test_runtimes_give_each_plan_what_it_runs_on_built_once():
    magnet, hy_lm, reference_lm = tiny_lm(seed=1), ar_lm("hybrid", seed=3), tiny_lm(seed=2)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    runtimes = generate.Runtimes(magnet, "fp32", lambda: reference_lm)
    plain = runtimes.models(generate.plan(magnet.cfg, params, batch=1, frames=30))
    assert isinstance(plain.runtime, Runtime) and plain.ar is None and plain.runtime is runtimes.masked()
    reference = runtimes.models(generate.plan(magnet.cfg, params, batch=1, frames=30, engine="reference"))
    assert reference.lm is reference_lm and reference.runtime is None
    two = generate.plan(magnet.cfg, params, batch=1, frames=30, prefix_frames=7, prefix_cfg=ar_lm("musicgen").cfg)
    with pytest.raises(InvalidOptionError, match="prefix model"):
        runtimes.models(two)
    prefix = hybrid.ARRuntime(ar_lm("musicgen"))
    assert runtimes.models(two, prefix).ar is prefix
    hy_runtimes = generate.Runtimes(hy_lm, "fp32", lambda: hy_lm)
    hy = generate.plan(hy_lm.cfg, params, batch=1, frames=36, prefix_frames=9)
    first = hy_runtimes.models(hy)
    assert isinstance(first.ar, hybrid.ARRuntime) and first.ar.lm is first.runtime.lm   # the same LM's
    assert hy_runtimes.models(hy).ar is first.ar


def test_plan_of_infill():
    lm = tiny_lm(seed=1)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    kept = ((0, 7), (13, 20), (25, 30))
    p = generate.plan(lm.cfg, params, batch=2, frames=30, fixed=list(kept))
    assert (p.mode, p.ar, p.total_steps, p.masked.kept) == ("infill", None, 9, 30)
    assert p.masked.fixed == (kept,) * 4
    assert torch.equal(p.masked.fixed_mask(), fixed_mask(4, 30, kept))
    with pytest.raises(InvalidOptionError, match="own cells"):
        generate.plan(lm.cfg, params, batch=1, frames=30, fixed=list(kept), prompt_frames=3)
    with pytest.raises(InvalidOptionError, match="nothing to decode"):
        generate.plan(lm.cfg, params, batch=1, frames=30, fixed=[(0, 30)])
    with pytest.raises(InvalidOptionError, match="within"):
        generate.plan(lm.cfg, params, batch=1, frames=30, fixed=[(0, 40)])
    with pytest.raises(InvalidOptionError, match="parallel layout"):
        generate.plan(ar_lm("hybrid").cfg, params, batch=1, frames=30, fixed=list(kept))


def test_plan_refuses_an_unknown_engine():
    with pytest.raises(InvalidOptionError, match="engine must be one of"):
        generate.plan(tiny_lm().cfg, DecodingParams(), batch=1, frames=30, engine="turbo")


# ------------------------------------------------------------------ plan: infill regions, long-form windows
def test_snap_regions_merges_and_widens_to_chunks():
    cfg = tiny_lm().cfg                                            # span_len 3
    params = DecodingParams()
    regions, fixed = generate.snap_regions(cfg, params, 31, [(4, 7), (7, 8), (20, 22)])
    assert regions == ((3, 9), (18, 24)) and fixed == ((0, 3), (9, 18), (24, 30))
    regions, fixed = generate.snap_regions(cfg, params.replace(span_arrangement="stride1"), 31, [(4, 7), (6, 8)])
    assert regions == ((4, 8),) and fixed == ((0, 4), (8, 31))
    with pytest.raises(RegionError, match="whole clip"):
        generate.snap_regions(cfg, params, 31, [(1, 29)])
    with pytest.raises(RegionError, match="outside"):
        generate.snap_regions(cfg, params, 31, [(20, 40)])
    with pytest.raises(RegionError, match="drops"):
        generate.snap_regions(cfg, params, 31, [(30, 31)])


def test_long_form_windows_tile_the_clip():
    lm = tiny_lm(seed=23)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    p = generate.plan(lm.cfg, params, batch=2, frames=70, window_frames=30, stride_frames=18)
    assert [(w.start, w.kept, w.prompt_lens[0]) for w in p.phases] == [(0, 30, 0), (18, 30, 12), (36, 30, 12),
                                                                         (54, 15, 12)]
    assert p.out_frames == 69 and p.total_steps == 4 * 9
    within = generate.plan(lm.cfg, params, batch=2, frames=30, window_frames=30, stride_frames=18)
    assert within.windows == () and within == generate.plan(lm.cfg, params, batch=2, frames=30)
    with pytest.raises(InvalidOptionError, match="stride"):
        generate.plan(lm.cfg, params, batch=1, frames=70, window_frames=30, stride_frames=30)
    with pytest.raises(InvalidOptionError, match="hybrid|infill"):
        generate.plan(lm.cfg, params, batch=1, frames=70, window_frames=30, stride_frames=18, fixed=[(0, 3)])


def test_window_seeds_are_the_documented_offsets():
    """README: window i > 0 draws with seed + i * 0x9E3779B97F4A7C15 (mod 2**63); window 0 with
    the seed itself. Expected values worked out by hand from that formula."""
    assert generate.window_seeds([1, 2], 0) == [1, 2]
    assert generate.window_seeds([7], 1) == [2177342782468422684]                     # 7 + step - 2**63
    assert generate.window_seeds([1, 2], 2) == [4354685564936845355, 4354685564936845356]
    assert generate.window_seeds([7], 3) == [6532028347405268038]
    assert generate.window_seeds([2 ** 63 - 1], 1) == [2177342782468422676]           # wraps, stays < 2**63


# ------------------------------------------------------------------ run: events, cancellation
def test_run_reports_typed_events_in_order():
    lm = tiny_lm(seed=6)
    runtime = Runtime(lm)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    p = generate.plan(lm.cfg, params, batch=1, frames=24)
    seen = []
    codes = generate.run(p, generate.Models(runtime=runtime), _cond(lm, 1), seeds=[3], listener=seen.append)
    assert isinstance(seen[0], events.Started) and seen[0].total == 9
    steps = [e for e in seen if isinstance(e, events.StageStep)]
    assert [(e.stage, e.step, e.steps, e.done) for e in steps][:4] == [(0, 0, 3, 1), (0, 1, 3, 2), (0, 2, 3, 3),
                                                                      (1, 0, 2, 4)]
    assert [e.done for e in steps] == list(range(1, 10)) and all(e.total == 9 for e in steps)
    # the canvas is the live buffer: after stage 0's last step, codebook 0 holds no mask id
    assert isinstance(seen[-1], events.Done) and torch.equal(seen[-1].codes, codes)
    assert steps[-1].canvas.shape == codes.shape and steps[-1].confidence.shape == (1, 24)


def test_hybrid_run_reports_ar_steps_then_the_prefix_then_masked_steps():
    lm = ar_lm("hybrid", seed=4)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    p = generate.plan(lm.cfg, params, batch=1, frames=33, prefix_frames=9,
                      hybrid=hybrid.HybridOptions(ar=hybrid.ARParams(top_k=10)))
    seen = []
    codes = generate.run(p, generate.Models(runtime=Runtime(lm), ar=hybrid.ARRuntime(lm)), _cond(lm, 1),
                         seeds=[3], listener=seen.append)
    kinds = [type(e).__name__ for e in seen]
    ar_steps = p.ar.steps
    # one window: its codes are ready once, just before the run is done
    assert kinds == ["Started"] + ["ARStep"] * ar_steps + ["PrefixReady"] + ["StageStep"] * 9 + ["WindowReady", "Done"]
    assert seen[0].total == p.total_steps == ar_steps + 9
    assert [e.done for e in seen if isinstance(e, (events.ARStep, events.StageStep))] == list(range(1, ar_steps + 10))
    assert [(e.step, e.steps) for e in seen[1:1 + ar_steps]] == [(i, ar_steps) for i in range(ar_steps)]
    assert torch.equal(seen[-1].codes, codes)


def test_a_raising_listener_cancels_the_run_after_the_current_step():
    lm = tiny_lm(seed=7)
    runtime = Runtime(lm)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    p = generate.plan(lm.cfg, params, batch=1, frames=24)
    count = []
    with pytest.raises(Cancelled):
        generate.run(p, generate.Models(runtime=runtime), _cond(lm, 1), seeds=[0], listener=cancel_at(2, count))
    assert count == [1, 2]


def test_a_raising_listener_cancels_the_ar_phase_after_the_current_step():
    lm = ar_lm("hybrid", seed=5)
    p = generate.plan(lm.cfg, DecodingParams(decoding_steps=(3, 2, 2, 2)), batch=1, frames=33, prefix_frames=9)
    seen = []

    def listen(event):
        seen.append(type(event).__name__)
        if isinstance(event, events.ARStep) and event.done == 2:
            raise Cancelled
    with pytest.raises(Cancelled):
        generate.run(p, generate.Models(runtime=Runtime(lm), ar=hybrid.ARRuntime(lm)), _cond(lm, 1), seeds=[0],
                     listener=listen)
    assert seen == ["Started", "ARStep", "ARStep"]


# ------------------------------------------------------------------ run: two-model and long-form
def test_two_model_hybrid_continues_the_musicgen_prefix():
    magnet, musicgen = ar_lm("magnet", seed=1), ar_lm("musicgen", seed=2)
    cond, ar_cond = _cond(magnet, 2, seed=1), _cond(musicgen, 2, seed=2)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    p = generate.plan(magnet.cfg, params, batch=2, frames=30, prefix_frames=7,
                      hybrid=hybrid.HybridOptions(ar=hybrid.ARParams(top_k=10)), prefix_cfg=musicgen.cfg)
    assert (p.mode, p.ar.steps) == ("two_model", 7 + 3)
    out = generate.run(p, generate.Models(runtime=Runtime(magnet), ar=hybrid.ARRuntime(musicgen)), cond,
                       ar_cond=ar_cond, seeds=[4, 5])
    steps = 7 + 3                                               # the rectangle: max(d) extra steps
    seq = hybrid.ARRuntime(musicgen).generate(ar_cond, steps, hybrid.delayed_length(7, musicgen.cfg.delays),
                                              hybrid.ARParams(top_k=10), seeds=[4, 5]).seq
    assert torch.equal(out[..., :7], hybrid.revert_delayed(seq, musicgen.cfg.delays, 7))
    assert out.shape == (2, 4, 30) and (out < 40).all()


def test_long_form_run_fixes_each_windows_prefix_to_the_last_tail():
    lm = tiny_lm(seed=24)
    runtime = Runtime(lm)
    cond = _cond(lm, 2, seed=5)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    p = generate.plan(lm.cfg, params, batch=2, frames=70, window_frames=30, stride_frames=18)
    seen = []
    out = generate.run(p, generate.Models(runtime=runtime), cond, seeds=[1, 2], listener=seen.append)
    assert out.shape == (2, 4, 69) and (out != lm.cfg.mask_id).all()
    ready = [e for e in seen if isinstance(e, events.WindowReady)]
    assert [(e.index, e.count, e.codes.shape[-1]) for e in ready] == [(0, 4, 30), (1, 4, 18), (2, 4, 18), (3, 4, 3)]
    assert torch.equal(torch.cat([e.codes for e in ready], dim=-1), out)
    steps = [e for e in seen if isinstance(e, events.StageStep)]
    assert [e.done for e in steps] == list(range(1, 37)) and {e.total for e in steps} == {36}
    assert [e.window for e in steps[::9]] == [0, 1, 2, 3]
    # each window's fixed prefix is the previous window's tail: re-decode window 2 alone
    w = p.phases[2]
    # window 2's seeds, literal (README: seed + 2 * 0x9E3779B97F4A7C15 mod 2**63), not window_seeds' own
    again = runtime.generate(cond, w.kept, params, seeds=[4354685564936845355, 4354685564936845356],
                             canvas=out[..., w.start:w.end], fixed=fixed_mask(4, w.kept, [(0, w.prompt_lens[0])]))
    assert torch.equal(again, out[..., w.start:w.end])
    # the first window is a plain generation with the same seeds
    assert torch.equal(runtime.generate(cond, 30, params, seeds=[1, 2]), out[..., :30])


def test_long_form_windows_draw_different_noise():
    """Window 1 is decoded with the literal offset seed, and that matters: re-decoding it with
    window 0's seed (the bug of dropping the offset) gives other codes, so equality with the
    literal seed is not luck."""
    lm = tiny_lm(seed=24)
    runtime = Runtime(lm)
    cond = _cond(lm, 1, seed=5)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    p = generate.plan(lm.cfg, params, batch=1, frames=70, window_frames=30, stride_frames=18)
    out = generate.run(p, generate.Models(runtime=runtime), cond, seeds=[7])
    w = p.phases[1]
    canvas, fixed = out[..., w.start:w.end], fixed_mask(4, w.kept, [(0, w.prompt_lens[0])])
    redo = runtime.generate(cond, w.kept, params, seeds=[2177342782468422684], canvas=canvas, fixed=fixed)
    assert torch.equal(redo, canvas)                                 # window 1 drew with 7 + step (mod 2**63)
    unshifted = runtime.generate(cond, w.kept, params, seeds=[7], canvas=canvas, fixed=fixed)
    assert not torch.equal(unshifted, canvas)                        # ... not with window 0's seed


def test_long_form_reference_engine_and_text_per_window():
    lm = tiny_lm(seed=25)
    params = DecodingParams(use_sampling=False, decoding_steps=(3, 2, 2, 2))
    p = generate.plan(lm.cfg, params, batch=1, frames=50, window_frames=30, stride_frames=18)
    p_ref = generate.plan(lm.cfg, params, batch=1, frames=50, window_frames=30, stride_frames=18, engine="reference")
    conds = [_cond(lm, 1, seed=s) for s in range(len(p.phases))]
    fast = generate.run(p, generate.Models(runtime=Runtime(lm)), conds, seeds=[0])
    ref = generate.run(p_ref, generate.Models(lm=lm), conds, seeds=[0])
    assert torch.equal(fast, ref)                                   # greedy: the engines agree window by window
    same_text = generate.run(p, generate.Models(runtime=Runtime(lm)), conds[0], seeds=[0])
    assert torch.equal(same_text[..., :30], fast[..., :30]) and not torch.equal(same_text, fast)
    with pytest.raises(InvalidOptionError, match="one condition per window"):
        generate.run(p, generate.Models(runtime=Runtime(lm)), conds[:1], seeds=[0])
