"""Typed configs: the model config parsed from a checkpoint's `xp.cfg`, and decoding params.

`xp.cfg` is the full audiocraft training config as a YAML string, with `${...}`
interpolations left unresolved (real exports keep them). We parse it with OmegaConf and
read only the fields generation needs; each is resolved on access, so an interpolation
we never read cannot fail the load. Only plain references (`${a.b}`) resolve: the typed
configs read through `without_resolvers`, a copy in which every value that calls a resolver
(`${oc.env:USER}` in the dora section, `${oc.decode:...}`, anything registered) is a marker
that `cfg_get` refuses to read, so nothing in a checkpoint reaches the environment.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing as tp

from magnet_engine.engine.errors import ConfigError, InvalidOptionError

_MISSING = object()


def parse_yaml_config(text: str, what: str = "xp.cfg"):
    """YAML string -> OmegaConf DictConfig (interpolations resolved lazily on access)."""
    from omegaconf import OmegaConf

    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what}: expected a non-empty YAML string, found {type(text).__name__}")
    try:
        cfg = OmegaConf.create(text)
    except Exception as exc:  # omegaconf raises several unrelated types on bad YAML
        raise ConfigError(f"{what}: not valid YAML ({exc})") from exc
    if not hasattr(cfg, "keys"):
        raise ConfigError(f"{what}: expected a mapping at top level")
    return cfg


def without_resolvers(cfg):
    """A copy of a parsed config in which every string that calls a resolver is REFUSED;
    read fields from it with `cfg_get` (which refuses the marker, also when reached through a
    plain reference). Plain references still resolve."""
    from omegaconf import OmegaConf

    return OmegaConf.create(_without_resolvers(OmegaConf.to_container(cfg, resolve=False)))


REFUSED = "<refused: an OmegaConf resolver interpolation>"


def _uses_resolver(text: str) -> bool:
    """Whether a string calls a resolver (`${name:...}`, at any depth), by OmegaConf's own grammar."""
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    if "${" not in text:
        return False
    try:
        tree = grammar_parser.parse(text)
    except Exception:  # noqa: BLE001 - unparsable: OmegaConf could not resolve it either
        return True
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            return True
        stack.extend(getattr(node, "children", None) or [])
    return False


def _without_resolvers(node: tp.Any) -> tp.Any:
    """The raw config tree with every string that calls a resolver replaced by REFUSED."""
    if isinstance(node, dict):
        return {k: _without_resolvers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_resolvers(v) for v in node]
    if isinstance(node, str) and _uses_resolver(node):
        return REFUSED
    return node


def _holds_refused(value: tp.Any) -> bool:
    if isinstance(value, str):
        return REFUSED in value
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(_holds_refused(v) for v in value)


def _check_not_refused(value: tp.Any, path: str, what: str) -> None:
    if _holds_refused(value):
        raise ConfigError(f"{what}: `{path}` uses an OmegaConf resolver (${{name:...}}); a checkpoint may only "
                          "use plain ${...} references, so it is not read")


