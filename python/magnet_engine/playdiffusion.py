"""PlayDiffusion (PlayHT speech inpainting) on magnet-engine: the public surface.

    from magnet_engine import PlayDiffusion, InpaintInput
    pd = PlayDiffusion()                          # random weights: runs with no download
    pd = PlayDiffusion("PlayHT/inpainter")        # or a local directory with the six upstream files
    sr, pcm = pd.inpaint(InpaintInput(audio="in.wav", input_text="the quick brown fox",
                                      output_text="the quick red fox", input_word_times=[...]))

The input models have upstream's fields, defaults and bounds (pydantic); `inpaint`, `tts` and
`rvc` return (sample_rate, int16 PCM [samples]) as upstream does. Audio is a local path or a
`file:` URI (upstream's s3:// loader is not carried over). Bad input raises a typed
magnet_engine error before any work, and nothing is written.
"""
from __future__ import annotations

import os
import threading
import typing as tp
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from magnet_engine.engine import graphs
from magnet_engine.engine.files import atomic_write
from magnet_engine.engine.playdiffusion.unmasking import UnmaskOptions
from magnet_engine.errors import InvalidInputError, InvalidOptionError

RANDOM_MODEL = "random"  # the model name of the built-in random-weight tiny model
DEFAULT_CACHE = Path("~/.cache/magnet_engine")


_LOOP = UnmaskOptions()   # the loop's defaults (upstream's); the bounds below are upstream's input models'


class BaseInput(BaseModel):
    output_text: str = Field(description="Text to inpaint")
    num_steps: int = Field(default=_LOOP.steps, ge=1, le=100, description="Number of unmasking steps")
    init_temp: float = Field(default=_LOOP.init_temp, ge=0.0, le=1.0,
                             description="Initial sampling temperature, annealed to 0")
    init_diversity: float = Field(default=_LOOP.init_diversity, ge=0.0, le=1.0,
                                  description="Initial re-masking noise, annealed to 0")
    guidance: float = Field(default=_LOOP.guidance, ge=0.0, le=1.0, description="Text guidance weight (0: off)")
    rescale: float = Field(default=_LOOP.rescale, ge=0.0, le=1.0, description="Guidance std-rescale mix")
    topk: int = Field(default=_LOOP.topk, ge=1, le=100, description="Top-k filter on the logits")
    audio_token_syllable_ratio: tp.Optional[float] = Field(
        default=None, ge=5.0, le=25.0, description="Frames per syllable; None: estimated from the word times")


class InpaintInput(BaseInput):
    audio: str = Field(description="Path (or file: URI) of the audio to edit")
    input_text: str = Field(description="Transcript of the input audio")
    input_word_times: tp.List[tp.Dict] = Field(
        default=[], description="Word timings of the input audio: [{word, start, end}] in seconds",
        examples=[[{"word": "Hello", "start": 0.0, "end": 0.5}, {"word": "world", "start": 0.5, "end": 1.0}]])


class TTSInput(BaseInput):
    voice: str = Field(description="Path (or file: URI) of a reference clip of the voice")


class RVCInput(BaseModel):
    source_speech: str = Field(description="Path of the speech to convert")
    target_voice: str = Field(description="Path of a clip of the target voice")


def _validated(model: type[BaseModel], value) -> BaseModel:
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise InvalidOptionError(f"{model.__name__}: {e}") from None


def read_audio_uri(uri: str) -> tuple[torch.Tensor, int]:
    """A local path or file: URI -> ([C, N] float32, sample rate)."""
    from magnet_engine.audio import read_audio

    if not isinstance(uri, str) or not uri:
        raise InvalidInputError(f"audio must be a path, found {uri!r}")
    if uri.startswith("file:"):
        uri = uri[len("file:"):].removeprefix("//")
    elif "://" in uri:
        raise InvalidInputError(f"audio {uri!r}: only local paths and file: URIs are supported")
    if not Path(uri).is_file():
        raise InvalidInputError(f"audio file not found: {uri}")
    return read_audio(uri)


def write_pcm16(path, pcm: np.ndarray, sample_rate: int) -> Path:
    """int16 [N] -> 16-bit WAV at path, atomically (`files.atomic_write`: nothing half-written,
    an existing file's mode kept, a path that is not a regular file refused)."""
    import soundfile as sf

    return atomic_write(path, lambda tmp: sf.write(tmp, pcm, sample_rate, subtype="PCM_16", format="WAV"),
                        suffix=".wav")


