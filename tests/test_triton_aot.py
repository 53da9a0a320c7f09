"""The Triton kernels compiled ahead for sm_80 and sm_90 without a GPU, with the launch
signatures the wrappers build (kernels/aot.py: every dtype, aligned and unaligned ints and
pointers), and the triton_op registration traced to the kernel launches themselves.

Both run in a subprocess without TRITON_INTERPRET (conftest sets it; under it @triton.jit
gives interpreted kernels, which neither compile nor trace). The compile writes registers,
spills and shared memory per variant to benchmarks/results/triton_aot.json.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magnet_engine.bench_common import machine_info, write_report
from magnet_engine.kernels import backend

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "triton_aot.json"
KERNELS = {"_sample_kernel", "_remask_kernel", "_banded_attention_kernel"}

pytestmark = pytest.mark.skipif(not backend.triton_available(), reason="Triton not installed")


def _run(args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, said explicitly (it warns otherwise)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm80_and_sm90():
    done = _run(["-m", "magnet_engine.kernels.aot", str(RESULTS)], timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    # the compile host's CPU beside the figures, as every result file records it (kernels/ sits
    # below bench_common, so the compile step cannot add it itself)
    full = json.loads(RESULTS.read_text())
    write_report(RESULTS, {**full, "machine": machine_info(torch.device("cpu"))})
    report = full["kernels"]
    for target in ("sm_80", "sm_90"):
        compiled = [r for r in report if r["target"] == target]
        assert {r["kernel"] for r in compiled} == KERNELS
        dtypes = {r["signature"]["q_ptr"] for r in compiled if r["kernel"] == "_banded_attention_kernel"}
        assert dtypes == {"*fp32", "*fp16", "*bf16"}
        for name in KERNELS:  # both sides of the int / pointer alignment specialisation
            attrs = [r["attrs"] for r in compiled if r["kernel"] == name]
            assert len({json.dumps(a, sort_keys=True) for a in attrs}) >= 2, name
        modes = {r["constexprs"]["MODE"] for r in compiled if r["kernel"] == "_sample_kernel"}
        assert modes == {"0", "1", "2", "3", "4"}  # every mode for the call, and PER_ROW
    for r in report:
        assert 0 < r["registers"] <= 255, r
        if r["kernel"] == "_banded_attention_kernel":  # per-dtype blocks chosen not to spill
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


TRACE = """
import torch
from torch._dynamo.backends.common import aot_autograd
from magnet_engine.kernels import attention, backend, masking, sampling

impls = backend.resolve("cuda")
assert impls.sample_tokens == impls.remask == impls.banded_attention == "triton"
graphs = []


class Traced(Exception):
    pass


def keep_graph(gm, example_inputs):
    graphs.append(gm)

    def run(*args):  # no GPU: the graph is the result
        raise Traced
    return run


def step(cond, uncond, coef, temp, seed, offset, rows, canvas, scores, num_masked, q, k, v):
    tokens, prob = sampling.sample_tokens(cond, uncond, coef, temp, use_sampling=True, top_k=0, top_p=0.9,
                                          seed=seed, offset=offset, row_ids=rows, impl=impls)
    n = cond.shape[0]  # per-row values and options, as a batch of requests samples
    row_tokens, _ = sampling.sample_tokens(cond, uncond, coef.expand(n), temp.expand(n),
                                           use_sampling=rows > 2, top_k=rows, top_p=temp.expand(n) - 1,
                                           seed=seed, offset=rows, row_ids=rows, impl=impls)
    masked = masking.remask(canvas[:, 0], scores, num_masked, span_len=1, arrangement="token", prompt_len=0,
                            mask_id=99, impl=impls)
    return tokens, prob, row_tokens, masked, attention.attention(q, k, v, 2, impl=impls)


qkv = torch.zeros(2, 40, 3, 2, 16).permute(2, 0, 3, 1, 4)
per_step = torch.ones(4)
args = (torch.zeros(8, 37), torch.zeros(8, 37), per_step[1], per_step[2], torch.zeros(8, dtype=torch.long),
        torch.arange(3)[1], torch.arange(8), torch.zeros(2, 3, 40, dtype=torch.long), torch.zeros(2, 40),
        torch.arange(3)[2], qkv[0], qkv[1], qkv[2])