def cfg_get(cfg, path: str, default: tp.Any = _MISSING, what: str = "xp.cfg") -> tp.Any:
    """Read and resolve one dotted field of a `without_resolvers` copy; a missing field
    without default, or one that calls a resolver, is a ConfigError."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, path, default=_MISSING, throw_on_missing=False)
    except Exception as exc:
        raise ConfigError(f"{what}: cannot resolve `{path}` ({exc})") from exc
    if value is _MISSING or value is None and default is not _MISSING:
        if default is _MISSING:
            raise ConfigError(f"{what}: required field `{path}` is missing")
        return default
    if OmegaConf.is_config(value):
        try:
            value = OmegaConf.to_container(value, resolve=True)
        except Exception as exc:
            raise ConfigError(f"{what}: cannot resolve `{path}` ({exc})") from exc
    _check_not_refused(value, path, what)
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the LM computes; every field comes from the checkpoint's xp.cfg."""

    dim: int
    num_heads: int
    num_layers: int
    hidden_scale: int
    n_q: int
    card: int
    subcodes_context: int       # W: stages > 0 attend to |i - j| <= W (-1: unrestricted)
    span_len: int               # L
    segment_duration: float     # seconds the model was trained on
    frame_rate: int             # codec frames per second (50)
    sample_rate: int
    channels: int
    t5_name: str
    max_period: float = 10000.0
    bias_ff: bool = False
    bias_attn: bool = False
    bias_proj: bool = False
    lm_model: str = "transformer_lm_magnet"
    pattern: str = "parallel"   # codebooks_pattern.modeling: 'parallel' (MAGNeT) or 'delay'
    delays: tp.Tuple[int, ...] = ()  # codebooks_pattern.delay.delays, read for the 'delay' layout
    causal: bool = False        # transformer_lm.causal: true for MusicGen / AudioGen
    cfg_coef: float = 3.0       # classifier_free_guidance.inference_coef: the AR sampling CFG

    @property
    def is_autoregressive(self) -> bool:
        """A MusicGen / AudioGen LM: causal, delay layout, next-step prediction."""
        return self.lm_model == "transformer_lm"

    @property
    def is_hybrid(self) -> bool:
        """A hybrid-MAGNeT LM: MAGNeT's network in the delay layout, with an AR prefix."""
        return self.lm_model == "transformer_lm_magnet" and self.pattern == "delay"

    @property
    def max_delay(self) -> int:
        return max(self.delays) if self.delays else 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return self.hidden_scale * self.dim

    @property
    def mask_id(self) -> int:
        return self.card

    @classmethod
    def from_xp_cfg(cls, cfg, frame_rate: tp.Optional[int] = None) -> "ModelConfig":
        """Build from a parsed xp.cfg. `frame_rate` comes from the codec (the loader's rule);
        without it, `transformer_lm.compression_model_framerate` must be present."""
        cfg = without_resolvers(cfg)
        g = lambda path, default=_MISSING: cfg_get(cfg, path, default)  # noqa: E731
        lm_model = g("lm_model", "transformer_lm_magnet")
        if lm_model not in ("transformer_lm_magnet", "transformer_lm"):
            raise ConfigError(f"xp.cfg: lm_model {lm_model!r} is not a MAGNeT/MusicGen transformer LM")
        unsupported = {
            "transformer_lm.activation": ("gelu",),
            "transformer_lm.norm": ("layer_norm",),
            "transformer_lm.norm_first": (True,),
            "transformer_lm.positional_embedding": ("sin",),
            "transformer_lm.layer_scale": (None,),
            "transformer_lm.qk_layer_norm": (False,),
            "transformer_lm.qk_layer_norm_cross": (False,),
            "transformer_lm.kv_repeat": (1,),
        }
        for path, allowed in unsupported.items():
            value = g(path, allowed[0])
            if value not in allowed:
                raise ConfigError(f"xp.cfg: `{path}` = {value!r} is not supported (expected {allowed[0]!r})")
        fuser_cross = g("fuser.cross", ["description"])
        if list(fuser_cross) != ["description"] or g("fuser.prepend", []) or g("fuser.sum", []):
            raise ConfigError("xp.cfg: only a `description` condition fused by cross-attention is supported, "
                              f"found fuser={g('fuser', {})}")
        if frame_rate is None:
            frame_rate = g("transformer_lm.compression_model_framerate")
        dim, heads = int(g("transformer_lm.dim")), int(g("transformer_lm.num_heads"))
        if dim % heads:
            raise ConfigError(f"xp.cfg: dim {dim} is not divisible by num_heads {heads}")
        span_len = g("masking.span_len", None)
        if span_len is None:
            span_len = g("transformer_lm.span_len", 1)
        pattern = str(g("codebooks_pattern.modeling", "parallel"))
        n_q = int(g("transformer_lm.n_q"))
        delays: tp.Sequence[int] = ()
        if lm_model == "transformer_lm" and pattern != "delay":
            raise ConfigError(f"xp.cfg: an autoregressive LM (lm_model transformer_lm) needs the 'delay' codebooks "
                              f"pattern, found codebooks_pattern.modeling={pattern!r}")
        if pattern == "delay":
            delays = g("codebooks_pattern.delay.delays", list(range(n_q)))
            if len(delays) != n_q or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in delays):
                raise ConfigError(f"xp.cfg: codebooks_pattern.delay.delays must be {n_q} ints >= 0, found {delays}")
            for field in ("flatten_first", "empty_initial"):
                if g(f"codebooks_pattern.delay.{field}", 0) != 0:
                    raise ConfigError(f"xp.cfg: codebooks_pattern.delay.{field} != 0 is not supported")
        elif pattern != "parallel":
            raise ConfigError(f"xp.cfg: codebooks_pattern.modeling {pattern!r} is not supported "
                              "(expected 'parallel' or 'delay')")
        return cls(
            dim=dim, num_heads=heads,
            num_layers=int(g("transformer_lm.num_layers")),
            hidden_scale=int(g("transformer_lm.hidden_scale", 4)),
            n_q=n_q,
            card=int(g("transformer_lm.card")),
            subcodes_context=int(g("transformer_lm.subcodes_context", -1)),
            span_len=int(span_len),
            segment_duration=float(g("dataset.segment_duration")),
            frame_rate=int(frame_rate),
            sample_rate=int(g("sample_rate")),
            channels=int(g("channels", 1)),
            t5_name=str(g("conditioners.description.t5.name", "t5-base")),
            max_period=float(g("transformer_lm.max_period", 10000.0)),
            bias_ff=bool(g("transformer_lm.bias_ff", False)),
            bias_attn=bool(g("transformer_lm.bias_attn", False)),
            bias_proj=bool(g("transformer_lm.bias_proj", False)),
            lm_model=str(lm_model),
            pattern=pattern,
            delays=tuple(int(d) for d in delays),
            causal=bool(g("transformer_lm.causal", lm_model == "transformer_lm")),
            cfg_coef=float(g("classifier_free_guidance.inference_coef", 3.0)),
        )


