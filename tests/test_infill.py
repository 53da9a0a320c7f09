"""Infill (fixed cells anywhere), streamed decoding, and both through the API and CLI, on tiny random
models. Their plans (regions, long-form windows and seeds) are tested in test_generate.py."""
import pytest
import soundfile as sf
import torch

from magnet_engine import MAGNeT
from magnet_engine.cli import main as cli_main
from magnet_engine.demo import build_random_model
from magnet_engine.engine import events, reference
from magnet_engine.engine.codec import Codec, StreamDecoder
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.random_weights import random_compression_package
from magnet_engine.errors import InvalidInputError, RegionError

from test_decoding import keyed_sampler
from test_generate import fixed_mask
from test_model import tiny_lm
from test_reference import _cond

FAST = dict(decoding_steps=[3, 2, 2, 2])


# ------------------------------------------------------------------ engine: fixed cells
@pytest.mark.parametrize("arrangement", ["nonoverlap", "stride1"])
@pytest.mark.parametrize("cfg_on", [True, False], ids=["cfg", "cfg1"])
def test_infill_fast_equals_reference_with_the_same_draws(arrangement, cfg_on):
    lm = tiny_lm(seed=21, layers=2)
    cond = _cond(lm, 2, seed=4)
    seeds = [5, 6]
    params = DecodingParams(decoding_steps=(4, 2, 2, 2), span_arrangement=arrangement)
    if not cfg_on:
        params = params.replace(max_cfg_coef=1.0, min_cfg_coef=1.0)
    canvas = torch.randint(0, lm.cfg.card, (2, 4, 30), generator=torch.Generator().manual_seed(1))
    # two regions, [7, 13) and [20, 25): not chunk-aligned, so 'nonoverlap' has partly fixed chunks
    fixed = fixed_mask(4, 30, [(0, 7), (13, 20), (25, 30)])
    fast = Runtime(lm).generate(cond, 30, params, seeds=seeds, canvas=canvas, fixed=fixed)
    ref = reference.generate_tokens(lm, cond, 30, params, sampler=keyed_sampler(params, seeds, 30),
                                    canvas=canvas, fixed=fixed)
    assert torch.equal(fast, ref)
    assert torch.equal(fast[:, fixed], canvas[:, fixed])           # fixed cells bit for bit
    assert (fast != lm.cfg.mask_id).all()
    assert not torch.equal(fast[:, ~fixed], canvas[:, ~fixed])     # the regions were decoded


def test_a_prefix_fixed_mask_is_the_prompt_path():
    """A prompt is the prefix case of the fixed mask: same tokens either way, both engines."""
    lm = tiny_lm(seed=22)
    cond = _cond(lm, 1, seed=2)
    params = DecodingParams(decoding_steps=(3, 2, 2, 2))
    prompt = torch.randint(0, lm.cfg.card, (1, 4, 8), generator=torch.Generator().manual_seed(3))
    canvas = torch.cat([prompt, torch.zeros(1, 4, 19, dtype=torch.long)], dim=-1)
    fixed = fixed_mask(4, 27, [(0, 8)])
    rt = Runtime(lm)
    assert torch.equal(rt.generate(cond, 27, params, prompt=prompt, seeds=[4]),
                       rt.generate(cond, 27, params, canvas=canvas, fixed=fixed, seeds=[4]))
    gen = lambda: torch.Generator().manual_seed(9)   # noqa: E731
    assert torch.equal(reference.generate_tokens(lm, cond, 27, params, prompt=prompt, generator=gen()),
                       reference.generate_tokens(lm, cond, 27, params, canvas=canvas, fixed=fixed, generator=gen()))


# ------------------------------------------------------------------ streaming decode
@pytest.fixture(scope="module")
def codec():
    return Codec.from_package(random_compression_package(n_filters=4, dimension=16, bins=64, seed=1))


def test_stream_decoder_joins_to_the_whole_decode(codec):
    codes = torch.randint(0, 64, (2, 4, 260), generator=torch.Generator().manual_seed(0))
    whole = codec.decode(codes)
    stream = StreamDecoder(codec)
    parts, at = [], 0
    for n in (100, 3, 57, 60, 40):                                  # windows of any size
        parts.append(stream.push(codes[..., at:at + n]))
        at += n
    parts.append(stream.flush())
    joined = torch.cat(parts, dim=-1)
    assert joined.shape == whole.shape
    # 50 frames of context leave only float rounding (~2e-7 here); 1e-4 passed even with 8 frames
    assert (joined - whole).abs().max() <= 1e-6
    assert parts[0].shape[-1] == (100 - 8) * codec.hop_length       # held back: the 8-frame look-ahead


