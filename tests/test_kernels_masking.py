"""kernels/masking.py: span choice and tie order per implementation, the stride1 search
against a transcription of the reference, exact frame writes, and the span scores."""
import numpy as np
import pytest
import torch
from hypothesis import given, HealthCheck, settings, strategies as st

from magnet_engine.kernels import backend, masking

from kernel_helpers import skip_unless_available

MASK_ID = 2048
IMPLS = ["torch", "cpp", "triton"]


def _tied_scores(batch, n, seed, levels=3, prompt_spans=0):
    """Scores full of ties (few distinct values), DONT_REMASK on the first prompt_spans."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (batch, n), generator=g).float() / levels
    scores[:, :prompt_spans] = masking.DONT_REMASK
    return scores


def _codes(batch, frames, seed=0):
    return torch.randint(0, MASK_ID, (batch, frames), generator=torch.Generator().manual_seed(seed))


def _remask(codes, scores, k, impl, span_len=3, arrangement="nonoverlap", prompt_len=0):
    return masking.remask(codes, scores, torch.tensor(k, dtype=torch.int64), span_len=span_len,
                          arrangement=arrangement, prompt_len=prompt_len, mask_id=MASK_ID, impl=impl)


def _expected_frames(chosen_spans, span_len, frames, prompt_len):
    """[B, T] bool: frames of the chosen chunks, minus the prompt."""
    per_frame = chosen_spans.repeat_interleave(span_len, dim=-1)
    out = torch.zeros(chosen_spans.shape[0], frames, dtype=torch.bool)
    out[:, : per_frame.shape[1]] = per_frame
    out[:, :prompt_len] = False
    return out


def _lowest_index_first(scores, k):
    """[B, n] bool: the k best by a stable descending sort (ties: lowest index first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def _topk_choice(scores, k):
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=-1).indices, True)


# ----------------------------------------------------------------------------- chunk / token
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("frames,span_len,arrangement", [(50, 3, "nonoverlap"), (48, 3, "nonoverlap"),
                                                         (41, 1, "nonoverlap"), (41, 4, "token")])
