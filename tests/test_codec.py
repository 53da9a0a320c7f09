"""EnCodec: the reference fixtures, both package formats, bad inputs, prompt resampling."""
import math
import sys
import warnings

import pytest
import torch

from magnet_engine.engine import codec as codec_mod
from magnet_engine.engine.codec import Codec, resample
from magnet_engine.engine.random_weights import random_compression_package
from magnet_engine.errors import (CheckpointError, ConfigError, DependencyError, InvalidInputError,
                                  ModelNotFoundError, NumericalError)


def max_abs(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- reference fixtures
@pytest.fixture(scope="module")
def fixture_codec(fixtures):
    pkg = torch.load(fixtures / "checkpoint" / "compression_state_dict.bin", map_location="cpu", weights_only=True)
    return Codec.from_package(pkg)


def test_fixture_config_is_read_from_xp_cfg(fixture_codec):
    cfg = fixture_codec.cfg
    assert cfg.n_filters == 4 and cfg.ratios == (8, 5, 4, 4) and cfg.dimension == 128
    assert cfg.pad_mode == "constant" and cfg.true_skip and not cfg.causal
    assert (fixture_codec.sample_rate, fixture_codec.hop_length, fixture_codec.frame_rate) == (32000, 640, 50.0)
    assert (fixture_codec.n_q, fixture_codec.cardinality, fixture_codec.channels) == (4, 2048, 1)


def test_fixture_decode(fixture_codec, golden):
    ref = golden["codec"]
    assert max_abs(fixture_codec.decode_latent(ref["decode_codes"]), ref["decode_latent"]) <= 1e-5
    wav = fixture_codec.decode(ref["decode_codes"])
    assert wav.dtype == torch.float32
    assert max_abs(wav, ref["decode_wav"]) <= 1e-4


def test_fixture_encode(fixture_codec, golden):
    ref = golden["codec"]
    assert max_abs(fixture_codec.encoder_latent(ref["encode_wav"]), ref["encoder_latent"]) <= 1e-5
    assert torch.equal(fixture_codec.encode(ref["encode_wav"]), ref["encode_codes"])


def test_fixture_greedy_generation_wav(fixture_codec, golden):
    ref = golden["generate_greedy"]
    assert max_abs(fixture_codec.decode(ref["tokens"]), ref["wav"]) <= 1e-4


# ---------------------------------------------------------------- random packages
def small_package(**overrides):
    kwargs = dict(n_filters=4, bins=64, dimension=16, seed=1)
    kwargs.update(overrides)
    return random_compression_package(**kwargs)


@pytest.fixture(scope="module")
def small_pkg():
    return small_package()


@pytest.fixture(scope="module")
def small_codec(small_pkg):
    return Codec.from_package(small_pkg)


def test_package_layout(small_pkg):
    assert small_pkg["version"] == "1.3.0" and small_pkg["exported"] is True
    assert "${sample_rate}" in small_pkg["xp.cfg"]  # unresolved, as real exports keep them
    state = small_pkg["best_state"]
    assert state["decoder.model.3.convtr.convtr.weight_g"].shape == (64, 1, 1)  # g of a transposed conv: dim 0
    assert state["quantizer.vq.layers.3._codebook.embed"].shape == (64, 16)
    assert state["quantizer.vq.layers.0._codebook.inited"].item() == 1.0
    assert all(v.dtype == torch.float32 for v in state.values())


def test_decode_length_and_encode_round_trip(small_codec):
    codes = torch.randint(0, 64, (2, 4, 7), generator=torch.Generator().manual_seed(0))
    wav = small_codec.decode(codes)
    assert wav.shape == (2, 1, 7 * 640) and wav.dtype == torch.float32
    assert small_codec.encode(wav).shape == (2, 4, 7)
    # a prompt that is not a whole number of frames gets a last, partial frame
    assert small_codec.encode(wav[..., :-100]).shape == (2, 4, 7)


def test_decode_latent_is_codebook_sum(small_codec, small_pkg):
    codes = torch.randint(0, 64, (3, 4, 5), generator=torch.Generator().manual_seed(1))
    books = [small_pkg["best_state"][f"quantizer.vq.layers.{k}._codebook.embed"] for k in range(4)]
    expected = sum(books[k][codes[:, k]] for k in range(4)).transpose(1, 2)  # [B, D, T]
    assert max_abs(small_codec.decode_latent(codes), expected) <= 1e-6
    # fewer codebooks than the codec has (an LM with compression_model_n_q < n_q)
    partial = sum(books[k][codes[:, k]] for k in range(2)).transpose(1, 2)
    assert max_abs(small_codec.decode_latent(codes[:, :2]), partial) <= 1e-6


def test_encode_is_greedy_residual_argmin(small_codec, small_pkg):
    wav = torch.randn(2, 1, 3200, generator=torch.Generator().manual_seed(2))
    residual = small_codec.encoder_latent(wav).transpose(1, 2)  # [B, T, D]
    expected = []
    for k in range(4):
        book = small_pkg["best_state"][f"quantizer.vq.layers.{k}._codebook.embed"]
        idx = torch.cdist(residual.double(), book.double()[None]).argmin(-1)  # [B, T]
        expected.append(idx)
        residual = residual - book[idx]
    assert torch.equal(small_codec.encode(wav), torch.stack(expected, dim=1))


def test_16khz_architecture_is_read_from_xp_cfg():
    pkg = small_package(sample_rate=16000, ratios=(8, 5, 4, 2), n_filters=2)
    codec = Codec.from_package(pkg)
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate) == (16000, 320, 50.0)
    assert codec.cfg.n_filters == 2 and codec.cfg.ratios == (8, 5, 4, 2)
    assert codec.decode(torch.zeros(1, 4, 3, dtype=torch.long)).shape == (1, 1, 960)
    # 2 filters · 2^4 channels after the decoder's first conv
    assert pkg["best_state"]["decoder.model.0.conv.conv.weight_v"].shape == (32, 16, 7)


