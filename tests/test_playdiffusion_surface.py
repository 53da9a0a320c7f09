"""PlayDiffusion's surface on a random-weight tiny model in the real file formats: the Python
API and its input models, bad input, the CLI, the HTTP router; plus the loop's invariants
(docs/numerics.md §9), fast == reference under the named fixes, and the sampling epilogue's law."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from magnet_engine.engine import events
from magnet_engine.errors import InvalidInputError, InvalidOptionError

WORDS = [{"word": "hello", "start": 0.10, "end": 0.50}, {"word": "there", "start": 0.55, "end": 0.90},
         {"word": "world", "start": 1.00, "end": 1.60}]
FAST = dict(num_steps=4)  # the surface tests check plumbing, not the 30-step loop (fixtures do)


@pytest.fixture(scope="module")
def pd_dir(tiny_speech_dir):
    return tiny_speech_dir


@pytest.fixture(scope="module")
def pd(pd_dir):
    from magnet_engine import PlayDiffusion

    return PlayDiffusion(str(pd_dir), device="cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "in.wav"
    rng = np.random.RandomState(0)
    sf.write(path, (0.1 * rng.randn(2 * 16000)).astype(np.float32), 16000)
    return path


def _edit(clip, **kw):
    return dict(dict(audio=str(clip), input_text="hello there world", output_text="hello big world",
                     input_word_times=WORDS, **FAST), **kw)


# ----------------------------------------------------------------------------- API
def test_input_models_match_upstream_fields_defaults_and_bounds():
    from magnet_engine import InpaintInput, RVCInput, TTSInput

    expected = {"num_steps": (30, 1, 100), "init_temp": (1.0, 0.0, 1.0), "init_diversity": (1.0, 0.0, 1.0),
                "guidance": (0.5, 0.0, 1.0), "rescale": (0.7, 0.0, 1.0), "topk": (25, 1, 100),
                "audio_token_syllable_ratio": (None, 5.0, 25.0)}
    for name, (default, lo, hi) in expected.items():
        field = InpaintInput.model_fields[name]
        bounds = {type(m).__name__: m for m in field.metadata}
        assert (field.default, bounds["Ge"].ge, bounds["Le"].le) == (default, lo, hi), name
    assert InpaintInput.model_fields["input_word_times"].default == []
    assert set(TTSInput.model_fields) == set(expected) | {"output_text", "voice"}
    assert set(RVCInput.model_fields) == {"source_speech", "target_voice"}
    with pytest.raises(Exception):
        InpaintInput(audio="x", input_text="a", output_text="b", topk=101)


def test_inpaint_tts_rvc_return_int16_at_the_vocoder_rate(pd, clip):
    sr, pcm = pd.inpaint(_edit(clip), seed=3)
    assert sr == 24000 and pcm.dtype == np.int16 and pcm.ndim == 1 and len(pcm) > 0
    again = pd.inpaint(_edit(clip), seed=3)[1]
    assert np.array_equal(pcm, again)  # seeded: reproducible
    sr, tts = pd.tts(dict(output_text="hi there", voice=str(clip), **FAST), seed=0)
    assert sr == 24000 and tts.dtype == np.int16
    import syllables

    frames = int(syllables.estimate("hi there") * 12.5)  # the default 12.5 frames per syllable
    assert len(tts) == math.floor(frames * 480 / 512) * 2 * 256
    sr, vc = pd.rvc(dict(source_speech=str(clip), target_voice=f"file:{clip}"))
    assert sr == 24000 and vc.dtype == np.int16


def test_inpaint_units_keep_the_unedited_frames(pd, clip):
    wave, sr = sf.read(clip, dtype="float32")
    result = pd.inpaint_audio(torch.from_numpy(wave), sr, _edit(clip), seed=1)
    units = pd.pipeline.units(torch.from_numpy(wave)[None], sr)
    region = result.plan.regions[0]
    assert torch.equal(result.units[:region.start_frame], units[:region.start_frame])
    tail = units.numel() - region.end_frame - 1
    if tail > 0:
        assert torch.equal(result.units[-tail:], units[-tail:])
    assert result.units.numel() == units.numel() - (region.end_frame - region.start_frame + 1) + region.n_frames


@pytest.mark.parametrize("change, error", [
    (dict(output_text="hello there world"), "do not differ"),
    (dict(input_text="hello there & world", output_text="hello big & world"), "do not match"),
    (dict(input_word_times=[{"word": "goodbye", "start": 0.1, "end": 0.5}]), "none of the timed words"),
    (dict(input_word_times=WORDS[:2] + [{"word": "world", "start": 1.0, "end": 9.0}]), "after the end"),
    (dict(input_word_times=[{"word": "hello", "start": 0.5, "end": 0.1}]), "before start"),
    (dict(input_word_times=[]), "empty"),
    (dict(input_text=""), "empty"),
    (dict(output_text="hello " + "x" * 4500 + " world"), "maximum"),
])
def test_bad_edits_are_typed_errors(pd, clip, change, error):
    with pytest.raises(InvalidInputError, match=error):
        pd.inpaint(_edit(clip, **change))


def test_bad_audio_and_settings_are_typed_errors(pd, clip, tmp_path):
    low = tmp_path / "low.wav"
    sf.write(low, np.zeros(8000, np.float32) + 0.1, 8000)
    with pytest.raises(InvalidInputError, match="16000"):
        pd.inpaint(_edit(low))
    with pytest.raises(InvalidInputError, match="non-empty"):
        pd.inpaint_audio(torch.zeros(0), 16000, _edit(clip))
    with pytest.raises(InvalidInputError, match="not found"):
        pd.inpaint(_edit(tmp_path / "missing.wav"))
    with pytest.raises(InvalidInputError, match="only local"):
        pd.inpaint(_edit("s3://bucket/a.wav"))
    with pytest.raises(InvalidOptionError, match="topk"):
        pd.inpaint(_edit(clip, topk=0))
    with pytest.raises(InvalidOptionError, match="init_temp"):
        pd.tts(dict(output_text="hi", voice=str(clip), init_temp=5.0))
    with pytest.raises(InvalidOptionError, match="quirk"):
        type(pd)("random", unmask_fixes={"no_such_fix": True})  # refused before anything loads


# ----------------------------------------------------------------------------- loop
def test_loop_invariants_and_fast_equals_reference_under_every_fix(pd):
    """docs/numerics.md §9: units in range, context unchanged, committed tokens never change, exactly
    next_masked[i] positions masked after step i, each a subset of the previous mask."""
    from magnet_engine.engine.playdiffusion.pipeline import generate_units
    from magnet_engine.engine.playdiffusion.reference import reference_generate
    from magnet_engine.engine.playdiffusion.unmasking import GeneratorDraws, UnmaskOptions, make_schedule

    model = pd.pipeline.inpainter
    cfg = model.cfg
    gen = torch.Generator().manual_seed(5)
    text = torch.randint(3, 60, (7,), generator=gen)
    code = torch.randint(0, cfg.codebook_size, (30,), generator=gen)
    for fixes in ({}, {"greedy_last_step_always": True, "cfg_std_target_only": True}):
        for length, guidance in ((12, 1.5), (25, 0.0)):    # 1.5: not 0.5, where g and 1 - g agree
            options = UnmaskOptions(steps=8, guidance=guidance, topk=10, **fixes)
            left, right = code[:10], code[10:]
            canvases = []
            out = generate_units(pd.pipeline.runtime, text, options, GeneratorDraws(torch.Generator().manual_seed(1)),
                                 code=torch.cat([left, torch.zeros(length - 1, dtype=torch.long), right]),
                                 start_frame=10, end_frame=10 + length - 1,
                                 listener=lambda e: canvases.append(e.canvas[0, 0].clone())
                                 if isinstance(e, events.StageStep) else None)
            next_masked = make_schedule(length, options).next_masked
            assert out.min() >= 0 and out.max() < cfg.codebook_size
            assert torch.equal(out[:10], left) and torch.equal(out[10 + length:], right)
            previous = torch.ones(length, dtype=torch.bool)
            for i, canvas in enumerate(canvases):
                target = canvas[10:10 + length]
                masked = target == cfg.codebook_size  # the canvas holds units; MASK is A
                expected = next_masked[i]
                assert expected == 0 or i + 1 < len(canvases)
                assert int(masked.sum()) == expected
                assert not (masked & ~previous).any()
                if i > 0:
                    fixed = ~previous
                    assert torch.equal(target[fixed], canvases[i - 1][10:10 + length][fixed])
                previous = masked
            ref = reference_generate(model, text, options, GeneratorDraws(torch.Generator().manual_seed(1)),
                                     code=torch.cat([left, torch.zeros(length - 1, dtype=torch.long), right]),
                                     start_frame=10, end_frame=10 + length - 1)
            assert torch.equal(out, ref), (fixes, length, guidance)


def test_schedule_matches_the_spec_examples():
    from magnet_engine.engine.playdiffusion.unmasking import UnmaskOptions, make_schedule

    counts = list(make_schedule(100, UnmaskOptions(steps=30)).next_masked)
    assert counts == [99, 99, 98, 97, 96, 95, 93, 91, 89, 86, 83, 80, 77, 74, 70, 66, 62, 58, 54, 50, 45, 40,
                      35, 30, 25, 20, 15, 10, 5, 0]
    short = make_schedule(19, UnmaskOptions(steps=30))
    assert short.steps_run == 29 and not any(short.greedy)  # quirk 3: the greedy step never runs
    fixed = make_schedule(19, UnmaskOptions(steps=30, greedy_last_step_always=True))
    assert fixed.greedy[-1] and fixed.steps_run == 29


def test_gumbel_topk_sample_draws_from_the_tempered_topk_softmax():
    """Frequencies of the Gumbel-max draw against softmax(top-k logits / τ); scores as defined."""
    from magnet_engine.kernels.gumbel_sampling import gumbel, gumbel_topk_sample

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0]]).expand(40000, 6).contiguous()
    temperature, diversity = torch.tensor(0.7), torch.tensor(0.3)
    sample_u, score_u = torch.rand(40000, 6, generator=gen), torch.rand(40000, generator=gen)
    tokens, scores = gumbel_topk_sample(logits, sample_u, score_u, temperature, diversity, top_k=4)
    kept = torch.tensor([2.0, 1.0, 0.5, float("-inf"), 3.0, float("-inf")])
    law = torch.softmax(kept / 0.7, -1)
    freq = torch.bincount(tokens, minlength=6).float() / 40000
    assert freq[3] == 0 and freq[5] == 0
    assert (freq - law).abs().max() < 4 * math.sqrt(0.25 / 40000) + 1e-3
    p = torch.softmax(kept, -1)[tokens]
    torch.testing.assert_close(scores, -(0.3 * gumbel(score_u) + torch.log(p + 1e-10)))
    greedy, _ = gumbel_topk_sample(logits, None, score_u, temperature, diversity, top_k=4)
    assert (greedy == 4).all()


def test_random_weight_xlsr_keys_round_trip_to_fairseq2_names(pd_dir):
    from magnet_engine.engine.playdiffusion import files

    state = files.load_pickle(pd_dir / files.FILES["speech_tokenizer"])
    assert "encoder_frontend.pos_encoder.conv.weight_g" in state
    assert "encoder.layers.34.ffn.inner_proj.weight" in state and "encoder.layers.35.ffn.inner_proj.weight" not in state


def test_exact_region_length_fix_keeps_the_end_frame(pd_dir, clip):
    from magnet_engine import PlayDiffusion

    fixed = PlayDiffusion(str(pd_dir), device="cpu", planner_fixes={"exact_region_length": True})
    wave, sr = sf.read(clip, dtype="float32")
    result = fixed.inpaint_audio(torch.from_numpy(wave), sr, _edit(clip), seed=2)
    units = fixed.pipeline.units(torch.from_numpy(wave)[None], sr)
    r = result.plan.regions[0]
    assert result.units.numel() == units.numel() - (r.end_frame - r.start_frame) + r.n_frames
    assert result.units[r.start_frame + r.n_frames] == units[r.end_frame]


def test_tts_text_split_is_upstreams():
    from magnet_engine.engine.playdiffusion.planner import split_tts_text

    text = ("One two three four five six seven. " * 20).strip()
    pieces = split_tts_text(text)
    assert all(len(p) <= 500 for p in pieces) and " ".join(pieces) == text
    assert all(p.endswith(".") for p in pieces)


# ----------------------------------------------------------------------------- CLI
def test_cli_speech_edit_writes_the_output_and_nothing_on_error(pd_dir, clip, tmp_path, capsys):
    from magnet_engine.cli import main

    times = tmp_path / "times.json"
    times.write_text(json.dumps(WORDS))
    out = tmp_path / "out.wav"
    common = [str(clip), "--word-times", str(times), "--model", str(pd_dir), "--num-steps", "3", "--seed", "1"]
    assert main(["speech", "edit", "--from", "hello there world", "--to", "hello big world", "-o", str(out),
                 *common]) == 0
    data, sr = sf.read(out, dtype="int16")
    assert sr == 24000 and len(data) > 0
    bad = tmp_path / "bad.wav"
    assert main(["speech", "edit", "--from", "hello there world", "--to", "hello there world", "-o", str(bad),
                 *common]) == 2
    assert "do not differ" in capsys.readouterr().err
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))


# ----------------------------------------------------------------------------- HTTP
def test_speech_edit_router(pd, clip):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from magnet_engine.server.routes.speech import SpeechLimits, make_speech_router

    app = FastAPI()
    app.include_router(make_speech_router(pd, SpeechLimits(max_upload_bytes=200_000, max_audio_seconds=5)))
    client = TestClient(app)
    form = dict(input_text="hello there world", output_text="hello big world", word_times=json.dumps(WORDS),
                num_steps="3", seed="4")
    audio = clip.read_bytes()
    ok = client.post("/v1/speech/edit", data=form, files={"audio": ("in.wav", audio, "audio/wav")})
    assert ok.status_code == 200, ok.text
    pcm, sr = sf.read(io.BytesIO(ok.content), dtype="int16")
    assert sr == 24000 and len(pcm) > 0 and int(ok.headers["X-Units"]) > 0
    assert set(json.loads(ok.headers["X-Timings"])) == {"tokenize", "plan", "unmask", "vocode"}
    cases = [
        (dict(files={"audio": ("x.wav", b"not audio", "audio/wav")}), 400),
        (dict(files={"audio": ("x.wav", b"\0" * 300_000, "audio/wav")}), 413),
        (dict(data=dict(form, topk="500")), 422),
        (dict(data=dict(form, output_text=form["input_text"])), 400),
        (dict(data=dict(form, word_times="[not json")), 400),
        (dict(data=dict(form, word_times=json.dumps([{"word": 1}]))), 400),
    ]
    for kwargs, status in cases:
        kwargs.setdefault("data", form)
        kwargs.setdefault("files", {"audio": ("in.wav", audio, "audio/wav")})
        response = client.post("/v1/speech/edit", **kwargs)
        assert response.status_code == status, (kwargs.get("data"), response.text)
    long = io.BytesIO()
    sf.write(long, np.zeros(16000 * 6, np.float32), 16000, subtype="PCM_16", format="WAV")
    too_long = client.post("/v1/speech/edit", data=form, files={"audio": ("l.wav", long.getvalue(), "audio/wav")})
    assert too_long.status_code == 413
    assert client.get("/v1/speech/edit/defaults").json()["topk"] == 25


# ----------------------------------------------------------------------------- planner
def test_long_region_is_split_as_upstream():
    """n > 750 frames: 1 + n // 750 near-equal word groups (numpy.array_split); the first keeps
    the start edge, the last the end edge, middle groups get no audio context (quirk 9)."""
    from magnet_engine.engine.playdiffusion.planner import plan_edit

    words = [dict(word=w, start=0.1 + 0.4 * i, end=0.4 + 0.4 * i) for i, w in enumerate("one two three".split())]
    inserted = " ".join(["banana"] * 40)  # 3 syllables each at 25 frames: ~3000 frames
    plan = plan_edit("one two three", f"one {inserted} two three", words, n_units=75, ratio=25.0)
    regions = plan.regions
    n_total = int(3 * 40 * 25)
    assert len(regions) >= 1 + n_total // 750
    first, last = regions[0], regions[-1]
    assert first.start_frame is not None and first.end_frame is None and first.buf_end_frame is None
    assert last.start_frame is None and last.end_frame is not None and last.buf_start_frame is None
    assert all(r.start_frame is None and r.end_frame is None for r in regions[1:-1])
    assert all(r.n_frames <= 750 + 75 for r in regions)


def test_end_insertion_quirk_and_its_fix():
    """Quirk 4: an insertion after the last word never takes the left neighbour (frames × 50
    compared with a time); the named fix does."""
    from magnet_engine.engine.playdiffusion.planner import PlannerOptions, plan_edit

    words = [dict(word="hello", start=0.1, end=0.5), dict(word="world", start=0.55, end=1.0)]
    quirk = plan_edit("hello world", "hello world again", words, n_units=60, ratio=12.5).regions[0]
    fixed = plan_edit("hello world", "hello world again", words, n_units=60, ratio=12.5,
                      options=PlannerOptions(fix_end_insertion_buffer=True)).regions[0]
    assert quirk.start_frame == 60 and quirk.text == "hello world again"
    assert fixed.start_frame == int(0.55 * 50)


@pytest.mark.parametrize("card, top_k", [(64, 25), (1000, 7), (10, 10)])
def test_gumbel_topk_triton_matches_torch(card, top_k):
    from magnet_engine.kernels import backend
    from magnet_engine.kernels.gumbel_sampling import gumbel_topk_sample

    if not (backend.triton_available() and backend.triton_interpreted()):
        pytest.skip("Triton interpreter not available")
    gen = torch.Generator().manual_seed(card)
    logits = torch.randn(9, card, generator=gen) * 3  # distinct values: no tie at the k-th
    logits[0, :] = -logits[0, :]                       # negative-heavy row: the int image of fp32
    sample_u, score_u = torch.rand(9, card, generator=gen), torch.rand(9, generator=gen)
    temperature, diversity = torch.tensor(0.4), torch.tensor(0.8)
    for su in (sample_u, None):
        t_tok, t_sc = gumbel_topk_sample(logits, su, score_u, temperature, diversity, top_k=top_k, impl="torch")
        x_tok, x_sc = gumbel_topk_sample(logits, su, score_u, temperature, diversity, top_k=top_k, impl="triton")
        assert torch.equal(t_tok, x_tok)
        torch.testing.assert_close(x_sc, t_sc, atol=1e-5, rtol=1e-5)


def test_step_options_reach_the_speech_runtime(pd_dir):
    """compile / cuda_graphs from the API and the CLI to the unmasking runtime; cuda_graphs off
    CUDA is refused before anything loads."""
    from magnet_engine import PlayDiffusion
    from magnet_engine.speech_cli import build_parser

    with pytest.raises(InvalidOptionError, match="CUDA"):
        PlayDiffusion(str(pd_dir), device="cpu", cuda_graphs=True)
    runtime = PlayDiffusion(str(pd_dir), device="cpu", compile=True).pipeline.runtime
    assert runtime._step_fn is not runtime._step and not runtime.cuda_graphs
    args = build_parser().parse_args(["tts", "hi", "--voice", "v.wav", "-o", "o.wav", "--compile", "--cuda-graphs"])
    assert args.compile and args.cuda_graphs