def test_chooses_exactly_num_masked_highest_spans_and_writes_only_their_frames(impl, batch, frames, span_len,
                                                                              arrangement):
    skip_unless_available(impl)
    layout = masking.mode(span_len, arrangement)
    n = masking.num_spans(frames, span_len, arrangement)
    prompt_len = 7
    prompt_spans = prompt_len // span_len if layout == "chunk" else prompt_len
    scores = torch.rand(batch, n, generator=torch.Generator().manual_seed(1))  # no ties here
    scores[:, :prompt_spans] = masking.DONT_REMASK
    codes = _codes(batch, frames)
    before = codes.clone()
    k = 9
    masked = _remask(codes, scores, k, impl, span_len, arrangement, prompt_len)

    chosen = _topk_choice(scores, k)
    L = span_len if layout == "chunk" else 1
    frames_hit = _expected_frames(chosen, L, frames, prompt_len)
    assert torch.equal(codes[frames_hit], torch.full_like(codes[frames_hit], MASK_ID))
    assert torch.equal(codes[~frames_hit], before[~frames_hit])
    assert masked.dtype == torch.bool and masked.shape == (batch, n)
    if layout == "chunk":
        assert torch.equal(masked, chosen)
        assert (masked.sum(-1) == k).all()
    else:
        assert torch.equal(masked, codes == MASK_ID)
    # the chosen are the highest scores, and never a never-re-mask span
    assert (scores[chosen].view(batch, k).min(-1).values >= scores.masked_fill(chosen, -1e9).max(-1).values).all()
    assert not chosen[:, :prompt_spans].any()


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("n", [5, 33, 166, 500])
def test_tie_order_is_torch_topk_on_cpu(impl, n):
    """The original implementation ran scores.topk(k) on CPU; the fixtures depend on its ties."""
    skip_unless_available(impl)
    batch = 3
    for seed in range(4):
        scores = _tied_scores(batch, n, seed, levels=2 + seed, prompt_spans=n // 10)
        if seed == 3:
            scores[0, [1, n // 2]] = float("nan")  # NaN ranks first, as in torch.topk
        for k in sorted({1, 2, n // 64, n // 64 + 1, n // 3, n // 2, n - 1, n} - {0}):  # both ATen regimes
            codes = _codes(batch, n)
            masked = _remask(codes, scores, k, impl, span_len=1)
            assert torch.equal(masked, _topk_choice(scores, k)), f"seed {seed} k {k}"
            chunk_codes = _codes(batch, 3 * n)
            chunks = _remask(chunk_codes, scores, k, impl, span_len=3)
            assert torch.equal(chunks, _topk_choice(scores, k)), f"seed {seed} k {k} (chunks)"


@pytest.mark.parametrize("n", [5, 37, 130])
def test_tie_order_triton_is_lowest_index_first(n):
    skip_unless_available("triton")
    scores = _tied_scores(3, n, seed=5, prompt_spans=2)
    scores[1, 3] = float("nan")
    for k in (1, n // 3, n - 1):
        masked = _remask(_codes(3, 3 * n), scores, k, "triton")
        assert torch.equal(masked, _lowest_index_first(scores, k))


@pytest.mark.parametrize("n", [5, 37, 130])
def test_torch_sync_free_selection_used_on_cuda_is_lowest_index_first(n):
    scores = _tied_scores(3, n, seed=6, prompt_spans=2)
    scores[2, 0] = float("nan")
    for k in (0, 1, n // 3, n - 1, n + 4):
        selected = masking._rank(scores) < torch.tensor(k)
        assert torch.equal(selected, _lowest_index_first(scores, min(k, n)))


@pytest.mark.parametrize("impl", IMPLS)
def test_num_masked_is_clamped_to_the_span_count(impl):
    skip_unless_available(impl)
    scores = torch.rand(2, 10)
    codes = _codes(2, 31)
    masked = _remask(codes, scores, 25, impl)
    assert masked.all()
    assert (codes[:, :30] == MASK_ID).all() and (codes[:, 30] != MASK_ID).all()  # tail frame untouched


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arrangement,span_len", [("nonoverlap", 3), ("token", 1), ("stride1", 3)])
def test_works_in_place_on_a_canvas_row_view(impl, arrangement, span_len):
    skip_unless_available(impl)
    canvas = torch.randint(0, MASK_ID, (3, 4, 30))
    stage = 2
    n = masking.num_spans(30, span_len, arrangement)
    scores = torch.rand(3, n, generator=torch.Generator().manual_seed(2))
    expected = canvas.clone()
    expected_row = expected[:, stage].contiguous()
    ref_masked = _remask(expected_row, scores, 4, "torch", span_len, arrangement, 2)
    expected[:, stage] = expected_row
    masked = _remask(canvas[:, stage], scores, 4, impl, span_len, arrangement, 2)
    assert torch.equal(canvas, expected)
    assert torch.equal(masked, ref_masked)


# ----------------------------------------------------------------------------- stride1
def _lps_reference(scores_row, num_masked, span_len):
    """Transcription of audiocraft's _least_probable_span_masking (docs/model.md §7), with
    fp32 span sums as torch computes them and a stable sort (ties: lowest start first)."""
    T = len(scores_row)
    sums = [np.float32(0)] * (T - span_len + 1)
    for j in range(T - span_len + 1):
        s = np.float32(scores_row[j])
        for l in range(1, span_len):
            s = np.float32(s + np.float32(scores_row[j + l]))
        sums[j] = s
    order = sorted(range(len(sums)), key=lambda j: -sums[j])

    def cover(u):
        mask = [False] * T
        for j in order[:u]:
            for l in range(span_len):
                mask[j + l] = True
        return mask

    num_masked = max(num_masked, span_len)
    min_u = num_masked // span_len
    max_u = num_masked - span_len + 1
    mid = round(0.5 * (min_u + max_u))
    if mid == min_u or mid == max_u:
        return cover(mid)
    while min_u < mid < max_u:
        mask = cover(mid)
        if sum(mask) > num_masked:
            max_u = mid
        else:
            min_u = mid
        mid = round(0.5 * (min_u + max_u))
    return mask


@pytest.mark.parametrize("impl", IMPLS)  # "triton" runs the torch path for stride1
@pytest.mark.parametrize("frames,span_len", [(12, 3), (31, 3), (40, 2), (29, 5)])
def test_stride1_equals_the_reference_search(impl, frames, span_len):
    skip_unless_available(impl)
    batch = 3
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        if seed == 0:
            scores = -torch.log(torch.rand(batch, frames, generator=g))  # -log p: no ties
        else:
            scores = torch.randint(0, 3, (batch, frames), generator=g).float()  # ties everywhere
        scores[:, : seed * 2] = masking.DONT_REMASK
        for m in range(1, frames - seed * 2 + 1):
            codes = _codes(batch, frames)
            before = codes.clone()
            masked = _remask(codes, scores, m, impl, span_len, "stride1", prompt_len=0)
            expected = torch.tensor([_lps_reference(scores[b].tolist(), m, span_len) for b in range(batch)])
            assert torch.equal(codes == MASK_ID, expected), f"seed {seed} m {m}"
            assert torch.equal(codes[~expected], before[~expected])
            assert torch.equal(masked, codes == MASK_ID)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_stride1_never_writes_prompt_frames(impl):
    skip_unless_available(impl)
    scores = torch.zeros(2, 20)
    scores[:, :5] = masking.DONT_REMASK
    codes = _codes(2, 20)
    before = codes.clone()
    masked = _remask(codes, scores, 15, impl, 3, "stride1", prompt_len=5)  # spans may touch the prompt
    assert torch.equal(codes[:, :5], before[:, :5])
    assert not masked[:, :5].any()


# ----------------------------------------------------------------------------- scores
def test_span_scores_formulas():
    g = torch.Generator().manual_seed(3)
    prob = torch.rand(3, 50, generator=g) * 0.99 + 0.01
    masked = torch.rand(3, 16, generator=g) > 0.4
    max_scores = masking.span_scores(prob, masked, span_len=3, arrangement="nonoverlap", scoring="max")
    prod_scores = masking.span_scores(prob, masked, span_len=3, arrangement="nonoverlap", scoring="prod")
    for b in range(3):
        for j in range(16):
            chunk = prob[b, 3 * j: 3 * j + 3]
            if masked[b, j]:
                assert max_scores[b, j] == 1 - chunk.max()
                torch.testing.assert_close(prod_scores[b, j], (-torch.log(chunk)).sum())
            else:
                assert max_scores[b, j] == prod_scores[b, j] == masking.DONT_REMASK
    token_masked = torch.rand(3, 50, generator=g) > 0.5
    for arrangement, span_len in (("stride1", 3), ("token", 1), ("nonoverlap", 1)):
        scores = masking.span_scores(prob, token_masked, span_len=span_len, arrangement=arrangement, scoring="max")
        assert torch.equal(scores, torch.where(token_masked, -torch.log(prob), masking.DONT_REMASK))


def test_initial_span_scores():
    chunk = masking.initial_span_scores(2, 50, span_len=3, arrangement="nonoverlap", prompt_len=8, device="cpu")
    assert chunk.shape == (2, 16) and chunk.dtype == torch.float32
    assert (chunk[:, :2] == masking.DONT_REMASK).all() and (chunk[:, 2:] == 0).all()
    token = masking.initial_span_scores(2, 50, span_len=3, arrangement="stride1", prompt_len=8, device="cpu")
    assert token.shape == (2, 50)
    assert (token[:, :8] == masking.DONT_REMASK).all() and (token[:, 8:] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_first_step_masks_every_generated_chunk_and_then_nests(impl):
    """Invariant 5 of docs/numerics.md §9 on a toy loop: exactly m_i chunks, nested, prompt frames intact."""
    skip_unless_available(impl)
    batch, frames, prompt_len, span_len = 3, 40, 7, 3
    prompt = _codes(batch, prompt_len, seed=9)
    codes = torch.full((batch, frames), MASK_ID)
    codes[:, :prompt_len] = prompt
    scores = masking.initial_span_scores(batch, frames, span_len=span_len, arrangement="nonoverlap",
                                         prompt_len=prompt_len, device="cpu")
    g = torch.Generator().manual_seed(4)
    previous = None
    for m in (11, 8, 5, 1):  # G = 13 - 2 = 11 generated chunks
        masked = _remask(codes, scores, m, impl, span_len, "nonoverlap", prompt_len)
        assert (masked.sum(-1) == m).all()
        if previous is not None:
            assert not (masked & ~previous).any()
        assert torch.equal(codes[:, :prompt_len], prompt)
        sampled = torch.randint(0, MASK_ID, (batch, frames), generator=g)
        codes = torch.where(codes == MASK_ID, sampled, codes)
        prob = torch.rand(batch, frames, generator=g)
        scores = masking.span_scores(prob, masked, span_len=span_len, arrangement="nonoverlap", scoring="max")
        previous = masked


def test_rejects_bad_arguments():
    codes = _codes(2, 30)
    for num_masked in (torch.tensor([3, 3, 3]), torch.tensor([[3], [3]]), torch.tensor([3, 3], dtype=torch.int32)):
        with pytest.raises(ValueError, match="num_masked must be a 0-d or \\[B\\] int64"):
            masking.remask(codes, torch.rand(2, 10), num_masked, span_len=3, arrangement="nonoverlap", prompt_len=0,
                           mask_id=MASK_ID, impl="torch")
    with pytest.raises(ValueError, match="span_scores"):
        _remask(codes, torch.rand(2, 30), 3, "torch")  # chunk mode wants [2, 10]
    with pytest.raises(ValueError, match="arrangement"):
        _remask(codes, torch.rand(2, 10), 3, "torch", arrangement="stride2")
    with pytest.raises(ValueError, match="int64"):
        _remask(codes.int(), torch.rand(2, 10), 3, "torch")


# ----------------------------------------------------------------------------- a count per row
LAYOUTS = [("nonoverlap", 3), ("token", 1), ("nonoverlap", 1), ("stride1", 3)]


def _per_row_vs_alone(impl, scores, counts, span_len, arrangement, prompt_len, frames, seed=0):
    """remask with one count per row against each row alone with its 0-d count: the codes
    written and the masked spans equal, bit for bit."""
    codes = _codes(scores.shape[0], frames, seed)
    batch_codes = codes.clone()
    masked = masking.remask(batch_codes, scores, counts, span_len=span_len, arrangement=arrangement,
                            prompt_len=prompt_len, mask_id=MASK_ID, impl=impl)
    for b in range(scores.shape[0]):
        row_codes = codes[b:b + 1].clone()
        row_masked = masking.remask(row_codes, scores[b:b + 1], counts[b], span_len=span_len,
                                    arrangement=arrangement, prompt_len=prompt_len, mask_id=MASK_ID, impl=impl)
        assert torch.equal(batch_codes[b], row_codes[0]), f"row {b} codes"
        assert torch.equal(masked[b], row_masked[0]), f"row {b} masked"
    return masked


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arrangement,span_len", LAYOUTS)
def test_count_per_row_equals_each_row_alone(impl, arrangement, span_len):
    """Rows of different requests at different steps share a call: row b re-masks exactly
    as it would alone with num_masked[b], ties and NaN included (counts 0, 1, many, > n)."""
    skip_unless_available(impl)
    frames = 40
    n = masking.num_spans(frames, span_len, arrangement)
    scores = _tied_scores(5, n, seed=7, prompt_spans=2)
    scores[3, 5] = float("nan")
    counts = torch.tensor([0, 1, n // 2, 7, n + 3])
    masked = _per_row_vs_alone(impl, scores, counts, span_len, arrangement, 2, frames)
    if masking.mode(span_len, arrangement) == "chunk":
        assert masked.sum(-1).tolist() == counts.clamp(max=n).tolist()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arrangement,span_len", [("nonoverlap", 3), ("token", 1)])
def test_rows_of_other_lengths_rank_their_own_spans_as_alone(impl, arrangement, span_len):
    """`spans`: rows shorter than the call's width (their padded spans scored -inf, as in a
    slot step) choose among tied scores exactly as alone on their own spans, and never touch
    their padding. torch.topk's choice among ties depends on the row's length, so without
    `spans` some row of the same call chooses other spans on the CPU (torch, C++); Triton's
    lowest index first needs nothing."""
    skip_unless_available(impl)
    frames = 60
    n = masking.num_spans(frames, span_len, arrangement)
    spans = torch.tensor([n, 7, 13, 1, n - 1, 4])
    counts = torch.tensor([5, 3, 9, 1, 17, 0])
    scores = _tied_scores(6, n, seed=3, levels=2)
    for b, k in enumerate(spans.tolist()):
        scores[b, k:] = -torch.inf
    codes = _codes(6, frames)
    options = dict(span_len=span_len, arrangement=arrangement, prompt_len=0, mask_id=MASK_ID, impl=impl)
    batch_codes = codes.clone()
    masked = masking.remask(batch_codes, scores, counts, spans=spans, **options)
    for b, k in enumerate(spans.tolist()):
        kept = k * span_len if arrangement == "nonoverlap" else k
        alone_codes = codes[b:b + 1, :kept].clone()
        alone = masking.remask(alone_codes, scores[b:b + 1, :k].contiguous(), counts[b], **options)
        assert torch.equal(batch_codes[b, :kept], alone_codes[0]) and torch.equal(batch_codes[b, kept:], codes[b, kept:])
        assert torch.equal(masked[b, :k], alone[0]) and not masked[b, k:].any(), b
    if impl != "triton":
        padded = codes.clone()
        masking.remask(padded, scores, counts, **options)
        assert not torch.equal(padded, batch_codes)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("arrangement,span_len", LAYOUTS)
def test_count_per_row_matches_torch_reference(impl, arrangement, span_len):
    """The scalar tie order per implementation (torch.topk on the CPU, C++ its twin,
    Triton lowest index first) carries over to counts per row; stride1 and untied scores
    agree everywhere."""
    skip_unless_available(impl)
    frames = 40
    n = masking.num_spans(frames, span_len, arrangement)
    scores = torch.rand(4, n, generator=torch.Generator().manual_seed(8))  # no ties
    counts = torch.tensor([3, 0, n, 11])
    codes, ref_codes = _codes(4, frames), _codes(4, frames)
    masked = masking.remask(codes, scores, counts, span_len=span_len, arrangement=arrangement, prompt_len=2,
                            mask_id=MASK_ID, impl=impl)
    ref = masking.remask(ref_codes, scores, counts, span_len=span_len, arrangement=arrangement, prompt_len=2,
                         mask_id=MASK_ID, impl="torch")
    assert torch.equal(codes, ref_codes) and torch.equal(masked, ref)


def test_count_per_row_sync_free_selection_used_on_cuda():
    """The torch path's CUDA selection (rank < count) with a count per row: lowest index
    first among ties, each row with its own count."""
    scores = _tied_scores(4, 37, seed=9, prompt_spans=2)
    counts = torch.tensor([0, 5, 36, 50])
    selected = masking._rank(scores) < counts[:, None]
    for b, k in enumerate(counts.tolist()):
        assert torch.equal(selected[b], _lowest_index_first(scores[b:b + 1], min(k, 37))[0])


@pytest.mark.parametrize("impl,examples", [("torch", 40), ("cpp", 60), ("triton", 8)])
def test_count_per_row_property(impl, examples):
    skip_unless_available(impl)

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(layout=st.sampled_from(LAYOUTS), frames=st.integers(1, 60), data_seed=st.integers(0, 2**16),
           levels=st.integers(1, 4), counts=st.lists(st.integers(0, 70), min_size=1, max_size=5),
           prompt_len=st.integers(0, 8))
    def check(layout, frames, data_seed, levels, counts, prompt_len):
        arrangement, span_len = layout
        n = masking.num_spans(frames, span_len, arrangement)
        scores = _tied_scores(len(counts), n, data_seed, levels=levels)
        _per_row_vs_alone(impl, scores, torch.tensor(counts), span_len, arrangement, prompt_len, frames, data_seed)

    check()


def test_initial_span_scores_prompt_length_per_row():
    lengths = [0, 8, 3, 50]
    for arrangement, span_len in LAYOUTS:
        options = dict(span_len=span_len, arrangement=arrangement, device="cpu")
        per_row = masking.initial_span_scores(4, 50, prompt_len=torch.tensor(lengths), **options)
        alone = torch.cat([masking.initial_span_scores(1, 50, prompt_len=p, **options) for p in lengths])
        assert per_row.dtype == torch.float32 and torch.equal(per_row, alone)
    with pytest.raises(ValueError, match="prompt_len must be an int or a \\[B\\] int64"):
        masking.initial_span_scores(4, 50, prompt_len=torch.tensor([1, 2]), **options)


def test_count_per_row_compiles_without_graph_breaks():
    """remask with a count per row inside a traced step, per implementation: no graph
    break, and compiled equals eager (codes written in place and the masked spans)."""
    scores = _tied_scores(3, 12, seed=10, prompt_spans=1)
    counts = torch.tensor([2, 0, 9])
    for name in IMPLS:
        if name == "cpp" and backend.cpp_module() is None or name == "triton" and not backend.triton_interpreted():
            continue
        impls = backend.resolve("cpu", name)

        def step(canvas, scores, counts):
            out = []
            for stage, (arrangement, span_len) in enumerate([("nonoverlap", 3), ("token", 1), ("stride1", 3)]):
                n = masking.num_spans(36, span_len, arrangement)
                out.append(masking.remask(canvas[:, stage], scores.repeat(1, 3)[:, :n].contiguous(), counts,
                                          span_len=span_len, arrangement=arrangement, prompt_len=2, mask_id=MASK_ID,
                                          impl=impls))
            return out + [canvas.clone()]

        canvas = lambda: torch.randint(0, MASK_ID, (3, 3, 36), generator=torch.Generator().manual_seed(1))  # noqa: E731
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(step)(canvas(), scores, counts)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        eager = step(canvas(), scores, counts)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(canvas(), scores, counts)
        for got, want in zip(compiled, eager, strict=True):
            assert torch.equal(got, want), name