class _FrameCodec:
    """A codec stand-in whose samples are the frame index (hop 2), recording each decode's
    frame range: what StreamDecoder asks of the codec, with no numerics in the way."""
    hop_length, channels = 2, 1

    def __init__(self):
        self.calls = []

    def decode(self, codes):                                        # codes[..., t] == t
        self.calls.append((int(codes[0, 0, 0]), int(codes[0, 0, -1]) + 1))
        return codes[:, :1].float().repeat_interleave(2, dim=-1)


def test_stream_decoder_decodes_each_chunk_with_50_frames_before_and_8_after():
    """The README's numbers, by hand: a push of frames up to n returns frames [emitted, n - 8)
    decoded from [emitted - 50, n); flush returns the held-back 8."""
    fake = _FrameCodec()
    stream = StreamDecoder(fake)                                    # the defaults under test
    frames = torch.arange(260).expand(1, 4, -1)
    parts, at = [], 0
    for n in (100, 3, 57, 60, 40):
        parts.append(stream.push(frames[..., at:at + n]))
        at += n
    parts.append(stream.flush())
    assert fake.calls == [(0, 100), (42, 103), (45, 160), (102, 220), (162, 260), (202, 260)]
    emitted = [(int(p[0, 0, 0]), int(p[0, 0, -1]) + 1, p.shape[-1]) for p in parts]
    assert emitted == [(0, 92, 184), (92, 95, 6), (95, 152, 114), (152, 212, 120), (212, 252, 80), (252, 260, 16)]
    assert torch.equal(torch.cat(parts, dim=-1)[0, 0], torch.arange(260).float().repeat_interleave(2))


def test_stream_decoder_error_at_the_documented_context(codec):
    """README: 16 frames of left context give ~1e-6 on random weights; at 8 the LSTM state
    still shows (measured 6.9e-5): the bound holds because of the context, not for any context."""
    codes = torch.randint(0, 64, (2, 4, 260), generator=torch.Generator().manual_seed(0))
    whole = codec.decode(codes)

    def error(left):
        stream = StreamDecoder(codec, left_context=left)
        parts = [stream.push(codes[..., :100]), stream.push(codes[..., 100:160]), stream.push(codes[..., 160:]),
                 stream.flush()]
        return float((torch.cat(parts, dim=-1) - whole).abs().max())
    assert error(16) <= 5e-6                                         # measured 1.9e-6
    assert error(8) > 2e-5


@pytest.mark.parametrize("left, ahead", [(2, 8), (50, 1)])
def test_stream_decoder_needs_its_context(codec, left, ahead):
    """Too little left context (the LSTM's state) or look-ahead (the convolutions') breaks
    the 1e-4 bound: the defaults are not slack."""
    codes = torch.randint(0, 64, (1, 4, 200), generator=torch.Generator().manual_seed(1))
    stream = StreamDecoder(codec, left_context=left, lookahead=ahead)
    joined = torch.cat([stream.push(codes[..., :100]), stream.push(codes[..., 100:]), stream.flush()], dim=-1)
    assert (joined - codec.decode(codes)).abs().max() > 1e-4


# ------------------------------------------------------------------ API and CLI
@pytest.fixture(scope="module")
def one_second_dir(tmp_path_factory):
    """conftest's tiny model with a 1 s window: long-form and streaming take a few windows."""
    return build_random_model(tmp_path_factory.mktemp("tiny-infill"), "tiny", seed=0, duration=1)


@pytest.fixture(scope="module")
def model(one_second_dir):
    m = MAGNeT.from_pretrained(one_second_dir, device="cpu")
    m.set_generation_params(**FAST)
    return m


def _clip(seconds=0.8, channels=1):
    t = torch.arange(int(32000 * seconds)) / 32000
    return (0.3 * torch.sin(2 * torch.pi * 220 * t)).expand(channels, -1)[None].contiguous()


def test_api_infill_keeps_every_cell_outside_the_regions(model):
    clip = _clip()
    codes = model.codec.encode(clip)                                 # [1, 4, 40]
    wav, tokens = model.generate_infill(clip, 32000, [(0.1, 0.2), (0.5, 0.55)], ["drum fill"],
                                        return_tokens=True, seed=3)
    assert tokens.shape == codes.shape == (1, 4, 40) and wav.shape == (1, 1, 40 * 640)
    inside = torch.zeros(40, dtype=torch.bool)
    inside[3:12] = inside[24:30] = True                              # 5..10 and 25..28 widened to chunks
    assert torch.equal(tokens[..., ~inside], codes[..., ~inside])
    assert not torch.equal(tokens[..., inside], codes[..., inside]) and (tokens < 2048).all()
    stereo = model.generate_infill(clip.expand(2, 2, -1), 32000, [(0.1, 0.2)], return_tokens=True, seed=[3, 4])[1]
    assert stereo.shape == (2, 4, 40)                                # a batch, downmixed like a prompt
    streamed = list(model.generate_infill_stream(clip, 32000, [(0.1, 0.2), (0.5, 0.55)], ["drum fill"], seed=3))
    assert [kind for kind, _ in streamed] == ["full"] and torch.equal(streamed[0][1], wav)


