"""PlayDiffusion's unmasking step on the runtime: a speech plan run by `engine.generate.run`,
one capturable step (traced whole, no host sync), compiled == eager, the draw sources, the
events and cancellation. A tiny random inpainter; the fixture replays are in test_playdiffusion.py.
"""
from __future__ import annotations

import ast
import copy
import inspect
import textwrap

import pytest
import torch
import torch._dynamo

from magnet_engine.engine import events, generate
from magnet_engine.engine.playdiffusion.inpainter import Inpainter, InpainterConfig
from magnet_engine.engine.playdiffusion.pipeline import generate_units
from magnet_engine.engine.playdiffusion.plan import plan_speech
from magnet_engine.engine.playdiffusion.reference import reference_generate
from magnet_engine.engine.playdiffusion.unmasking import (GeneratorDraws, KeyedDraws, RecordedDraws, SpeechRuntime,
                                                          UnmaskOptions, make_schedule)
from magnet_engine.errors import InvalidOptionError

from test_generate import Cancelled, cancel_at

CFG = InpainterConfig(vocab_size=40, codebook_size=64, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=32)
OPTIONS = UnmaskOptions(steps=6, topk=12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Inpainter(CFG).eval()


def _inputs(seed=0, text=5, left=6, right=7):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CFG.vocab_size - 2, (text,), generator=gen),
            torch.randint(0, CFG.codebook_size, (left,), generator=gen),
            torch.randint(0, CFG.codebook_size, (right,), generator=gen))


def _loop(runtime, draws, options=OPTIONS, target=9, seed=0, listener=None):
    text, left, right = (t.to(runtime.device) for t in _inputs(seed))
    p = plan_speech(CFG, options, [(text.numel(), left.numel(), target, right.numel())])
    return generate.run(p, generate.Models(speech=runtime), [(text, left, right)], draws=draws, listener=listener)[0]


def _reference(model, draws, options=OPTIONS, target=9, seed=0):
    text, left, right = _inputs(seed)
    code = torch.cat([left, left.new_zeros(target - 1), right])
    return reference_generate(model, text, options, draws, code=code, start_frame=left.numel(),
                              end_frame=left.numel() + target - 1)


# ----------------------------------------------------------------------------- one capturable step
@pytest.mark.parametrize("draws, greedy, options", [
    (GeneratorDraws(), False, OPTIONS),                                           # upstream's CPU draws
    (KeyedDraws(3), True, UnmaskOptions(steps=6, topk=12, guidance=0.0)),         # keyed, greedy, no CFG
    (RecordedDraws([torch.rand(1, 9, 64)], [torch.rand(1, 9)]), False,            # given, the quirk-14 fix
     UnmaskOptions(steps=6, topk=12, cfg_std_target_only=True)),
])
def test_speech_step_traces_whole(model, draws, greedy, options):
    """torch._dynamo.explain traces the step as torch.compile(fullgraph=True) would: no break."""
    runtime = SpeechRuntime(model)
    text, left, right = _inputs()
    st, shapes = runtime.prepare(make_schedule(9, options), options, text, left, right, draws)
    shape = next(s for s in shapes if s.greedy == greedy)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch._dynamo.explain(runtime._step)(st, shape)
    assert out.graph_count == 1 and out.graph_break_count == 0, out.break_reasons


def test_speech_step_has_no_host_sync():
    """The step and the forward it runs never read a device value back on the host."""
    banned_attrs = {"item", "cpu", "tolist", "numpy"}
    banned_calls = {"print", "int", "float", "bool"}
    for fn in (SpeechRuntime._step, SpeechRuntime.logits):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                assert not (isinstance(f, ast.Attribute) and f.attr in banned_attrs), (fn.__name__, ast.unparse(node))
                assert not (isinstance(f, ast.Name) and f.id in banned_calls), (fn.__name__, ast.unparse(node))


def test_compiled_step_tokens_equal_eager(model):
    """compile=True (the whole step through torch.compile(fullgraph=True)) gives the eager tokens
    from upstream's generator draws, and both equal the reference loop's. (30 steps over 9
    positions stop early with no greedy step: one step shape, one compile on this CPU; the keyed
    draws compiled are checked on CUDA, test_speech_cuda_graph_tokens_equal_eager.)"""
    options = UnmaskOptions(steps=30, topk=12)
    assert not any(make_schedule(9, options).greedy)
    eager, compiled = SpeechRuntime(model), SpeechRuntime(model, compile=True)
    for seed in (4, 5):                         # the second loop reuses the compiled step
        def draws():
            return GeneratorDraws(torch.Generator().manual_seed(seed))
        want = _loop(eager, draws(), options)
        assert torch.equal(_loop(compiled, draws(), options), want)
        assert torch.equal(_reference(model, draws(), options), want)


