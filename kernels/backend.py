"""Which implementation of a kernel runs: Triton (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 when asked for explicitly), C++ (`magnet_engine._C`, CPU), or torch.

Every kernel module exposes one dispatch function taking `impl=None | "triton" | "cpp" |
"torch"`; None picks the best available for the tensors' device. The choice made for a
device is reported once through the `magnet_engine` logger, never per call.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger("magnet_engine")
IMPLS = ("triton", "cpp", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def cpp_module():
    """The compiled extension, or None when it was not built."""
    try:
        return importlib.import_module("magnet_engine._C")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _say_once(kernel: str, device_type: str, impl: str) -> None:
    hint = ""
    if impl == "torch" and device_type == "cpu" and cpp_module() is None:
        hint = " (C++ extension not built: `pip install .` with a C++ compiler builds it)"
    logger.info("magnet_engine: %s on %s uses the %s implementation%s", kernel, device_type, impl, hint)


def choose(kernel: str, device: torch.device, impl: str | None, available: tuple[str, ...] = IMPLS) -> str:
    """Resolve `impl` for a kernel on `device`; an explicit impl that cannot run raises."""
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"{kernel}: impl must be one of {IMPLS} or None, found {impl!r}")
        if impl not in available:
            raise ValueError(f"{kernel}: no {impl} implementation (available: {available})")
        if impl == "triton" and not (triton_available() and (device.type == "cuda" or triton_interpreted())):
            raise RuntimeError(f"{kernel}: Triton needs a CUDA tensor or TRITON_INTERPRET=1 (device {device})")
        if impl == "cpp" and (cpp_module() is None or device.type != "cpu"):
            raise RuntimeError(f"{kernel}: the C++ path needs CPU tensors and the built extension magnet_engine._C")
        return impl
    if device.type == "cuda" and "triton" in available and triton_available():
        chosen = "triton"
    elif device.type == "cpu" and "cpp" in available and cpp_module() is not None:
        chosen = "cpp"
    else:
        chosen = "torch"
    _say_once(kernel, device.type, chosen)
    return chosen
