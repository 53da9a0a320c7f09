"""Read and write MAGNeT checkpoints in the published Hugging Face layout (docs/model.md §2).

A model directory (or Hub repo such as `facebook/magnet-small-10secs`) holds
    state_dict.bin              {'best_state': LM state, 'xp.cfg': YAML, 'version', 'exported'}
    compression_state_dict.bin  {'best_state': EnCodec state, 'xp.cfg': YAML, ...}
                                or {'pretrained': 'facebook/encodec_32khz'}
Both are torch pickles, always read with `weights_only=True`. The writer produces the same
layout (random weights for tests and the demo) so that the loader cannot tell them apart.

Weights are held once. A zip-format file (torch.save's format since torch 1.6) is memory-
mapped, copy-on-write: its tensors are views of the file's pages, read on first touch, and
become the module's parameters as they are (`load_state_dict(assign=True)` into modules
built on the meta device). A tensor that needs another dtype or device is copied one at a
time, and the file pages it was read from are handed back at once (`release_pages`), so a
load never holds the checkpoint and the model side by side. A mapped file must not be
rewritten in place while a model loaded from it lives (`atomic_save` renames: that is safe).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import pickle
import sys
import typing as tp
import zipfile
from mmap import PAGESIZE
from pathlib import Path

import torch

from magnet_engine.engine import hub
from magnet_engine.engine.config import ModelConfig, parse_yaml_config
from magnet_engine.engine.errors import CheckpointError, ModelNotFoundError
from magnet_engine.engine.files import atomic_write
from magnet_engine.engine.model import MagnetLM

LM_FILE = "state_dict.bin"
CODEC_FILE = "compression_state_dict.bin"
CONDITIONER_PREFIX = "condition_provider.conditioners.description.output_proj."

# The published models (docs/model.md §1); used to recognise a name and for random-weight presets.
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
            files[filename] = hf_hub_download(name, filename, local_files_only=True)
            continue
        except Exception:
            pass
        timeout = hub.check_reachable(name)
        try:
            files[filename] = hf_hub_download(name, filename, etag_timeout=timeout)
        except Exception as exc:
            raise ModelNotFoundError(f"cannot fetch {filename} of {name!r} from the Hugging Face Hub or its "
                                     f"cache ({type(exc).__name__}: {exc}); pass a local directory instead") from exc
    return Path(files[LM_FILE]).parent


def mappable(path: Path) -> bool:
    """True for a zip-format torch file (torch.load can memory-map it); False for a legacy
    pickle, which is read whole. The same magic-bytes test torch.load makes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def load_package(path: Path) -> dict:
    """torch.load(weights_only=True), memory-mapped when the file allows it (see the module
    docstring), with each failure mapped to a typed error."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"checkpoint file not found: {path}")
    try:
        pkg = torch.load(path, map_location="cpu", weights_only=True, mmap=mappable(path))
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


_MADV_DONTNEED = 4   # <sys/mman.h> on Linux
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release_pages(tensor: torch.Tensor) -> None:
    """Hand back the resident pages of a tensor memory-mapped from a checkpoint, once it has
    been copied elsewhere. The file mapping lives as long as any tensor of the file does (the
    embeddings kept as they are, say), so without this every page a cast read would stay in
    the process. Only whole pages inside the tensor are dropped; the mapping is private and
    never written, so a later read faults the same bytes back in from the file.
    Call it only on tensors of a mapped file (on anonymous memory it would zero them)."""
    if _LIBC is None or tensor.device.type != "cpu":
        return
    start = -(-tensor.data_ptr() // PAGESIZE) * PAGESIZE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // PAGESIZE * PAGESIZE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def place_state(state: tp.Mapping[str, torch.Tensor], device: tp.Union[str, torch.device],
                dtype: tp.Callable[[str], torch.dtype], mapped: bool) -> tp.Dict[str, torch.Tensor]:
    """Each tensor on `device` in dtype(key), one at a time: a tensor already there is kept
    as it is (no copy); a copied one of a mapped file (`mapped`) has its pages released."""
    placed = {}
    for key, value in state.items():
        placed[key] = value.to(torch.device(device), dtype(key))
        if mapped and placed[key] is not value:
            release_pages(value)
    return placed


@dataclasses.dataclass
class LMCheckpoint:
    cfg: ModelConfig
    lm_state: tp.Dict[str, torch.Tensor]           # keys of MagnetLM
    output_proj: tp.Tuple[torch.Tensor, torch.Tensor]  # conditioner Linear(d_t5 -> D): weight, bias
    xp_cfg: tp.Any                                  # the parsed YAML, for fields beyond ModelConfig
    mapped: bool = False                            # the tensors are views of a memory-mapped file


def load_lm_checkpoint(path: Path, frame_rate: tp.Optional[int]) -> LMCheckpoint:
    """state_dict.bin, validated (`read_lm_package`), its tensors mapped from the file when it is a zip."""
    checkpoint = read_lm_package(load_package(path), frame_rate, what=Path(path).name)
    checkpoint.mapped = mappable(path)
    return checkpoint


def build_lm(checkpoint: LMCheckpoint, device: tp.Union[str, torch.device] = "cpu",
             dtype: torch.dtype = torch.float32, norm_dtype: tp.Optional[torch.dtype] = None) -> MagnetLM:
    """The LM of a checkpoint on `device`, its transformer in `dtype` (its layer norms in
    `norm_dtype`, default `dtype`: fp32 for the mixed precisions) and the rest (embeddings,
    output norm, heads) in fp32, as the reference's autocast (docs/model.md §4). The modules are built
    on the meta device and take the checkpoint's tensors as their parameters: nothing is
    allocated twice, and fp32 weights on the CPU stay the mapped file pages."""
    with torch.device("meta"):
        lm = MagnetLM(checkpoint.cfg)
    norm_dtype = dtype if norm_dtype is None else norm_dtype

    def dtype_of(key: str) -> torch.dtype:
        if not key.startswith("transformer."):
            return torch.float32
        return norm_dtype if ".norm" in key else dtype
    state = place_state(checkpoint.lm_state, device, dtype_of, checkpoint.mapped)
    lm.load_state_dict(state, strict=True, assign=True)
    return lm.eval().requires_grad_(False)


def expected_lm_shapes(cfg: ModelConfig) -> tp.Dict[str, tp.Tuple[int, ...]]:
    """Every LM key and its shape, biases as configured (docs/model.md §2.2 table)."""
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