def check_same_codes(other: "ModelConfig", cfg: "ModelConfig", what: str) -> None:
    """Another LM (a prefix model, a rescorer) must read and write MAGNeT's codes: the same
    codebooks, cardinality, frame rate and sample rate."""
    theirs = (other.n_q, other.card, other.frame_rate, other.sample_rate)
    mine = (cfg.n_q, cfg.card, cfg.frame_rate, cfg.sample_rate)
    if theirs != mine:
        raise InvalidOptionError(f"{what}: its codes (n_q, card, frame rate, sample rate) = {theirs} do not "
                                 f"match the MAGNeT model's {mine}")


def check_sampling_options(use_sampling, top_k, top_p, temperature, what: str = "") -> None:
    """The sampling options shared by masked and AR decoding; `what` prefixes the messages."""
    if not isinstance(use_sampling, bool):
        raise InvalidOptionError(f"{what}use_sampling must be a bool, found {use_sampling!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InvalidOptionError(f"{what}top_k must be an int >= 0, found {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        raise InvalidOptionError(f"{what}top_p must be 0 (off) or in (0, 1], found {top_p!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise InvalidOptionError(f"{what}temperature must be a finite number >= 0, found {temperature!r}")


def as_integral(value: tp.Any) -> tp.Any:
    """An int, numpy integer or integral float -> int, as audiocraft's `int(s)` (UIs such as
    gradio's Number send 20.0); anything else is returned as is for validation to refuse."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return value


SPAN_ARRANGEMENTS = ("nonoverlap", "stride1")
SPAN_SCORINGS = ("max", "prod")


# Bounds on options whose size the caller controls. The published models decode with 20-10-10-10
# steps; each step is one transformer pass and its schedule is a host-side table built before
# the loop, so an unbounded count (1e6 or 1e8 steps) would hold the model for hours and the
# host's memory. |CFG coefficient| beyond 1e4 makes (cond - uncond) * coef overflow low
# precision logits into inf and NaN; the published schedule runs from 10 down to 1.
MAX_DECODING_STEPS = 1000   # per codebook
MAX_CFG_COEF = 1e4

# Seeds key the sampler's counter-based streams, one int64 per row (kernels/rng.py): a row's
# seed lies in [0, SEED_LIMIT). A caller's seed, or one drawn for it, lies below MAX_SEED, so
# that row b of a batch, seeded with seed + b, stays in range whatever the batch.
SEED_LIMIT = 2 ** 63
MAX_SEED = 2 ** 62


@dataclasses.dataclass(frozen=True)
class DecodingParams:
    """Decoding options, with the names and defaults of `MAGNeT.set_generation_params`.

    `validate` bounds each codebook's step count by MAX_DECODING_STEPS (a server passes its
    own, lower `max_steps`), top_k by the codebook size and the CFG coefficients by
    MAX_CFG_COEF."""

    use_sampling: bool = True
    top_k: int = 0
    top_p: float = 0.9
    temperature: float = 3.0
    max_cfg_coef: float = 10.0
    min_cfg_coef: float = 1.0
    decoding_steps: tp.Tuple[int, ...] = (20, 10, 10, 10)
    span_arrangement: str = "nonoverlap"
    span_scoring: str = "max"
    anneal_temp: bool = True

    def __post_init__(self):
        # frozen: normalise through object.__setattr__; validate() judges what remains.
        object.__setattr__(self, "top_k", as_integral(self.top_k))
        steps = self.decoding_steps
        if not isinstance(steps, (str, bytes)) and isinstance(steps, tp.Iterable):
            object.__setattr__(self, "decoding_steps", tuple(as_integral(s) for s in steps))

    def validate(self, n_q: int, card: tp.Optional[int] = None,
                 max_steps: int = MAX_DECODING_STEPS) -> "DecodingParams":
        """Check every option (top_k against the codebook size `card` when given); returns
        self so calls chain."""
        def bad(msg):
            raise InvalidOptionError(msg)

        check_sampling_options(self.use_sampling, self.top_k, self.top_p, self.temperature)
        if card is not None and self.top_k > card:
            bad(f"top_k must be at most the codebook size {card} (0: off), found {self.top_k}")
        for name in ("max_cfg_coef", "min_cfg_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > MAX_CFG_COEF:
                bad(f"{name} must be a number in [-{MAX_CFG_COEF:g}, {MAX_CFG_COEF:g}], found {value!r}")
        steps = self.decoding_steps
        if not isinstance(steps, tuple):
            bad(f"decoding_steps must be a sequence of {n_q} ints, found {steps!r}")
        if len(steps) != n_q:
            bad(f"decoding_steps must have one entry per codebook ({n_q}), found {len(steps)}: {list(steps)[:8]}")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= max_steps for s in steps):
            bad(f"decoding_steps must be ints in [1, {max_steps}], found {list(steps)}")
        if self.span_arrangement not in SPAN_ARRANGEMENTS:
            bad(f"span_arrangement must be one of {SPAN_ARRANGEMENTS}, found {self.span_arrangement!r}")
        if self.span_scoring not in SPAN_SCORINGS:
            bad(f"span_scoring must be one of {SPAN_SCORINGS}, found {self.span_scoring!r}")
        if not isinstance(self.anneal_temp, bool):
            bad(f"anneal_temp must be a bool, found {self.anneal_temp!r}")
        return self

    def replace(self, **changes) -> "DecodingParams":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidOptionError(f"unknown decoding option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


def rows_per_batch(engine: tp.Optional[str], max_batch: int) -> int:
    """How many rows one generation may batch on `engine` (the names of generate.ENGINES): the
    reference loop draws every row from one generator seeded with the first row's seed, so its
    rows are not batch-invariant and it generates one row at a time; the fast runtime takes up to
    `max_batch`. The serving layers ask here."""
    return 1 if engine == "reference" else max_batch