@pytest.mark.parametrize("arrangement, prompt_frames", [("nonoverlap", 9), ("stride1", 10)])
def test_a_region_from_the_prompt_end_is_a_continuation(one_second_dir, arrangement, prompt_frames):
    m = MAGNeT.from_pretrained(one_second_dir, device="cpu")
    m.set_generation_params(duration=0.8, span_arrangement=arrangement, **FAST)
    clip = _clip(0.8)
    codes = m.codec.encode(clip)
    infilled = m.generate_infill(clip, 32000, [(prompt_frames / 50, 0.8)], ["x"], return_tokens=True, seed=7)[1]
    # generate_continuation = encode the prompt audio, then generate_tokens with its codes fixed
    continued = m.generate_tokens(["x"], prompt_codes=codes[..., :prompt_frames], seed=7)
    assert torch.equal(infilled[..., :continued.shape[-1]], continued)


def test_api_infill_bad_input(model, tmp_path):
    clip = _clip()
    with pytest.raises(RegionError, match="0 <= start < end"):
        model.generate_infill(clip, 32000, [(0.5, 0.9)])
    with pytest.raises(RegionError, match="0 <= start < end"):
        model.generate_infill(clip, 32000, [(0.3, 0.3)])
    with pytest.raises(RegionError, match="whole clip"):
        model.generate_infill(clip, 32000, [(0.0, 0.8)])
    with pytest.raises(RegionError, match="non-empty"):
        model.generate_infill(clip, 32000, [])
    with pytest.raises(InvalidInputError, match="window"):
        model.generate_infill(_clip(1.5), 32000, [(0.1, 0.2)])
    with pytest.raises(InvalidInputError, match="waveform"):
        model.generate_infill(clip[0, 0], 32000, [(0.1, 0.2)])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really")
    with pytest.raises(InvalidInputError, match="cannot read"):
        model.generate_infill(bad, None, [(0.1, 0.2)])
    out = tmp_path / "never.wav"
    assert cli_main(["edit", str(bad), "--region", "0.1:0.2", "--model", model.name, "-q", "-o", str(out)]) == 2
    assert not out.exists()


def test_cli_edit_writes_the_edited_clip(model, tmp_path):
    src = tmp_path / "in.wav"
    sf.write(src, _clip()[0, 0].numpy(), 32000)
    out = tmp_path / "out.wav"
    assert cli_main(["edit", str(src), "--region", "0.1:0.2", "--region", "0.5:0.6", "a fill", "--model",
                     model.name, "-q", "--seed", "1", "--decoding-steps", "3", "2", "2", "2", "-o", str(out)]) == 0
    data, sr = sf.read(out)
    assert sr == 32000 and data.shape == (40 * 640,)


def test_api_long_form_and_streaming(model):
    model.set_generation_params(duration=2.5, **FAST)
    model.extend_stride = 0.6
    try:
        seen = []
        tokens = model.generate_tokens(["a", "b"], seed=2, on_event=seen.append, duration=2.5)
        windows = [e for e in seen if isinstance(e, events.WindowReady)]
        assert len(windows) == 4 and tokens.shape == (2, 4, 123)   # 0-48, 30-78, 60-108, 90-123
        assert model.window_count(2.5) == 4 and model.window_count(1) == model.window_count(0.5) == 1
        first = model.generate_tokens(["a", "b"], seed=2, duration=1)
        assert torch.equal(first, tokens[..., :48])
        chunks = list(model.generate_stream([["a", "b", "c", "d"], ["e", "f", "g", "h"]], seed=2))
        kinds = [k for k, _ in chunks]
        assert kinds == ["chunk"] * 5 + ["full"]
        joined = torch.cat([w for k, w in chunks if k == "chunk"], dim=-1)
        assert joined.shape == chunks[-1][1].shape == (2, 1, 123 * 640)
        # float rounding at the default 50-frame context (1.3e-7); 1e-4 also passed an 8-frame one
        assert (joined - chunks[-1][1]).abs().max() <= 1e-6
        with pytest.raises(InvalidInputError, match="per row"):
            model.generate([["a", "b"]], seed=2)
    finally:
        model.extend_stride = None
        model.set_generation_params(**FAST)
