"""Every Triton launch a decoding plan makes, enumerated ahead: compiled for a GPU that is
not here (compile-ahead check), or warmed on the GPU that is (before a CUDA-graph capture).

Contract
--------
    StepShapes(...)                              # what a plan's steps look like
    launches(shapes, device) -> [Launch]         # the launches, built by the wrappers' own
                                                 #   *_launch functions on example tensors
    precompile(shapes, device)                   # compile every variant, launch nothing
    compile_ahead(launch, target) -> stats       # triton.compile for a GPUTarget, no GPU
    python -m magnet_engine.kernels.aot OUT.json # every kernel for sm_80 and sm_90

A launch's variant is fixed by its constexprs, its argument types and the specialisation
Triton derives from the values (16-byte alignment of pointers, ints divisible by 16 or
equal to 1). The scalar operands that change from step to step (0-d views such as
`coefs[i]`, prompt lengths, top-k) are excluded from specialisation in the kernels, so the
steps of one shape share one variant, and a masked-decoding plan needs the variants listed
here. (The hybrid tail attends from a contiguous KV cache, other strides: warm it with one
eager step, which compiles the variant every later step of that shape uses.)

compile_ahead binds the arguments as Triton's launcher does (the same binder, for the
target's backend), so the signature is the launch's, then compiles for the target with the
ptxas that ships with Triton and reads its resource report: registers, spill bytes and
shared memory per variant. The kernels must be plain @triton.jit functions (not decorated
under TRITON_INTERPRET=1): run it in a process without that variable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys
import typing as tp

import torch
import triton  # this module is about Triton: no CPU-only fallback

from magnet_engine.kernels import attention, masking, sampling


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The shapes of one decoding plan's steps, as the kernels see them.

    batch: B (canvas rows); frames: T' (the kept frames of the canvas [B, K, T']);
    n_q: K; card: C; heads, head_dim: H, d of the self-attention; dtype: its operands';
    logits_dtype: the heads' output (fp32 in the engine); windows: the band per stage
    (None: full attention); span_len, arrangement: the masking layout; modes: the
    sampling modes (sampling.GREEDY..CATEGORICAL, one for the call; sampling.PER_ROW,
    options, coefficients, temperatures and offsets per row, as a batch of requests
    samples); cfg: whether steps run with the unconditional half (True), without (False:
    coefficient exactly 1), or both.
    """
    batch: int
    frames: int
    n_q: int
    card: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    windows: tp.Tuple[tp.Optional[int], ...]
    span_len: int
    arrangement: str
    modes: tp.Tuple[int, ...] = (sampling.TOP_P,)
    cfg: tp.Tuple[bool, ...] = (True, False)
    logits_dtype: torch.dtype = torch.float32


@dataclasses.dataclass(frozen=True)
class Launch:
    label: str
    kernel: tp.Any
    grid: tp.Tuple[int, ...]
    args: tp.Tuple[tp.Any, ...]
    meta: tp.Dict[str, tp.Any]


