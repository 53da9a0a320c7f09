"""PlayDiffusion end to end on the engine (docs/model.md §13.1, §13.10):

    inpaint: wave -> units (16 kHz XLS-R + k-means) and speaker embedding (24 kHz voice encoder)
             texts + word times -> planner regions -> one unmasking loop per region (all of them
             one speech plan, `plan.run_speech` on the SpeechRuntime)
             -> stitched units -> vocoder -> int16 PCM
    tts:     text pieces -> unmasking loops with no audio context -> vocoder (voice clip's embedding)
    rvc:     source units -> vocoder with the target voice's embedding

Every region is planned and its length checked before any model runs, so a bad request
fails before work starts. Each call returns its per-phase wall times (tokenize, plan,
unmask, vocode) for the benchmarks.
"""
from __future__ import annotations

import dataclasses
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

from magnet_engine.engine.errors import CheckpointError, InvalidInputError, InvalidOptionError
from magnet_engine.engine.events import Listener
from magnet_engine.engine.playdiffusion import files
from magnet_engine.engine.playdiffusion.inpainter import MAX_SEQ_LEN, Inpainter, load_inpainter
from magnet_engine.engine.playdiffusion.plan import plan_speech, run_speech
from magnet_engine.engine.playdiffusion.planner import (DEFAULT_RATIO, EditPlan, PlannerOptions, plan_edit,
                                                         split_tts_text, syllables)
from magnet_engine.engine.playdiffusion.resample import resample
from magnet_engine.engine.playdiffusion.speech_tokenizer import SAMPLE_RATE as UNIT_RATE
from magnet_engine.engine.playdiffusion.speech_tokenizer import SpeechTokenizer, load_speech_tokenizer
from magnet_engine.engine.playdiffusion.text import TextTokenizer
from magnet_engine.engine.playdiffusion.unmasking import Draws, GeneratorDraws, SpeechRuntime, UnmaskOptions, split_code
from magnet_engine.engine.playdiffusion.vocoder import Vocoder, load_vocoder
from magnet_engine.engine.playdiffusion.voice_encoder import SAMPLE_RATE as VOICE_RATE
from magnet_engine.engine.playdiffusion.voice_encoder import VoiceEncoder, load_voice_encoder
from magnet_engine.engine.precision import cpu_info, quantize_linears_

