"""Read and write MAGNeT checkpoints in the published Hugging Face layout (spec §8).

A model directory (or Hub repo such as `facebook/magnet-small-10secs`) holds
    state_dict.bin              {'best_state': LM state, 'xp.cfg': YAML, 'version', 'exported'}
    compression_state_dict.bin  {'best_state': EnCodec state, 'xp.cfg': YAML, ...}
                                or {'pretrained': 'facebook/encodec_32khz'}
Both are torch pickles, always read with `weights_only=True`. The writer produces the same
layout (random weights for tests and the demo) so that the loader cannot tell them apart.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import typing as tp
import zipfile
from pathlib import Path

import torch

from magnet_engine.engine.config import ModelConfig, parse_yaml_config
from magnet_engine.engine.files import atomic_write
from magnet_engine.errors import CheckpointError, ModelNotFoundError

LM_FILE = "state_dict.bin"
CODEC_FILE = "compression_state_dict.bin"
CONDITIONER_PREFIX = "condition_provider.conditioners.description.output_proj."

# The published models (spec §8); used to recognise a name and for random-weight presets.
ARCHITECTURES = {
    "tiny": dict(dim=64, num_heads=4, num_layers=3),
    "small": dict(dim=1024, num_heads=16, num_layers=24),
    "medium": dict(dim=1536, num_heads=24, num_layers=48),
}


def resolve_model_dir(name_or_dir: tp.Union[str, os.PathLike]) -> Path:
    """A local directory, or a Hub id resolved through huggingface_hub (cache first)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        missing = [f for f in (LM_FILE, CODEC_FILE) if not (path / f).is_file()]
        if missing:
            raise ModelNotFoundError(f"{path}: missing {', '.join(missing)} (expected the Hugging Face "
                                     f"layout: {LM_FILE} and {CODEC_FILE})")
        return path
    name = str(name_or_dir)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"{name!r} is neither a model directory nor a Hub id like "
                                 "'facebook/magnet-small-10secs'")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise ModelNotFoundError(f"{name!r} is not a local directory and huggingface_hub is not installed") from exc
    files = {}
    for filename in (LM_FILE, CODEC_FILE):
        try:
            try:
                files[filename] = hf_hub_download(name, filename, local_files_only=True)
            except Exception:
                files[filename] = hf_hub_download(name, filename)
        except Exception as exc:
            raise ModelNotFoundError(f"cannot fetch {filename} of {name!r} from the Hugging Face Hub or its "
                                     f"cache ({type(exc).__name__}: {exc}); pass a local directory instead") from exc
    return Path(files[LM_FILE]).parent


def load_package(path: Path) -> dict:
    """torch.load(weights_only=True) with each failure mapped to a typed error."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"checkpoint file not found: {path}")
    try:
        pkg = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global that is not a tensor / plain container.
        raise CheckpointError(f"{path.name}: refused to load, the pickle holds more than plain tensors "
                              f"and containers ({str(exc).splitlines()[0][:300]})") from exc
    except PermissionError as exc:
        raise CheckpointError(f"{path}: not readable ({exc.strerror}); check the file's permissions") from exc
    except (EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path.name}: truncated or corrupt file ({exc})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # the unpickler fails in many ways on garbage bytes
        raise CheckpointError(f"{path.name}: truncated or corrupt file "
                              f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    if not isinstance(pkg, dict):
        raise CheckpointError(f"{path.name}: expected a dict package, found {type(pkg).__name__}")
    return pkg


@dataclasses.dataclass
class LMCheckpoint:
    cfg: ModelConfig
    lm_state: tp.Dict[str, torch.Tensor]           # keys of MagnetLM
    output_proj: tp.Tuple[torch.Tensor, torch.Tensor]  # conditioner Linear(d_t5 -> D): weight, bias
    xp_cfg: tp.Any                                  # the parsed YAML, for fields beyond ModelConfig


def expected_lm_shapes(cfg: ModelConfig) -> tp.Dict[str, tp.Tuple[int, ...]]:
    """Every LM key and its shape, biases as configured (spec §8 table)."""
    d, f, c = cfg.dim, cfg.ffn_dim, cfg.card
    shapes: tp.Dict[str, tp.Tuple[int, ...]] = {}
    for k in range(cfg.n_q):
        shapes[f"emb.{k}.weight"] = (c + 1, d)
        shapes[f"linears.{k}.weight"] = (c, d)
        if cfg.bias_proj:
            shapes[f"linears.{k}.bias"] = (c,)
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        for attn in ("self_attn", "cross_attention"):
            shapes[p + f"{attn}.in_proj_weight"] = (3 * d, d)
            shapes[p + f"{attn}.out_proj.weight"] = (d, d)
            if cfg.bias_attn:
                shapes[p + f"{attn}.in_proj_bias"] = (3 * d,)
                shapes[p + f"{attn}.out_proj.bias"] = (d,)
        shapes[p + "linear1.weight"] = (f, d)
        shapes[p + "linear2.weight"] = (d, f)
        if cfg.bias_ff:
            shapes[p + "linear1.bias"] = (f,)
            shapes[p + "linear2.bias"] = (d,)
        for norm in ("norm1", "norm2", "norm_cross"):
            shapes[p + f"{norm}.weight"] = (d,)
            shapes[p + f"{norm}.bias"] = (d,)
    shapes["out_norm.weight"] = (d,)
    shapes["out_norm.bias"] = (d,)
    return shapes


def check_state(state: tp.Mapping[str, tp.Any], expected: tp.Mapping[str, tp.Tuple[int, ...]], what: str) -> None:
    """Missing, unexpected, non-tensor or misshaped keys -> CheckpointError naming them."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{what}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{what}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{what}: `{key}` is a {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"{what}: `{key}` has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if not value.is_floating_point():
            raise CheckpointError(f"{what}: `{key}` has dtype {value.dtype}, expected a floating-point tensor")


