"""Which implementation of each kernel runs: Triton (CUDA tensors, or CPU tensors when the
kernels were decorated under TRITON_INTERPRET=1 and it is asked for explicitly), C++
(`magnet_engine._C`, CPU), or torch; and the torch.library registration they share.

Contract
--------
    resolve(device, impl=None) -> Impls        # once per runtime, outside any traced code
    pick(impl, device) -> Impls                # what every kernel entry point does with `impl`

`impl` is None (the best available for the device), "triton", "cpp" or "torch"; an
explicit impl that cannot run raises. `resolve` does the imports and checks once per
(device type, impl) and reports the choice once through the `magnet_engine` logger. The
result, a frozen `Impls`, is what the engine passes as `impl=` to every kernel: a kernel
given an `Impls` reads one attribute, so a step traced by torch.compile holds no import, no
environment read and no cache lookup. A str or None is resolved per call (a cached
lookup eagerly; at trace time under torch.compile, see `resolve`).

Every kernel is a torch custom op in the `magnet_engine` namespace (the op names are in
each kernel module): the torch and C++ implementations behind one opaque op taking the
impl name, the Triton kernel behind a `torch.library.triton_op` (inductor sees the launch).
Opaque ops also keep compiled results bit-identical to eager ones: inductor never re-derives
a softmax or a log that the tokens depend on. Eagerly the entry points call the function
behind the op directly (`call`), as the dispatcher costs more than a small kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import typing as tp

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


@functools.lru_cache(maxsize=None)
def triton_interpreted() -> bool:
    """True when @triton.jit makes interpreted kernels (TRITON_INTERPRET=1 when the kernel
    modules were imported): they then run on CPU tensors. Asked of Triton itself, once."""
    if not triton_available():
        return False
    import triton

    return is_interpreted(triton.jit(_probe))


def _probe():
    pass


def is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def cpp_module():
    """The compiled extension, or None when it was not built."""
    try:
        return importlib.import_module("magnet_engine._C")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    try:
        importlib.import_module("flash_attn")
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Impls:
    """The implementation of each kernel on one device type, resolved once.

    requested: the impl asked for (None: automatic; then a full-width band routes to
    full attention). stride1 re-masking has no Triton kernel (torch is sync-free on CUDA).
    full_attention: 'flash' (flash-attn, CUDA fp16/bf16 when installed), 'sdpa' or 'triton'.
    """
    device_type: str
    requested: tp.Optional[str]
    sample_tokens: str
    remask: str
    remask_stride1: str
    banded_attention: str
    full_attention: str


@functools.lru_cache(maxsize=None)
def _resolve(device_type: str, impl: tp.Optional[str]) -> Impls:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, found {impl!r}")
    if impl == "triton" and not (triton_available() and (device_type == "cuda" or triton_interpreted())):
        raise RuntimeError(f"Triton needs a CUDA tensor or kernels decorated under TRITON_INTERPRET=1 "
                           f"(device {device_type})")
    if impl == "cpp" and (cpp_module() is None or device_type != "cpu"):
        raise RuntimeError("the C++ path needs CPU tensors and the built extension magnet_engine._C")
    chosen = impl
    if chosen is None:
        if device_type == "cuda" and triton_available():
            chosen = "triton"
        elif device_type == "cpu" and cpp_module() is not None:
            chosen = "cpp"
        else:
            chosen = "torch"
    if chosen == "triton":
        full = "triton" if impl == "triton" else ("flash" if flash_attn_available() else "sdpa")
    else:
        full = "flash" if impl is None and device_type == "cuda" and flash_attn_available() else "sdpa"
    impls = Impls(device_type, impl, sample_tokens=chosen, remask=chosen,
                  remask_stride1="torch" if chosen == "triton" else chosen,
                  banded_attention=chosen, full_attention=full)
    if impl is None:
        hint = ""
        if chosen == "torch" and device_type == "cpu":
            hint = " (C++ extension not built: `pip install .` with a C++ compiler builds it)"
        logger.info("magnet_engine: kernels on %s use %s%s", device_type, impls, hint)
    return impls


@torch.compiler.assume_constant_result
def resolve(device: tp.Union[torch.device, str], impl: tp.Optional[str] = None) -> Impls:
    """The implementations for tensors on `device`; raises when an explicit impl cannot run.
    Under torch.compile it runs at trace time and its result is a constant of the graph, so
    even a kernel given a name traces without a break; the engine still resolves once."""
    return _resolve(torch.device(device).type, impl)


def pick(impl: tp.Union[Impls, str, None], device: torch.device) -> Impls:
    """`impl` as every kernel takes it: a resolved Impls as is, else resolved for `device`."""
    if isinstance(impl, Impls):
        return impl
    return resolve(device, impl)


def call(op, fn: tp.Callable, *args):
    """`op(*args)` while torch.compile or torch.export traces (they see the op), else
    `fn(*args)`, the function the op runs: the same result, without the dispatcher's cost
    in eager loops (~40 us a call against ~3 us direct, measured on the 2-core CI CPU)."""
    if torch.compiler.is_compiling():
        return op(*args)
    return fn(*args)


def register_triton_op(name: str, kernel, fn: tp.Callable, *, mutates_args: tp.Tuple[str, ...],
                       fake: tp.Callable):
    """`fn` (whose launches go through torch.library.wrap_triton) as the op `name`: a
    triton_op for compiled kernels; an opaque custom op with `fake` when `kernel` is
    interpreted (the interpreter cannot run on fake or functional tensors)."""
    if is_interpreted(kernel):
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, fn, mutates_args=mutates_args)
