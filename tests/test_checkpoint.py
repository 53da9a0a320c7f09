"""Loader round trip and every way a checkpoint can be bad."""
import os
import pickle

import pytest
import torch

from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine import random_weights
from magnet_engine.engine.config import ModelConfig, parse_yaml_config
from magnet_engine.engine.schedule import duration_frames
from magnet_engine.errors import CheckpointError, ConfigError, ModelNotFoundError


@pytest.fixture(scope="module")
def lm_pkg():
    return random_weights.random_lm_package(dim=32, num_heads=4, num_layers=2, d_t5=16, card=64, seed=3)


def test_round_trip_every_tensor_equal(tmp_path, lm_pkg):
    path = tmp_path / ckpt.LM_FILE
    ckpt.atomic_save(lm_pkg, path)
    loaded = ckpt.read_lm_package(ckpt.load_package(path), frame_rate=50)
    state = lm_pkg["best_state"]
    assert set(loaded.lm_state) | {ckpt.CONDITIONER_PREFIX + "weight", ckpt.CONDITIONER_PREFIX + "bias"} == set(state)
    for key, value in loaded.lm_state.items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(loaded.output_proj[0], state[ckpt.CONDITIONER_PREFIX + "weight"])
    assert loaded.cfg.dim == 32 and loaded.cfg.card == 64 and loaded.cfg.num_layers == 2
    # interpolations in the written xp.cfg were resolved
    assert loaded.cfg.span_len == 3 and loaded.cfg.segment_duration == 10


def test_fixture_checkpoint_config(fixtures):
    pkg = ckpt.load_package(fixtures / "checkpoint" / ckpt.LM_FILE)
    loaded = ckpt.read_lm_package(pkg, frame_rate=50)
    cfg = loaded.cfg
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.n_q, cfg.card) == (64, 4, 3, 4, 2048)
    assert (cfg.span_len, cfg.subcodes_context, cfg.segment_duration) == (3, 5, 10)
    assert duration_frames(cfg.segment_duration, cfg.frame_rate) == 500    # the trained window
    assert loaded.output_proj[0].shape == (64, 32)


def test_truncated_file(tmp_path, lm_pkg):
    path = tmp_path / "state_dict.bin"
    ckpt.atomic_save(lm_pkg, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.load_package(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "state_dict.bin"
    path.write_bytes(b"this is not a torch file at all" * 10)
    with pytest.raises(CheckpointError):
        ckpt.load_package(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_pickle_refused(tmp_path):
    path = tmp_path / "state_dict.bin"
    torch.save({"best_state": {}, "xp.cfg": "a: 1", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="more than plain tensors"):
        ckpt.load_package(path)


def test_missing_file_and_dir(tmp_path):
    with pytest.raises(ModelNotFoundError):
        ckpt.load_package(tmp_path / "nope.bin")
    with pytest.raises(ModelNotFoundError, match="missing"):
        ckpt.resolve_model_dir(tmp_path)  # exists but empty
    with pytest.raises(ModelNotFoundError):
        ckpt.resolve_model_dir(str(tmp_path / "does-not-exist"))
    with pytest.raises(ModelNotFoundError):
        ckpt.resolve_model_dir("not a model name")


def test_misshaped_key_named(lm_pkg):
    pkg = dict(lm_pkg, best_state=dict(lm_pkg["best_state"]))
    key = "transformer.layers.1.linear1.weight"
    pkg["best_state"][key] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match=r"linear1\.weight.*\(5, 5\).*\(128, 32\)"):
        ckpt.read_lm_package(pkg, frame_rate=50)


def test_missing_and_unexpected_keys(lm_pkg):
    state = dict(lm_pkg["best_state"])
    del state["out_norm.bias"]
    with pytest.raises(CheckpointError, match="out_norm.bias"):
        ckpt.read_lm_package(dict(lm_pkg, best_state=state), frame_rate=50)
    state = dict(lm_pkg["best_state"], **{"transformer.layers.9.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected"):
        ckpt.read_lm_package(dict(lm_pkg, best_state=state), frame_rate=50)
    state = dict(lm_pkg["best_state"])
    del state[ckpt.CONDITIONER_PREFIX + "weight"]
    with pytest.raises(CheckpointError, match="output_proj"):
        ckpt.read_lm_package(dict(lm_pkg, best_state=state), frame_rate=50)


def test_package_structure_errors(lm_pkg):
    with pytest.raises(CheckpointError, match="xp.cfg"):
        ckpt.read_lm_package({"best_state": lm_pkg["best_state"]}, frame_rate=50)
    with pytest.raises(ConfigError):
        ckpt.read_lm_package(dict(lm_pkg, **{"xp.cfg": ""}), frame_rate=50)
    bad_cfg = lm_pkg["xp.cfg"].replace("positional_embedding: sin", "positional_embedding: rope")
    with pytest.raises(ConfigError, match="positional_embedding"):
        ckpt.read_lm_package(dict(lm_pkg, **{"xp.cfg": bad_cfg}), frame_rate=50)


def test_config_interpolation_and_missing_field():
    text = "sample_rate: 16000\nx:\n  rate: ${sample_rate}\ndora:\n  dir: /c/${oc.env:SOME_UNSET_VAR_XYZ}\n"
    from magnet_engine.engine.config import cfg_get
    cfg = parse_yaml_config(text)
    assert cfg_get(cfg, "x.rate") == 16000  # resolved; the unresolvable env var is never read
    with pytest.raises(ConfigError, match="transformer_lm.dim"):
        ModelConfig.from_xp_cfg(cfg, frame_rate=50)


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("no")

    target = tmp_path / "out.bin"
    with pytest.raises(Exception):
        ckpt.atomic_save({"x": Unpicklable()}, target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind,lm_model,pattern,causal,span_len,window", [
    ("magnet", "transformer_lm_magnet", "parallel", False, 3, 5),
    ("hybrid", "transformer_lm_magnet", "delay", False, 3, 5),
    ("musicgen", "transformer_lm", "delay", True, 1, -1),
])
def test_layouts_read_from_the_config(kind, lm_model, pattern, causal, span_len, window):
    cfg = ckpt.read_lm_package(random_weights.random_lm_package(32, 4, 1, d_t5=8, kind=kind), frame_rate=50).cfg
    assert (cfg.lm_model, cfg.pattern, cfg.causal, cfg.span_len, cfg.subcodes_context) == \
        (lm_model, pattern, causal, span_len, window)
    assert cfg.delays == (() if pattern == "parallel" else (0, 1, 2, 3)) and cfg.cfg_coef == 3.0
    assert cfg.is_hybrid == (kind == "hybrid") and cfg.is_autoregressive == (kind == "musicgen")


@pytest.mark.parametrize("edit,match", [
    (("delays: [0, 1, 2, 3]", "delays: [0, 1, 2]"), "delays"),
    (("flatten_first: 0", "flatten_first: 1"), "flatten_first"),
    (("empty_initial: 0\n  parallel", "empty_initial: 2\n  parallel"), "empty_initial"),
    (("modeling: delay", "modeling: parallel"), "delay"),
    (("modeling: delay", "modeling: unroll"), "unroll"),
])
def test_delay_layout_config_errors(edit, match):
    pkg = random_weights.random_lm_package(32, 4, 1, d_t5=8, kind="musicgen")
    assert edit[0] in pkg["xp.cfg"]
    pkg["xp.cfg"] = pkg["xp.cfg"].replace(*edit)
    with pytest.raises(ConfigError, match=match):
        ckpt.read_lm_package(pkg, frame_rate=50)
