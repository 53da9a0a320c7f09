"""Helpers shared by the kernel tests (test_kernels_*.py)."""
import pytest

from magnet_engine.kernels import backend


def skip_unless_available(impl: str) -> None:
    """Skip a test of one kernel implementation that this run cannot execute: the C++ one
    without the built extension, the Triton one unless it runs interpreted on CPU tensors."""
    if impl == "cpp" and backend.cpp_module() is None:
        pytest.skip("C++ extension magnet_engine._C not built (python setup.py build_ext --inplace)")
    if impl == "triton" and not (backend.triton_available() and backend.triton_interpreted()):
        pytest.skip("Triton not installed, or TRITON_INTERPRET is not 1 on this CPU-only run")
