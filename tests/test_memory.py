"""Weights are held once: loading maps the checkpoint into the parameters, a low-precision
runtime casts in place, the reference loop gets fp32 weights only when asked for."""
import sys
from pathlib import Path

import pytest
import torch

from magnet_engine import MAGNeT
from magnet_engine.demo import build_random_model
from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine import random_weights
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.model import MagnetLM, weight_bytes
from magnet_engine.errors import CheckpointError

FAST = dict(duration=0.5, decoding_steps=[2, 1, 1, 1])
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


@pytest.fixture(scope="module")
def musicgen_dir(tmp_path_factory):
    """A MusicGen naming the same T5 as the MAGNeT and shipping none: it shares the MAGNeT's."""
    import shutil

    directory = build_random_model(tmp_path_factory.mktemp("musicgen-memory"), "tiny", seed=5, kind="musicgen")
    shutil.rmtree(directory / "t5")
    return directory


def _tensors(*modules):
    return [t for m in modules for t in list(m.parameters()) + list(m.buffers())]


def _file_ranges(path: Path):
    """Address ranges of this process mapping `path`."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _stored(directory):
    return torch.load(directory / ckpt.LM_FILE, weights_only=True)["best_state"]   # read whole, no mapping


@linux_only
def test_fp32_load_keeps_the_file_pages_as_the_parameters(tiny_dir):
    model = MAGNeT.from_pretrained(tiny_dir, device="cpu", precision="fp32")
    model.set_generation_params(**FAST)
    model.generate_tokens(["x"], seed=0)
    runtime = model._fast_runtime()
    assert runtime.lm is model.lm.module    # no cast copy at fp32
    lm_file, codec_file = _file_ranges(tiny_dir / ckpt.LM_FILE), _file_ranges(tiny_dir / ckpt.CODEC_FILE)
    assert lm_file and codec_file
    for tensors, ranges in ((_tensors(model.lm.module, model.conditioner.output_proj), lm_file),
                            (_tensors(model.codec), codec_file)):
        for t in tensors:   # every weight lives in the mapped checkpoint, none in a second copy
            assert any(lo <= t.data_ptr() < hi for lo, hi in ranges), t.shape
    ptrs = [t.data_ptr() for t in _tensors(model.lm.module, runtime.lm, model.conditioner, model.codec)]
    distinct = {id(t) for t in _tensors(model.lm.module, runtime.lm, model.conditioner, model.codec)}
    assert len(set(ptrs)) == len(distinct)                          # one tensor per address
    stored = _stored(tiny_dir)
    for key, value in model.lm.module.state_dict().items():
        assert torch.equal(value, stored[key]), key


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_runtime_holds_no_fp32_transformer_weights(tiny_dir, precision, dtype):
    model = MAGNeT.from_pretrained(tiny_dir, device="cpu", precision=precision)
    model.set_generation_params(**FAST)
    model.generate_tokens(["x"], seed=0)
    runtime = model._fast_runtime()
    assert runtime.lm is model.lm.module    # cast in place: no second LM
    tensors = _tensors(model.lm.module, runtime.lm, model.conditioner, model.codec)
    assert len({t.data_ptr() for t in tensors}) == len({id(t) for t in tensors})
    for name, param in model.lm.module.named_parameters():
        want = dtype if name.startswith("transformer.") else torch.float32   # embeddings, out_norm, heads fp32
        assert param.dtype == want, name
    assert model._reference_lm is None                              # no fp32 LM until the reference asks
    stored = _stored(tiny_dir)
    for key, value in model.lm.module.state_dict().items():               # the stored values, rounded once
        assert torch.equal(value, stored[key].to(value.dtype)), key
    stats = model.memory_stats()
    lm_bytes = sum(v.numel() * (dtype.itemsize if k.startswith("transformer.") else 4)
                   for k, v in stored.items() if not k.startswith("condition_provider."))
    assert stats["weights_bytes"]["lm"] == lm_bytes


def test_runtime_casts_in_place():
    package = random_weights.random_lm_package(32, 4, 2, d_t5=8, card=40)
    lm = ckpt.build_lm(ckpt.read_lm_package(package, frame_rate=50))
    before = {id(t) for t in _tensors(lm)}
    count = len(list(lm.parameters()))
    runtime = Runtime(lm, precision="bf16")
    assert runtime.lm is lm and len(list(runtime.lm.parameters())) == count
    assert {id(t) for t in _tensors(lm)} == before                  # the same Parameters, converted
    assert {p.dtype for p in lm.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in lm.named_parameters() if not n.startswith("transformer.")} == {torch.float32}


def test_reference_engine_gets_fp32_weights_only_when_asked(tiny_dir):
    low = MAGNeT.from_pretrained(tiny_dir, device="cpu", precision="bf16")
    ref = MAGNeT.from_pretrained(tiny_dir, device="cpu", engine="reference")
    assert ref.reference_lm() is ref.lm.module                      # fp32 already: nothing loaded twice
    for m in (low, ref):
        m.set_generation_params(**FAST)
    low.generate_tokens(["x"], seed=0)                              # the fast runtime exists, in bf16
    assert low._reference_lm is None
    low.engine = "reference"
    tokens = low.generate_tokens(["a reference run"], seed=3)
    reference_lm = low._reference_lm
    assert reference_lm is not None and reference_lm is not low.lm.module
    assert {p.dtype for p in reference_lm.parameters()} == {torch.float32}
    assert torch.equal(tokens, ref.generate_tokens(["a reference run"], seed=3))
    assert low.memory_stats()["weights_bytes"]["reference_lm"] == weight_bytes(reference_lm)


def test_reference_without_a_checkpoint_directory_is_a_typed_error(tiny_dir):
    from magnet_engine.errors import InvalidOptionError

    loaded = MAGNeT.from_pretrained(tiny_dir, device="cpu", precision="bf16")
    bare = MAGNeT("bare", loaded.lm.module, loaded.conditioner, loaded.codec, loaded.device, engine="reference")
    with pytest.raises(InvalidOptionError, match="fp32 weights"):
        bare.reference_lm()


def test_legacy_pickle_loads_without_mapping(tmp_path):
    package = random_weights.random_lm_package(32, 4, 1, d_t5=8, card=40, seed=2)
    legacy, modern = tmp_path / "legacy.bin", tmp_path / "modern.bin"
    torch.save(package, legacy, _use_new_zipfile_serialization=False)
    torch.save(package, modern)
    assert not ckpt.mappable(legacy) and ckpt.mappable(modern)
    for path in (legacy, modern):
        loaded = ckpt.load_lm_checkpoint(path, frame_rate=50)
        assert loaded.mapped == (path == modern)
        lm = ckpt.build_lm(loaded, dtype=torch.bfloat16)
        for key, value in lm.state_dict().items():
            assert torch.equal(value, package["best_state"][key].to(value.dtype)), key


def test_released_pages_read_back_the_same_values(tmp_path):
    """A cast releases the source's file pages; the package still holding them reads the
    file's bytes again, not zeros."""
    package = random_weights.random_lm_package(64, 4, 2, d_t5=8, card=1024, seed=6)
    path = tmp_path / ckpt.LM_FILE
    torch.save(package, path)
    loaded = ckpt.load_lm_checkpoint(path, frame_rate=50)
    assert loaded.mapped
    ckpt.build_lm(loaded, dtype=torch.float16)
    for key, value in loaded.lm_state.items():
        assert torch.equal(value, package["best_state"][key]), key


