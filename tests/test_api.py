"""The public API and the CLI on a tiny random checkpoint in the published layout."""
import pytest
import soundfile as sf
import torch

from magnet_engine import MAGNeT
from magnet_engine.cli import main as cli_main
from magnet_engine.demo import build_random_model
from magnet_engine.errors import InvalidInputError, InvalidOptionError, ModelNotFoundError

FAST = dict(decoding_steps=[3, 2, 2, 2])


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = MAGNeT.from_pretrained(tiny_dir, device="cpu")
    m.set_generation_params(duration=0.5, **FAST)
    return m


def test_attributes_and_defaults(model):
    assert model.sample_rate == 32000 and model.frame_rate == 50 and model.max_duration == 10
    fresh = MAGNeT.from_pretrained(model_dir := model.name, device="cpu")
    assert fresh.params.decoding_steps == (20, 10, 10, 10) and fresh.params.top_p == 0.9
    assert fresh.params.temperature == 3.0 and fresh.params.use_sampling and fresh.duration == 10
    assert model_dir


def test_generate_shapes_and_seed(model):
    wav, tokens = model.generate(["warm piano", "techno"], return_tokens=True, seed=3)
    assert tokens.shape == (2, 4, 24)                  # 25 frames trimmed to a multiple of 3
    assert wav.shape == (2, 1, 24 * 640) and torch.isfinite(wav).all()
    assert tokens.min() >= 0 and tokens.max() < 2048
    again = model.generate(["warm piano", "techno"], seed=3)
    assert torch.equal(wav, again)
    other = model.generate_tokens(["warm piano", "techno"], seed=4)
    assert not torch.equal(other, tokens)


def test_engines_agree_greedy(tiny_dir):
    fast = MAGNeT.from_pretrained(tiny_dir, device="cpu")
    ref = MAGNeT.from_pretrained(tiny_dir, device="cpu", engine="reference")
    for m in (fast, ref):
        m.set_generation_params(duration=0.5, use_sampling=False, **FAST)
    assert torch.equal(fast.generate_tokens(["lo-fi"]), ref.generate_tokens(["lo-fi"]))


def test_progress_callback(model):
    seen = []
    model.generate_tokens(["x"], progress=lambda done, total: seen.append((done, total)), seed=0)
    assert seen[-1] == (9, 9) and len(seen) == 9


def test_continuation_keeps_prompt(model):
    t = torch.arange(8000) / 32000
    prompt = (0.3 * torch.sin(2 * torch.pi * 440 * t))[None, None]
    wav, tokens = model.generate_continuation(prompt, 32000, ["piano"], return_tokens=True, seed=1)
    prompt_codes = model.codec.encode(prompt)
    assert torch.equal(tokens[..., :prompt_codes.shape[-1]], prompt_codes)
    # a prompt at another rate is resampled first, giving the same number of frames
    wav2, tokens2 = model.generate_continuation(prompt[..., ::2].contiguous(), 16000, ["piano"],
                                                return_tokens=True, seed=1)
    assert tokens2.shape == tokens.shape


def test_bad_inputs(model, tmp_path):
    with pytest.raises(InvalidInputError):
        model.generate([])
    with pytest.raises(InvalidInputError):
        model.generate("not a list")
    with pytest.raises(InvalidOptionError, match="duration"):
        model.set_generation_params(duration=601)   # past MAX_LONGFORM_SECONDS (long-form allows 11)
    with pytest.raises(InvalidOptionError, match="duration"):
        model.set_generation_params(duration=0)
    with pytest.raises(InvalidOptionError, match="top_p"):
        model.set_generation_params(top_p=1.5)
    with pytest.raises(InvalidOptionError, match="decoding_steps"):
        model.set_generation_params(decoding_steps=[10, 10])
    with pytest.raises(InvalidOptionError, match="span_arrangement"):
        model.set_generation_params(span_arrangement="zigzag")
    assert model.duration == 0.5                       # a refused call changes nothing
    with pytest.raises(InvalidInputError, match="prompt"):
        model.generate_continuation(torch.zeros(3, 3, 3, 3), 32000)
    with pytest.raises(InvalidInputError, match=r"\[0, 2047\]"):
        model.generate_tokens(["x"], prompt_codes=torch.full((1, 4, 5), 4000))
    with pytest.raises(InvalidInputError, match="shorter"):
        model.generate_tokens(["x"], prompt_codes=torch.zeros(1, 4, 30, dtype=torch.long))
    with pytest.raises(InvalidOptionError, match="seed"):
        model.generate_tokens(["x", "y"], seed=[1])
    with pytest.raises(ModelNotFoundError):
        MAGNeT.from_pretrained(tmp_path / "missing")


