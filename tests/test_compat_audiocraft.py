"""audiocraft's MAGNeT client code, run with only the import changed, on random checkpoints
in the published layout (issue 12):

- the demo notebook's cells (audiocraft demos/magnet_demo.ipynb), IPython's display replaced
  by a shim that keeps its input checks;
- the gradio app's generation path (demos/magnet_app.py: load_model, _do_predictions,
  predict_full), gradio replaced by shims that keep their input checks;
- the docs' API example (docs/MAGNET.md);
- audiocraft's generic generation-model tests (tests/models/test_musicgen.py, test_audiogen.py)
  adapted to MAGNeT, with their assertions;
- one test per gap the issue lists, and audio_write's normalisation strategies.

The checkpoints' segment lengths are 1 s (notebook, app) and 10 s (the rest) so that the
suite stays fast on two cores; the client code reads them from the checkpoint as it would
read 10 s or 30 s from a published one.
"""
import concurrent.futures
import math
import shutil
import tempfile
import typing as tp
import warnings
from pathlib import Path
from tempfile import NamedTemporaryFile

import numpy as np
import pytest
import soundfile as sf
import torch

from magnet_engine import MAGNeT
from magnet_engine.demo import PRESETS, build_random_model
from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine.codec import Codec
from magnet_engine.engine.config import parse_yaml_config
from magnet_engine.engine.random_weights import random_compression_package, random_lm_package
from magnet_engine.errors import InvalidInputError, InvalidOptionError

HOP = 640          # 32 kHz codec: 50 frames per second
FAST = [2, 1, 1, 1]


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """{'music10': 10 s at 32 kHz, 'music1': 1 s at 32 kHz, 'audio1': 1 s at 16 kHz}; one T5."""
    root = tmp_path_factory.mktemp("compat-models")
    dirs = {"music10": build_random_model(root / "music10", "tiny", seed=0)}
    tiny = PRESETS["tiny"]
    for name, duration, sample_rate, ratios in (("music1", 1, 32000, (8, 5, 4, 4)), ("audio1", 1, 16000, (8, 5, 4, 2))):
        shutil.copytree(dirs["music10"] / "t5", root / name / "t5")
        lm = random_lm_package(**ckpt.ARCHITECTURES["tiny"], d_t5=tiny["t5"]["d_model"], duration=duration,
                                    sample_rate=sample_rate, seed=1)
        codec = random_compression_package(sample_rate=sample_rate, n_filters=tiny["codec_filters"], ratios=ratios,
                                           seed=1)
        dirs[name] = ckpt.save_checkpoint(root / name, lm, codec)
    return dirs


@pytest.fixture(scope="module")
def model(model_dirs):
    """A 10 s model shared by the tests that only read it or restore what they set."""
    return MAGNeT.get_pretrained(str(model_dirs["music10"]), device="cpu")


# ------------------------------------------------------------------ notebook
class IPythonDisplay:
    """IPython.display's Audio and display, keeping Audio's checks on array input."""

    def __init__(self):
        self.shown: tp.List[tp.Tuple[np.ndarray, int]] = []

    def Audio(self, data, rate=None):  # noqa: N802 (IPython's name)
        data = np.asarray(data, dtype=float)
        if rate is None:
            raise ValueError("rate must be specified when data is a numpy array or list of audio samples.")
        if data.ndim not in (1, 2):
            raise ValueError("encountered an audio array with more than 2 dimensions")
        return data, rate

    def display(self, obj):
        self.shown.append(obj)


def make_display_audio(ipd):
    # audiocraft/utils/notebook.py, over the shim
    def display_audio(samples: torch.Tensor, sample_rate: int):
        assert samples.dim() == 2 or samples.dim() == 3
        samples = samples.detach().cpu()
        if samples.dim() == 2:
            samples = samples[None, ...]
        for audio in samples:
            ipd.display(ipd.Audio(audio, rate=sample_rate))
    return display_audio