def read_lm_package(pkg: dict, frame_rate: tp.Optional[int], what: str = LM_FILE) -> LMCheckpoint:
    """Validate an LM package and split it into the LM state and the conditioner projection."""
    for field in ("best_state", "xp.cfg"):
        if field not in pkg:
            raise CheckpointError(f"{what}: missing top-level entry {field!r} (found {sorted(pkg)})")
    state = pkg["best_state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: 'best_state' is a {type(state).__name__}, expected a dict of tensors")
    xp_cfg = parse_yaml_config(pkg["xp.cfg"], f"{what} xp.cfg")
    cfg = ModelConfig.from_xp_cfg(xp_cfg, frame_rate=frame_rate)
    proj_w, proj_b = CONDITIONER_PREFIX + "weight", CONDITIONER_PREFIX + "bias"
    for key in (proj_w, proj_b):
        if not isinstance(state.get(key), torch.Tensor):
            raise CheckpointError(f"{what}: missing key `{key}` (the text conditioner's output projection)")
    weight, bias = state[proj_w], state[proj_b]
    if weight.dim() != 2 or weight.shape[0] != cfg.dim or tuple(bias.shape) != (cfg.dim,):
        raise CheckpointError(f"{what}: `{proj_w}` has shape {tuple(weight.shape)} / bias {tuple(bias.shape)}, "
                              f"expected ({cfg.dim}, d_t5) / ({cfg.dim},)")
    lm_state = {k: v for k, v in state.items() if not k.startswith("condition_provider.")}
    check_state(lm_state, expected_lm_shapes(cfg), what)
    return LMCheckpoint(cfg, lm_state, (weight, bias), xp_cfg)