def test_loading_emits_no_weight_norm_deprecation_warnings(small_pkg):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        Codec.from_package(small_pkg)


def test_encodec_is_not_imported_under_its_own_name(small_codec):
    assert not [name for name in sys.modules if name == "encodec" or name.startswith("encodec.")]


def test_missing_encodec_is_a_dependency_error(monkeypatch):
    monkeypatch.delitem(sys.modules, codec_mod._ENCODEC_ALIAS)
    monkeypatch.setattr(codec_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DependencyError, match=r"pip install --no-deps encodec==0\.1\.1"):
        codec_mod._encodec_modules()


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bad", [-1, 64, 10 ** 6])
def test_out_of_range_codes(small_codec, bad):
    codes = torch.zeros(1, 4, 5, dtype=torch.long)
    codes[0, 2, 3] = bad
    with pytest.raises(InvalidInputError, match=r"\[0, 63\]"):
        small_codec.decode(codes)


@pytest.mark.parametrize("codes", [torch.zeros(1, 4, 5), torch.zeros(4, 5, dtype=torch.long),
                                   torch.zeros(1, 5, 5, dtype=torch.long), torch.zeros(1, 4, 0, dtype=torch.long)])
def test_malformed_codes(small_codec, codes):
    with pytest.raises(InvalidInputError):
        small_codec.decode(codes)


@pytest.mark.parametrize("wav", [torch.zeros(1, 3200), torch.zeros(1, 2, 3200), torch.zeros(1, 1, 0),
                                 torch.zeros(1, 1, 3200, dtype=torch.long)])
def test_malformed_wav(small_codec, wav):
    with pytest.raises(InvalidInputError):
        small_codec.encode(wav)


def with_state(pkg, state):
    return {**pkg, "best_state": state}


def test_misshaped_key_is_named(small_pkg):
    key = "decoder.model.0.conv.conv.weight_v"
    state = dict(small_pkg["best_state"])
    state[key] = torch.zeros(64, 16, 5)
    with pytest.raises(CheckpointError, match=r"decoder\.model\.0\.conv\.conv\.weight_v.*\(64, 16, 5\).*\(64, 16, 7\)"):
        Codec.from_package(with_state(small_pkg, state))


