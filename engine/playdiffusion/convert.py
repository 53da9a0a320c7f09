"""One-time conversion of a trusted PlayDiffusion pickle to `<name>.safetensors`.

    python -m magnet_engine.engine.playdiffusion.convert MODEL_DIR/v090_g_01105000 [...]

This is the only place in the package that unpickles with `weights_only=False`, which can
run code from the file: run it yourself, on files you trust, once. The output holds the
tensors (named '<top-level key>/<key>') and the configs as JSON metadata; files.py reads it
in place of the pickle, with no unpickling at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def _plain(value):
    """Configs as JSON: dict subclasses (AttrDict) to dicts, numpy scalars to numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not torch.is_tensor(value):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot convert a {type(value).__qualname__} to JSON")


def convert(src: Path) -> Path:
    from safetensors.torch import save_file

    package = torch.load(src, map_location="cpu", weights_only=False)  # the user's explicit, trusted step
    if not isinstance(package, dict):
        raise TypeError(f"{src}: expected a dict at the top level, found {type(package).__qualname__}")
    tensors, values = {}, {}
    for top, value in package.items():
        if torch.is_tensor(value):
            tensors[str(top)] = value.contiguous()
        elif isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
            tensors.update({f"{top}/{k}": v.contiguous() for k, v in value.items()})
        else:
            values[str(top)] = _plain(value)
    dst = src.with_name(src.name + ".safetensors")
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"playdiffusion": json.dumps({"values": values})})
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for src in args.files:
        print(f"{src} -> {convert(src)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