# ----------------------------------------------------------------------------- draws
def test_default_draws_are_upstreams_global_generator_in_order(model):
    """The state-tensor draws inside the step consume the global generator exactly as the plain
    loop's uniform_ calls do: same tokens, and the generator ends in the same state."""
    torch.manual_seed(21)
    fast = _loop(SpeechRuntime(model), GeneratorDraws())
    after_fast = torch.get_rng_state()
    torch.manual_seed(21)
    ref = _reference(model, GeneratorDraws())
    assert torch.equal(fast, ref) and torch.equal(after_fast, torch.get_rng_state())


def test_greedy_last_step_fix_and_no_guidance_match_the_reference(model):
    options = UnmaskOptions(steps=30, topk=12, guidance=0.0, greedy_last_step_always=True)
    sched = make_schedule(9, options)
    assert sched.steps_run < 30 and sched.greedy[-1]           # stops early; the fix makes it greedy
    runtime = SpeechRuntime(model)
    for seed in (0, 1):
        assert torch.equal(_loop(runtime, KeyedDraws(seed), options),
                           _reference(model, KeyedDraws(seed), options))


# ----------------------------------------------------------------------------- plan / run
def test_speech_run_reports_typed_events_in_order(model):
    runtime = SpeechRuntime(model)
    loops = [_inputs(0), _inputs(1, text=3, left=0, right=4)]
    p = plan_speech(CFG, OPTIONS, [(t.numel(), l.numel(), n, r.numel())
                                            for (t, l, r), n in zip(loops, (9, 5))])
    assert p.mode == "speech" and p.total_steps == sum(ph.schedule.steps_run for ph in p.phases)
    seen = []
    outs = generate.run(p, generate.Models(speech=runtime), loops, draws=KeyedDraws(2), listener=seen.append)
    assert isinstance(seen[0], events.Started) and seen[0].total == p.total_steps
    steps = [e for e in seen if isinstance(e, events.StageStep)]
    assert [e.done for e in steps] == list(range(1, p.total_steps + 1))
    assert [e.window for e in steps] == [0] * p.phases[0].schedule.steps_run + [1] * p.phases[1].schedule.steps_run
    ready = [e for e in seen if isinstance(e, events.WindowReady)]
    assert [(e.index, e.count, e.codes.shape[-1]) for e in ready] == [(0, 2, 9), (1, 2, 5)]
    assert isinstance(seen[-1], events.Done) and torch.equal(seen[-1].codes[0, 0],
                                                             torch.cat([outs[0][6:15], outs[1][0:5]]))
    assert torch.equal(outs[0][:6], loops[0][1]) and torch.equal(outs[0][15:], loops[0][2])   # context kept
    assert (outs[0] < CFG.codebook_size).all() and (outs[1] < CFG.codebook_size).all()


def test_a_raising_listener_cancels_the_speech_run_after_the_current_step(model):
    count = []
    gen = torch.Generator().manual_seed(8)
    with pytest.raises(Cancelled):
        _loop(SpeechRuntime(model), GeneratorDraws(gen), listener=cancel_at(2, count))
    assert count == [1, 2]
    # the generator advanced by the two steps that ran (sample [L, A] + score [L] each), as upstream's
    want = torch.Generator().manual_seed(8)
    for _ in range(2):
        torch.empty(9, CFG.codebook_size).uniform_(generator=want)
        torch.empty(9).uniform_(generator=want)
    assert torch.equal(gen.get_state(), want.get_state())


def test_speech_plan_and_run_refuse_bad_input(model):
    with pytest.raises(InvalidOptionError, match="topk"):
        plan_speech(CFG, UnmaskOptions(topk=0), [(3, 0, 4, 0)])
    with pytest.raises(InvalidOptionError, match="target position"):
        plan_speech(CFG, OPTIONS, [(3, 0, 0, 0)])
    with pytest.raises(InvalidOptionError, match="maximum"):
        plan_speech(CFG, OPTIONS, [(3, 0, 5000, 0)])
    p = plan_speech(CFG, OPTIONS, [(5, 6, 9, 7)])
    models = generate.Models(speech=SpeechRuntime(model))
    with pytest.raises(InvalidOptionError, match="do not match"):
        generate.run(p, models, [_inputs(text=4)], draws=KeyedDraws(0))
    with pytest.raises(InvalidOptionError, match="draws"):
        generate.run(p, models, [_inputs()], seeds=[0])
    with pytest.raises(InvalidOptionError, match="CUDA"):
        SpeechRuntime(model, cuda_graphs=True)


