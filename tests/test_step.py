"""One capturable step: the plan, the static-buffer step of every mode, traced whole.

`torch._dynamo.explain` traces a step as `torch.compile(fullgraph=True)` would and counts
the graph breaks; a step with none is one graph, which is what a CUDA graph captures.
"""

import pytest
import torch
import torch._dynamo

from magnet_engine.engine import events, generate, hybrid
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.rescoring import RescoreOptions
from magnet_engine.errors import InvalidOptionError

from test_hybrid import ar_lm
from test_model import tiny_lm
from test_reference import _cond
from test_rescoring import bound

IMPL = None   # the default choice (C++ on this CPU): custom ops, opaque to the tracer


def breaks(fn, *args) -> int:
    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args)
    assert out.graph_count >= 1
    return out.graph_break_count


def masked_step_breaks(runtime, cond, frames, params, *, prompt=None, forward=None, hook=None, pick=None, **fixed):
    st, shapes = runtime.prepare(cond, frames, params, prompt, forward=forward, hook=hook, **fixed)
    shape = pick(shapes) if pick else shapes[1][0]
    st.scores.copy_(st.init_scores[shape.stage])
    return breaks(runtime._step, st, shape, params, forward, hook)


@pytest.mark.parametrize("mode", ["plain", "prompt", "stride1", "cfg1", "token", "infill", "infill_stride1"])
def test_masked_step_traces_whole(mode):
    lm = tiny_lm(seed=3)
    runtime = Runtime(lm, impl=IMPL)
    cond = _cond(lm, 2)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    prompt = None
    if mode == "prompt":
        prompt = torch.randint(0, lm.cfg.card, (2, 4, 7))
    elif mode == "stride1":
        params = params.replace(span_arrangement="stride1")
    elif mode == "cfg1":
        params = params.replace(max_cfg_coef=1.0, min_cfg_coef=1.0)
    elif mode == "token":
        params = params.replace(span_arrangement="token")
    fixed = {}
    if mode.startswith("infill"):      # fixed cells on both sides of a region, a chunk partly fixed
        mask = torch.ones(4, 30, dtype=torch.bool)
        mask[:, 7:20] = False
        fixed = dict(canvas=torch.randint(0, lm.cfg.card, (2, 4, 30)), fixed=mask)
        if mode == "infill_stride1":
            params = params.replace(span_arrangement="stride1")
    assert masked_step_breaks(runtime, cond, 30, params, prompt=prompt, **fixed) == 0


def test_rescored_step_traces_whole():
    lm = tiny_lm(seed=4)
    runtime = Runtime(lm, impl=IMPL)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    hook = bound(RescoreOptions(weight=0.3))
    assert masked_step_breaks(runtime, _cond(lm, 2), 30, params, hook=hook, pick=lambda s: s[0][0]) == 0


def test_hybrid_tail_and_ar_steps_trace_whole():
    lm = ar_lm("hybrid", seed=5)
    runtime = Runtime(lm, impl=IMPL)
    cond = _cond(lm, 2, seed=1)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    tail = hybrid.plan_hybrid(lm.cfg, 36, 9, params)
    ar_rt = hybrid.ARRuntime(lm, impl=IMPL)
    ar = ar_rt.generate(cond, tail.ar_steps, tail.seq_len, hybrid.ARParams(top_k=10), seeds=[1, 2])
    prompt = hybrid.revert_delayed(ar.seq, lm.cfg.delays, 9)
    for k, n in enumerate(tail.prompt_lens):
        prompt[:, k, n:] = lm.cfg.mask_id
    forward = hybrid.tail_forward(runtime, tail, ar)
    st, shapes = runtime.prepare(cond, 36, params, prompt, prompt_lens=tail.prompt_lens, forward=forward)
    for stage in (0, 2):                     # full attention, then the band
        st.scores.copy_(st.init_scores[stage])
        assert breaks(runtime._step, st, shapes[stage][0], params, forward, None) == 0
    state = ar_rt.prepare(cond, tail.seq_len, hybrid.ARParams(top_k=10), [1, 2])
    state.pos.fill_(3)
    assert breaks(ar_rt._step, state) == 0


def test_plan_phases_and_totals():
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


def test_a_raising_listener_cancels_the_run_after_the_current_step():
    lm = tiny_lm(seed=7)
    runtime = Runtime(lm)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    p = generate.plan(lm.cfg, params, batch=1, frames=24)
    count = []

    class Cancelled(Exception):
        pass

    def listen(event):
        if isinstance(event, events.StageStep):
            count.append(event.done)
            if event.done == 2:
                raise Cancelled
    with pytest.raises(Cancelled):
        generate.run(p, generate.Models(runtime=runtime), _cond(lm, 1), seeds=[0], listener=listen)
    assert count == [1, 2]


def test_buffers_are_static_across_steps_and_calls():
    """Every step reads and writes the same buffers (what a captured graph needs), and a
    second call of the same shape reuses them."""
    lm = tiny_lm(seed=8)
    runtime = Runtime(lm)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    ptrs = []

    def listen(event):
        ptrs.append((event.canvas.data_ptr(), event.confidence.data_ptr()))
    runtime.generate(_cond(lm, 1), 24, params, seeds=[1], listener=listen)
    runtime.generate(_cond(lm, 1, seed=3), 24, params, seeds=[2], listener=listen)
    assert len(set(ptrs)) == 1 and len(ptrs) == 18


def test_cuda_graphs_need_cuda():
    with pytest.raises(InvalidOptionError, match="CUDA"):
        Runtime(tiny_lm(), cuda_graphs=True)


def test_fixed_cells_are_host_data():
    """The fixed-cell mask plans the run (step shapes, schedule) before the loop: a mask that
    is not on the host is refused rather than read back with a sync."""
    lm = tiny_lm(seed=9)
    runtime = Runtime(lm)
    params = DecodingParams(decoding_steps=(2, 1, 1, 1))
    canvas = torch.full((1, 4, 24), lm.cfg.mask_id)
    fixed = torch.zeros(4, 24, dtype=torch.bool)
    fixed[:, :6] = True
    runtime.prepare(_cond(lm, 1), 24, params, canvas=canvas, fixed=fixed)
    with pytest.raises(InvalidOptionError, match="on the CPU"):
        runtime.prepare(_cond(lm, 1), 24, params, canvas=canvas, fixed=fixed.to("meta"))
    with pytest.raises(InvalidOptionError, match="cell mask"):
        runtime.prepare(_cond(lm, 1), 24, params, canvas=canvas, fixed=fixed.int())
