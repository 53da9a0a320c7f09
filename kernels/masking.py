"""Span re-masking for one decoding step of one stage, and the span scores it consumes
(docs/model.md §7).

Contract
--------
    remask(stage_codes, span_scores, num_masked, *, span_len, arrangement, prompt_len,
           mask_id, impl=None) -> masked
    span_scores(prob, masked, *, span_len, arrangement, scoring) -> scores
    initial_span_scores(batch, frames, *, span_len, arrangement, prompt_len, device) -> scores

Torch ops (what the functions call; `impl` as in kernels/sampling.py): layout codes CHUNK,
STRIDE1, TOKEN;
    magnet_engine::remask(codes!, scores, num_masked, layout, span_len, prompt_len, mask_id, impl, spans?)
    magnet_engine::remask_triton(codes!, scores, num_masked, layout, span_len, prompt_len, mask_id)
    magnet_engine::span_scores(prob, masked, layout, span_len, scoring)
(codes! is written in place; each returns a new tensor).

Layouts. `mode(span_len, arrangement)` picks one of three (the reference's rule):
- "chunk"   ('nonoverlap', L > 1): span j is frames [j*L, j*L + L); n = T // L spans (the
            caller trims the canvas to n*L frames; frames past n*L are never touched).
- "stride1" ('stride1', L > 1): scores are per frame (n = T); the masked frames are the
            cover of overlapping spans [j, j + L) found by the LPS search of docs/model.md §7.
- "token"   (L == 1, or arrangement 'token'): span j is frame j; n = T.

remask (in place on `stage_codes` [B, T] int64, last dimension contiguous; a view of the
canvas row such as `X[:, s]` is fine):
- chunk / token: choose, per batch row, the `num_masked` spans with the highest score
  (`num_masked`: int64 tensor, 0-d for every row or [B] for one count per row, e.g. rows
  of different requests at different steps; clamped to [0, n]); stride1: run the LPS
  search with the row's count. Rows are independent: row b in the batch equals, bit for
  bit, row b alone with the 0-d count num_masked[b].
- Write `mask_id` on every frame of the chosen spans except frames t < prompt_len. The
  canvas holds the prompt there (it is written before decoding and never overwritten), so
  skipping them is the reference's "mask, then restore the prompt".
- Returns `masked` [B, n] bool, what the next span_scores needs: chunk mode, the chosen
  chunks (the reference's `chunks_mask`); token / stride1, `stage_codes == mask_id` after
  the write (the reference's `is_mask`, which at step 0 is every non-prompt frame).
- Never-re-mask spans (prompt, frozen frames) carry the DONT_REMASK score -1e4 and are
  chosen only if `num_masked` exceeds the spans with real scores, which the schedule
  never asks for.

Tie order (higher score first; NaN counts as the largest, as in torch.topk):
- torch, CPU tensors: `span_scores.topk(num_masked)` itself, exactly the original
  implementation's choice under ties (the fixtures depend on it); with a count per row, one
  topk per distinct count on its rows (topk treats rows independently). Reading the counts
  is a read of host memory, not a device sync.
- C++: ATen's CPU topk algorithm re-run (std::partial_sort / std::nth_element on (value,
  index) pairs, value-only comparator): the same set as torch.topk, checked on rows of ties.
- torch on CUDA tensors, and Triton: rank selection, lowest index first among ties, without
  a sync (CUDA's topk has no defined tie order to reproduce).
- Rows of other lengths in one call (`spans`, engine/slots.py): torch.topk's choice among
  ties on the CPU depends on the row's length, so torch and C++ rank each shorter row on its
  own spans (one call per length, a read of host memory as the counts are); lowest index
  first cannot be changed by padding ranked last, so Triton and CUDA tensors ignore `spans`.
- stride1 in every implementation: spans ordered by a stable descending sort of their sums
  (lowest start first among ties). The reference's `argsort` is unstable and its tie order
  depends on the machine (x86-simd-sort on AVX2/AVX512 CPUs, std::sort elsewhere), so
  there is no order to reproduce. Triton has no stride1 kernel: it runs the torch path
  (sync-free, batched).

span_scores (torch only: a few elementwise ops, written exactly as the reference so the
scores match it bit for bit):
- chunk 'max': 1 - max(prob over the chunk); chunk 'prod': sum(-log prob over the chunk);
  stride1 / token: -log prob per frame. DONT_REMASK = -1e4 where `masked` is False.
"""
from __future__ import annotations

import typing as tp