def test_generate_units_is_upstreams_generate_through_the_plan(model):
    """TTS (no context) and inpainting through the pipeline's one-loop helper."""
    runtime = SpeechRuntime(model)
    text = _inputs()[0]
    tts = generate_units(runtime, text, OPTIONS, KeyedDraws(5), target_len=7)
    assert tts.shape == (7,)
    assert torch.equal(tts, reference_generate(model, text, OPTIONS, KeyedDraws(5), target_len=7))


# ----------------------------------------------------------------------------- guidance
def _guided_by_hand(cond, uncond, g, r):
    """Upstream reverse_diffusion's CFG on the hidden states, written out: x = c + g(c - u),
    rescaled to c's std, blended by r."""
    mixed = cond + g * (cond - uncond)
    return r * (mixed * cond.std() / mixed.std()) + (1 - r) * mixed


@pytest.mark.parametrize("guidance", [0.25, 1.0, 2.0])
def test_guided_logits_follow_the_formula_where_g_and_1_minus_g_differ(model, guidance):
    """g = 0.5 (the default, and the fixtures') cannot tell g from 1 - g: these can. rescale 0.4
    for the same reason against 1 - r (0.7 and 0.3 would also do, 0.5 would not)."""
    options = UnmaskOptions(steps=6, topk=12, guidance=guidance, rescale=0.4)
    runtime = SpeechRuntime(model)
    text, left, right = _inputs()
    st, shapes = runtime.prepare(make_schedule(9, options), options, text, left, right, KeyedDraws(0))
    with torch.no_grad():
        hidden = model.hidden(st.ids)[:, st.text_len:]                  # [2, P + L + Q, D]: cond, null text
        want = model.to_logits(_guided_by_hand(hidden[0], hidden[1], guidance, 0.4)[6:15])
    torch.testing.assert_close(runtime.logits(st, shapes[0]), want, atol=1e-5, rtol=0)


def test_guided_loop_equals_the_reference_where_g_and_1_minus_g_differ(model):
    """Token for token against the plain loop at g = 0.25 and 2 (where 1 - g is 0.75 and -1);
    the tokens do depend on g here, so the equality checks the scale, not only the wiring."""
    runtime = SpeechRuntime(model)
    by_guidance = {}
    for guidance in (0.25, 2.0):
        options = UnmaskOptions(steps=6, topk=12, guidance=guidance, rescale=0.4)
        by_guidance[guidance] = [_loop(runtime, KeyedDraws(seed), options, seed=seed) for seed in (0, 1)]
        for seed, fast in enumerate(by_guidance[guidance]):
            assert torch.equal(fast, _reference(model, KeyedDraws(seed), options, seed=seed)), (guidance, seed)
    assert any(not torch.equal(a, b) for a, b in zip(by_guidance[0.25], by_guidance[2.0]))


# ----------------------------------------------------------------------------- on CUDA (marker gpu)
@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_speech_cuda_graph_tokens_equal_eager(model, compile):
    """PlayDiffusion's unmasking step captured once per shape (greedy or not) and replayed:
    the eager tokens, from a seeded CUDA generator (keyed draws inside the step), from the
    keyed RNG and from host-given uniforms."""
    cuda = torch.device("cuda")
    model = copy.deepcopy(model).to(cuda)     # the module's fixture stays on the CPU
    options = UnmaskOptions(steps=8, topk=12)
    eager, graphed = SpeechRuntime(model), SpeechRuntime(model, compile=compile, cuda_graphs=True)
    assert eager.impl.sample_tokens == "triton"
    recorded = RecordedDraws([torch.rand(1, 9, 64, device=cuda) for _ in range(8)],
                             [torch.rand(1, 9, device=cuda) for _ in range(8)])
    for make in (lambda: GeneratorDraws(torch.Generator(device=cuda).manual_seed(3)), lambda: KeyedDraws(5),
                 lambda: recorded):
        want = _loop(eager, make(), options)
        assert torch.equal(_loop(graphed, make(), options), want)
        assert torch.equal(_loop(graphed, make(), options), want)            # replayed, not recaptured
    state = next(iter(graphed._states.values()))
    # greedy or not, per draw source: 'keyed' (a CUDA generator seeds the keyed RNG) and 'given'
    assert len(graphed._states.graphs(state)) == 2 * 2
