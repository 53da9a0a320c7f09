"""Shared test set-up. Triton kernels run on CPU tensors under its interpreter here;
the flag must be set before triton decorates any kernel, hence at conftest import."""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def fixtures_dir() -> Path:
    return Path(os.environ.get("MAGNET_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    path = fixtures_dir()
    if not (path / "golden.pt").exists():
        pytest.skip(f"reference fixtures not found at {path} (set MAGNET_FIXTURES)")
    return path


@pytest.fixture(scope="session")
def golden(fixtures):
    return torch.load(fixtures / "golden.pt", weights_only=True)


@pytest.fixture(scope="session")
def fixture_lm(fixtures):
    """The fixtures' LM checkpoint, loaded strictly."""
    from magnet_engine.engine import checkpoint as ckpt
    from magnet_engine.engine.model import MagnetLM

    loaded = ckpt.read_lm_package(ckpt.load_package(fixtures / "checkpoint" / ckpt.LM_FILE), frame_rate=50)
    lm = MagnetLM(loaded.cfg)
    lm.load_state_dict(loaded.lm_state, strict=True)
    return lm.eval()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped here, run by benchmarks/gpu_suite.sh")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` live beside their concern; without a CUDA device they stay collected
    and are skipped (benchmarks/gpu_suite.sh runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-weight model directory of the tiny preset in the published layout (read-only
    for the tests that share it: build your own to change files in it)."""
    from magnet_engine.demo import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-model"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_speech_dir(tmp_path_factory):
    """A random-weight PlayDiffusion directory (the six upstream files) of the tiny preset,
    read-only for the tests that share it."""
    from magnet_engine.engine.playdiffusion.random_weights import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-speech"), "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The tiny model loaded on the fast engine, shared by the service tests (each sets its
    decoding options before it compares against the API)."""
    from magnet_engine.api import MAGNeT

    return MAGNeT.from_pretrained(tiny_dir, device="cpu", engine="fast")