try:
    torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=keep_graph))(*args)
except Traced:
    pass
print(graphs[0].code)
"""


def test_triton_ops_trace_to_kernel_launches():
    """fullgraph=True (no break) and, after functionalisation, the launches themselves:
    inductor sees the kernels (sampling with scalar and with per-row options, re-masking,
    attention), not opaque calls."""
    done = _run(["-c", TRACE], timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    code = done.stdout
    assert code.count("triton_kernel_wrapper_functional(") == 4, code
    assert "magnet_engine" not in code, code


STABLE = """
import json
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from magnet_engine.kernels import aot, masking, sampling

backend = make_backend(GPUTarget("cuda", 90, 32))
shapes = aot.plans()[0]


def keys(launch_of):
    return [aot._source(launch_of(i), backend)[0].hash() for i in range(4)]


def sample(i, shift=0):  # step i's scalars are 0-d views coefs[i], temps[i], offsets[i]
    launch = aot.launches(shapes)[0]
    coefs, temps, offsets = torch.ones(4), torch.ones(4), torch.arange(4)
    rows, card = launch.args[0].shape
    cond = torch.zeros(rows * card + 4)[shift:shift + rows * card].view(rows, card)  # shift: 4-byte steps
    args = (cond,) + launch.args[1:2] + (coefs[i], temps[i], launch.args[4], offsets[i]) \
        + launch.args[6:]
    return aot.Launch(launch.label, launch.kernel, launch.grid, args, launch.meta)


def sample_rows(i):  # step i's per-row values are rows of tables: cfgs[i] is 16-byte aligned every 4th i
    launch = [l for l in aot.launches(shapes) if l.label.startswith(f"sample mode={sampling.PER_ROW}")][0]
    rows = launch.args[0].shape[0] + 1  # an odd row count: the alignment of table[i] changes with i
    floats, ints = torch.ones(3, 4, rows), torch.ones(2, 4, rows, dtype=torch.int64)
    flags = torch.ones(4, rows, dtype=torch.bool)
    args = launch.args[:2] + (floats[0, i, 1:], floats[1, i, 1:]) + launch.args[4:5] + (ints[0, i, 1:],) \
        + launch.args[6:7] + (flags[i, 1:], ints[1, i, 1:], floats[2, i, 1:]) + launch.args[10:]
    return aot.Launch(launch.label, launch.kernel, launch.grid, args, launch.meta)


def remask(i, per_row=False):
    launch = [l for l in aot.launches(shapes) if l.label.startswith("remask")][0]
    num_masked = torch.arange(4)
    if per_row:  # one count per row: the same variant as one count for the batch
        batch = launch.args[1].shape[0]
        counts = torch.arange(4 * batch + 1)[1 + i * batch:1 + (i + 1) * batch]
        args = launch.args[:2] + (counts,) + launch.args[3:8] + (1,)
    else:
        args = launch.args[:2] + (num_masked[i],) + launch.args[3:6] + (i,) + launch.args[7:]  # prompt_len i
    return aot.Launch(launch.label, launch.kernel, launch.grid, args, launch.meta)


print(json.dumps({"sample": keys(sample), "remask": keys(remask) + keys(lambda i: remask(i, per_row=True)),
                  "sample_rows": keys(sample_rows), "sample_logits_shifted": keys(lambda i: sample(0, shift=i))}))
"""


def test_steps_of_one_shape_share_one_variant():
    """The scalars of step i are 0-d views (coefs[i]: 16-byte aligned for every fourth i),
    the prompt length may be 1, per-row values are rows of tables at any alignment, a count
    per row shares the count-per-batch variant: none of it selects a new variant. The
    logits' own alignment still does (the control: the keys do see alignment)."""
    done = _run(["-c", STABLE], timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    keys = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(set(keys["sample"])) == 1
    assert len(set(keys["remask"])) == 1
    assert len(set(keys["sample_rows"])) == 1
    assert len(set(keys["sample_logits_shifted"])) == 2  # aligned at shift 0, not at 1, 2, 3