def atomic_save(obj: tp.Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename over `path`
    (engine/files.py: the mode of an existing file kept, a non-regular file refused)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(directory: tp.Union[str, os.PathLike], lm_package: dict, codec_package: dict) -> Path:
    """Write a model directory in the published layout (each file atomically)."""
    directory = Path(directory)
    atomic_save(lm_package, directory / LM_FILE)
    atomic_save(codec_package, directory / CODEC_FILE)
    return directory


XP_CFG_TEMPLATE = """\
device: cuda
dtype: float32
autocast: true
autocast_dtype: float16
seed: {seed}
efficient_attention_backend: xformers
dora:
  dir: /checkpoint/${{oc.env:USER}}/experiments/audiocraft/outputs
  use_rendezvous: false
dataset:
  batch_size: 64
  segment_duration: {duration}
  return_info: true
generate:
  every: 25
  audio:
    format: wav
    sample_rate: ${{sample_rate}}
  lm:
{lm_generate}classifier_free_guidance:
  training_dropout: 0.3
  inference_coef: 3.0
fuser:
  cross_attention_pos_emb: false
  cross_attention_pos_emb_scale: 1
  sum: []
  prepend: []
  cross: [description]
  input_interpolate: []
conditioners:
  description:
    model: t5
    t5:
      name: {t5_name}
      finetune: false
      word_dropout: 0.3
      normalize_text: false
sample_rate: {sample_rate}
channels: 1
compression_model_checkpoint: //pretrained/facebook/encodec_{khz}khz
compression_model_n_q: null
lm_model: {lm_model}
codebooks_pattern:
  modeling: {modeling}
  delay:
    delays: [0, 1, 2, 3]
    flatten_first: 0
    empty_initial: 0
  parallel:
    empty_initial: -1
transformer_lm:
  dim: {dim}
  num_heads: {num_heads}
  num_layers: {num_layers}
  hidden_scale: 4
  n_q: {n_q}
  card: {card}
  dropout: 0.0
  emb_lr: null
  activation: gelu
  norm_first: true
  bias_ff: false
  bias_attn: false
  bias_proj: false
  past_context: null
  causal: {causal}
  custom: false
  memory_efficient: true
  attention_as_float32: false
  layer_scale: null
  positional_embedding: sin
  xpos: false
  checkpointing: none
  weight_init: gaussian
  norm: layer_norm
  cross_attention: false
  qk_layer_norm: false
  qk_layer_norm_cross: false
  kv_repeat: 1
  two_step_cfg: false
{magnet_fields}"""

_MAGNET_GENERATE = """\
    use_sampling: true
    temp: 3.0
    top_k: 0
    top_p: 0.9
    max_cfg_coef: 10.0
    min_cfg_coef: 1.0
    decoding_steps: [{steps}, 10, 10, 10]
    anneal_temp: true
    span_scoring: max
    span_arrangement: nonoverlap
"""
_AR_GENERATE = """\
    use_sampling: true
    temp: 1.0
    top_k: 250
    top_p: 0.0
"""
_MAGNET_FIELDS = """\
  subcodes_context: {subcodes_context}
  segment_duration: ${{dataset.segment_duration}}
  span_len: ${{masking.span_len}}
masking:
  span_len: {span_len}
"""

# kind -> (lm_model, codebooks_pattern.modeling, transformer_lm.causal)
LM_KINDS = {
    "magnet": ("transformer_lm_magnet", "parallel", "false"),
    # hybrid-MAGNeT: MAGNeT's network and masking fields, MusicGen's delay layout
    "hybrid": ("transformer_lm_magnet", "delay", "false"),
    # MusicGen / AudioGen: the plain causal transformer LM, delay layout, no masking section
    "musicgen": ("transformer_lm", "delay", "true"),
}


def random_lm_package(dim: int, num_heads: int, num_layers: int, *, d_t5: int, n_q: int = 4, card: int = 2048,
                      duration: float = 10, sample_rate: int = 32000, span_len: int = 3,
                      subcodes_context: int = 5, t5_name: str = "t5-base", seed: int = 0,
                      dtype: torch.dtype = torch.float32, kind: str = "magnet") -> dict:
    """An LM package with seeded random weights, in the exporter's exact layout.

    kind: 'magnet' (plain MAGNeT), 'hybrid' (hybrid-MAGNeT: delay layout) or 'musicgen'
    (a MusicGen / AudioGen LM: causal, delay layout, no masking fields)."""
    if kind not in LM_KINDS:
        raise ValueError(f"kind must be one of {sorted(LM_KINDS)}, found {kind!r}")
    lm_model, modeling, causal = LM_KINDS[kind]
    steps = 20 if duration <= 10 else 60
    magnet = kind != "musicgen"
    xp_cfg = XP_CFG_TEMPLATE.format(
        seed=seed, duration=duration if duration != int(duration) else int(duration),
        t5_name=t5_name, sample_rate=sample_rate, khz=sample_rate // 1000, dim=dim, num_heads=num_heads,
        num_layers=num_layers, n_q=n_q, card=card, lm_model=lm_model, modeling=modeling, causal=causal,
        lm_generate=(_MAGNET_GENERATE.format(steps=steps) if magnet else _AR_GENERATE),
        magnet_fields=(_MAGNET_FIELDS.format(subcodes_context=subcodes_context, span_len=span_len)
                       if magnet else ""))
    cfg = ModelConfig.from_xp_cfg(parse_yaml_config(xp_cfg), frame_rate=50)
    gen = torch.Generator().manual_seed(seed)
    state: tp.Dict[str, torch.Tensor] = {
        CONDITIONER_PREFIX + "weight": torch.randn(dim, d_t5, generator=gen) / d_t5 ** 0.5,
        CONDITIONER_PREFIX + "bias": torch.randn(dim, generator=gen) * 0.02,
    }
    for key, shape in expected_lm_shapes(cfg).items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm_cross.weight", "out_norm.weight")):
            value = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            value = 0.02 * torch.randn(shape, generator=gen)
        else:  # gaussian init scaled by fan-in, as audiocraft's weight_init='gaussian' roughly does
            value = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        state[key] = value.to(dtype)
    return {"best_state": state, "xp.cfg": xp_cfg, "version": "1.3.0", "exported": True}