def test_missing_and_unexpected_keys_are_named(small_pkg):
    state = dict(small_pkg["best_state"])
    del state["quantizer.vq.layers.2._codebook.embed"]
    with pytest.raises(CheckpointError, match=r"missing.*quantizer\.vq\.layers\.2\._codebook\.embed"):
        Codec.from_package(with_state(small_pkg, state))
    state = {**small_pkg["best_state"], "decoder.model.99.conv.conv.bias": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected.*decoder\.model\.99"):
        Codec.from_package(with_state(small_pkg, state))


def test_bad_packages(small_pkg):
    with pytest.raises(CheckpointError, match="pretrained"):
        Codec.from_package({"state": {}})
    with pytest.raises(ConfigError, match="n_filters"):
        Codec.from_package({**small_pkg, "xp.cfg": small_pkg["xp.cfg"].replace("  n_filters: 4\n", "")})
    with pytest.raises(ConfigError, match="disable_norm_outer_blocks"):
        Codec.from_package({**small_pkg, "xp.cfg": small_pkg["xp.cfg"].replace(
            "disable_norm_outer_blocks: 0", "disable_norm_outer_blocks: 1")})


def test_non_finite_decode_is_a_numerical_error(small_pkg):
    """Broken weights decode to NaN / inf: Codec.decode raises instead of returning them (a
    16-bit writer would clamp them into full-scale clicks). Only codes that reach the broken
    codebook entry fail, so the check looks at the output, not at the weights."""
    state = dict(small_pkg["best_state"])
    book = "quantizer.vq.layers.0._codebook.embed"
    state[book] = state[book].clone()
    state[book][5] = float("nan")
    broken = Codec.from_package(with_state(small_pkg, state))
    clean = torch.zeros(1, 4, 6, dtype=torch.long)
    assert torch.isfinite(broken.decode(clean)).all()
    nan_codes = clean.clone()
    nan_codes[0, 0, 3] = 5
    with pytest.raises(NumericalError, match="NaN or inf"):
        broken.decode(nan_codes)
    bias = "decoder.model.0.conv.conv.bias"
    inf = Codec.from_package(with_state(small_pkg, {**small_pkg["best_state"], bias: torch.full_like(
        small_pkg["best_state"][bias], float("inf"))}))
    with pytest.raises(NumericalError, match="NaN or inf"):
        inf.decode(clean)


def test_renormalizing_codec_cannot_encode_prompts(small_pkg):
    xp_cfg = small_pkg["xp.cfg"].replace("renormalize: false", "renormalize: true")
    codec = Codec.from_package({**small_pkg, "xp.cfg": xp_cfg})
    assert codec.decode(torch.zeros(1, 4, 2, dtype=torch.long)).shape == (1, 1, 1280)
    with pytest.raises(ConfigError, match="renormalize"):
        codec.encode(torch.zeros(1, 1, 640))


# ---------------------------------------------------------------- transformers format
def test_transformers_pretrained_directory(tmp_path):
    from transformers import EncodecConfig, EncodecModel

    # 8 kHz, hop 8: 1000 frames/s of 6 bits, so 12 kb/s is 2 codebooks.
    config = EncodecConfig(target_bandwidths=[12.0], sampling_rate=8000, hidden_size=16, num_filters=4,
                           upsampling_ratios=[4, 2], use_causal_conv=False, codebook_size=64, pad_mode="reflect")
    torch.manual_seed(0)
    model = EncodecModel(config).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:  # transformers initialises codebooks to zero
            layer.codebook.embed.normal_()
    model.save_pretrained(tmp_path)

    codec = Codec.from_package({"pretrained": str(tmp_path)})
    assert (codec.sample_rate, codec.hop_length, codec.n_q, codec.cardinality) == (8000, 8, 2, 64)
    assert codec.cfg.pad_mode == "reflect" and not codec.cfg.true_skip

    codes = torch.randint(0, 64, (2, 2, 30), generator=torch.Generator().manual_seed(3))
    wav = codec.decode(codes)
    assert wav.shape == (2, 1, 240)
    with torch.no_grad():
        assert max_abs(wav, model.decode(codes[None], [None]).audio_values) <= 1e-6
        x = torch.randn(2, 1, 200, generator=torch.Generator().manual_seed(4))
        assert torch.equal(codec.encode(x), model.encode(x, bandwidth=12.0).audio_codes[0])


def test_transformers_pretrained_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="absent"):
        Codec.from_package({"pretrained": str(tmp_path / "absent")})


# ---------------------------------------------------------------- prompt resampling
def sine(freq: float, sample_rate: int, n: int) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    return torch.sin(2 * math.pi * freq * t).float()