def test_mapped_loads_keep_the_typed_errors(tmp_path):
    package = random_weights.random_lm_package(32, 4, 1, d_t5=8, card=40)
    path = tmp_path / ckpt.LM_FILE
    torch.save(package, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])                          # a zip cut in half
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.load_lm_checkpoint(path, frame_rate=50)
    package["best_state"]["out_norm.bias"] = torch.zeros(3)
    torch.save(package, path)
    with pytest.raises(CheckpointError, match=r"out_norm\.bias.*\(3,\)"):
        ckpt.load_lm_checkpoint(path, frame_rate=50)


def test_shared_t5_counted_once(tiny_dir, musicgen_dir):
    model = MAGNeT.from_pretrained(tiny_dir, device="cpu", precision="fp32")
    external = model._external_lm(str(musicgen_dir))
    assert external.conditioner.t5 is model.conditioner.t5          # loaded once, shared
    stats = model.memory_stats()
    weights = stats["weights_bytes"]
    assert weights["conditioner"] == weight_bytes(model.conditioner)
    assert weights[f"external_conditioner:{musicgen_dir}"] == weight_bytes(external.conditioner.output_proj)
    assert stats["weights_total_bytes"] == sum(weights.values())
    assert stats["peak_rss_bytes"] >= stats.get("rss_bytes", 1) > 0
    assert stats["device"] == "cpu"


def test_meta_built_lm_matches_a_plain_one():
    """Outputs unchanged: the LM assigned from a checkpoint computes what one loaded by copy does."""
    package = random_weights.random_lm_package(32, 4, 2, d_t5=8, card=40, seed=9)
    loaded = ckpt.read_lm_package(package, frame_rate=50)
    assigned = ckpt.build_lm(loaded)
    copied = MagnetLM(loaded.cfg)
    copied.load_state_dict(loaded.lm_state)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 41, (2, 4, 12), generator=gen)
    cond = torch.randn(2, 3, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(assigned.stage_logits(codes, cond, 1), copied.eval().stage_logits(codes, cond, 1))


@linux_only
def test_memory_benchmark_runs_a_case(tiny_dir, tmp_path):
    """The benchmark's plumbing on the tiny model (its numbers are for the benchmark, not asserted)."""
    import json

    from magnet_engine.bench_memory import main

    out = tmp_path / "memory.json"
    assert main(["--model", str(tiny_dir), "--precision", "bf16", "--cache", "warm", "--label", "t",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    case = report["runs"][0]["cases"][0]
    stored = _stored(tiny_dir)
    lm_bytes = sum(v.numel() * (2 if k.startswith("transformer.") else 4)
                   for k, v in stored.items() if not k.startswith("condition_provider."))
    assert case["weights_bytes"]["lm"] == lm_bytes == case["memory_stats"]["weights_bytes"]["lm"]
    assert case["load"]["peak_rss"] >= case["baseline_rss"] > 0
    assert [row["label"] for row in report["summary"]] == ["t"]