def test_cli_generate_writes_wav(tiny_dir, tmp_path):
    out = tmp_path / "out.wav"
    rc = cli_main(["generate", "warm piano", "--model", str(tiny_dir), "-o", str(out), "--duration", "0.5",
                   "--decoding-steps", "2", "1", "1", "1", "--seed", "0", "-q", "--device", "cpu"])
    assert rc == 0
    data, sr = sf.read(out)
    assert sr == 32000 and data.shape == (24 * 640,)
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]      # no temporary left behind


def test_cli_errors_are_clear(tiny_dir, tmp_path, capsys):
    rc = cli_main(["generate", "x", "--model", str(tiny_dir), "-o", str(tmp_path / "o.wav"), "--top-p", "3",
                   "-q", "--device", "cpu"])
    assert rc == 2 and "top_p" in capsys.readouterr().err
    assert not (tmp_path / "o.wav").exists()


def test_cli_demo_runs(tmp_path, capsys):
    rc = cli_main(["demo", "--preset", "tiny", "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "d.wav"),
                   "--duration", "0.3", "--decoding-steps", "2", "1", "1", "1", "-q", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "noise" in out and (tmp_path / "d.wav").exists()
    assert (tmp_path / "cache" / "demo-tiny-10s" / "BUILT.json").exists()


@pytest.fixture(scope="session")
def ar_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar-models")
    return {kind: build_random_model(root / kind, "tiny", seed=1, kind=kind) for kind in ("hybrid", "musicgen")}


def _wav_ok(path, seconds):
    data, sr = sf.read(path)
    assert sr == 32000 and data.ndim == 1 and len(data) > 0.9 * seconds * 32000
    assert float(abs(data).max()) > 0


@pytest.mark.parametrize("extra", [
    ["--hybrid-prefix-seconds", "0.3"],
    ["--hybrid-prefix-seconds", "0.3", "--hybrid-handoff", "rectangle", "--hybrid-prefix-attention", "bidirectional"],
])
def test_cli_hybrid(ar_dirs, tmp_path, capsys, extra):
    out, first = tmp_path / "hybrid.wav", tmp_path / "prefix.wav"
    assert cli_main(["generate", "a hybrid test", "--model", str(ar_dirs["hybrid"]), "--duration", "1", "-q",
                     "--decoding-steps", "3", "2", "2", "2", "--seed", "1", "-o", str(out),
                     "--prefix-output", str(first)] + extra) == 0
    _wav_ok(out, 0.96)
    _wav_ok(first, 0.3 - 0.06 * ("staircase" in extra or "rectangle" not in extra))
    assert "time to first audio" in capsys.readouterr().out


def test_cli_two_model_hybrid_and_rescoring(ar_dirs, tiny_dir, tmp_path):
    out = tmp_path / "two.wav"
    assert cli_main(["generate", "two models", "--model", str(tiny_dir), "--duration", "1", "-q",
                     "--decoding-steps", "3", "2", "2", "2", "--hybrid-prefix-seconds", "0.4",
                     "--prefix-model", str(ar_dirs["musicgen"]), "-o", str(out)]) == 0
    _wav_ok(out, 0.96)
    out = tmp_path / "rescored.wav"
    assert cli_main(["generate", "rescored", "--model", str(tiny_dir), "--duration", "1", "-q",
                     "--decoding-steps", "3", "2", "2", "2", "--rescorer", str(ar_dirs["musicgen"]),
                     "--rescore-weight", "0.7", "-o", str(out)]) == 0
    _wav_ok(out, 0.96)


def test_api_hybrid_prefix_audio_first_and_errors(ar_dirs, tiny_dir):
    hy = MAGNeT.from_pretrained(ar_dirs["hybrid"], device="cpu")
    hy.set_generation_params(duration=1, **FAST)
    assert hy.prefix_frames() == 25                      # default: 3 s capped at half the clip
    events = list(hy.generate_stream(["x"], seed=2, hybrid_prefix_seconds=0.4))
    assert [e for e, _ in events] == ["prefix", "full"]
    assert events[0][1].shape == (1, 1, (20 - 3) * 640) and events[1][1].shape == (1, 1, 48 * 640)
    wav = hy.generate(["x"], seed=2, hybrid_prefix_seconds=0.4)
    assert torch.equal(wav, events[1][1])
    with pytest.raises(InvalidOptionError, match="at least one frame"):
        hy.set_generation_params(hybrid_prefix_seconds=0)
    with pytest.raises(InvalidOptionError, match="span"):
        hy.generate(["x"], hybrid_prefix_seconds=0.99)
    plain = MAGNeT.from_pretrained(tiny_dir, device="cpu")
    with pytest.raises(InvalidOptionError, match="prefix_model"):
        plain.set_generation_params(duration=1, hybrid_prefix_seconds=0.2)
    with pytest.raises(InvalidOptionError, match="rescore_weight"):
        plain.set_generation_params(rescorer=str(ar_dirs["musicgen"]), rescore_weight=2)
    from magnet_engine.errors import CheckpointError
    with pytest.raises(CheckpointError, match="autoregressive"):
        plain.set_generation_params(rescorer=str(ar_dirs["hybrid"]), rescore_weight=0.5)
    assert plain.rescorer is None and plain.params.decoding_steps == (20, 10, 10, 10)  # nothing half-set


def test_cli_demo_hybrid(tmp_path, capsys):
    rc = cli_main(["demo", "--preset", "tiny", "--kind", "hybrid", "--cache-dir", str(tmp_path / "cache"),
                   "-o", str(tmp_path / "h.wav"), "--duration", "1", "--decoding-steps", "2", "1", "1", "1", "-q"])
    assert rc == 0
    _wav_ok(tmp_path / "h.wav", 0.96)
    assert (tmp_path / "cache" / "demo-tiny-hybrid-10s" / "BUILT.json").exists()
    assert "hybrid-MAGNeT" in capsys.readouterr().out


def test_two_model_ar_cfg_defaults_to_the_prefix_models_own(ar_dirs, tiny_dir):
    import dataclasses
    plain = MAGNeT.from_pretrained(tiny_dir, device="cpu")
    musicgen = plain._external_lm(str(ar_dirs["musicgen"]))
    musicgen.cfg = dataclasses.replace(musicgen.cfg, cfg_coef=5.0)
    plain.set_generation_params(duration=1, hybrid_prefix_seconds=0.2, prefix_model=musicgen)
    assert plain.hybrid.ar.cfg_coef == 5.0 and plain.prefix_model is musicgen
    plain.set_generation_params(duration=1, hybrid_prefix_seconds=0.2, prefix_model=musicgen, ar_cfg_coef=2.0)
    assert plain.hybrid.ar.cfg_coef == 2.0


def test_bench_hybrid_runs_on_a_tiny_model(tmp_path):
    """`magnet-engine bench hybrid` end to end on tiny random models: every configuration
    runs and the JSON holds a time to first audio for the hybrid ones (not a timing test)."""
    import json
    out = tmp_path / "hybrid.json"
    assert cli_main(["bench", "hybrid", "--arch", "tiny", "--runs", "1", "--warmup", "1", "--duration", "1",
                     "--prefixes", "0.3", "--decoding-steps", "2", "1", "1", "1", "--precision", "fp32",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    cases = {c["name"]: c for c in json.loads(out.read_text())["cases"]}
    assert {"plain", "hybrid-0.3s", "rescored"} <= set(cases) and any(n.startswith("two-model") for n in cases)
    hybrid_case = cases["hybrid-0.3s"]
    assert 0 < hybrid_case["first_audio_ms"]["p50"] < hybrid_case["end_to_end_ms"]["p50"]


def test_generate_stream_raises_the_workers_error(ar_dirs):
    hy = MAGNeT.from_pretrained(ar_dirs["hybrid"], device="cpu")
    hy.set_generation_params(duration=1, **FAST)
    with pytest.raises(InvalidOptionError, match="span"):
        list(hy.generate_stream(["x"], hybrid_prefix_seconds=0.99))
    with pytest.raises(InvalidOptionError, match="exclusive"):
        hy.generate_tokens(["x"], prompt_codes=torch.zeros(1, 4, 5, dtype=torch.long))