def peak_hz(x: torch.Tensor, sample_rate: int) -> float:
    spectrum = torch.fft.rfft(x * torch.hann_window(len(x), dtype=x.dtype)).abs()
    return spectrum.argmax().item() * sample_rate / len(x)


@pytest.mark.parametrize("old_sr, new_sr", [(44100, 32000), (48000, 32000), (16000, 32000), (22050, 16000)])
def test_resample_keeps_a_sine(old_sr, new_sr):
    n = 22069  # 44.1 -> 32 kHz: 16013.85 samples, floored
    y = resample(sine(997.0, old_sr, n)[None, None], old_sr, new_sr)[0, 0]
    assert len(y) == n * new_sr // old_sr  # julius's (and so audiocraft's) floored length
    assert abs(peak_hz(y, new_sr) - 997.0) <= new_sr / len(y)
    middle = y[len(y) // 4: 3 * len(y) // 4]
    assert abs(middle.pow(2).mean().sqrt().item() - math.sqrt(0.5)) <= 1e-3  # passband gain 1


def test_resample_removes_what_the_new_rate_cannot_hold():
    # 20 kHz is above 16 kHz, the Nyquist frequency of 32 kHz: it must not alias to 12 kHz.
    y = resample(sine(20000.0, 48000, 48000)[None], 48000, 32000)[0]
    assert y[8000:24000].pow(2).mean().sqrt().item() <= 1e-3 * math.sqrt(0.5)  # below -60 dB


def gain_db(frac: float, old_sr: int, new_sr: int) -> float:
    """Gain of `resample` for a sine at `frac` x the lower Nyquist frequency, in dB."""
    x = sine(frac * min(old_sr, new_sr) / 2, old_sr, old_sr)
    y = resample(x[None], old_sr, new_sr)[0]
    middle = y[len(y) // 4: 3 * len(y) // 4]                      # away from the edge padding
    return 20 * math.log10(middle.pow(2).mean().sqrt().item() / math.sqrt(0.5))


@pytest.mark.parametrize("old_sr, new_sr", [(48000, 32000), (44100, 32000), (16000, 32000)])
def test_resample_frequency_response_is_the_documented_one(old_sr, new_sr):
    """resample's docstring: flat within 0.02 dB to 0.85 x the lower Nyquist frequency, -3 dB
    at 0.93, -45 dB at 1.03, below -60 dB from 1.05. A 997 Hz sine and a 20 kHz one (the tests
    above) pass with half the zero crossings or a rolloff of 0.8 or 0.99; these points do not
    (measured there: -0.43 dB at 0.85 / -39 dB at 0.85 / -0.13 dB at 0.93)."""
    assert abs(gain_db(0.85, old_sr, new_sr)) <= 0.05            # measured +0.020
    assert abs(gain_db(0.93, old_sr, new_sr) + 3.0) <= 0.5       # measured -3.29
    if new_sr < old_sr:                                           # above the new Nyquist: alias suppression
        assert gain_db(1.03, old_sr, new_sr) <= -43.0             # measured -45.2
        assert gain_db(1.05, old_sr, new_sr) <= -60.0             # measured -66.0


def test_resample_same_rate_and_constants():
    x = torch.randn(2, 1, 1000)
    assert resample(x, 32000, 32000) is x
    assert max_abs(resample(torch.full((1, 4410), 0.25), 44100, 32000), torch.full((1, 3200), 0.25)) <= 1e-6


def test_preprocess_prompt(small_codec):
    stereo = torch.stack([sine(440.0, 48000, 4800), sine(660.0, 48000, 4800)])[None]  # [1, 2, 4800]
    mono = small_codec.preprocess_prompt(stereo, 48000)
    assert mono.shape == (1, 1, 3200)
    expected = resample(stereo, 48000, 32000).mean(dim=1, keepdim=True)
    assert max_abs(mono, expected) <= 1e-6
    same = torch.randn(2, 1, 640)
    assert torch.equal(small_codec.preprocess_prompt(same, 32000), same)
    for bad in (torch.zeros(4800), torch.zeros(1, 1, 0)):
        with pytest.raises(InvalidInputError):
            small_codec.preprocess_prompt(bad, 48000)
    with pytest.raises(InvalidInputError):
        small_codec.preprocess_prompt(torch.zeros(1, 1, 4800), 0)
