"""Precision: the int8 linear kernel against its exact twin, the int8 LM, the 'auto'
choice's rules on the CPU (with the timings injected, so the rule is tested, not this CPU),
and the CUDA default (marker gpu)."""
import copy
import dataclasses
import os
import warnings

import pytest
import torch

from magnet_engine.engine import generate
from magnet_engine.engine import precision as P
from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.decoding import Runtime
from magnet_engine.engine.precision import Int8Linear, PrecisionWarning, cast_for_precision, choose_precision
from magnet_engine.errors import InvalidOptionError
from magnet_engine.kernels import int8
from test_model import tiny_lm
from test_reference import _cond

AVX2_ONLY = P.CpuInfo(model="AMD EPYC (test)", capability="AVX2", flags=("avx2",), threads=2)
AMX = P.CpuInfo(model="Xeon (test)", capability="AVX512",
                flags=("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"), threads=2)


# ----------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("shape,n,bias", [((1, 64), 32, True), ((3, 5, 72), 40, False), ((130, 256), 96, True)])
def test_int8_linear_equals_its_exact_twin(shape, n, bias):
    """The int32 accumulation is exact, so only the final fp32 scaling separates the kernel
    from the same quantized operands multiplied in fp64 (a saturating int8 product, as on a
    CPU without VNNI at full weight range, is off by ~1e3 relative)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen) * 3
    q, s = int8.quantize_weight(torch.randn(n, shape[-1], generator=gen), int8.weight_qmax())
    b = torch.randn(n, generator=gen) if bias else None
    y = int8.int8_linear(x, q, s, b)
    assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
    torch.testing.assert_close(y, int8.int8_linear_reference(x, q, s, b), rtol=2e-6, atol=2e-6)


@pytest.mark.skipif(int8._cpp() is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("rows,cols,n", [(1, 1, 3), (6, 67, 9), (300, 1024, 40)])
def test_cpp_quantize_and_rescale_are_the_torch_passes_bitwise(rows, cols, n):
    """The C++ passes around the int8 product (csrc/int8.cpp) round exactly as the torch ones,
    ties to even, zero and non-finite tokens included, so the int8 path is one function
    whichever runs."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, cols + 3, generator=gen)[:, 3:] * 5    # a strided view, as a sliced activation
    if rows > 1:
        x[1] = 0.0                                                 # an all-zero token: the smallest scale
        x[2, cols // 2] = float("nan")                             # a NaN token: NaN scale, NaN outputs
        x[3, 0] = float("inf")                                   # inf / inf: a NaN code, 0 as torch casts it
        x[4, :-1] = torch.arange(cols - 1) % 9 - 3.5               # scale exactly 1 (max 127): halves
        x[4, -1] = 127.0                                           # round half to even, as torch.round
    module = int8._cpp()
    q_cpp, s_cpp = int8._quantize_rows_cpp(module, x.contiguous())
    q, s = int8.quantize_rows(x)
    finite = ~s[:, 0].isnan()
    assert torch.equal(s_cpp.isnan(), s.isnan()) and torch.equal(s_cpp[finite], s[finite])
    assert torch.equal(q_cpp[finite], q[finite])   # a NaN token's codes are unspecified: its scale decides
    acc = torch.randint(-2 ** 20, 2 ** 20, (rows, n), generator=gen, dtype=torch.int32)
    scale, bias = torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    for b in (bias, None):
        expected = int8.rescale(acc.clone(), s, scale, b)
        got = int8._rescale_cpp(module, acc.clone(), s, scale, b)
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())
        if rows > 1:
            assert bool(got[2].isnan().all())


def test_weight_range_is_exact_on_this_dispatch():
    """weight_qmax() is the widest weight range whose products this CPU's int8 path computes
    exactly: the worst case (|x| = 127 everywhere, both signs) at that range must be exact."""
    qmax = int8.weight_qmax()
    assert qmax in (63, 127)
    a = torch.full((24, 256), 127, dtype=torch.int8)
    a[::2] = -127
    b = torch.full((256, 24), qmax, dtype=torch.int8)
    b[:, ::3] = -qmax
    assert torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


def test_quantize_weight_is_per_output_channel():
    w = torch.tensor([[1.0, -2.0, 0.5], [100.0, 50.0, -25.0], [0.0, 0.0, 0.0]])
    q, s = int8.quantize_weight(w, 127)
    assert q.dtype == torch.int8 and s.shape == (3,)
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [127, 64, -32] and q[2].tolist() == [0, 0, 0]
    torch.testing.assert_close(s[:2], torch.tensor([2.0 / 127, 100.0 / 127]))


# ----------------------------------------------------------------------------- the int8 LM
def _int8_twin(monkeypatch):
    """Route every int8 layer through the fp64 twin (eagerly the entry point calls this name)."""
    monkeypatch.setattr(int8, "_int8_linear", int8.int8_linear_reference)