MIN_SAMPLE_RATE = 16000  # upstream refuses lower rates ("garbage in, garbage out")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Per-component dtypes. Upstream (CUDA): XLS-R + k-means fp16, inpainter fp32, voice
    encoder autocast, vocoder fp16. The defaults here are fp32. inpainter: a dtype, or 'int8'
    (its backbone's linear layers int8 on the CPU, engine/precision.py; embeddings, norms and
    the output head fp32). voice_autocast: None follows the device: on CUDA fp16 autocast as
    upstream, on a CPU bf16 autocast (upstream's own CPU behaviour) only where the CPU has
    native bf16; elsewhere fp32, which is both faster and more exact there."""
    speech: torch.dtype = torch.float32
    inpainter: tp.Union[torch.dtype, str] = torch.float32
    vocoder: torch.dtype = torch.float32
    voice_autocast: tp.Optional[bool] = None

    def autocast_on(self, device: torch.device) -> bool:
        if self.voice_autocast is not None:
            return self.voice_autocast
        return device.type == "cuda" or (device.type == "cpu" and cpu_info().native_bf16)


@dataclasses.dataclass
class SpeechResult:
    sample_rate: int
    pcm: np.ndarray                  # [samples] int16
    units: torch.Tensor              # [T] int64: what was vocoded
    timings: dict                    # phase -> seconds
    plan: EditPlan | None = None

    def pcm_tuple(self) -> tuple[int, np.ndarray]:
        """upstream's return value: (sample_rate, int16 PCM)."""
        return self.sample_rate, self.pcm


def to_pcm16(wave: torch.Tensor) -> np.ndarray:
    """[-1, 1] float -> int16 as upstream: clip(trunc(x · 32768))."""
    x = torch.trunc(wave.float().reshape(-1) * 32768).clamp(-32768, 32767)
    return x.to(torch.int16).cpu().numpy()


def check_audio(wave: torch.Tensor, sample_rate: int, what: str) -> torch.Tensor:
    """wave [N] or [C, N] float -> [C, N] fp32; refuses empty, non-finite, low-rate audio."""
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate < MIN_SAMPLE_RATE:
        raise InvalidInputError(f"{what}: sample rate must be an integer >= {MIN_SAMPLE_RATE} Hz, found {sample_rate!r}")
    wave = torch.as_tensor(wave)
    if wave.dim() == 1:
        wave = wave[None]
    if wave.dim() != 2 or wave.shape[-1] == 0 or wave.shape[0] == 0:
        raise InvalidInputError(f"{what}: expected non-empty audio [samples] or [channels, samples], "
                                f"found shape {tuple(wave.shape)}")
    wave = wave.float()
    if not torch.isfinite(wave).all():
        raise InvalidInputError(f"{what}: audio holds NaN or inf samples")
    return wave


def unmask(runtime: SpeechRuntime, options: UnmaskOptions, loops: tp.Sequence[tuple], draws: Draws,
           listener: Listener | None = None) -> tp.Tuple[torch.Tensor, ...]:
    """(text [Lt'] ids, left [P] units, L, right [Q] units) per loop -> units [P + L + Q] per
    loop: one speech plan (`plan.plan_speech`, `plan.run_speech`)."""
    p = plan_speech(runtime.cfg, options, [(text.numel(), left.numel(), length, right.numel())
                                           for text, left, length, right in loops])
    return run_speech(p, runtime, [(text, left, right) for text, left, _, right in loops], draws, listener)


def generate_units(runtime: SpeechRuntime, text: torch.Tensor, options: UnmaskOptions, draws: Draws, *,
                   target_len: int | None = None, code: torch.Tensor | None = None, start_frame: int | None = None,
                   end_frame: int | None = None, listener: Listener | None = None) -> torch.Tensor:
    """Upstream `MaskGCT.generate` as one loop: TTS (target_len, no code) or inpainting (code
    [T] units with the target at [start_frame, end_frame]). text: [Lt'] ids -> units [T']."""
    if code is None:
        left = right = text.new_zeros(0)
        length = int(target_len)
    else:
        left, length, right = split_code(code, int(start_frame), int(end_frame))
    return unmask(runtime, options, [(text, left, length, right)], draws, listener)[0]


def _placed_inpainter(inpainter: Inpainter, device: torch.device, dtype: tp.Union[torch.dtype, str]) -> Inpainter:
    if dtype == "int8":
        if device.type != "cpu":
            raise InvalidOptionError("the int8 inpainter is a CPU path")
        quantize_linears_(inpainter.LM)
        return inpainter.to(device)
    return inpainter.to(device, dtype)


class PlayDiffusionPipeline:
    """compile / cuda_graphs: how the unmasking step runs (SpeechRuntime: the whole step through
    torch.compile(fullgraph=True); captured once per step shape as a CUDA graph, CUDA only)."""

    def __init__(self, tokenizer: TextTokenizer, speech_tokenizer: SpeechTokenizer, voice_encoder: VoiceEncoder,
                 vocoder: Vocoder, inpainter: Inpainter, precision: Precision = Precision(), *,
                 compile: bool = False, cuda_graphs: bool = False):
        cfg = inpainter.cfg
        if tokenizer.vocab_size > cfg.vocab_size - 2:
            raise CheckpointError(f"text tokenizer has {tokenizer.vocab_size} ids, the inpainter's vocabulary "
                                  f"{cfg.vocab_size} leaves room for {cfg.vocab_size - 2}")
        if speech_tokenizer.centroids.shape[0] != cfg.codebook_size:
            raise CheckpointError(f"k-means has {speech_tokenizer.centroids.shape[0]} centroids, the inpainter "
                                  f"{cfg.codebook_size} units")
        self.tokenizer, self.speech_tokenizer, self.voice_encoder = tokenizer, speech_tokenizer, voice_encoder
        self.vocoder, self.inpainter, self.precision = vocoder, inpainter, precision
        self.runtime = SpeechRuntime(inpainter, compile=compile, cuda_graphs=cuda_graphs)

    @classmethod
    def load(cls, name_or_dir: tp.Union[str, Path], device: tp.Union[str, torch.device] = "cpu",
             precision: Precision = Precision(), *, compile: bool = False,
             cuda_graphs: bool = False) -> "PlayDiffusionPipeline":
        root = files.resolve_dir(name_or_dir)
        device = torch.device(device)
        centroids = files.load_kmeans(files.component_path(root, "kmeans"))
        speech = load_speech_tokenizer(files.load_pickle(files.component_path(root, "speech_tokenizer")),
                                       centroids, files.load_xlsr_sidecar(root), precision.speech)
        return cls(
            TextTokenizer(files.component_path(root, "tokenizer")),
            speech.to(device),
            load_voice_encoder(files.load_pickle(files.component_path(root, "voice_encoder"))).to(device),
            load_vocoder(files.load_pickle(files.component_path(root, "vocoder")), precision.vocoder).to(device),
            _placed_inpainter(load_inpainter(files.load_pickle(files.component_path(root, "inpainter"))), device,
                              precision.inpainter),
            precision, compile=compile, cuda_graphs=cuda_graphs,
        )

    @property
    def device(self) -> torch.device:
        return self.inpainter.to_logits.weight.device

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    # ------------------------------------------------------------------ components
    @torch.inference_mode()
    def units(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """[C, N] float at sample_rate -> units [T] int64 (mono mean, resampled to 16 kHz)."""
        peak = wave.abs().max()
        mono = (wave / peak if peak > 1 else wave).mean(0)  # upstream rescales float audio beyond [-1, 1]
        return self.speech_tokenizer(resample(mono, sample_rate, UNIT_RATE).to(self.device))[0]

    @torch.inference_mode()
    def voice_embedding(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """[C, N] at sample_rate -> [1, C_emb] (resampled to 24 kHz per channel)."""
        return self.voice_encoder(resample(wave, sample_rate, VOICE_RATE).to(self.device),
                                  autocast=self.precision.autocast_on(self.device))

    @torch.inference_mode()
    def vocode(self, units: torch.Tensor, speaker: torch.Tensor) -> np.ndarray:
        return to_pcm16(self.vocoder(units[None].to(self.device), speaker.to(self.vocoder.dtype)))

    def _text(self, words: str) -> torch.Tensor:
        return self.tokenizer.encode(words)[0].to(self.device)

    # ------------------------------------------------------------------ modes
    def inpaint(self, wave: torch.Tensor, sample_rate: int, input_text: str, output_text: str,
                word_times: tp.Sequence[dict], options: UnmaskOptions = UnmaskOptions(),
                ratio: float | None = None, planner: PlannerOptions = PlannerOptions(),
                draws: Draws | None = None, listener: Listener | None = None,
                units: torch.Tensor | None = None) -> SpeechResult:
        """Edit `wave` so it says output_text. `units` [T] skips the speech tokenizer (cached units)."""
        options.check(self.inpainter.cfg.codebook_size)
        wave = check_audio(wave, sample_rate, "inpaint audio")
        timings: dict = {}
        t0 = time.perf_counter()
        if units is None:
            units = self.units(wave, sample_rate)
        speaker = self.voice_embedding(wave, sample_rate)
        t1 = time.perf_counter()
        timings["tokenize"] = t1 - t0
        plan = plan_edit(input_text, output_text, word_times, units.numel(), ratio, planner)
        if not plan.regions:
            raise InvalidInputError("input_text and output_text do not differ (after unidecode and word "
                                    "splitting): there is nothing to edit")
        calls = [self._region_call(units, r, planner) for r in plan.regions]
        t2 = time.perf_counter()
        timings["plan"] = t2 - t1
        outs = unmask(self.runtime, options, [call[:4] for call in calls], draws or GeneratorDraws(), listener)
        pieces, last_end = [], -1
        for region, (text, left, length, right, keep_end), out in zip(plan.regions, calls, outs):
            if region.start_frame is not None and region.start_frame > last_end + 1:
                pieces.append(units[last_end + 1:region.start_frame])
            if region.end_frame is not None:
                last_end = keep_end
            pieces.append(out[left.numel():left.numel() + region.n_frames].to(units.device))
        if units.numel() > last_end + 1:
            pieces.append(units[last_end + 1:])
        new_units = torch.cat(pieces)
        t3 = time.perf_counter()
        timings["unmask"] = t3 - t2
        pcm = self.vocode(new_units, speaker)
        timings["vocode"] = time.perf_counter() - t3
        return SpeechResult(self.sample_rate, pcm, new_units, timings, plan)

    def _region_call(self, units: torch.Tensor, region, planner: PlannerOptions):
        """(text ids, left, L, right, last replaced frame) of one region, as upstream's
        do_inpaint + generate compute them; refuses a sequence over the model's maximum."""
        text = self._text(region.text)
        sf, ef, n = region.start_frame, region.end_frame, region.n_frames
        left = units[region.buf_start_frame:sf] if region.buf_start_frame is not None and sf is not None \
            else units[:0]
        has_right = ef is not None and region.buf_end_frame is not None
        right = units[ef:region.buf_end_frame] if has_right else units[:0]
        if planner.exact_region_length:  # fix of quirks 1-2: n positions, ef kept
            length, keep_end = n, (ef - 1 if ef is not None else None)
        else:
            code = torch.cat([left, units.new_zeros(n), right])  # placeholders are never read
            end = left.numel() + n if has_right else code.numel()
            left, length, right = split_code(code, left.numel(), end)
            keep_end = ef
        size = text.numel() + 2 + left.numel() + length + right.numel()
        if size > MAX_SEQ_LEN:
            raise InvalidInputError(f"edit region needs {size} inpainter positions (text {text.numel() + 2}, "
                                    f"context {left.numel() + right.numel()}, new {length}); the model's maximum "
                                    f"is {MAX_SEQ_LEN}: make the edit shorter or split it into several edits")
        return text, left.to(self.device), length, right.to(self.device), keep_end

    def tts(self, text: str, voice: torch.Tensor, sample_rate: int, options: UnmaskOptions = UnmaskOptions(),
            ratio: float | None = None, draws: Draws | None = None,
            listener: Listener | None = None) -> SpeechResult:
        """Text -> speech in the voice of `voice` (the vocoder's speaker embedding only)."""
        from unidecode import unidecode

        options.check(self.inpainter.cfg.codebook_size)
        voice = check_audio(voice, sample_rate, "voice audio")
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("output_text is empty")
        timings: dict = {}
        t0 = time.perf_counter()
        speaker = self.voice_embedding(voice, sample_rate)
        t1 = time.perf_counter()
        timings["tokenize"] = t1 - t0
        pieces = split_tts_text(unidecode(text))
        jobs = []
        for piece in pieces:
            ids = self._text(piece)
            length = int(syllables(piece) * (ratio or DEFAULT_RATIO))
            if ids.numel() + 2 + length > MAX_SEQ_LEN:
                raise InvalidInputError(f"text piece of {len(piece)} characters needs {ids.numel() + 2 + length} "
                                        f"inpainter positions, over the maximum of {MAX_SEQ_LEN}")
            jobs.append((ids, length))
        t2 = time.perf_counter()
        timings["plan"] = t2 - t1
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        units = torch.cat(unmask(self.runtime, options, [(ids, empty, length, empty) for ids, length in jobs],
                                 draws or GeneratorDraws(), listener))
        t3 = time.perf_counter()
        timings["unmask"] = t3 - t2
        pcm = self.vocode(units, speaker)
        timings["vocode"] = time.perf_counter() - t3
        return SpeechResult(self.sample_rate, pcm, units, timings)

    def rvc(self, source: torch.Tensor, source_rate: int, target: torch.Tensor, target_rate: int) -> SpeechResult:
        """Voice conversion: the source's units vocoded with the target's speaker embedding."""
        source = check_audio(source, source_rate, "source speech")
        target = check_audio(target, target_rate, "target voice")
        t0 = time.perf_counter()
        units = self.units(source, source_rate)
        speaker = self.voice_embedding(target, target_rate)
        t1 = time.perf_counter()
        pcm = self.vocode(units, speaker)
        return SpeechResult(self.sample_rate, pcm, units,
                            {"tokenize": t1 - t0, "plan": 0.0, "unmask": 0.0, "vocode": time.perf_counter() - t1})