def test_notebook_cells(model_dirs):
    ipd = IPythonDisplay()
    display_audio = make_display_audio(ipd)

    # --- music (cells 2, 4, 7); the model name is the random checkpoint's directory
    model = MAGNeT.get_pretrained(str(model_dirs["music1"]))
    model.set_generation_params(
        use_sampling=True,
        top_k=0,
        top_p=0.9,
        temperature=3.0,
        max_cfg_coef=10.0,
        min_cfg_coef=1.0,
        decoding_steps=[int(20 * model.lm.cfg.dataset.segment_duration // 10), 10, 10, 10],
        span_arrangement='stride1'
    )
    text = "80s electronic track with melodic synthesizers, catchy beat and groovy bass"
    N_VARIATIONS = 3
    descriptions = [text for _ in range(N_VARIATIONS)]
    output = model.generate(descriptions=descriptions, progress=True, return_tokens=True)
    display_audio(output[0], sample_rate=model.compression_model.sample_rate)

    assert model.generation_params["decoding_steps"] == [2, 10, 10, 10]
    wav, tokens = output
    assert tokens.shape == (3, 4, 50) and 0 <= int(tokens.min()) and int(tokens.max()) < 2048  # stride1: no trim
    assert wav.shape == (3, 1, 50 * HOP)
    assert [(a.shape, rate) for a, rate in ipd.shown] == [((1, 50 * HOP), 32000)] * 3

    # --- sound effects (cells 10, 12, 14): a 16 kHz checkpoint
    ipd.shown.clear()
    model = MAGNeT.get_pretrained(str(model_dirs["audio1"]))
    model.set_generation_params(
        use_sampling=True,
        top_k=0,
        top_p=0.8,
        temperature=3.5,
        max_cfg_coef=20.0,
        min_cfg_coef=1.0,
        decoding_steps=[int(20 * model.lm.cfg.dataset.segment_duration // 10), 10, 10, 10],
        span_arrangement='stride1'
    )
    text = "Seagulls squawking as ocean waves crash while wind blows heavily into a microphone."
    descriptions = [text for _ in range(N_VARIATIONS)]
    output = model.generate(descriptions=descriptions, progress=True, return_tokens=True)
    display_audio(output[0], sample_rate=model.compression_model.sample_rate)

    assert output[1].shape == (3, 4, 50) and output[0].shape == (3, 1, 50 * 320)
    assert [(a.shape, rate) for a, rate in ipd.shown] == [((1, 50 * 320), 16000)] * 3


# ------------------------------------------------------------------ gradio app
class Gradio:
    """The parts of gradio the app's predict path uses, keeping their input checks."""

    class Error(Exception):
        pass

    class Progress:
        def __init__(self, on_call=None):
            self.calls: tp.List[tp.Any] = []
            self.on_call = on_call

        def __call__(self, progress, desc=None, total=None, unit="steps"):
            if isinstance(progress, tuple):      # (done, total)
                done, of = progress
                assert 0 <= done <= of, progress
            else:                                # a fraction
                assert 0.0 <= progress <= 1.0, progress
            self.calls.append(progress)
            if self.on_call is not None:
                self.on_call(progress)

    @staticmethod
    def make_waveform(audio, **kwargs):
        data, sr = sf.read(audio)     # gradio reads the file to draw it; the video is out of scope here
        assert data.size and sr > 0
        return str(audio) + ".mp4"


class App:
    """demos/magnet_app.py's generation path, as written there (its globals as attributes)."""

    N_REPEATS = 2
    PROD_STRIDE_1 = "prod-stride1 (new!)"

    def __init__(self, gr):
        self.gr = gr
        self.MODEL = None
        self.INTERRUPTING = False
        self.pool = concurrent.futures.ThreadPoolExecutor(2)   # the app's ProcessPoolExecutor(4)
        self.files: tp.List[str] = []

    def interrupt(self):
        self.INTERRUPTING = True

    def make_waveform(self, *args, **kwargs):
        return self.gr.make_waveform(*args, **kwargs)

    def load_model(self, version='facebook/magnet-small-10secs'):
        if self.MODEL is None or self.MODEL.name != version:
            self.MODEL = None  # in case loading would crash
            self.MODEL = MAGNeT.get_pretrained(version)

    def _do_predictions(self, texts, progress=False, gradio_progress=None, **gen_kwargs):
        from magnet_engine.audio import audio_write   # the app's `from audiocraft.data.audio import audio_write`
        gr, MODEL = self.gr, self.MODEL
        MODEL.set_generation_params(**gen_kwargs)
        try:
            outputs = MODEL.generate(texts, progress=progress, return_tokens=False)
        except RuntimeError as e:
            raise gr.Error("Error while generating " + e.args[0])
        outputs = outputs.detach().cpu().float()
        pending_videos = []
        out_wavs = []
        for i, output in enumerate(outputs):
            with NamedTemporaryFile("wb", suffix=".wav", delete=False) as file:
                audio_write(
                    file.name, output, MODEL.sample_rate, strategy="loudness",
                    loudness_headroom_db=16, loudness_compressor=True, add_suffix=False)
                if i == 0:
                    pending_videos.append(self.pool.submit(self.make_waveform, file.name))
                out_wavs.append(file.name)
                self.files.append(file.name)
        out_videos = [pending_video.result() for pending_video in pending_videos]
        return out_videos, out_wavs

    def predict_full(self, model, model_path, text, temperature, topp,
                     max_cfg_coef, min_cfg_coef,
                     decoding_steps1, decoding_steps2, decoding_steps3, decoding_steps4,
                     span_score,
                     progress=None):
        gr = self.gr
        self.INTERRUPTING = False
        progress(0, desc="Loading model...")
        model_path = model_path.strip()
        if model_path:
            if not Path(model_path).exists():
                raise gr.Error(f"Model path {model_path} doesn't exist.")
            if not Path(model_path).is_dir():
                raise gr.Error(f"Model path {model_path} must be a folder containing "
                               "state_dict.bin and compression_state_dict_.bin.")
            model = model_path
        if temperature < 0:
            raise gr.Error("Temperature must be >= 0.")

        self.load_model(model)

        max_generated = 0

        def _progress(generated, to_generate):
            nonlocal max_generated
            max_generated = max(generated, max_generated)
            progress((min(max_generated, to_generate), to_generate))
            if self.INTERRUPTING:
                raise gr.Error("Interrupted.")
        self.MODEL.set_custom_progress_callback(_progress)

        videos, wavs = self._do_predictions(
            [text] * self.N_REPEATS, progress=True,
            temperature=temperature, top_p=topp,
            max_cfg_coef=max_cfg_coef, min_cfg_coef=min_cfg_coef,
            decoding_steps=[decoding_steps1, decoding_steps2, decoding_steps3, decoding_steps4],
            span_arrangement='stride1' if (span_score == self.PROD_STRIDE_1) else 'nonoverlap',
            gradio_progress=progress)

        outputs_ = [videos[0]] + [wav for wav in wavs]
        return tuple(outputs_)


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where NamedTemporaryFile writes
    app = App(Gradio)
    yield app
    app.pool.shutdown()


def test_app_predict_full(app, model_dirs):
    import pyloudnorm

    progress = Gradio.Progress()
    # gr.Number inputs arrive as floats; the radio gives the span arrangement
    video, *wavs = app.predict_full("facebook/magnet-small-10secs", f"  {model_dirs['music1']}  ",
                                    "80s electronic track with melodic synthesizers", 3.0, 0.9, 10.0, 1.0,
                                    4.0, 2.0, 2.0, 2.0, App.PROD_STRIDE_1, progress=progress)
    assert app.MODEL.generation_params["decoding_steps"] == [4, 2, 2, 2]
    assert app.MODEL.generation_params["span_arrangement"] == "stride1"
    assert progress.calls[0] == 0 and progress.calls[1:] == [(k, 10) for k in range(1, 11)]
    assert len(wavs) == 2 and video == wavs[0] + ".mp4"
    for path in wavs:
        data, sr = sf.read(path, always_2d=True)
        assert sr == 32000 and data.shape == (50 * HOP, 1)
        # -16 LUFS, then tanh soft clipping, which lowers loudness a little
        loudness = pyloudnorm.Meter(sr).integrated_loudness(data)
        assert -17.5 < loudness < -15.9, loudness

    # the same model is reused; nonoverlap trims 50 frames to 48 (3-frame spans)
    first = app.MODEL
    _, wav, _ = app.predict_full("", str(model_dirs["music1"]), "techno", 3.0, 0.9, 10.0, 1.0,
                                 2.0, 1.0, 1.0, 1.0, "max-nonoverlap", progress=Gradio.Progress())
    assert app.MODEL is first and sf.info(wav).frames == 48 * HOP


def test_app_input_checks_and_interrupt(app, model_dirs):
    with pytest.raises(Gradio.Error, match="doesn't exist"):
        app.predict_full("", "/no/such/model", "x", 3.0, 0.9, 10.0, 1.0, 2.0, 1.0, 1.0, 1.0, "max-nonoverlap",
                         progress=Gradio.Progress())
    with pytest.raises(Gradio.Error, match="Temperature"):
        app.predict_full("", str(model_dirs["music1"]), "x", -1.0, 0.9, 10.0, 1.0, 2.0, 1.0, 1.0, 1.0,
                         "max-nonoverlap", progress=Gradio.Progress())

    # the Interrupt button, pressed while step 3 is reported: the run stops after that step
    def press_interrupt(progress):
        if progress == (3, 50):
            app.interrupt()
    progress = Gradio.Progress(on_call=press_interrupt)
    with pytest.raises(Gradio.Error, match="Interrupted"):
        app.predict_full("", str(model_dirs["music1"]), "x", 3.0, 0.9, 10.0, 1.0, 20.0, 10.0, 10.0, 10.0,
                         "max-nonoverlap", progress=progress)
    assert progress.calls[-1] == (3, 50) and app.files == []

    # a non-integral step count is refused with a typed error before anything runs
    with pytest.raises(InvalidOptionError, match="decoding_steps"):
        app.predict_full("", str(model_dirs["music1"]), "x", 3.0, 0.9, 10.0, 1.0, 2.5, 1.0, 1.0, 1.0,
                         "max-nonoverlap", progress=Gradio.Progress())


# ------------------------------------------------------------------ docs example
def test_docs_api_example(model_dirs, tmp_path, monkeypatch):
    from magnet_engine.audio import audio_write
    monkeypatch.chdir(tmp_path)
    model = MAGNeT.get_pretrained(str(model_dirs["music1"]))
    model.set_generation_params(decoding_steps=FAST)   # the one added line: 5 steps instead of 50, for time
    descriptions = ['disco beat', 'energetic EDM', 'funky groove']
    wav = model.generate(descriptions)  # generates 3 samples.

    for idx, one_wav in enumerate(wav):
        # Will save under {idx}.wav, with loudness normalization at -14 db LUFS.
        audio_write(f'{idx}', one_wav.cpu(), model.sample_rate, strategy="loudness", loudness_compressor=True)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.wav", "1.wav", "2.wav"]
    assert sf.info(tmp_path / "0.wav").frames == 48 * HOP


# ------------------------------------------------------------------ audiocraft's generic model tests
class TestMAGNeTModel:
    """tests/models/test_musicgen.py / test_audiogen.py for MAGNeT. Adaptations: MAGNeT's
    set_generation_params takes no duration (audiocraft's MAGNeT sets the attribute); fewer
    decoding steps for speed; with 'nonoverlap' spans MAGNeT decodes a multiple of span_len
    (3) frames, so 2 s = 100 frames gives 99 (audiocraft's lm_magnet trims the same way); a
    bad call raises a typed ValueError where audiocraft asserts."""

    @pytest.fixture(autouse=True)
    def _dir(self, model_dirs):
        self.directory = str(model_dirs["music10"])

    def get_magnet(self):
        mg = MAGNeT.get_pretrained(name=self.directory, device='cpu')
        mg.set_generation_params(decoding_steps=FAST)
        mg.duration = 2.0
        return mg

    def test_base(self):
        mg = self.get_magnet()
        assert mg.frame_rate == 50
        assert mg.sample_rate == 32000
        assert mg.audio_channels == 1

    def test_generate_unconditional(self):
        mg = self.get_magnet()
        wav = mg.generate_unconditional(3)
        assert list(wav.shape) == [3, 1, 99 * HOP]

    def test_generate_continuation(self):
        mg = self.get_magnet()
        prompt = torch.randn(3, 1, 32000)
        wav = mg.generate_continuation(prompt, 32000)
        assert list(wav.shape) == [3, 1, 99 * HOP]

        prompt = torch.randn(2, 1, 32000)
        wav = mg.generate_continuation(
            prompt, 32000, ['youpi', 'lapin dort'])
        assert list(wav.shape) == [2, 1, 99 * HOP]

        prompt = torch.randn(2, 1, 32000)
        with pytest.raises(ValueError):
            wav = mg.generate_continuation(
                prompt, 32000, ['youpi', 'lapin dort', 'one too many'])

    def test_generate(self):
        mg = self.get_magnet()
        wav = mg.generate(
            ['youpi', 'lapin dort'])
        assert list(wav.shape) == [2, 1, 99 * HOP]

    def test_generate_long(self):
        mg = self.get_magnet()
        mg.max_duration = 3.
        mg.duration = 4.
        mg.extend_stride = 2.
        wav = mg.generate(
            ['youpi', 'lapin dort'])
        assert list(wav.shape[:2]) == [2, 1] and wav.shape[-1] >= (4 * 50 - 3) * HOP


# ------------------------------------------------------------------ the gaps, one by one
def test_lm_view(model):
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ReadonlyConfigError

    lm = model.lm
    assert isinstance(lm.cfg, DictConfig) and model.cfg is lm.cfg
    assert lm.cfg.dataset.segment_duration == 10 and lm.cfg.transformer_lm.n_q == 4
    assert lm.cfg.generate.audio.sample_rate == 32000           # a node reference resolves
    # what audiocraft's loader sets: this run's device and dtype, transformer_lm's derived fields
    assert (lm.cfg.device, lm.cfg.dtype) == ("cpu", "float32")
    tl = lm.cfg.transformer_lm
    assert (tl.compression_model_framerate, tl.segment_duration, tl.span_len) == (50, 10, 3)
    with pytest.raises(ReadonlyConfigError):
        lm.cfg.dataset.segment_duration = 30
    with pytest.raises(ConfigAttributeError):
        lm.cfg.no_such_section
    assert (lm.num_codebooks, lm.n_q, lm.card, lm.special_token_id) == (4, 4, 2048, 2048)
    assert list(lm.condition_provider.conditioners) == ["description"]
    assert "self_wav" not in lm.condition_provider.conditioners
    assert sum(p.numel() for p in lm.parameters()) > 0


def test_training_config_runs_no_resolver(monkeypatch):
    """`${oc.env:USER}` (in every real export's dora section) and any other resolver call are
    replaced by the refusal marker (engine/config.py without_resolvers); model.cfg runs none."""
    from omegaconf import OmegaConf
    from magnet_engine.compat import training_config
    from magnet_engine.engine.config import REFUSED

    calls = []
    with warnings.catch_warnings():   # omegaconf 2.4 renames it register_resolver; 2.3 has only this one
        warnings.simplefilter("ignore", UserWarning)
        OmegaConf.register_new_resolver("compat_spy", lambda *a: calls.append(a) or "SPY-RAN", replace=True)
    monkeypatch.setenv("USER", "not-to-be-read")
    text = random_lm_package(32, 4, 1, d_t5=8)["xp.cfg"] + "spy: ${compat_spy:x}\nref: ${sample_rate}\n"
    cfg = training_config(parse_yaml_config(text), torch.device("cuda"), 50)
    assert cfg.dtype == "float16" and cfg.device == "cuda" and cfg.ref == 32000
    assert cfg.dora.dir == REFUSED and cfg.spy == REFUSED
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    assert calls == [] and "not-to-be-read" not in yaml and "SPY-RAN" not in yaml


def test_compression_model_view(model, tmp_path):
    cm = model.compression_model
    assert (cm.sample_rate, cm.channels, cm.cardinality, cm.num_codebooks, cm.total_codebooks) == (32000, 1, 2048, 4, 4)
    # audiocraft's own EnCodec gives an int frame rate (sample_rate // hop), as does the model
    assert type(cm.frame_rate) is int and type(model.frame_rate) is int and model.frame_rate == 50
    x = torch.randn(2, 1, 3200, generator=torch.Generator().manual_seed(0))
    codes, scale = cm.encode(x)
    assert scale is None and torch.equal(codes, model.codec.encode(x)) and codes.shape == (2, 4, 5)
    assert torch.equal(cm.decode(codes), model.generate_audio(codes)) and cm.decode(codes).shape == (2, 1, 5 * HOP)
    assert cm.decode_latent(codes).shape[::2] == (2, 5)
    with pytest.raises(InvalidInputError, match="scale"):
        cm.decode(codes, torch.ones(2, 1))

    # audiocraft's wrapper of the transformers EnCodec computes sample_rate / hop: a float
    from transformers import EncodecConfig, EncodecModel
    from magnet_engine.compat import CompressionModelView
    config = EncodecConfig(target_bandwidths=[12.0], sampling_rate=8000, hidden_size=16, num_filters=4,
                           upsampling_ratios=[4, 2], codebook_size=64)
    EncodecModel(config).save_pretrained(tmp_path)
    view = CompressionModelView(Codec.from_package({"pretrained": str(tmp_path)}))
    assert type(view.frame_rate) is float and view.frame_rate == 1000.0


def test_durations_and_types(model_dirs):
    m = MAGNeT.get_pretrained(str(model_dirs["music10"]), device="cpu")
    assert type(m.max_duration) is int and m.max_duration == 10 and m.duration == 10 and m.extend_stride is None
    m.duration = 20                           # long-form: decoded window by window
    assert m.duration == 20
    with pytest.raises(InvalidOptionError, match="duration"):
        m.duration = 601                      # past MAX_LONGFORM_SECONDS
    assert m.duration == 20
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(InvalidOptionError):
            m.duration = bad
    m.duration = 2
    m.set_generation_params(decoding_steps=FAST)
    assert m.duration == 2                   # set_generation_params leaves the duration alone
    assert m.generate_tokens(["x"], seed=0).shape == (1, 4, 99)

    for bad in (11, 0, None, "3"):
        with pytest.raises(InvalidOptionError, match="max_duration"):
            m.max_duration = bad
    m.max_duration = 1.5
    assert m.max_duration == 1.5 and m.duration == 2
    assert m.generate(["x"]).shape == (1, 1, 99 * HOP)   # 2 s in two windows: 0-75, 45-99 (stride 0.6 x 1.5 s)
    m.duration = 1.5
    assert m.generate(["x"]).shape == (1, 1, 75 * HOP)

    m.extend_stride = 1
    assert m.extend_stride == 1
    for bad in (1.5, 0, -1, "1"):
        with pytest.raises(InvalidOptionError, match="extend_stride"):
            m.extend_stride = bad
    m.extend_stride = None
    assert m.extend_stride is None


def test_generation_params(model):
    saved = model.params
    try:
        model.set_generation_params(use_sampling=False, top_k=5, top_p=0.0, temperature=2.0, max_cfg_coef=5.0,
                                    min_cfg_coef=2.0, decoding_steps=[4, 3, 2, 1], span_arrangement="stride1")
        assert dict(model.generation_params) == {
            "use_sampling": False, "temp": 2.0, "top_k": 5, "top_p": 0.0, "max_cfg_coef": 5.0,
            "min_cfg_coef": 2.0, "decoding_steps": [4, 3, 2, 1], "span_arrangement": "stride1"}
        with pytest.raises(TypeError):
            model.generation_params["temp"] = 1.0     # a read-only view: a change must not be lost silently
        model.generation_params = {"temp": 1.5, "decoding_steps": [5.0, 1, 1, 1]}
        assert model.params.temperature == 1.5 and model.params.decoding_steps == (5, 1, 1, 1)
        assert model.params.top_p == 0.9                # unnamed keys take lm.generate's defaults
        model.generation_params = {"span_scoring": "prod", "anneal_temp": False}   # lm.generate takes these too
        assert model.params.span_scoring == "prod" and not model.params.anneal_temp
        with pytest.raises(InvalidOptionError, match="unknown"):
            model.generation_params = {"cfg_coef": 3.0}
    finally:
        model.params = saved


def test_integral_numbers_are_taken(model):
    saved = model.params
    try:
        model.set_generation_params(decoding_steps=[20.0, 10.0, 10.0, 10.0], top_k=np.int64(5))
        assert model.params.decoding_steps == (20, 10, 10, 10) and model.params.top_k == 5
        assert all(type(s) is int for s in model.params.decoding_steps) and type(model.params.top_k) is int
        model.set_generation_params(decoding_steps=np.array([3, 2, 2, 2]), top_k=7.0)
        assert model.params.decoding_steps == (3, 2, 2, 2) and model.params.top_k == 7
        for bad in (dict(decoding_steps=[20.5, 10, 10, 10]), dict(decoding_steps=[True, 1, 1, 1]),
                    dict(decoding_steps=20), dict(decoding_steps="2111"), dict(top_k=2.5), dict(top_k=float("inf")),
                    dict(top_k=True)):
            with pytest.raises(InvalidOptionError):
                model.set_generation_params(**bad)
        assert model.params.decoding_steps == (3, 2, 2, 2)     # a refused call changes nothing
    finally:
        model.params = saved


def test_torch_manual_seed_reproduces(model):
    saved = (model.params, model.duration)
    try:
        model.set_generation_params(decoding_steps=FAST)
        model.duration = 0.5
        torch.manual_seed(7)
        a = model.generate_tokens(["x", "y"])
        torch.manual_seed(7)
        b = model.generate_tokens(["x", "y"])
        c = model.generate_tokens(["x", "y"])
        assert torch.equal(a, b) and not torch.equal(b, c)
        # keyed per-row RNG: with seed=, a row's sample does not depend on its batch
        both = model.generate_tokens(["x", "y"], seed=5)
        assert torch.equal(both[1:], model.generate_tokens(["y"], seed=6))
    finally:
        model.params, model.duration = saved


def test_custom_progress_callback(model):
    saved = (model.params, model.duration)
    seen: tp.List[tp.Tuple[int, int]] = []
    try:
        model.set_generation_params(decoding_steps=FAST)
        model.duration = 0.5
        model.set_custom_progress_callback(lambda generated, to_generate: seen.append((generated, to_generate)))
        model.generate(["x"])                                # progress=False: no report (audiocraft)
        assert seen == []
        model.generate(["x"], progress=True)
        assert seen == [(k, 5) for k in range(1, 6)]
        seen.clear()
        model.generate_unconditional(1, progress=True)
        assert seen[-1] == (5, 5)
        with pytest.raises(InvalidOptionError):
            model.set_custom_progress_callback(42)
    finally:
        model.set_custom_progress_callback(None)
        model.params, model.duration = saved


def test_generate_audio(model):
    tokens = torch.randint(0, 2048, (2, 4, 6), generator=torch.Generator().manual_seed(0))
    wav = model.generate_audio(tokens)
    assert wav.shape == (2, 1, 6 * HOP) and torch.equal(wav, model.decode(tokens))
    with pytest.raises(InvalidInputError):
        model.generate_audio(tokens[0])


# ------------------------------------------------------------------ audio_write
def _tone(seconds=1.0, sr=32000, amp=0.3, channels=1):
    t = torch.arange(int(seconds * sr)) / sr
    x = amp * torch.sin(2 * math.pi * 440 * t) * (1 + 0.5 * torch.sin(2 * math.pi * 3 * t))
    return x.repeat(channels, 1)


def audio_write(*args, **kwargs):   # imported on use: each test fails on its own where it is missing
    from magnet_engine.audio import audio_write
    return audio_write(*args, **kwargs)


def _read(path):
    data, sr = sf.read(path, dtype="int16", always_2d=True)
    return torch.from_numpy(data.T.astype(np.float64)) / 32768, sr


def test_audio_write_strategies(tmp_path):
    import pyloudnorm

    x = _tone(amp=0.3)
    peak = 10 ** (-1 / 20)
    y, sr = _read(audio_write(tmp_path / "peak", x, 32000))           # default: peak at -1 dBFS
    assert sr == 32000 and abs(float(y.abs().max()) - peak) < 1 / 32768
    # the samples are ffmpeg's f32 -> s16: x * 2^15, rounded, saturated
    expected = ((x * (peak / float(x.abs().max()))).double() * 32768).round().clamp(-32768, 32767) / 32768
    assert torch.equal(y, expected)

    quiet = _tone(amp=0.1)
    y, _ = _read(audio_write(tmp_path / "keep", quiet, 32000, normalize=False))
    assert abs(float(y.abs().max()) - float(quiet.abs().max())) < 1 / 32768   # only scaled down when too loud

    y, _ = _read(audio_write(tmp_path / "clip", _tone(amp=1.5), 32000, strategy="clip"))
    assert abs(float(y.abs().max()) - peak) < 1 / 32768

    y, _ = _read(audio_write(tmp_path / "rms", x, 32000, strategy="rms", rms_headroom_db=20))
    assert abs(float(y.pow(2).mean().sqrt()) - 0.1) < 1e-4

    stereo = _tone(amp=0.2, channels=2) * torch.tensor([[1.0], [0.5]])
    path = audio_write(tmp_path / "loud", stereo, 32000, strategy="loudness", loudness_headroom_db=20)
    data, _ = sf.read(path)
    assert data.shape == (32000, 2) and abs(pyloudnorm.Meter(32000).integrated_loudness(data) + 20) < 0.05
    gain = 10 ** ((-14 - pyloudnorm.Meter(32000).integrated_loudness(stereo.double().numpy().T)) / 20)
    y, _ = _read(audio_write(tmp_path / "soft", stereo, 32000, strategy="loudness", loudness_compressor=True))
    assert (y - torch.tanh(stereo.double() * gain)).abs().max() <= 1 / 32768

    assert torch.equal(_read(audio_write(tmp_path / "silent", torch.zeros(1, 16000), 32000))[0], torch.zeros(1, 16000))
    y, _ = _read(audio_write(tmp_path / "as-is", quiet, 32000, strategy="none"))
    assert (y - quiet.double()).abs().max() <= 1 / 65536


def test_audio_write_files(tmp_path):
    x = _tone(seconds=2.0)
    assert audio_write(tmp_path / "a" / "b" / "x", x[0], 32000).name == "x.wav"       # [samples], parent made
    assert audio_write(tmp_path / "raw.bin", x, 32000, add_suffix=False).name == "raw.bin"
    assert sf.info(tmp_path / "raw.bin").format == "WAV"
    for fmt in ("flac", "ogg"):
        assert sf.info(audio_write(tmp_path / "x", x, 32000, format=fmt)).frames == 64000
    hi = audio_write(tmp_path / "hi", x, 32000, format="mp3")            # mp3_rate=320
    lo = audio_write(tmp_path / "lo", x, 32000, format="mp3", mp3_rate=128)
    assert 2.2 < hi.stat().st_size / lo.stat().st_size < 2.8             # ~320 / 128 kbps, constant bitrate

    bad = [dict(wav=torch.zeros(1, 10, dtype=torch.int16)), dict(wav=torch.zeros(1, 1, 10)),
           dict(wav=torch.full((1, 10), float("nan"))), dict(strategy="loud"), dict(format="aac"),
           dict(sample_rate=0), dict(format="mp3", mp3_rate=500), dict(format="ogg", ogg_rate=128),
           dict(wav=torch.full((1, 10), 1.5), strategy="none"),
           dict(wav=_tone(seconds=0.1), strategy="loudness")]
    for kwargs in bad:
        args = {"wav": x, "sample_rate": 32000, **kwargs}
        with pytest.raises((InvalidInputError, InvalidOptionError)):
            audio_write(tmp_path / "bad", **args)
    assert not list(tmp_path.glob("bad*"))


def test_audio_write_is_atomic(tmp_path, monkeypatch):
    target = audio_write(tmp_path / "keep", _tone(), 32000)
    before = target.read_bytes()

    def failing_write(file, data, *args, **kwargs):
        Path(file).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(sf, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        audio_write(tmp_path / "keep", _tone(amp=0.1), 32000)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.wav"]