def test_int8_lm_equals_its_twin_and_keeps_no_fp32_linear(monkeypatch):
    lm = tiny_lm(layers=2, bias=True, dim=64, heads=4, card=40)
    q = cast_for_precision(copy.deepcopy(lm), "int8")
    for layer in q.transformer.layers:
        assert layer.self_attn.in_proj_weight is None and layer.cross_attention.in_proj_weight is None
        assert all(isinstance(m, Int8Linear) for m in (layer.linear1, layer.linear2, layer.self_attn.out_proj,
                                                       layer.cross_attention.out_proj))
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in q.transformer.parameters())
    codes = torch.randint(0, 41, (2, lm.cfg.n_q, 30), generator=torch.Generator().manual_seed(1))
    cond = torch.randn(2, 7, lm.cfg.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = q.stage_logits(codes, cond, stage=1)
        fp32 = lm.stage_logits(codes, cond, stage=1)
        _int8_twin(monkeypatch)
        twin = q.stage_logits(codes, cond, stage=1)
    # the same quantized arithmetic: agree to fp32 rounding (a rounding tie of an activation
    # may flip one quantization step: allowed, as a small fraction of the logits' scale)
    scale = fp32.abs().max()
    assert (ours - twin).abs().max() <= 1e-4 * scale
    # and int8 is an approximation of fp32, not something else: close, but not equal. The
    # bound scales with the weight step (7-bit weights where the CPU's int8 product needs them).
    rel = ((ours - fp32).norm() / fp32.norm()).item()
    assert 0 < rel < 0.05 * 127 / int8.weight_qmax()


def test_int8_runtime_compiles_whole_and_matches_eager():
    """A compiled int8 step has no graph break (the int8 linear is an opaque custom op) and
    gives the eager tokens."""
    import torch._dynamo

    lm = tiny_lm(layers=2, dim=64, heads=4, card=40)
    cond = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    from magnet_engine.engine.config import DecodingParams

    params = DecodingParams(decoding_steps=[3, 2, 2, 2])
    eager = Runtime(copy.deepcopy(lm), precision="int8").generate(cond, frames=20, params=params, seeds=[5])
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = Runtime(copy.deepcopy(lm), precision="int8", compile=True).generate(cond, frames=20, params=params,
                                                                                    seeds=[5])
    assert torch.equal(compiled, eager)
    assert sum(counters["graph_break"].values()) == 0


# ----------------------------------------------------------------------------- auto
def _timings(**ms):
    calls = []

    def measure(dim, ffn, candidates):
        calls.append(candidates)
        return {c: ms[c] for c in candidates}
    return measure, calls


def test_auto_never_picks_bf16_on_a_cpu_without_it(monkeypatch):
    """The demo used to force bf16 on every CPU: 300x slower than fp32 where bf16 is emulated."""
    monkeypatch.setattr(P, "cpu_info", lambda: AVX2_ONLY)
    measure, calls = _timings(fp32=10.0, bf16=1.0, int8=5.0)   # even if bf16 were to time fast
    choice = choose_precision("auto", torch.device("cpu"), 1024, 4096, measure=measure)
    assert calls == [("fp32", "int8")]
    assert choice.precision == "int8" and "no native bf16" in choice.reason


@pytest.mark.parametrize("ms,expected", [
    (dict(fp32=10.0, bf16=4.0, int8=3.0), "int8"),     # int8 > 5% faster than bf16
    (dict(fp32=10.0, bf16=4.0, int8=3.9), "bf16"),     # within 5%: the more precise one
    (dict(fp32=10.0, bf16=9.7, int8=9.6), "fp32"),     # nothing pays
    (dict(fp32=10.0, bf16=12.0, int8=30.0), "fp32"),
])
def test_auto_takes_the_most_precise_within_the_margin(monkeypatch, ms, expected):
    monkeypatch.setattr(P, "cpu_info", lambda: AMX)
    measure, _ = _timings(**ms)
    choice = choose_precision(None, torch.device("cpu"), 1024, 4096, measure=measure)
    assert choice.precision == expected and choice.requested == "auto"
    assert choice.timings_ms == ms


def test_auto_on_a_narrow_model_is_fp32_without_measuring(monkeypatch):
    measure, calls = _timings(fp32=1.0, bf16=0.1, int8=0.1)
    assert choose_precision("auto", torch.device("cpu"), 64, 256, measure=measure).precision == "fp32"
    assert calls == []


def test_explicit_precision_is_honoured_with_a_warning_where_not_native(monkeypatch):
    monkeypatch.setattr(P, "cpu_info", lambda: AVX2_ONLY)
    with pytest.warns(PrecisionWarning, match="without native bf16"):
        assert choose_precision("bf16", torch.device("cpu"), 1024, 4096).precision == "bf16"
    monkeypatch.setattr(P, "cpu_info", lambda: AMX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_precision("bf16-mixed", torch.device("cpu"), 1024, 4096).precision == "bf16-mixed"
        assert choose_precision("int8", torch.device("cpu"), 1024, 4096).precision == "int8"


def test_cuda_keeps_fp16_mixed_and_refuses_int8():
    assert choose_precision(None, torch.device("cuda"), 1024, 4096).precision == "fp16-mixed"
    assert choose_precision("auto", torch.device("cuda"), 1024, 4096).precision == "fp16-mixed"
    with pytest.raises(InvalidOptionError, match="CPU path"):
        choose_precision("int8", torch.device("cuda"), 1024, 4096)
    with pytest.raises(InvalidOptionError, match="precision must be one of"):
        choose_precision("int4", torch.device("cpu"), 1024, 4096)


def test_measurement_is_cached_and_covers_the_candidates():
    first = P.measure_matmuls(128, 512, ("fp32", "int8"))
    assert set(first) == {"fp32", "int8"} and all(v > 0 for v in first.values())
    assert P.measure_matmuls(128, 512, ("fp32", "int8")) == first


def test_cpu_info_reports_flags_and_capability():
    info = P.cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert set(info.flags) <= set(P.CpuInfo.ISA) and info.threads == torch.get_num_threads()
    d = info.as_dict()
    assert {"model", "capability", "threads", "avx2", "avx512_bf16", "amx_bf16"} <= set(d)
    assert dataclasses.replace(info, flags=("amx_bf16",), capability="AVX512").native_bf16 and not AVX2_ONLY.native_bf16


def test_voice_encoder_autocasts_only_where_the_cpu_has_bf16(monkeypatch):
    """Upstream autocasts the voice encoder (bf16 on a CPU); where bf16 is emulated that is
    slower than fp32 and rounds by the kernel, so the default follows the CPU."""
    from magnet_engine.engine.playdiffusion import pipeline

    monkeypatch.setattr(pipeline, "cpu_info", lambda: AVX2_ONLY)
    assert not pipeline.Precision().autocast_on(torch.device("cpu"))
    assert pipeline.Precision(voice_autocast=True).autocast_on(torch.device("cpu"))
    assert pipeline.Precision().autocast_on(torch.device("cuda"))   # fp16 autocast, as upstream
    monkeypatch.setattr(pipeline, "cpu_info", lambda: AMX)
    assert pipeline.Precision().autocast_on(torch.device("cpu"))
    assert not dataclasses.replace(AMX, capability="AVX2").native_bf16   # dispatch held to AVX2


# ----------------------------------------------------------------------------- surfaces
def test_cli_and_api_say_what_ran_and_why(tiny_dir, tmp_path, capsys, monkeypatch):
    from magnet_engine import MAGNeT, cli

    code = cli.main(["generate", "x", "--model", str(tiny_dir), "-o", str(tmp_path / "a.wav"), "--duration", "0.5",
                     "--decoding-steps", "2", "1", "1", "1", "-q", "--device", "cpu", "--precision", "int8"])
    out = capsys.readouterr()
    assert code == 0 and "precision: int8: as requested" in out.out
    model = MAGNeT.from_pretrained(tiny_dir)
    assert model.precision == "fp32" and model.precision_choice.requested == "auto"
    assert "dim 64" in model.precision_choice.reason
    # an explicit precision this CPU lacks: honoured, one warning line on stderr
    monkeypatch.setattr(P, "cpu_info", lambda: AVX2_ONLY)
    code = cli.main(["generate", "x", "--model", str(tiny_dir), "-o", str(tmp_path / "b.wav"), "--duration", "0.5",
                     "--decoding-steps", "2", "1", "1", "1", "-q", "--device", "cpu", "--precision", "bf16"])
    out = capsys.readouterr()
    assert code == 0 and "precision: bf16: as requested" in out.out
    warning_lines = [line for line in out.err.splitlines() if "warning" in line]
    assert len(warning_lines) == 1 and "without native bf16" in warning_lines[0]


def test_int8_loads_straight_into_int8(tiny_dir):
    """No fp32 copy of the transformer's linear weights is kept, and the reference loop (fp32)
    reloads its own weights rather than running the quantized ones."""
    from magnet_engine import MAGNeT

    model = MAGNeT.from_pretrained(tiny_dir, precision="int8")
    lm = model._lm
    assert P.is_quantized(lm)
    linear_bytes = sum(b.numel() * b.element_size() for n, b in lm.transformer.named_buffers() if n.endswith("qweight"))
    fp32_matrices = [n for n, p in lm.transformer.named_parameters() if p.dim() == 2]
    assert linear_bytes > 0 and fp32_matrices == []
    stats = model.memory_stats()
    assert stats["weights_bytes"]["lm"] < MAGNeT.from_pretrained(tiny_dir, precision="fp32").memory_stats()["weights_bytes"]["lm"]
    assert model.reference_lm() is not lm and not P.is_quantized(model.reference_lm())


def test_playdiffusion_inpainter_takes_int8():
    """PlayDiffusion's inpainter gets the same option: its backbone's linear layers int8, the
    embeddings, norms and output head fp32; logits close to the fp32 inpainter's."""
    from magnet_engine.engine.playdiffusion.pipeline import PlayDiffusionPipeline, Precision
    from test_playdiffusion import CKPT

    fp32 = PlayDiffusionPipeline.load(CKPT)
    q = PlayDiffusionPipeline.load(CKPT, precision=Precision(inpainter="int8"))
    backbone = [m for m in q.inpainter.LM.modules() if isinstance(m, torch.nn.Linear)]
    assert backbone == [] and P.is_quantized_module(q.inpainter.LM)
    assert isinstance(q.inpainter.to_logits, torch.nn.Linear)
    ids = torch.randint(0, fp32.inpainter.cfg.total_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ours = fp32.inpainter(ids), q.inpainter(ids)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05 * 127 / int8.weight_qmax()
    with pytest.raises(InvalidOptionError, match="CPU path"):
        from magnet_engine.engine.playdiffusion.pipeline import _placed_inpainter
        _placed_inpainter(copy.deepcopy(fp32.inpainter), torch.device("meta"), "int8")


@pytest.mark.gpu
def test_default_precision_on_cuda_is_mixed_fp16():
    cuda = torch.device("cuda")
    assert P.default_precision(cuda) == "fp16-mixed"
    lm = tiny_lm(seed=6, dim=64, heads=4).to(cuda)
    runtime = Runtime(lm, precision="fp16-mixed")
    layer = runtime.lm.transformer.layers[0]
    assert layer.linear1.weight.dtype == torch.float16 and layer.norm1.weight.dtype == torch.float32
    p = generate.plan(lm.cfg, DecodingParams(decoding_steps=(3, 2, 2, 2)), batch=1, frames=30)
    codes = generate.run(p, generate.Models(runtime=runtime), _cond(lm, 1).to(cuda), seeds=[0])
    assert codes.shape == (1, 4, 30) and (codes < lm.cfg.card).all()


def test_precision_benchmarks_run_and_report(tiny_dir, tmp_path):
    """`bench --precisions` and `bench --quality` end to end on the tiny model: the JSON names the
    CPU, each candidate's timing and what auto chose; fp32 against itself would be exact, the
    low precisions are not."""
    import json

    from magnet_engine.bench import main as bench_main

    speed = tmp_path / "speed.json"
    assert bench_main(["--precisions", "--model", str(tiny_dir), "--duration", "0.5", "--decoding-steps", "2", "1",
                       "1", "1", "--runs", "1", "--warmup", "0", "--candidates", "fp32", "int8", "auto",
                       "--out", str(speed)]) == 0
    report = json.loads(speed.read_text())
    assert set(report["cases"]) == {"fp32", "int8", "auto"} and report["choices"]["auto"]["precision"] == "fp32"
    assert report["cases"]["int8"]["runs_precision"] == "int8" and report["cases"]["fp32"]["tokens_cpu_ms"]["p50"] > 0
    assert "cpu_isa" in report["machine"] and "capability" in report["machine"]["cpu_isa"]
    quality = tmp_path / "quality.json"
    assert bench_main(["--quality", "--model", str(tiny_dir), "--duration", "0.5", "--candidates", "int8",
                       "--out", str(quality)]) == 0
    figures = json.loads(quality.read_text())["against_fp32"]["int8"]
    assert 0 < figures["logit_error_in_std"]["p50"] < figures["logit_error_in_std"]["max"]
    assert 0.5 < figures["greedy_agreement"] <= 1 and 0 < figures["sampling_tv"]["cfg_max"]["mean"] < 1


def test_int8_linear_benchmark_runs_and_records_the_cpu(tmp_path):
    """benchmarks/int8_linear.py end to end at a toy size: every case timed, ratios against fp32,
    the CPU named (a result that cannot say where it came from is not comparable)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "int8_linear.py"
    out = tmp_path / "int8_linear.json"
    proc = subprocess.run([sys.executable, str(script), "--rows", "3", "--runs", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    cases = report["by_rows"]["3"]
    assert {"fp32", "int_mm", "int8"} <= set(cases) and cases["fp32"]["vs_fp32"] == 1.0
    assert all(c["cpu_ms"] > 0 for c in cases.values())
    assert report["machine"]["cpu_isa"]["capability"] and report["weight_qmax"] in (63, 127)