import torch
from torch.library import wrap_triton

from magnet_engine.kernels import backend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch and C++ paths do not need it
    triton = None

DONT_REMASK = -1e4
ARRANGEMENTS = ("nonoverlap", "stride1", "token")
CHUNK, STRIDE1, TOKEN = 0, 1, 2  # the layouts' codes, as csrc/masking.cpp
_MODE_CODE = {"chunk": CHUNK, "stride1": STRIDE1, "token": TOKEN}


def mode(span_len: int, arrangement: str) -> str:
    """'chunk', 'stride1' or 'token': the reference's choice of masking layout."""
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"arrangement must be one of {ARRANGEMENTS}, found {arrangement!r}")
    if span_len < 1:
        raise ValueError(f"span_len must be >= 1, found {span_len}")
    if arrangement == "token" or span_len == 1:
        return "token"
    return "chunk" if arrangement == "nonoverlap" else "stride1"


def num_spans(frames: int, span_len: int, arrangement: str) -> int:
    """n: the width of the score / masked tensors for a stage of `frames` frames."""
    return frames // span_len if mode(span_len, arrangement) == "chunk" else frames


# ----------------------------------------------------------------------------- Triton
if triton is not None:

    # num_masked is a 0-d view `num_masked[i]` (alignment changes with i); prompt_len,
    # mask_id and the stride are values (1 would specialise): no variant may appear mid-loop.
    @triton.jit(do_not_specialize=("prompt_len", "mask_id", "num_masked_stride"),
                do_not_specialize_on_alignment=("num_masked_ptr",))
    def _remask_kernel(
        codes_ptr, scores_ptr, num_masked_ptr, masked_ptr,
        n, codes_row_stride, prompt_len, mask_id, num_masked_stride,
        SPAN_LEN: tl.constexpr, CHUNK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        """Grid (B, cdiv(n, BLOCK_J)). Span j is chosen iff its rank < num_masked, with
        rank_j = #{i: s_i > s_j} + #{i < j: s_i == s_j} (NaN largest): lowest index first.
        num_masked_stride: 0 for one count for the batch, 1 for one per row."""
        b = tl.program_id(0).to(tl.int64)
        js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_in = js < n
        s_j = tl.load(scores_ptr + b * n + js, mask=j_in, other=0.0)
        nan_j = s_j != s_j
        rank = tl.zeros([BLOCK_J], dtype=tl.int32)
        for start in range(0, n, BLOCK_I):
            i_s = start + tl.arange(0, BLOCK_I)
            s_i = tl.load(scores_ptr + b * n + i_s, mask=i_s < n, other=0.0)
            nan_i = s_i != s_i
            greater = (nan_i[None, :] & ~nan_j[:, None]) | (s_i[None, :] > s_j[:, None])
            equal = (nan_i[None, :] & nan_j[:, None]) | (s_i[None, :] == s_j[:, None])
            before = (equal & (i_s[None, :] < js[:, None])) | greater
            rank += tl.sum((before & (i_s[None, :] < n)).to(tl.int32), axis=1)
        chosen = (rank < tl.load(num_masked_ptr + b * num_masked_stride)) & j_in

        row = codes_ptr + b * codes_row_stride
        if CHUNK:
            for l in tl.static_range(SPAN_LEN):
                t = js * SPAN_LEN + l
                tl.store(row + t, tl.zeros([BLOCK_J], tl.int64) + mask_id, mask=chosen & (t >= prompt_len))
            tl.store(masked_ptr + b * n + js, chosen.to(tl.int1), mask=j_in)
        else:
            y = tl.load(row + js, mask=j_in, other=0)
            y = tl.where(chosen & (js >= prompt_len), mask_id, y)
            tl.store(row + js, y, mask=j_in)
            tl.store(masked_ptr + b * n + js, (y == mask_id).to(tl.int1), mask=j_in)


def _remask_launch(codes, scores, num_masked, masked, layout, span_len, prompt_len, mask_id):
    """(grid, args, constexprs) of the _remask_kernel launch (the op and kernels/aot.py)."""
    batch, n = scores.shape
    block_j = min(64, triton.next_power_of_2(n))
    args = (codes, scores, num_masked, masked, n, codes.stride(0), prompt_len, mask_id, 1 if num_masked.dim() else 0)
    meta = dict(SPAN_LEN=span_len if layout == CHUNK else 1, CHUNK=layout == CHUNK,
                BLOCK_J=block_j, BLOCK_I=min(64, triton.next_power_of_2(n)))
    return (batch, triton.cdiv(n, block_j)), args, meta


def _remask_triton(codes: torch.Tensor, scores: torch.Tensor, num_masked: torch.Tensor, layout: int,
                   span_len: int, prompt_len: int, mask_id: int) -> torch.Tensor:
    batch, n = scores.shape
    masked = torch.empty(batch, n, dtype=torch.bool, device=codes.device)
    if batch > 0 and n > 0:
        grid, args, meta = _remask_launch(codes, scores, num_masked, masked, layout, span_len, prompt_len, mask_id)
        launch = wrap_triton(_remask_kernel) if torch.compiler.is_compiling() else _remask_kernel
        launch[grid](*args, **meta)
    return masked


# ----------------------------------------------------------------------------- C++
def _remask_cpp(codes, scores, num_masked, layout, span_len, prompt_len, mask_id):
    masked = torch.empty(scores.shape, dtype=torch.bool)
    backend.cpp_module().remask(
        codes.numpy(), scores.numpy(), num_masked.numpy() if num_masked.dim() else int(num_masked), layout,
        span_len, prompt_len, mask_id, masked.numpy(),
    )
    return masked


# ----------------------------------------------------------------------------- torch
def _rank(values: torch.Tensor) -> torch.Tensor:
    """[B, n] int64: each entry's position in its row's stable descending sort (NaN first)."""
    batch, n = values.shape
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(1, order, torch.arange(n, device=values.device).expand(batch, n))


def _topk_spans(scores: torch.Tensor, num_masked: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: the num_masked (0-d, or [B]: one per row) highest scores of each row
    (tie order: module docstring)."""
    if scores.device.type == "cpu":
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        if num_masked.dim() == 0:
            k = min(max(int(num_masked), 0), scores.shape[1])
            return chosen.scatter_(1, scores.topk(k, dim=-1).indices, True)
        # torch.topk treats rows independently: one call per distinct count, on its rows.
        counts = num_masked.clamp(0, scores.shape[1])
        for k in counts.unique().tolist():
            rows = (counts == k).nonzero()[:, 0]
            chosen[rows] = chosen[rows].scatter_(1, scores[rows].topk(k, dim=-1).indices, True)
        return chosen
    return _rank(scores) < num_masked.reshape(-1, 1)


def _round_half_even(total: torch.Tensor) -> torch.Tensor:
    """Python's round(0.5 * total) for integer tensors >= 0."""
    half = total // 2
    return half + (total % 2) * (half % 2)


def _lps_frames(scores: torch.Tensor, num_masked: torch.Tensor, span_len: int) -> torch.Tensor:
    """[B, T] bool, the least-probable-span search of docs/model.md §7 for every row at once
    (num_masked: 0-d, or [B]: one per row).

    Sync-free: the reference's data-dependent while loop runs a fixed number of times
    (enough for any T) with rows that have finished frozen, keeping the last cover evaluated.
    """
    batch, frames = scores.shape
    n_spans = frames - span_len + 1
    if n_spans <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    span_sums = scores.unfold(1, span_len, 1).sum(dim=-1)  # [B, n_spans], as the reference
    rank = _rank(span_sums)

    def cover(u: torch.Tensor) -> torch.Tensor:  # frames of the u best spans per row
        starts = rank < u
        covered = torch.zeros_like(scores, dtype=torch.bool)
        for shift in range(span_len):
            covered[:, shift:shift + n_spans] |= starts
        return covered

    n = torch.clamp(num_masked, min=span_len).reshape(-1, 1).expand(batch, 1)
    lo = n // span_len
    hi = n - span_len + 1
    mid = _round_half_even(lo + hi)
    result = cover(mid)  # the answer when mid is already lo or hi
    for _ in range(frames.bit_length() + 1):  # the interval halves each round
        active = (lo < mid) & (mid < hi)
        candidate = cover(mid)
        result = torch.where(active, candidate, result)
        too_many = candidate.sum(dim=-1, keepdim=True) > n
        hi = torch.where(active & too_many, mid, hi)
        lo = torch.where(active & ~too_many, mid, lo)
        mid = torch.where(active, _round_half_even(lo + hi), mid)
    return result


def _remask_torch(codes, scores, num_masked, layout, span_len, prompt_len, mask_id):
    """The plain twin, in torch ops, sync-free on CUDA."""
    if layout == STRIDE1:
        frame_mask = _lps_frames(scores, num_masked, span_len)
    else:
        chosen = _topk_spans(scores, num_masked)
        frame_mask = chosen.repeat_interleave(span_len, dim=-1) if layout == CHUNK else chosen
    width = frame_mask.shape[1]  # n * L in chunk mode (the trimmed canvas), else T
    not_prompt = torch.arange(width, device=codes.device) >= prompt_len
    codes[:, :width].masked_fill_(frame_mask & not_prompt, mask_id)
    if layout == CHUNK:
        return chosen
    return codes == mask_id


# ----------------------------------------------------------------------------- ops
_HOST_IMPLS = {"cpp": _remask_cpp, "torch": _remask_torch}


def _remask_host(codes: torch.Tensor, scores: torch.Tensor, num_masked: torch.Tensor, layout: int, span_len: int,
                 prompt_len: int, mask_id: int, impl: str, spans: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """The C++ (impl='cpp', CPU) and torch (impl='torch') implementations; layout: CHUNK,
    STRIDE1 or TOKEN (csrc/masking.cpp's codes). spans: `remask`'s."""
    remask_rows = _HOST_IMPLS[impl]
    batch, n = scores.shape
    if spans is None or layout == STRIDE1 or codes.device.type != "cpu":   # padding cannot change the choice
        return remask_rows(codes, scores, num_masked, layout, span_len, prompt_len, mask_id)
    counts = num_masked.expand(batch)
    # a row ranks its own spans only, as alone (one call per width; rows are independent)
    width = torch.where((counts > 0) & (spans < n), spans.clamp(min=0), n)
    if bool((width == n).all()):
        return remask_rows(codes, scores, num_masked, layout, span_len, prompt_len, mask_id)
    masked = torch.zeros(batch, n, dtype=torch.bool)
    for w in width.unique().tolist():
        if w == 0:          # a row with a count and no span of its own: nothing to choose
            continue
        rows = (width == w).nonzero()[:, 0]
        frames = w * span_len if layout == CHUNK else w
        part = codes[rows, :frames].contiguous()
        masked[rows, :w] = remask_rows(part, scores[rows, :w].contiguous(), counts[rows].contiguous(), layout,
                                       span_len, prompt_len, mask_id)
        codes[rows, :frames] = part
    return masked if layout == CHUNK else codes == mask_id


_remask_op = torch.library.custom_op("magnet_engine::remask", _remask_host, mutates_args=("codes",))


def _remask_fake(codes, scores, num_masked, layout, span_len, prompt_len, mask_id, impl=None):
    return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)


@_remask_op.register_fake
def _remask_host_fake(codes, scores, num_masked, layout, span_len, prompt_len, mask_id, impl, spans=None):
    return _remask_fake(codes, scores, num_masked, layout, span_len, prompt_len, mask_id)

if triton is not None:
    _remask_triton_op = backend.register_triton_op(
        "magnet_engine::remask_triton", _remask_kernel, _remask_triton, mutates_args=("codes",), fake=_remask_fake)


def _span_scores(prob: torch.Tensor, masked: torch.Tensor, layout: int, span_len: int, scoring: str) -> torch.Tensor:
    batch, frames = prob.shape
    if layout == CHUNK:
        n = frames // span_len
        chunks = prob[:, : n * span_len].reshape(batch, n, span_len)
        if scoring == "max":
            scores = 1 - torch.max(chunks, dim=-1)[0]
        else:
            scores = torch.sum(-torch.log(chunks), dim=-1)
    else:
        scores = -torch.log(prob)
    return scores.masked_fill(~masked, DONT_REMASK)


# An op (opaque) so that compiled scores are eager scores bit for bit: they decide the spans.
_span_scores_op = torch.library.custom_op("magnet_engine::span_scores", _span_scores, mutates_args=())


@_span_scores_op.register_fake
def _span_scores_fake(prob, masked, layout, span_len, scoring):
    return torch.empty_like(masked, dtype=torch.float32, memory_format=torch.contiguous_format)


def remask(
    stage_codes: torch.Tensor,
    span_scores: torch.Tensor,
    num_masked: torch.Tensor,
    *,
    span_len: int,
    arrangement: str,
    prompt_len: int,
    mask_id: int,
    impl: backend.Impls | str | None = None,
    spans: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask the num_masked highest-scoring spans of one stage in place; see the module docstring.

    stage_codes: [B, T] int64 (modified in place); span_scores: [B, n] fp32;
    num_masked: 0-d int64 (every row) or [B] int64 (one count per row) -> masked [B, n] bool.
    spans: None, or [B] int64, each row's own span count when rows of other lengths share the
    call (a row's spans past it are padding: scored -inf, never chosen, frames never written);
    each row is then ranked on its own spans, exactly as alone (module docstring, tie order).
    """
    layout = mode(span_len, arrangement)
    if stage_codes.dim() != 2 or stage_codes.dtype != torch.int64 or stage_codes.stride(-1) != 1:
        raise ValueError(f"remask: stage_codes must be [B, T] int64 with contiguous frames, found "
                         f"{stage_codes.dtype} shape {tuple(stage_codes.shape)} stride {stage_codes.stride()}")
    batch, frames = stage_codes.shape
    n = num_spans(frames, span_len, arrangement)
    if span_scores.shape != (batch, n) or span_scores.dtype != torch.float32:
        raise ValueError(f"remask: span_scores must be [{batch}, {n}] fp32 for {layout} mode with T={frames}, "
                         f"found {span_scores.dtype} shape {tuple(span_scores.shape)}")
    if num_masked.shape not in ((), (batch,)) or num_masked.dtype != torch.int64:
        raise ValueError(f"remask: num_masked must be a 0-d or [B] int64 tensor (B = {batch}), found "
                         f"{num_masked.dtype} of shape {tuple(num_masked.shape)}")
    impls = backend.pick(impl, stage_codes.device)
    chosen = impls.remask_stride1 if layout == "stride1" else impls.remask
    scores = span_scores.contiguous()
    num_masked = num_masked.contiguous()
    code = _MODE_CODE[layout]
    if chosen == "triton":
        return backend.call(_remask_triton_op, _remask_triton, stage_codes, scores, num_masked, code, span_len,
                            prompt_len, mask_id)
    return backend.call(_remask_op, _remask_host, stage_codes, scores, num_masked, code, span_len, prompt_len,
                        mask_id, chosen, spans)


def span_scores(
    prob: torch.Tensor, masked: torch.Tensor, *, span_len: int, arrangement: str, scoring: str
) -> torch.Tensor:
    """Next step's scores from the sampled tokens' probabilities.

    prob: [B, T] fp32 (p-hat at every frame of the stage); masked: [B, n] bool from remask
    -> [B, n] fp32. chunk: 'max' = 1 - max over the chunk, 'prod' = sum of -log over the
    chunk; stride1 / token: -log prob (scoring ignored). DONT_REMASK where not masked.
    Higher means less confident, re-masked first.
    """
    layout = mode(span_len, arrangement)
    if scoring not in ("max", "prod"):
        raise ValueError(f"span_scores: scoring must be 'max' or 'prod', found {scoring!r}")
    if prob.dim() != 2 or masked.shape != (prob.shape[0], num_spans(prob.shape[1], span_len, arrangement)):
        raise ValueError(f"span_scores: prob must be [B, T] and masked [B, n] for {layout} mode, found "
                         f"{tuple(prob.shape)} and {tuple(masked.shape)}")
    return backend.call(_span_scores_op, _span_scores, prob, masked, _MODE_CODE[layout], span_len, scoring)


def initial_span_scores(
    batch: int, frames: int, *, span_len: int, arrangement: str, prompt_len: int | torch.Tensor,
    device: torch.device | str
) -> torch.Tensor:
    """Scores at a stage's start: [B, n] fp32 zeros, DONT_REMASK on the prompt's spans
    (prompt_len // L whole chunks in chunk mode, prompt_len frames otherwise). prompt_len:
    an int (every row), or a [B] int64 tensor on `device` (one prompt length per row)."""
    layout = mode(span_len, arrangement)
    n = num_spans(frames, span_len, arrangement)
    n_prompt = prompt_len // span_len if layout == "chunk" else prompt_len
    if isinstance(prompt_len, torch.Tensor):
        if prompt_len.shape != (batch,) or prompt_len.dtype != torch.int64:
            raise ValueError(f"initial_span_scores: prompt_len must be an int or a [B] int64 tensor (B = {batch}), "
                             f"found {prompt_len.dtype} of shape {tuple(prompt_len.shape)}")
        prompt = torch.arange(n, device=device) < n_prompt[:, None]
        return torch.where(prompt, DONT_REMASK, torch.zeros(batch, n, dtype=torch.float32, device=device))
    scores = torch.zeros(batch, n, dtype=torch.float32, device=device)
    scores[:, :n_prompt] = DONT_REMASK
    return scores
