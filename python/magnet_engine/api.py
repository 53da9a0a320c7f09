"""The public API, shaped like audiocraft's `MAGNeT` so existing users feel at home.

    model = MAGNeT.get_pretrained("facebook/magnet-small-10secs")   # or a local directory
    model.set_generation_params(duration=5, top_p=0.9)
    wav = model.generate(["80s pop with synths"])                   # [B, 1, samples]

A `MAGNeT` holds no global state: load once and call `generate` from any thread; calls on
one instance are serialised by its lock (they share the decoding buffers).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import typing as tp
from pathlib import Path

import torch

from magnet_engine import options as opts
from magnet_engine import requests as req
from magnet_engine import streaming
from magnet_engine.compat import CompressionModelView, LMView, training_config
from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine import events, generate, graphs
from magnet_engine.engine.codec import Codec
from magnet_engine.engine.conditioning import TextConditioner, check_descriptions
from magnet_engine.engine.config import DecodingParams, ModelConfig, cfg_get
from magnet_engine.engine.hybrid import ARParams, HybridOptions
from magnet_engine.engine.model import MagnetLM
from magnet_engine.engine.precision import PRECISIONS, PrecisionChoice, cast_for_precision
from magnet_engine.engine.rescoring import BoundRescorer, ExternalLM, RescoreOptions
from magnet_engine.engine.schedule import duration_frames
from magnet_engine.engine.slots import SlotRuntime, default_ladders
from magnet_engine.errors import InvalidInputError, InvalidOptionError
from magnet_engine.memory import memory_stats
from magnet_engine.streaming import Progress

# set_generation_params' defaults, read from the option dataclasses: a default changed there changes here
_DECODING, _HYBRID, _AR, _RESCORE = DecodingParams(), HybridOptions(), ARParams(), RescoreOptions()


class MAGNeT:
    """A loaded MAGNeT model: LM, text conditioner and EnCodec, plus generation params."""

    def __init__(self, name: str, lm: MagnetLM, conditioner: TextConditioner, codec: Codec,
                 device: torch.device, engine: str = "fast",
                 precision: tp.Union[str, None, PrecisionChoice] = None,
                 compile: bool = False, cuda_graphs: bool = False, xp_cfg=None):
        choice = (precision if isinstance(precision, PrecisionChoice)
                  else opts.precision_for(engine, precision, device, lm.cfg))
        graphs.check_device(cuda_graphs, device)     # before any runtime is built
        self.precision = choice.precision
        self.precision_choice = choice   # what ran and why ('auto' says what it measured)
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.name = name
        self._lm = lm                    # the engine's MagnetLM; `lm` is audiocraft's view of it
        self.conditioner = conditioner
        self.codec = codec
        self.device = device
        self.engine = engine
        self.config: ModelConfig = lm.cfg   # what the engine reads; `cfg` is audiocraft's full config
        # audiocraft's surface: cfg = lm.cfg, the checkpoint's training config (xp.cfg), read-only
        self.compression_model = CompressionModelView(codec)
        self.cfg = None if xp_cfg is None else training_config(xp_cfg, device, int(self.compression_model.frame_rate))
        self.lm = LMView(lm, self.cfg, conditioner)
        trained = cfg_get(self.cfg, "dataset.segment_duration", None) if self.cfg is not None else None
        if isinstance(trained, bool) or not isinstance(trained, (int, float)):
            trained = self.config.segment_duration
        self._max_duration = trained     # audiocraft's type: as written in xp.cfg (10, not 10.0)
        self._duration = trained
        self._extend_stride: tp.Optional[float] = None
        self._progress_callback: tp.Optional[Progress] = None
        self.params = DecodingParams()
        self.hybrid = HybridOptions(ar=ARParams(cfg_coef=self.config.cfg_coef))
        self.prefix_model: tp.Optional[ExternalLM] = None   # two-model hybrid: MusicGen makes the prefix
        self.rescorer: tp.Optional[ExternalLM] = None
        self.rescore = RescoreOptions()
        self.t5_source: tp.Optional[str] = None              # where the T5 came from (shared with external LMs)
        self._external: tp.Dict[tp.Tuple[str, str], ExternalLM] = {}
        self._lock = threading.Lock()
        self._runtimes = generate.Runtimes(lm, self.precision, self.reference_lm, compile=compile,
                                           cuda_graphs=cuda_graphs)   # each built on first use
        self.source: tp.Optional[Path] = None    # the checkpoint directory, to reload fp32 weights from
        self._reference_lm: tp.Optional[MagnetLM] = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def get_pretrained(cls, name: str = "facebook/magnet-small-10secs", device=None, *,
                       t5: tp.Optional[str] = None, engine: str = "fast",
                       precision: tp.Optional[str] = None, compile: bool = False,
                       cuda_graphs: bool = False) -> "MAGNeT":
        """Load a model by Hub id (via the Hugging Face cache / hub client) or local directory.

        `t5` overrides where the T5 text encoder comes from (a local directory, or a Hub
        name); by default the checkpoint's own `conditioners.description.t5.name`.
        """
        return cls.from_pretrained(ckpt.resolve_model_dir(name), device=device, t5=t5, engine=engine,
                                   precision=precision, compile=compile, cuda_graphs=cuda_graphs, name=name)

    @classmethod
    def from_pretrained(cls, directory: tp.Union[str, os.PathLike], device=None, *, t5: tp.Optional[str] = None,
                        engine: str = "fast", precision: tp.Optional[str] = None, compile: bool = False,
                        cuda_graphs: bool = False, name: tp.Optional[str] = None) -> "MAGNeT":
        """Load from a local directory in the Hugging Face layout.

        engine: 'fast' (default) or 'reference' (the plain loop); precision: of the fast
        runtime's transformer, 'auto' (CPU default: the fastest of fp32, bf16 and int8 on this
        CPU, see `precision_choice`), 'fp32', 'int8' (CPU: int8 linear layers), 'fp16-mixed'
        (CUDA default: fp16 matmuls, fp32 residual stream and norms, as the reference's
        autocast), 'bf16-mixed', 'bf16', 'fp16' (pure low precision); compile: torch.compile each decoding step whole (slower
        start-up); cuda_graphs: capture each step shape once as a CUDA graph and replay it.
        """
        directory = ckpt.resolve_model_dir(directory)
        device = opts.resolve_device(device)
        generate.check_engine(engine)
        codec_file = directory / ckpt.CODEC_FILE
        codec = Codec.from_package(ckpt.load_package(codec_file), device=device, mapped=ckpt.mappable(codec_file))
        lm_ckpt = ckpt.load_lm_checkpoint(directory / ckpt.LM_FILE, frame_rate=round(codec.frame_rate))
        if lm_ckpt.cfg.sample_rate != codec.sample_rate:
            raise ckpt.CheckpointError(f"LM was trained at {lm_ckpt.cfg.sample_rate} Hz but the codec runs at "
                                       f"{codec.sample_rate} Hz")
        choice = opts.precision_for(engine, precision, device, lm_ckpt.cfg)
        # Straight into the precision it runs in: the fast runtime's cast is then a no-op. int8
        # quantizes layer by layer from the mapped fp32 pages, handing each back once read.
        matmul, residual = PRECISIONS[choice.precision]
        lm = ckpt.build_lm(lm_ckpt, device, matmul, residual)
        if choice.precision == "int8":
            cast_for_precision(lm, "int8", release=ckpt.release_pages if lm_ckpt.mapped else lambda t: None)
            lm_ckpt.lm_state = {}
        weight, bias = lm_ckpt.output_proj
        if t5 is None:  # a T5 shipped inside the model directory wins over the hub name in xp.cfg
            t5 = str(directory / "t5") if (directory / "t5" / "config.json").is_file() else lm_ckpt.cfg.t5_name
        conditioner = TextConditioner.load(t5, weight.float(), bias.float(), device=device)
        model = cls(name or str(directory), lm, conditioner, codec, device, engine=engine, precision=choice,
                    compile=compile, cuda_graphs=cuda_graphs, xp_cfg=lm_ckpt.xp_cfg)
        model.t5_source = t5
        model.source = directory
        return model

    # ------------------------------------------------------------- properties
    # audiocraft's BaseGenModel surface; each setter validates, so a refused value changes nothing.
    @property
    def sample_rate(self) -> int:
        return self.compression_model.sample_rate

    @property
    def frame_rate(self) -> tp.Union[int, float]:
        """Codec frames per second; int or float as audiocraft gives it for this codec format."""
        return self.compression_model.frame_rate

    @property
    def audio_channels(self) -> int:
        return self.compression_model.channels

    @property
    def max_duration(self) -> tp.Union[int, float]:
        """The longest clip one decoding window makes (s): the trained segment length by default,
        settable down to one span."""
        return self._max_duration

    @max_duration.setter
    def max_duration(self, value: tp.Union[int, float]) -> None:
        self._max_duration = opts.check_max_duration(value, self.config, self.frame_rate)

    @property
    def duration(self) -> tp.Union[int, float]:
        """Seconds to generate; past `max_duration` a plain MAGNeT decodes window by window (long-form)."""
        return self._duration

    @duration.setter
    def duration(self, value: tp.Union[int, float]) -> None:
        self.check_duration(value)
        self._duration = opts.plain_number(value)

    @property
    def extend_stride(self) -> tp.Optional[float]:
        """audiocraft's stride (s) between long-form windows, in (0, max_duration); None: the default,
        DEFAULT_STRIDE_FRACTION of max_duration (6 s of a 10 s window, 18 s of a 30 s one)."""
        return self._extend_stride

    @extend_stride.setter
    def extend_stride(self, value: tp.Optional[float]) -> None:
        self._extend_stride = opts.check_extend_stride(value, self.max_duration)

    @property
    def generation_params(self) -> tp.Mapping[str, tp.Any]:
        """audiocraft's MAGNeT.generation_params: the decoding options under the keyword names
        of its `lm.generate`. A read-only view, so that a change cannot skip validation: assign a
        whole mapping (which may also name `anneal_temp` and `span_scoring`), or call
        `set_generation_params`."""
        return opts.generation_params(self.params)

    @generation_params.setter
    def generation_params(self, value: tp.Mapping[str, tp.Any]) -> None:
        self.params = opts.params_from_mapping(value, self.config)

    def set_custom_progress_callback(self, progress_callback: tp.Optional[Progress] = None) -> None:
        """Called as progress_callback(generated_steps, total_steps) in place of the progress
        bar when a generate call has progress=True (audiocraft's contract)."""
        if progress_callback is not None and not callable(progress_callback):
            raise InvalidOptionError(f"progress_callback must be callable or None, found "
                                     f"{type(progress_callback).__name__}")
        self._progress_callback = progress_callback

    # ------------------------------------------------------------- parameters
    def set_generation_params(self, use_sampling: bool = _DECODING.use_sampling, top_k: int = _DECODING.top_k,
                              top_p: float = _DECODING.top_p, temperature: float = _DECODING.temperature,
                              max_cfg_coef: float = _DECODING.max_cfg_coef,
                              min_cfg_coef: float = _DECODING.min_cfg_coef,
                              decoding_steps: tp.Sequence[int] = _DECODING.decoding_steps,
                              span_arrangement: str = _DECODING.span_arrangement, duration: tp.Optional[float] = None,
                              span_scoring: str = _DECODING.span_scoring, anneal_temp: bool = _DECODING.anneal_temp, *,
                              hybrid_prefix_seconds: tp.Optional[float] = _HYBRID.prefix_seconds,
                              hybrid_handoff: str = _HYBRID.handoff,
                              hybrid_prefix_attention: str = _HYBRID.prefix_attention, prefix_model=None,
                              ar_use_sampling: bool = _AR.use_sampling, ar_top_k: int = _AR.top_k,
                              ar_top_p: float = _AR.top_p, ar_temperature: float = _AR.temperature,
                              ar_cfg_coef: tp.Optional[float] = None, rescorer=None,
                              rescore_weight: float = _RESCORE.weight, rescore_temperature: str = _RESCORE.temperature,
                              rescore_fill: str = _RESCORE.fill,
                              rescore_cfg_coef: tp.Optional[float] = _RESCORE.cfg_coef) -> None:
        """Set decoding options; names and defaults as audiocraft's MAGNeT (docs/model.md §6).

        `duration` (seconds): None keeps the current one (audiocraft's MAGNeT takes no duration
        here: it sets `model.duration`); at most `max_duration`. `span_scoring` and
        `anneal_temp` are exposed here although the original API fixes them ('max', True).
        Integral floats and numpy integers are taken for `decoding_steps` and `top_k`.

        Hybrid decoding (docs/model.md §11; `engine/hybrid.py`): `hybrid_prefix_seconds` of audio are
        generated autoregressively first, then fixed while masked decoding fills the rest.
        On a hybrid-MAGNeT checkpoint it defaults to 3 s (DEFAULT_PREFIX_SECONDS); on a plain
        MAGNeT it needs `prefix_model` (a MusicGen / AudioGen directory or Hub id, or a loaded
        `ExternalLM`): the two-model hybrid, which is not the paper's model. hybrid_handoff:
        'staircase' (as trained) | 'rectangle'; hybrid_prefix_attention: 'cached' (prefix
        keys/values reused from the AR phase) | 'bidirectional' (the reference branch's).
        ar_*: sampling of the AR phase (MusicGen's defaults; ar_cfg_coef None = the
        checkpoint's classifier_free_guidance.inference_coef).

        Rescoring (docs/model.md §12; `engine/rescoring.py`): `rescorer` (a MusicGen / AudioGen directory,
        Hub id or `ExternalLM`) rescores each step's samples, conf = w·p_magnet + (1 − w)·p_ext
        with w = `rescore_weight` (1 = plain decoding, bit for bit); rescore_temperature
        'tempered' | 'raw', rescore_fill 'special' | 'greedy', rescore_cfg_coef None (1x) or
        a coefficient (2x).
        """
        params = DecodingParams(use_sampling=use_sampling, top_k=top_k, top_p=top_p, temperature=temperature,
                                max_cfg_coef=max_cfg_coef, min_cfg_coef=min_cfg_coef,
                                decoding_steps=decoding_steps, span_arrangement=span_arrangement,
                                span_scoring=span_scoring, anneal_temp=anneal_temp).validate(
                                    self.config.n_q, card=self.config.card)
        new_duration = self.duration if duration is None else self.check_duration(duration)
        rescore = RescoreOptions(rescore_weight, rescore_temperature, rescore_fill, rescore_cfg_coef).validate()
        prefix = self._external_lm(prefix_model) if prefix_model is not None else None
        if ar_cfg_coef is None:   # the AR model's own inference_coef: MusicGen's for the two-model hybrid
            ar_cfg_coef = (prefix.cfg if prefix is not None else self.config).cfg_coef
        ar = ARParams(use_sampling=ar_use_sampling, top_k=ar_top_k, top_p=ar_top_p, temperature=ar_temperature,
                      cfg_coef=ar_cfg_coef)
        hybrid = HybridOptions(hybrid_prefix_seconds, hybrid_handoff, hybrid_prefix_attention, ar).validate()
        generate.check_prefix(self.config, duration_frames(new_duration, self.frame_rate),
                              self.prefix_frames(new_duration, hybrid), None if prefix is None else prefix.cfg)
        scorer = self._external_lm(rescorer) if rescorer is not None else None
        self.params, self.hybrid, self.rescore = params, hybrid, rescore
        self.prefix_model, self.rescorer = prefix, scorer
        if duration is not None:
            self._duration = opts.plain_number(duration)

    def _external_lm(self, model) -> ExternalLM:
        """A MusicGen / AudioGen LM by directory / Hub id (loaded once per instance) or as given."""
        if not isinstance(model, ExternalLM):
            if not isinstance(model, (str, os.PathLike)):
                raise InvalidOptionError(f"expected a model directory, Hub id or ExternalLM, found {type(model).__name__}")
            key = (os.fspath(model), self.precision)
            if key not in self._external:
                shared = (self.config.t5_name, self.t5_source, self.conditioner) if self.t5_source else None
                self._external[key] = ExternalLM.from_pretrained(
                    model, frame_rate=round(self.frame_rate), device=self.device,
                    precision=self.precision if self.device.type == "cuda" or "fp16" not in self.precision else "fp32",
                    shared_t5=shared)
            model = self._external[key]
        model.check_compatible(self.config)
        return model

    def prefix_frames(self, duration: tp.Optional[float] = None, options: tp.Optional[HybridOptions] = None) -> int:
        """Frames of the AR prefix for the current settings; 0 when decoding is not hybrid."""
        return (options or self.hybrid).prefix_frames(self.config, self.frame_rate,
                                                      self.duration if duration is None else duration)

    def check_duration(self, duration: float, limit: tp.Optional[float] = None) -> float:
        """Validate a duration in seconds against the longest this model generates (and `limit`,
        e.g. a server's cap); returns it as a float. Changes nothing. A plain MAGNeT generates
        past `max_duration` window by window (long-form, up to MAX_LONGFORM_SECONDS); a hybrid
        one stays within it."""
        return opts.check_duration(duration, self.config, self.frame_rate, self.max_duration, limit)

    def window_count(self, duration: float) -> int:
        """How many windows a plain generation of `duration` seconds decodes (1 within
        max_duration; long-form advances extend_stride per window)."""
        frames, window = duration_frames(duration, self.frame_rate), duration_frames(self.max_duration, self.frame_rate)
        if frames <= window:
            return 1
        return len(generate.plan_windows(self.config, self.params, frames, window, self._stride_frames()))

    def _stride_frames(self) -> int:
        return opts.stride_frames(self.extend_stride, self.max_duration, self.frame_rate)

    @property
    def frames(self) -> int:
        """T = ⌊duration · frame_rate⌋, as the original's max_gen_len."""
        return duration_frames(self.duration, self.frame_rate)

    def plan(self, batch: int = 1, duration: tp.Optional[float] = None, *, prompt_frames: int = 0,
             params: tp.Optional[DecodingParams] = None,
             options: tp.Optional[HybridOptions] = None) -> "generate.Plan":
        """The plan `generate` runs for `batch` rows of `duration` seconds with the current
        settings (engine, decoding, hybrid, rescoring, long-form windows): `generate.plan`,
        asked in this model's frames. params / options: a call's own instead of the instance's."""
        params = self.params if params is None else params
        options = self.hybrid if options is None else options
        duration = self.duration if duration is None else duration
        return generate.plan(
            self.config, params, batch=batch, frames=duration_frames(duration, self.frame_rate),
            prompt_frames=prompt_frames, hybrid=options,
            prefix_frames=self.prefix_frames(min(duration, self.max_duration), options),
            prefix_cfg=None if self.prefix_model is None else self.prefix_model.cfg,
            rescore_fill=self.rescore.fill, engine=self.engine,
            window_frames=duration_frames(self.max_duration, self.frame_rate), stride_frames=self._stride_frames())

    # ------------------------------------------------------------- generation
    def generate(self, descriptions: tp.Sequence[tp.Optional[str]], progress: tp.Union[bool, Progress] = False,
                 return_tokens: bool = False, seed: tp.Union[int, tp.Sequence[int], None] = None, *,
                 hybrid_prefix_seconds: tp.Optional[float] = None,
                 on_prefix: tp.Optional[tp.Callable[[torch.Tensor], None]] = None):
        """Text -> audio [B, channels, samples] (and tokens [B, K, T'] with return_tokens).

        hybrid_prefix_seconds overrides the one set by `set_generation_params` for this call.
        on_prefix(wav [B, channels, samples]): with hybrid decoding, called with the decoded
        AR prefix as soon as it exists, before the tail is decoded (time to first audio).

        Long-form: a `duration` past `max_duration` is decoded window by window (each window
        advances `extend_stride` seconds; the rest of it is the previous window's tail, kept
        fixed). A row's description may then be a list with one text per window."""
        descriptions, per_window = req.window_texts(descriptions)
        return self._generate(descriptions, None, progress, return_tokens, seed,
                              hybrid_prefix_seconds=hybrid_prefix_seconds, on_prefix=on_prefix,
                              window_texts=per_window)

    def generate_stream(self, descriptions: tp.Sequence[tp.Optional[str]], seed=None, *,
                        hybrid_prefix_seconds: tp.Optional[float] = None,
                        progress: tp.Union[bool, Progress] = False) -> tp.Iterator[tp.Tuple[str, torch.Tensor]]:
        """Iterate ('prefix', wav) as soon as the AR prefix is decoded (hybrid only),
        ('chunk', wav) as each long-form window is decoded (the chunks joined are the whole
        clip, within 1e-4 of decoding it at once: `StreamDecoder`), then ('full', wav) when
        the clip is done. Generation runs on a worker thread; an error there is raised here."""
        descriptions, per_window = req.window_texts(descriptions)
        return streaming.stream(lambda put: self._generate(
            descriptions, None, progress, False, seed, hybrid_prefix_seconds=hybrid_prefix_seconds,
            on_prefix=lambda w: put(("prefix", w)), window_texts=per_window,
            on_event=streaming.chunker(self.codec, put)))

    # ------------------------------------------------------------------ infill
    def generate_infill(self, audio, sample_rate: tp.Optional[int], regions: tp.Sequence[tp.Tuple[float, float]],
                        descriptions: tp.Optional[tp.Sequence[tp.Optional[str]]] = None,
                        progress: tp.Union[bool, Progress] = False, return_tokens: bool = False,
                        seed: tp.Union[int, tp.Sequence[int], None] = None, *,
                        params: tp.Optional[DecodingParams] = None,
                        on_event: tp.Optional[events.Listener] = None):
        """Regenerate `regions` of a clip, keeping everything else.

        audio: a float waveform [B, C, samples] or [C, samples] at `sample_rate` (resampled
        and down/up-mixed to the codec's as a continuation prompt is), or an audio file path
        (sample_rate None: the file's). regions: (start, end) pairs in seconds, shared by every
        clip of the batch (clips needing different regions: call once per clip). Bounds are
        snapped outward to codec frames and, in 'nonoverlap' decoding, to whole spans
        (span_len frames, 60 ms); overlapping or touching regions are merged. The clip must
        fit one window (max_duration). Every codec frame outside the regions keeps the clip's
        encoded codes, bit for bit; returns audio [B, channels, frames · hop] decoded from
        them (and the codes [B, K, frames] with return_tokens). Errors: RegionError (empty,
        outside the clip, or covering all of it: that is `generate`), InvalidInputError
        (unreadable audio, channels, a clip longer than the window). params: this call's
        decoding options instead of the instance's (as `generate_tokens`). on_event: a listener
        of the run's typed events, as `generate_tokens`'s (raising from it cancels the run)."""
        request = self._infill_request(audio, sample_rate, regions, descriptions, seed, params)
        wav, tokens = self._infill(request, progress, on_event)
        return (wav, tokens) if return_tokens else wav

    def generate_infill_stream(self, audio, sample_rate: tp.Optional[int], regions, descriptions=None, seed=None,
                               progress: tp.Union[bool, Progress] = False):
        """As `generate_infill`, on a worker thread: yields ('full', wav) when done (an error is raised here)."""
        request = self._infill_request(audio, sample_rate, regions, descriptions, seed)   # bad input: raised now
        return streaming.stream(lambda put: self._infill(request, progress)[0])

    def _infill(self, request, progress, on_event: tp.Optional[events.Listener] = None):
        """Run a checked infill request (`_infill_request`) -> (audio, codes)."""
        codes, texts, the_plan, seeds = request
        with self._lock:
            tokens = self._tokens(texts, None, progress, seeds, params=the_plan.params, infill=(the_plan, codes),
                                  on_event=on_event)
            with torch.no_grad():
                return self.codec.decode(tokens), tokens

    def infill_plan(self, frames: int, regions: tp.Sequence[tp.Tuple[float, float]], batch: int = 1,
                    params: tp.Optional[DecodingParams] = None) -> "generate.Plan":
        """The plan of infilling `regions` (seconds) of a `frames`-frame clip (see generate_infill)."""
        params = self.params if params is None else params
        spans = req.region_frames(regions, frames, self.frame_rate)
        _, fixed = generate.snap_regions(self.config, params, frames, spans)
        return generate.plan(self.config, params, batch=batch, frames=frames, fixed=fixed, engine=self.engine,
                             rescore_fill=self.rescore.fill)

    def _infill_request(self, audio, sample_rate, regions, descriptions, seed, params=None):
        """Checks and encodes an infill request -> (codes [B, K, T], descriptions, plan, seeds)."""
        if params is not None:
            opts.check_params(params, self.config)
        if isinstance(audio, (str, os.PathLike)):
            from magnet_engine.audio import read_audio
            audio, file_rate = read_audio(audio)
            sample_rate = file_rate if sample_rate is None else sample_rate
        codes, descriptions = self._encode_clip(audio, sample_rate, descriptions, "audio", "sample_rate",
                                                max_seconds=self.max_duration)
        frames = min(codes.shape[-1], duration_frames(self.max_duration, self.frame_rate))
        codes = codes[..., :frames]
        the_plan = self.infill_plan(frames, regions, batch=codes.shape[0], params=params)
        return codes, descriptions, the_plan, req.row_seeds(seed, codes.shape[0])

    def _encode_clip(self, audio, sample_rate, descriptions, what: str, rate_name: str,
                     max_seconds: tp.Optional[float] = None) -> tp.Tuple[torch.Tensor, tp.List[tp.Optional[str]]]:
        """The one check and encode of a waveform clip (a continuation prompt, an infill clip)
        and its descriptions -> (codes [B, K, T] at the codec's rate, descriptions). what /
        rate_name: the caller's argument names, for the errors."""
        audio = req.check_clip(audio, sample_rate, what, rate_name, max_seconds)
        descriptions = req.clip_descriptions(descriptions, audio.shape[0])
        wav = self.codec.preprocess_prompt(audio.to(self.device), sample_rate)
        with torch.no_grad():
            return self.codec.encode(wav), descriptions

    def generate_unconditional(self, num_samples: int, progress: tp.Union[bool, Progress] = False,
                               return_tokens: bool = False, seed: tp.Union[int, tp.Sequence[int], None] = None):
        """Audio without text: every condition row is the null condition."""
        return self._generate([None] * req.check_num_samples(num_samples), None, progress, return_tokens, seed)

    def generate_continuation(self, prompt: torch.Tensor, prompt_sample_rate: int,
                              descriptions: tp.Optional[tp.Sequence[tp.Optional[str]]] = None,
                              progress: tp.Union[bool, Progress] = False, return_tokens: bool = False,
                              seed: tp.Union[int, tp.Sequence[int], None] = None):
        """Continue a waveform prompt [B, C, samples] or [C, samples]; its frames stay fixed."""
        prompt_codes, descriptions = self._encode_clip(prompt, prompt_sample_rate, descriptions, "prompt",
                                                       "prompt_sample_rate")
        return self._generate(descriptions, prompt_codes, progress, return_tokens, seed)

    def generate_tokens(self, descriptions: tp.Sequence[tp.Optional[str]], prompt_codes: tp.Optional[torch.Tensor] = None,
                        progress: tp.Union[bool, Progress] = False, seed: tp.Union[int, tp.Sequence[int], None] = None,
                        *, params: tp.Optional[DecodingParams] = None, duration: tp.Optional[float] = None,
                        on_prefix: tp.Optional[tp.Callable[[torch.Tensor], None]] = None,
                        on_event: tp.Optional[events.Listener] = None) -> torch.Tensor:
        """Tokens only, no codec: [B, K, T']. `prompt_codes` [B, K, P] are kept fixed.

        params / duration: this call's decoding options and length instead of the instance's
        (`set_generation_params`), which stay untouched — a service sharing one instance
        between requests passes them here rather than setting state. on_event: a listener of
        the run's typed events (`engine.events`: AR steps, stage steps with live canvas views,
        prefix ready, done); raising from it cancels the run. on_prefix: as `generate`'s
        (hybrid decoding: the decoded AR prefix audio, before the tail)."""
        descriptions = check_descriptions(descriptions)
        if params is not None:
            opts.check_params(params, self.config)
        if duration is not None:
            duration = self.check_duration(duration)
        if prompt_codes is not None:
            prompt_codes = self._check_prompt_codes(prompt_codes, len(descriptions), duration)
        progress = self._progress_for(progress)
        with self._lock:
            return self._tokens(descriptions, prompt_codes, progress, seed, params=params, duration=duration,
                                on_prefix=on_prefix, on_event=on_event)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes [B, K, T] -> waveform [B, channels, T · hop]."""
        if not isinstance(tokens, torch.Tensor):
            raise InvalidInputError(f"tokens must be an integer tensor [B, K, T], found {type(tokens).__name__}")
        with torch.no_grad():
            return self.codec.decode(tokens.to(self.device))

    def generate_audio(self, gen_tokens: torch.Tensor) -> torch.Tensor:
        """audiocraft's name for `decode`: codes [B, K, T] -> waveform [B, channels, T · hop]."""
        return self.decode(gen_tokens)


    # --------------------------------------------------------------- internals
    def _check_prompt_codes(self, codes: torch.Tensor, batch: int, duration: tp.Optional[float] = None) -> torch.Tensor:
        duration = self.duration if duration is None else duration
        codes = req.check_prompt_codes(codes, batch, self.config, duration_frames(duration, self.frame_rate), duration)
        return codes.to(self.device, torch.long)

    def _progress_for(self, progress: tp.Union[bool, Progress]) -> tp.Union[bool, Progress]:
        """progress=True reports to the custom callback when one is set (audiocraft), else to a bar."""
        if progress and not callable(progress) and self._progress_callback is not None:
            return self._progress_callback
        return progress

    def _generate(self, descriptions, prompt_codes, progress, return_tokens, seed, **hybrid):
        progress = self._progress_for(progress)
        if prompt_codes is not None:
            prompt_codes = self._check_prompt_codes(prompt_codes, len(descriptions))
        with self._lock:
            tokens = self._tokens(descriptions, prompt_codes, progress, seed, **hybrid)
            with torch.no_grad():
                wav = self.codec.decode(tokens)
        return (wav, tokens) if return_tokens else wav

    def _tokens(self, descriptions, prompt_codes, progress, seed, hybrid_prefix_seconds=None,
                on_prefix=None, params: tp.Optional[DecodingParams] = None,
                duration: tp.Optional[float] = None, on_event: tp.Optional[events.Listener] = None,
                window_texts=None, infill: tp.Optional[tp.Tuple["generate.Plan", torch.Tensor]] = None) -> torch.Tensor:
        """window_texts: [B][windows] texts (long-form, one per window); infill: (its plan, the clip's codes)."""
        seeds = req.row_seeds(seed, len(descriptions))
        options = self.hybrid
        if hybrid_prefix_seconds is not None:
            options = dataclasses.replace(options, prefix_seconds=hybrid_prefix_seconds).validate()
        rescorer = None
        if self.rescorer is not None and self.rescore.weight != 1.0:
            rescorer = BoundRescorer(self.rescorer, self.rescore, descriptions)
        if infill is not None:
            the_plan, canvas = infill
        else:
            canvas = None
            the_plan = self.plan(len(descriptions), duration, params=params, options=options,
                                 prompt_frames=0 if prompt_codes is None else prompt_codes.shape[-1])
        if window_texts is not None and len(window_texts[0]) != len(the_plan.phases):
            raise InvalidInputError(f"{len(window_texts[0])} texts per row for {len(the_plan.phases)} windows")
        bar = streaming.ProgressBar(the_plan.total_steps) if progress and not callable(progress) else None
        listener = streaming.fan_out([
            on_event, events.progress_listener(progress) if callable(progress) else bar,
            streaming.prefix_audio(self.codec, on_prefix) if on_prefix is not None else None])
        try:
            with torch.no_grad():
                cond = self.conditioner.encode(descriptions).embeds.to(self.device)
                if window_texts is not None:
                    texts = [[row[i] for row in window_texts] for i in range(len(the_plan.phases))]
                    cond = [self.conditioner.encode(t).embeds.to(self.device) for t in texts]
                    if rescorer is not None:   # each window scored against its own text
                        rescorer = [BoundRescorer(self.rescorer, self.rescore, t) for t in texts]
                ar_cond = None
                if the_plan.mode == "two_model":
                    ar_cond = self.prefix_model.conditioner.encode(descriptions).embeds.to(self.device)
                generator = None
                if self.engine == "reference":
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed(seeds[0])
                prefix = None if self.prefix_model is None else self.prefix_model.runtime
                models = self._runtimes.models(the_plan, prefix)
                return generate.run(the_plan, models, cond, seeds=seeds, prompt=prompt_codes,
                                    canvas=canvas, ar_cond=ar_cond, hook=rescorer, listener=listener,
                                    generator=generator)
        finally:
            if bar is not None:
                bar.close()

    def reference_lm(self) -> MagnetLM:
        """The fp32 LM the reference loop runs: this instance's own while its transformer is
        fp32; once the fast runtime has cast it to a lower precision (in place), a second one
        loaded from the checkpoint on first use — held only by those who ask for it."""
        linear = self._lm.transformer.layers[0].linear1
        if isinstance(linear, torch.nn.Linear) and linear.weight.dtype == torch.float32:
            return self._lm
        if self._reference_lm is None:
            if self.source is None:
                raise InvalidOptionError(f"the reference loop runs fp32 weights; this instance holds {self.precision} "
                                         "ones and no checkpoint directory to reload from (use from_pretrained)")
            loaded = ckpt.load_lm_checkpoint(self.source / ckpt.LM_FILE, frame_rate=round(self.frame_rate))
            self._reference_lm = ckpt.build_lm(loaded, self.device)
        return self._reference_lm

    def memory_stats(self) -> tp.Dict[str, tp.Any]:
        """Bytes of the weights per component, in the dtype each runs in (a tensor shared by
        two components, such as a T5 used by an external LM too, counted once, at the first),
        and the process's memory: resident set now and at its peak (Linux /proc; peak only
        elsewhere), and on CUDA the allocator's current and peak allocated / reserved bytes.

            {"weights_bytes": {"lm": ..., "conditioner": ..., "codec": ..., ...},
             "weights_total_bytes": ..., "rss_bytes": ..., "peak_rss_bytes": ..., "device": "cpu"}
        """
        components: tp.Dict[str, torch.nn.Module] = {"lm": self._lm, "conditioner": self.conditioner,
                                                     "codec": self.codec}
        if self._reference_lm is not None:
            components["reference_lm"] = self._reference_lm
        for (name, _), external in self._external.items():
            components[f"external_lm:{name}"] = external.lm
            components[f"external_conditioner:{name}"] = external.conditioner
        return memory_stats(components, self.device)

    def slot_runtime(self, rows: int, text_len: int) -> SlotRuntime:
        """Slots (continuous batching, engine/slots.py) over the fast runtime: `rows` rows of up
        to one window of frames and `text_len` text tokens each, compiled and graphed as this
        model's steps are; then on its ladder of step shapes (`default_ladders`), which
        `SlotRuntime.warm()` compiles and captures ahead of the first row. Eager, every step
        has its exact shape (the cheapest without anything to compile or capture)."""
        frames = duration_frames(self.max_duration, self.frame_rate)
        ladders = default_ladders(rows, frames, text_len, self.device) if self.compile or self.cuda_graphs else {}
        return SlotRuntime(self._fast_runtime(), rows, frames, text_len, compile=self.compile,
                           cuda_graphs=self.cuda_graphs, **ladders)

    def _fast_runtime(self):
        """The fast runtime (built on first use; it casts the engine LM in place to its precision)."""
        return self._runtimes.masked()