def wav_bytes_pcm16(pcm: np.ndarray, sample_rate: int) -> bytes:
    """int16 [N] -> the bytes of a 16-bit PCM WAV file."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def random_model_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """The tiny random-weight model, written once into the cache."""
    from magnet_engine.engine.playdiffusion import files
    from magnet_engine.engine.playdiffusion.random_weights import write_random_model

    root = Path(cache).expanduser() / "playdiffusion-random-tiny"
    if not all((root / name).exists() for name in files.FILES.values()):
        write_random_model(root, "tiny", seed=0)
    return root


class PlayDiffusion:
    """Loads all components once; thread-safe (calls are serialised)."""

    def __init__(self, model: tp.Union[str, os.PathLike] = RANDOM_MODEL, device: tp.Optional[str] = None,
                 precision=None, unmask_fixes: tp.Optional[dict] = None, planner_fixes: tp.Optional[dict] = None,
                 compile: bool = False, cuda_graphs: bool = False):
        """model: a directory with the six upstream files, a Hub id ("PlayHT/inpainter"), or
        "random" (default). precision: an engine.playdiffusion.pipeline.Precision, or 'fp32' (the
        default) or 'int8' (the inpainter's linear layers int8, CPU only).
        unmask_fixes / planner_fixes: named fixes of upstream quirks (UnmaskOptions /
        PlannerOptions fields), all off by default. compile: run the unmasking step through
        torch.compile(fullgraph=True) (compiled once per step shape, on the first call).
        cuda_graphs: capture the unmasking step once per step shape as a CUDA graph and replay
        it (CUDA only). Both give the eager tokens for the same draws."""
        from magnet_engine.engine.playdiffusion.pipeline import PlayDiffusionPipeline, Precision
        from magnet_engine.engine.playdiffusion.planner import PlannerOptions
        from magnet_engine.engine.playdiffusion.unmasking import UnmaskOptions

        try:
            self._unmask_fixes = UnmaskOptions(**(unmask_fixes or {}))
            self._planner = PlannerOptions(**(planner_fixes or {}))
        except TypeError as e:
            raise InvalidOptionError(f"unknown quirk fix: {e}") from None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        graphs.check_device(cuda_graphs, device)     # before the weights are loaded
        if precision is None or isinstance(precision, str):
            named = {None: Precision(), "fp32": Precision(), "int8": Precision(inpainter="int8")}
            if precision not in named:
                raise InvalidOptionError(f"precision must be 'fp32', 'int8' or a Precision, found {precision!r}")
            precision = named[precision]
        root = random_model_dir() if str(model) == RANDOM_MODEL else model
        self.pipeline = PlayDiffusionPipeline.load(root, device, precision, compile=compile,
                                                   cuda_graphs=cuda_graphs)
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        return self.pipeline.sample_rate

    def _options(self, settings: BaseInput):
        import dataclasses

        return dataclasses.replace(self._unmask_fixes, steps=settings.num_steps, init_temp=settings.init_temp,
                                   init_diversity=settings.init_diversity, guidance=settings.guidance,
                                   rescale=settings.rescale, topk=settings.topk)

    def _draws(self, seed: tp.Optional[int]):
        from magnet_engine.engine.playdiffusion.unmasking import GeneratorDraws

        if seed is None:
            return GeneratorDraws()  # the device's default generator, as upstream
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidOptionError(f"seed must be an int, found {seed!r}")
        return GeneratorDraws(torch.Generator(device=self.pipeline.device).manual_seed(seed))

    def inpaint(self, input: tp.Union[InpaintInput, dict], *, seed: tp.Optional[int] = None,
                listener=None) -> tuple[int, np.ndarray]:
        """Edit the recording so that it says output_text -> (sample_rate, int16 PCM)."""
        input = _validated(InpaintInput, input)
        wave, sr = read_audio_uri(input.audio)
        return self.inpaint_audio(wave, sr, input, seed=seed, listener=listener).pcm_tuple()

    def inpaint_audio(self, wave: torch.Tensor, sample_rate: int, input: tp.Union[InpaintInput, dict], *,
                      seed: tp.Optional[int] = None, listener=None):
        """The same on audio in memory ([C, N] or [N] float); `input.audio` is not read.
        -> engine.playdiffusion.pipeline.SpeechResult (pcm, units, timings, plan)."""
        if isinstance(input, dict):
            input = _validated(InpaintInput, {"audio": "", **input})
        with self._lock:
            return self.pipeline.inpaint(wave, sample_rate, input.input_text, input.output_text,
                                         input.input_word_times, self._options(input),
                                         input.audio_token_syllable_ratio, self._planner, self._draws(seed), listener)

    def tts(self, input: tp.Union[TTSInput, dict], *, seed: tp.Optional[int] = None,
            listener=None) -> tuple[int, np.ndarray]:
        input = _validated(TTSInput, input)
        voice, sr = read_audio_uri(input.voice)
        with self._lock:
            result = self.pipeline.tts(input.output_text, voice, sr, self._options(input),
                                       input.audio_token_syllable_ratio, self._draws(seed), listener)
        return result.pcm_tuple()

    def rvc(self, input: tp.Union[RVCInput, dict]) -> tuple[int, np.ndarray]:
        input = _validated(RVCInput, input)
        source, source_sr = read_audio_uri(input.source_speech)
        target, target_sr = read_audio_uri(input.target_voice)
        with self._lock:
            return self.pipeline.rvc(source, source_sr, target, target_sr).pcm_tuple()