def launches(shapes: StepShapes, device: tp.Union[torch.device, str] = "cpu") -> tp.List[Launch]:
    """Every distinct Triton launch of a plan with these shapes, as compiled for a GPU, on
    example tensors of the engine's layouts on `device` (the data is never read: only
    types, strides and alignment)."""
    s, dev = shapes, torch.device(device)
    out: tp.List[Launch] = []

    # sampling: logits [2B, M, C] -> cond rows [:B], uncond rows [B:]; one seed per row.
    rows = s.batch * (s.frames // s.span_len if masking.mode(s.span_len, s.arrangement) == "chunk" else s.frames)
    logits = torch.zeros(2, rows, s.card, dtype=s.logits_dtype, device=dev)
    per_step = torch.zeros(4, dtype=torch.float32, device=dev)
    step_ids = torch.zeros(4, dtype=torch.int64, device=dev)
    seeds = torch.zeros(rows, dtype=torch.int64, device=dev)
    row_ids = torch.zeros(rows, dtype=torch.int64, device=dev)
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    prob = torch.empty(rows, dtype=torch.float32, device=dev)
    # per row: cfg, temperature and top_p rows of one table; offsets, top_k, use_sampling
    row_floats = torch.zeros(3, rows, dtype=torch.float32, device=dev)
    row_offsets, row_top_k = torch.zeros(2, rows, dtype=torch.int64, device=dev)
    row_sampled = torch.zeros(rows, dtype=torch.bool, device=dev)
    for mode in s.modes:
        for cfg in s.cfg:
            if mode == sampling.PER_ROW:
                values = (row_floats[0], row_floats[1], seeds, row_offsets)
                options = (row_top_k, row_floats[2], row_sampled)
            else:
                values, options = (per_step[1], per_step[2], seeds, step_ids[1]), (5, 0.9)
            grid, args, meta = sampling._sample_launch(
                logits[0], logits[1] if cfg else None, *values, row_ids, tokens, prob, mode, *options)
            out.append(Launch(f"sample mode={mode} cfg={cfg} {s.logits_dtype} C={s.card}",
                              sampling._sample_kernel, grid, args, meta))

    # re-masking: a row of the canvas [B, K, T'] (stride K * T'); stride1 has no Triton kernel.
    layout = masking.mode(s.span_len, s.arrangement)
    if layout != "stride1":
        canvas = torch.zeros(s.batch, s.n_q, s.frames, dtype=torch.int64, device=dev)
        n = masking.num_spans(s.frames, s.span_len, s.arrangement)
        scores = torch.zeros(s.batch, n, dtype=torch.float32, device=dev)
        masked = torch.empty(s.batch, n, dtype=torch.bool, device=dev)
        grid, args, meta = masking._remask_launch(canvas[:, 0], scores, step_ids[1], masked,
                                                  masking._MODE_CODE[layout], s.span_len, 1, 0)
        out.append(Launch(f"remask {layout} n={n}", masking._remask_kernel, grid, args, meta))

    # banded attention: permuted views of the packed projection [2B, T', 3, H, d].
    qkv = torch.zeros(2 * s.batch, s.frames, 3, s.heads, s.head_dim, dtype=s.dtype, device=dev)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = attention._out_buffer(q, s.dtype)
    for window in sorted({w for w in s.windows if w is not None and w < s.frames - 1}):
        grid, args, meta = attention._banded_launch(q, k, v, o, window, s.head_dim ** -0.5, interpreted=False)
        out.append(Launch(f"banded {s.dtype} T={s.frames} H={s.heads} d={s.head_dim} W={window}",
                          attention._banded_attention_kernel, grid, args, meta))
    return out


def precompile(shapes: StepShapes, device: tp.Union[torch.device, str]) -> int:
    """Compile every Triton variant a plan with these shapes launches, without launching
    (call before capturing its steps in CUDA graphs). Returns the number of launches
    checked; 0 off CUDA (the interpreter compiles nothing)."""
    if torch.device(device).type != "cuda":
        return 0
    todo = launches(shapes, device)
    for launch in todo:
        launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
    return len(todo)


# ----------------------------------------------------------------------------- compile ahead
def compile_ahead(launch: Launch, target) -> tp.Dict[str, tp.Any]:
    """Compile `launch` for `target` (a triton GPUTarget) as the launcher would, without a
    GPU; raises on any compile error. -> {'registers', 'spill_stores', 'spill_loads',
    'shared', 'signature'} (spills in bytes, from ptxas -v; shared memory in bytes)."""
    from triton.compiler import make_backend
    from triton.knobs import nvidia as nvidia_knobs

    source, options = _source(launch, make_backend(target))
    log = io.StringIO()
    with contextlib.redirect_stdout(log), _knob(nvidia_knobs, "dump_ptxas_log", True):
        compiled = triton.compile(source, target=target, options=options.__dict__)
    report = log.getvalue()
    if "Used" not in report:
        raise RuntimeError(f"{launch.label}: no ptxas report (a cached binary? compile with an empty "
                           f"triton.knobs.cache.dir)")
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {
        "signature": dict(source.signature),
        "attrs": {str(k): str(v) for k, v in source.attrs.items()},
        "registers": int(registers.group(1)) if registers else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
    }


def _source(launch: Launch, backend):
    """(ASTSource, options) of the variant `launch` selects, bound by Triton's own binder."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.meta), bound, specialization,
                                                              options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def variants(todo: tp.Iterable[Launch], target) -> tp.List[Launch]:
    """`todo` less the launches that select a variant already listed (same source hash)."""
    from triton.compiler import make_backend

    backend, seen, out = make_backend(target), set(), []
    for launch in todo:
        source, options = _source(launch, backend)
        key = (source.hash(), str(options.__dict__))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


@contextlib.contextmanager
def _knob(knobs, name, value):
    old = getattr(knobs, name)
    setattr(knobs, name, value)
    try:
        yield
    finally:
        setattr(knobs, name, old)


# The plans compiled ahead: magnet-small/medium's shapes (10 s = 500 frames, card 2048,
# d = 64, W = 5; every int a multiple of 16 where the model gives one) and an odd plan where
# no int or pointer is, so both sides of every alignment specialisation are compiled.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_MODES = (sampling.GREEDY, sampling.TOP_P, sampling.TOP_K, sampling.CATEGORICAL, sampling.PER_ROW)


def plans() -> tp.List[StepShapes]:
    """fp32 logits (the engine's) in every sampling mode and per row, with and without CFG;
    fp16/bf16 logits and attention operands in the nucleus mode (the dtype only changes the
    loads)."""
    out = []
    for dtype in DTYPES:
        modes, cfg = (ALL_MODES, (True, False)) if dtype == torch.float32 else ((sampling.TOP_P,), (True,))
        out.append(StepShapes(batch=1, frames=512, n_q=4, card=2048, heads=16, head_dim=64, dtype=dtype,
                              windows=(None, 5), span_len=3, arrangement="nonoverlap", modes=modes, cfg=cfg,
                              logits_dtype=dtype))
        out.append(StepShapes(batch=3, frames=37, n_q=3, card=1031, heads=3, head_dim=24, dtype=dtype,
                              windows=(None, 5), span_len=1, arrangement="token", modes=modes, cfg=cfg,
                              logits_dtype=dtype))
    return out


def compile_all(target) -> tp.List[tp.Dict[str, tp.Any]]:
    """compile_ahead for every variant of plans() on `target`: one record per variant."""
    results = []
    for launch in variants([launch for shapes in plans() for launch in launches(shapes)], target):
        stats = compile_ahead(launch, target)
        results.append({"target": f"sm_{target.arch}", "kernel": launch.kernel.__name__, "launch": launch.label,
                        "constexprs": {k: str(v) for k, v in launch.meta.items()}, **stats})
        print(f"sm_{target.arch} {launch.label}: {stats['registers']} registers, spills "
              f"{stats['spill_stores']}/{stats['spill_loads']} B, shared {stats['shared']} B", flush=True)
    return results


def main(argv: tp.Sequence[str]) -> int:
    import tempfile

    from triton.backends.compiler import GPUTarget

    path = argv[0] if argv else "benchmarks/results/triton_aot.json"
    results = []
    with tempfile.TemporaryDirectory() as cache, _knob(triton.knobs.cache, "dir", cache):  # ptxas runs every time
        for arch in (80, 90):
            results += compile_all(GPUTarget("cuda", arch, 32))
    with open(path, "w") as f:
        json.dump({"triton": triton.__version__, "torch": torch.__version__, "kernels": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
