"""Nothing in a checkpoint reaches the environment: OmegaConf resolvers in `xp.cfg` are never
run (only plain ${...} references resolve), and unreadable files say so."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine.config import cfg_get, parse_yaml_config
from magnet_engine.engine.random_weights import random_lm_package
from magnet_engine.errors import CheckpointError, ConfigError

SECRET = "s3cr3t-value-from-the-environment"


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("MAGNET_TEST_SECRET", SECRET)


def lm_package(t5_name: str) -> dict:
    return random_lm_package(**ckpt.ARCHITECTURES["tiny"], d_t5=32, duration=1, t5_name=t5_name)


@pytest.mark.parametrize("t5_name", [
    "${oc.env:MAGNET_TEST_SECRET}",                   # the reported leak: the secret became a Hub repo id
    "t5-${oc.env:MAGNET_TEST_SECRET}",                # inside a string
    "${oc.decode:'${oc.env:MAGNET_TEST_SECRET}'}",    # nested
    "${dora.dir}",                                    # a plain reference to a field that calls oc.env
])
def test_an_env_resolver_in_the_checkpoint_is_refused_not_resolved(secret_env, t5_name):
    with pytest.raises(ConfigError, match="uses an OmegaConf resolver") as err:
        ckpt.read_lm_package(lm_package(t5_name), frame_rate=50)
    assert SECRET not in str(err.value) and "conditioners.description.t5.name" in str(err.value)


def test_no_registered_resolver_ever_runs(secret_env):
    calls = []
    OmegaConf.register_new_resolver("magnet_test_probe", lambda *a: calls.append(a) or "x", replace=True)
    try:
        cfg = parse_yaml_config("a: ${magnet_test_probe:1}\nb: ['${magnet_test_probe:2}']\nc: {d: '${a}'}\ne: 3\nf: ${e}")
        for path in ("a", "b", "c", "c.d"):
            with pytest.raises(ConfigError, match="resolver"):
                cfg_get(cfg, path)
        assert cfg_get(cfg, "f") == 3          # plain references still resolve
    finally:
        OmegaConf.clear_resolver("magnet_test_probe")
    assert calls == []


def test_a_resolver_in_a_field_never_read_does_not_fail_the_load(secret_env):
    loaded = ckpt.read_lm_package(lm_package("t5-base"), frame_rate=50)   # dora.dir holds ${oc.env:USER}
    assert loaded.cfg.t5_name == "t5-base"


def test_an_unreadable_checkpoint_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / ckpt.LM_FILE
    torch.save({"best_state": {}}, path)
    if os.geteuid() == 0:   # root reads a file of mode 000: make the open fail as it does for a user
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(torch, "load", denied)
    else:
        path.chmod(0)
    with pytest.raises(CheckpointError, match="not readable") as err:
        ckpt.load_package(path)
    assert "corrupt" not in str(err.value)
