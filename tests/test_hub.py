"""A model id that is not in the cache, with a Hub that accepts connections and never answers:
every loader gives a typed error within about HF_HUB_ETAG_TIMEOUT, not after the Hub client's
five retries with back-off (~85 s at the defaults)."""
import socket
import threading
import time

import pytest
from huggingface_hub import constants

from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine import conditioning
from magnet_engine.engine.playdiffusion import files as pd_files
from magnet_engine.errors import ModelNotFoundError

TIMEOUT = 1


@pytest.fixture
def silent_hub(monkeypatch, tmp_path):
    """A loopback endpoint that accepts and never replies; an empty Hub cache."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", TIMEOUT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    yield
    stop.set()
    thread.join()
    for c in held:
        c.close()
    server.close()


@pytest.mark.parametrize("load", [
    lambda: ckpt.resolve_model_dir("someone/not-cached-magnet"),
    lambda: conditioning._from_pretrained(__import__("transformers").T5Tokenizer, "someone/not-cached-t5", False),
    lambda: pd_files.resolve_dir("someone/not-cached-inpainter"),
], ids=["magnet", "t5", "playdiffusion"])
def test_unresponsive_hub_fails_fast(silent_hub, load):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="did not answer within 1 s"):
        load()
    # one probe of TIMEOUT, not 6 attempts of TIMEOUT plus 23 s of back-off sleeps
    assert time.monotonic() - start < 5 * TIMEOUT


def test_offline_hub_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        ckpt.resolve_model_dir("someone/not-cached-magnet")
