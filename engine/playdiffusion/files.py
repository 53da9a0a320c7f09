"""PlayDiffusion's six checkpoint files, read safely (docs/model.md §13.2).

A model directory (or the Hub repo `PlayHT/inpainter`) holds, under the upstream names:

    last_250k_fixed.pkl                       inpainter     torch pickle {"config", "model"}
    xlsr2_1b_v2_custom.pt                     XLS-R encoder torch pickle, fairseq2 state dict
    kmeans_10k.npy                            k-means       numpy [A, 1280] float32 (no pickle)
    voice_encoder_1992000.pt                  voice encoder torch pickle {"config", "model_state_dict"}
    v090_g_01105000                           vocoder       torch pickle {"params", "generator"}
    tokenizer-multi_bpe16384_merged_extended_58M.json   text BPE (tokenizers JSON)

Every pickle is read with `weights_only=True`: torch's restricted unpickler builds only
tensors and plain containers, plus the allow-list below, so nothing in a file can run code.
Upstream reads the vocoder and voice encoder with `weights_only=False`; if a real file holds
another class (a training-code `AttrDict`, say), loading stops with a CheckpointError that
names it and gives the one-time conversion command (convert.py), which the user runs
knowingly on a file they trust; it writes `<name>.safetensors`, which is then read instead.
"""
from __future__ import annotations

import json
import os
import pickle
import typing as tp
import zipfile
from pathlib import Path

import numpy as np
import torch

from magnet_engine.engine import hub
from magnet_engine.engine.errors import CheckpointError, ModelNotFoundError

FILES = {
    "inpainter": "last_250k_fixed.pkl",
    "speech_tokenizer": "xlsr2_1b_v2_custom.pt",
    "kmeans": "kmeans_10k.npy",
    "voice_encoder": "voice_encoder_1992000.pt",
    "vocoder": "v090_g_01105000",
    "tokenizer": "tokenizer-multi_bpe16384_merged_extended_58M.json",
}
# Not upstream: the tiny fixtures' XLS-R config overrides (upstream hard-codes xlsr2_1b_v2).
XLSR_SIDECAR = "xlsr_tiny_config.json"
PICKLES = ("inpainter", "speech_tokenizer", "voice_encoder", "vocoder")
CONVERTED_SUFFIX = ".safetensors"

# Classes beyond torch's own weights_only set that a config may hold: numpy scalars and
# dtypes (a hyper-parameter saved as np.float64), under numpy 1 and numpy 2 module names.
# Each builds data, never code.
_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
_DTYPES = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
ALLOWED_GLOBALS = (
    [(_SCALAR, "numpy.core.multiarray.scalar"), (_SCALAR, "numpy._core.multiarray.scalar"), np.dtype]
    + [(d, f"numpy.dtypes.{d.__name__}") for d in _DTYPES]
)
ALLOWED_NAMES = frozenset(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                          for g in ALLOWED_GLOBALS)


def convert_command(path: Path) -> str:
    return f"python -m magnet_engine.engine.playdiffusion.convert {path}"


def resolve_dir(name_or_dir: tp.Union[str, os.PathLike]) -> Path:
    """A local directory, or a Hub id fetched with huggingface_hub (cache first)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"PlayDiffusion model: {name!r} is neither a directory nor a Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ModelNotFoundError(f"huggingface_hub is needed to fetch {name!r}: {e}") from None
    patterns = list(FILES.values()) + [v + CONVERTED_SUFFIX for v in FILES.values()] + [XLSR_SIDECAR]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    timeout = hub.check_reachable(name)
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, etag_timeout=timeout))
    except Exception as e:
        raise ModelNotFoundError(f"PlayDiffusion model {name!r}: not a local directory and not fetched from the "
                                 f"Hub ({type(e).__name__}: {e})") from None


def component_path(root: Path, component: str) -> Path:
    path = root / FILES[component]
    if not path.exists() and not path.with_name(path.name + CONVERTED_SUFFIX).exists():
        raise ModelNotFoundError(f"PlayDiffusion model directory {root} has no {component} file {FILES[component]!r}")
    return path


def load_pickle(path: Path) -> tp.Any:
    """torch.load(weights_only=True) with the allow-list; a converted `.safetensors` twin wins."""
    converted = path.with_name(path.name + CONVERTED_SUFFIX)
    if converted.exists():
        return load_converted(converted)
    if not path.exists():
        raise ModelNotFoundError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip checkpoint (truncated, corrupt, or a legacy pickle); "
                              f"if you trust it, convert it once with: {convert_command(path)}")
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable torch checkpoint ({type(e).__name__}: {e})") from None
    refused = sorted(unsafe - ALLOWED_NAMES)
    if refused:
        raise CheckpointError(f"{path}: holds classes that a weights-only load does not build: {', '.join(refused)}. "
                              f"Nothing was executed. If you trust the file, convert it once with: "
                              f"{convert_command(path)}")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read with weights_only=True ({str(e).splitlines()[0][:300]}); "
                              f"if you trust it, convert it once with: {convert_command(path)}") from None


def load_converted(path: Path) -> dict:
    """A convert.py output: tensors under '<top>/<key>', the rest as JSON in the metadata."""
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("playdiffusion", "{}"))
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, not exported everywhere
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    out: dict = dict(meta.get("values", {}))
    for name, tensor in tensors.items():
        top, _, key = name.partition("/")
        if key:
            out.setdefault(top, {})[key] = tensor
        else:
            out[top] = tensor
    return out


def load_kmeans(path: Path) -> torch.Tensor:
    """kmeans_10k.npy: [A, D] float32 centroids (rows). Read without pickle support."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a plain .npy array ({e})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise CheckpointError(f"{path}: expected float centroids [A, D], found {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_xlsr_sidecar(root: Path) -> dict:
    path = root / XLSR_SIDECAR
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("encoder_overrides", {}))
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not the expected JSON ({e})") from None
