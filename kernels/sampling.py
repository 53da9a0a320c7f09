"""Fused token sampling: CFG mix, temperature, greedy / nucleus / top-k / categorical draw,
and the probability of the drawn token, for one decoding step (docs/model.md §8).

Contract
--------
    sample_tokens(cond_logits, uncond_logits, cfg_coef, temperature, *, use_sampling, top_k,
                  top_p, seed, offset, row_ids=None, impl=None) -> (tokens, prob)

- `cond_logits`, `uncond_logits`: [N, C] fp32 / fp16 / bf16 (N rows = the flattened
  (batch, frame) positions to sample, possibly a subset; C = card). Loaded, then computed
  in fp32. `uncond_logits=None` means no CFG (a coefficient of exactly 1): l = cond.
- `cfg_coef`, `temperature`: fp32 tensors on the logits' device, 0-d (every row) or [N]
  (one per row); the caller clamps the temperature to >= 0.01 (the reference's
  `max(t, 1e-2)`). A coefficient of exactly 1 means no CFG for that row, uncond given or
  not: a batch mixing CFG and no-CFG rows passes `uncond_logits` for every row and 1.0 as
  the no-CFG rows' coefficient.
- `use_sampling`, `top_k`, `top_p`: a bool, an int >= 0 and a float >= 0 for every row,
  or all three as [N] tensors on the logits' device (bool, int64, fp32: one set of options
  per row, each row's mode chosen by `sampling_mode`'s precedence). Per-row values are not
  checked (that would need a device sync): a negative top_k or top_p acts as 0.
- `seed`, `offset`: int64 tensors on the logits' device, the keys of the RNG
  (kernels/rng.py), each 0-d (every row) or [N] (one per row: a request's seed, its own
  step counter). `row_ids`: [N] int64 global row positions (None: 0..N-1). Element (i, j)
  draws `uniform(seed_i, offset_i, row_ids[i] * C + j)`, with seed_i = seed[i] for a [N]
  seed and seed for a 0-d one (offset_i likewise).
- Rows are independent: row i's (token, prob) depends only on its own logits, g, t,
  options, seed_i, offset_i and row_ids[i], never on which other rows share the call. Within
  one implementation a row sampled in a batch of per-row options equals, bit for bit, the
  same row sampled alone with its values as 0-d tensors and scalar options (with
  `uncond_logits=None` where its coefficient is 1); a [N] tensor whose entries all equal v
  samples exactly as the 0-d v.
- Returns `tokens` [N] int64 and `prob` [N] fp32.
- `impl`: an Impls from `backend.resolve` (what the engine passes: nothing is looked up in
  a traced step), or "triton" / "cpp" / "torch" / None, resolved per call.
- Torch ops: `magnet_engine::sample_tokens(cond, uncond, cfg_coef, temperature, seed,
  offset, row_ids, mode, top_k, top_p, impl)` (impl 'cpp' or 'torch'; `mode` is
  sampling_mode(...)) and `magnet_engine::sample_tokens_rows(..., row_ids, use_sampling,
  top_k, top_p, impl)` (per-row options as tensors), with the Triton twins
  `magnet_engine::sample_tokens_triton` / `sample_tokens_rows_triton` (the same without
  impl; triton_ops), all returning (tokens, prob). The scalar-options op keeps one mode per
  call, a compile-time constant of the Triton kernel; the per-row op branches per row.

Semantics (fp32, in this order, as the reference):
    l  = c                           if g == 1 (u + (c - u) * 1 rounds: it differs from c in
                                     # about a third of random fp32 pairs)
         u                           where c == u (so -inf in both halves stays -inf)
         u + (c - u) * g             otherwise
    pi = softmax(l / t)
    not use_sampling : y = argmax l (first index of the max),     p = pi[y]
    top_p > 0        : nucleus,                                   p = pi[y] (full pi)
    top_k > 0        : keep pi >= k-th largest pi (ties kept),    p = pi[y] / sum(kept pi)
                       (the reference renormalises pi in place before reading it)
    otherwise        : categorical on pi,                         p = pi[y]
- Draws are exact categorical samples by the exponential race: y = argmax_j pi_j / E_j over
  the kept set, E_j = -log(u_j) (first index on exact ties).
- Nucleus: token j is kept iff the mass of the tokens strictly more probable than j is
  <= top_p (compared in fp32); the most probable token is always kept. This is the
  reference's rule (drop j when cumsum_j - pi_j > p over the descending sort) with one
  difference on ties: every token equal to the smallest kept probability is kept, where
  the reference's sort splits a tie group arbitrarily. Triton and C++ do not sort the row:
  they find the threshold by bisection on the fp32 bit pattern (31 passes at most), so
  their sums are rounded in another order than the reference's cumsum, and a token whose
  tail mass is within fp32 rounding of top_p may be kept by one and not by another.
- NaN policy: a row whose mixed logits hold a NaN, a +inf, or only -inf has no defined
  distribution; it returns token 0 (a valid id, so the canvas stays indexable) and prob =
  NaN. The NaN flows into the span scores; the engine checks them once after the loop
  and raises NumericalError. -inf entries elsewhere are fine (probability 0).
- Implementations agree on tokens, and on prob to a few fp32 ulps: all compute
  exp(x - max) * (1 / sum) as torch.softmax does, but each with its own exp and summation
  order. A draw can only differ when two race values are within an ulp of each other.
  C++ flushes probabilities below FLT_MIN (exp argument < -87.34) to 0 (subnormals are
  slow on CPUs); such a token has no chance in the race and no weight in the fp32 sums.
"""
from __future__ import annotations

import typing as tp

import torch
from torch.library import wrap_triton

from magnet_engine.kernels import backend, rng

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch and C++ paths do not need it
    triton = None

if triton is not None:
    from magnet_engine.kernels.rng import rng_key, uniform_triton

GREEDY, TOP_P, TOP_K, CATEGORICAL = 0, 1, 2, 3
PER_ROW = 4  # not a mode: each row's mode, top_k and top_p are read from [N] tensors
BISECT_STEPS = 31  # probabilities lie in [0, 1]: bit patterns in [0, 0x3F800000] < 2**30


def sampling_mode(use_sampling: bool, top_k: int, top_p: float) -> int:
    """The reference's precedence: greedy, else nucleus, else top-k, else categorical."""
    if not use_sampling:
        return GREEDY
    if top_p > 0.0:
        return TOP_P
    if top_k > 0:
        return TOP_K
    return CATEGORICAL


def sampling_modes(use_sampling: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[N] int64: `sampling_mode` of every row of per-row options ([N] bool / int64 / fp32)."""
    return torch.where(~use_sampling, GREEDY,
                       torch.where(top_p > 0, TOP_P, torch.where(top_k > 0, TOP_K, CATEGORICAL)))


# ----------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _mixed_logits(cond_ptr, uncond_ptr, row_start, cols, C, g, HAS_UNCOND: tl.constexpr):
        """fp32 CFG-mixed logits at `cols` of one row; -inf outside [0, C)."""
        inside = cols < C
        logits = tl.load(cond_ptr + row_start + cols, mask=inside, other=float("-inf")).to(tl.float32)
        if HAS_UNCOND:
            u = tl.load(uncond_ptr + row_start + cols, mask=inside, other=float("-inf")).to(tl.float32)
            logits = tl.where(logits == u, u, u + (logits - u) * g)
        return logits

    @triton.jit
    def _nucleus_threshold(cond_ptr, uncond_ptr, row_start, C, g, t, x_max, inv_z, top_p,
                           HAS_UNCOND: tl.constexpr, BLOCK_C: tl.constexpr, BISECT: tl.constexpr):
        """The smallest v with sum(pi > v) <= top_p; it is always a value of the row."""
        lanes = tl.arange(0, BLOCK_C)
        lo = 0
        hi = inv_z.to(tl.int32, bitcast=True)  # the max has pi = inv_z
        for _ in range(BISECT):
            mid = (lo + hi) // 2
            v = mid.to(tl.float32, bitcast=True)
            mass = 0.0
            for start in range(0, C, BLOCK_C):
                logits = _mixed_logits(cond_ptr, uncond_ptr, row_start, start + lanes, C, g, HAS_UNCOND)
                pi = tl.exp(logits / t - x_max) * inv_z
                mass += tl.sum(tl.where(pi > v, pi, 0.0), axis=0)
            fits = mass <= top_p
            hi = tl.where(fits, mid, hi)
            lo = tl.where(fits, lo, mid + 1)
        return hi.to(tl.float32, bitcast=True)

    @triton.jit
    def _kth_largest(cond_ptr, uncond_ptr, row_start, C, g, t, x_max, inv_z, top_k,
                     HAS_UNCOND: tl.constexpr, BLOCK_C: tl.constexpr, BISECT: tl.constexpr):
        """The largest v with count(pi >= v) >= k, i.e. the k-th largest value (1 <= k <= C)."""
        lanes = tl.arange(0, BLOCK_C)
        lo = 0
        hi = inv_z.to(tl.int32, bitcast=True)
        for _ in range(BISECT):
            mid = lo + (hi - lo + 1) // 2
            v = mid.to(tl.float32, bitcast=True)
            count = 0
            for start in range(0, C, BLOCK_C):
                cols = start + lanes
                logits = _mixed_logits(cond_ptr, uncond_ptr, row_start, cols, C, g, HAS_UNCOND)
                pi = tl.exp(logits / t - x_max) * inv_z
                count += tl.sum(((pi >= v) & (cols < C)).to(tl.int32), axis=0)
            enough = count >= top_k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        return lo.to(tl.float32, bitcast=True)

    @triton.jit
    def _race(cond_ptr, uncond_ptr, row, row_start, C, g, t, x_max, inv_z, threshold, seed_ptr, offset_ptr,
              row_ids_ptr, token, HAS_UNCOND: tl.constexpr, HAS_ROW_IDS: tl.constexpr, BLOCK_C: tl.constexpr):
        """Exponential race over the kept set {pi >= threshold} -> (token, kept mass).
        seed_ptr / offset_ptr: this row's seed and offset."""
        k1, k2 = rng_key(seed_ptr, offset_ptr)
        if HAS_ROW_IDS:
            rng_row = tl.load(row_ids_ptr + row) * C
        else:
            rng_row = row_start
        lanes = tl.arange(0, BLOCK_C)
        best = -1.0
        kept_mass = 0.0
        for start in range(0, C, BLOCK_C):
            cols = start + lanes
            logits = _mixed_logits(cond_ptr, uncond_ptr, row_start, cols, C, g, HAS_UNCOND)
            pi = tl.exp(logits / t - x_max) * inv_z
            kept = (pi >= threshold) & (cols < C)
            u = uniform_triton(k1, k2, rng_row + cols)
            race = tl.where(kept, pi / -tl.log(u), -1.0)
            chunk_best = tl.max(race, axis=0)
            chunk_arg = tl.argmax(race, axis=0)
            better = chunk_best > best
            token = tl.where(better, start + chunk_arg, token)
            best = tl.where(better, chunk_best, best)
            kept_mass += tl.sum(tl.where(kept, pi, 0.0), axis=0)
        return token, kept_mass

    # The scalar operands are 0-d views such as `coefs[i]` whose 16-byte alignment changes
    # with i, and top_k / the strides may be 1: specialising on either would compile a new
    # variant mid-loop (fatal inside a CUDA-graph capture). One load each: nothing to gain.
    @triton.jit(do_not_specialize=("top_k", "cfg_stride", "temp_stride", "seed_stride", "offset_stride"),
                do_not_specialize_on_alignment=("cfg_ptr", "temp_ptr", "seed_ptr", "offset_ptr", "row_ids_ptr",
                                                "use_sampling_ptr", "top_k_ptr", "top_p_ptr"))
    def _sample_kernel(
        cond_ptr, uncond_ptr, cfg_ptr, temp_ptr, seed_ptr, offset_ptr, row_ids_ptr,
        use_sampling_ptr, top_k_ptr, top_p_ptr, tokens_ptr, prob_ptr,
        C, top_k, top_p, cfg_stride, temp_stride, seed_stride, offset_stride,
        HAS_UNCOND: tl.constexpr, HAS_ROW_IDS: tl.constexpr, MODE: tl.constexpr,
        BLOCK_C: tl.constexpr, BISECT: tl.constexpr,
    ):
        """One program per row; every pass re-reads the row in BLOCK_C chunks.
        *_stride: 0 for a 0-d value, 1 for one per row. MODE: GREEDY..CATEGORICAL for the
        whole call (top_k <= C, top_p), or PER_ROW: each row's options at *_ptr + row."""
        row = tl.program_id(0).to(tl.int64)
        row_start = row * C
        g = tl.load(cfg_ptr + row * cfg_stride)
        t = tl.load(temp_ptr + row * temp_stride)
        if HAS_UNCOND:
            # g == 1 is no CFG: mixing c with itself gives c exactly (l = u where c == u),
            # where u + (c - u) * 1 may round away from c. Per row, at no cost per element.
            uncond_ptr = tl.where(g == 1.0, cond_ptr, uncond_ptr)
        lanes = tl.arange(0, BLOCK_C)

        # Pass 1: max of l and its first index, and whether a NaN is present.
        l_max = float("-inf")
        argmax = 0
        has_nan = 0
        for start in range(0, C, BLOCK_C):
            logits = _mixed_logits(cond_ptr, uncond_ptr, row_start, start + lanes, C, g, HAS_UNCOND)
            is_nan = logits != logits
            has_nan = tl.maximum(has_nan, tl.max(is_nan.to(tl.int32), axis=0))
            logits = tl.where(is_nan, float("-inf"), logits)
            chunk_max = tl.max(logits, axis=0)
            chunk_arg = tl.argmax(logits, axis=0)
            better = chunk_max > l_max
            argmax = tl.where(better, start + chunk_arg, argmax)
            l_max = tl.where(better, chunk_max, l_max)
        # l / t is monotone in l (t > 0), so max(l / t) == max(l) / t exactly.
        x_max = l_max / t

        # Pass 2: softmax normaliser. pi_j = exp(l_j / t - x_max) * inv_z (torch.softmax
        # multiplies by the reciprocal); the max has pi = inv_z.
        z = 0.0
        for start in range(0, C, BLOCK_C):
            logits = _mixed_logits(cond_ptr, uncond_ptr, row_start, start + lanes, C, g, HAS_UNCOND)
            z += tl.sum(tl.exp(logits / t - x_max), axis=0)
        inv_z = 1.0 / z

        # The kept set {pi >= threshold}, then the race over it (and the kept mass for top-k).
        row_seed_ptr = seed_ptr + row * seed_stride
        row_offset_ptr = offset_ptr + row * offset_stride
        token = argmax
        kept_mass = 1.0
        if MODE == 4:  # PER_ROW: the same steps, chosen at run time by the row's own mode
            row_top_k = tl.minimum(tl.load(top_k_ptr + row), C)
            row_top_p = tl.load(top_p_ptr + row)
            row_mode = tl.where(tl.load(use_sampling_ptr + row) != 0,
                                tl.where(row_top_p > 0, 1, tl.where(row_top_k > 0, 2, 3)), 0)
            threshold = 0.0
            if row_mode == 1:
                threshold = _nucleus_threshold(cond_ptr, uncond_ptr, row_start, C, g, t, x_max, inv_z, row_top_p,
                                               HAS_UNCOND, BLOCK_C, BISECT)
            if row_mode == 2:
                threshold = _kth_largest(cond_ptr, uncond_ptr, row_start, C, g, t, x_max, inv_z, row_top_k,
                                         HAS_UNCOND, BLOCK_C, BISECT)
            mass = 1.0
            if row_mode != 0:
                token, mass = _race(cond_ptr, uncond_ptr, row, row_start, C, g, t, x_max, inv_z, threshold,
                                    row_seed_ptr, row_offset_ptr, row_ids_ptr, token, HAS_UNCOND, HAS_ROW_IDS,
                                    BLOCK_C)
            kept_mass = tl.where(row_mode == 2, mass, 1.0)
        else:
            threshold = 0.0
            if MODE == 1:
                threshold = _nucleus_threshold(cond_ptr, uncond_ptr, row_start, C, g, t, x_max, inv_z, top_p,
                                               HAS_UNCOND, BLOCK_C, BISECT)
            if MODE == 2:
                threshold = _kth_largest(cond_ptr, uncond_ptr, row_start, C, g, t, x_max, inv_z, top_k,
                                         HAS_UNCOND, BLOCK_C, BISECT)
            if MODE != 0:
                token, mass = _race(cond_ptr, uncond_ptr, row, row_start, C, g, t, x_max, inv_z, threshold,
                                    row_seed_ptr, row_offset_ptr, row_ids_ptr, token, HAS_UNCOND, HAS_ROW_IDS,
                                    BLOCK_C)
                if MODE == 2:
                    kept_mass = mass

        l_tok = _mixed_logits(cond_ptr, uncond_ptr, row_start, token, C, g, HAS_UNCOND)
        prob = tl.exp(l_tok / t - x_max) * inv_z / kept_mass
        invalid = (has_nan != 0) | (l_max == float("inf")) | (l_max == float("-inf"))
        tl.store(tokens_ptr + row, tl.where(invalid, 0, token).to(tl.int64))
        tl.store(prob_ptr + row, tl.where(invalid, float("nan"), prob))


def _sample_launch(cond, uncond, cfg_coef, temperature, seed, offset, row_ids, tokens, prob, mode, top_k, top_p,
                   use_sampling=None):
    """(grid, args, constexprs) of the _sample_kernel launch: shared by the op and the
    compile-ahead check (kernels/aot.py), so both see the same signature. mode: GREEDY..
    CATEGORICAL with int top_k / float top_p, or PER_ROW with [N] use_sampling, top_k, top_p."""
    n_rows, card = cond.shape
    if mode == PER_ROW:
        options, top_k, top_p = (use_sampling, top_k, top_p), 0, 0.0
    else:
        options, top_k = (tokens, tokens, tokens), min(top_k, card)  # unused pointers
    args = (
        cond, cond if uncond is None else uncond, cfg_coef, temperature, seed, offset,
        tokens if row_ids is None else row_ids,  # unused pointer when HAS_ROW_IDS is False
        *options, tokens, prob, card, top_k, top_p,
        *(1 if v.dim() else 0 for v in (cfg_coef, temperature, seed, offset)),
    )
    meta = dict(HAS_UNCOND=uncond is not None, HAS_ROW_IDS=row_ids is not None, MODE=mode,
                BLOCK_C=min(triton.next_power_of_2(card), 2048), BISECT=BISECT_STEPS)
    return (n_rows,), args, meta


def _run_sample_kernel(cond, uncond, cfg_coef, temperature, seed, offset, row_ids, mode, top_k, top_p,
                       use_sampling=None):
    n_rows = cond.shape[0]
    tokens = torch.empty(n_rows, dtype=torch.int64, device=cond.device)
    prob = torch.empty(n_rows, dtype=torch.float32, device=cond.device)
    if n_rows > 0:
        grid, args, meta = _sample_launch(cond, uncond, cfg_coef, temperature, seed, offset, row_ids,
                                          tokens, prob, mode, top_k, top_p, use_sampling)
        launch = wrap_triton(_sample_kernel) if torch.compiler.is_compiling() else _sample_kernel
        launch[grid](*args, **meta)
    return tokens, prob


def _sample_triton(cond: torch.Tensor, uncond: tp.Optional[torch.Tensor], cfg_coef: torch.Tensor,
                   temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                   row_ids: tp.Optional[torch.Tensor], mode: int, top_k: int, top_p: float
                   ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    return _run_sample_kernel(cond, uncond, cfg_coef, temperature, seed, offset, row_ids, mode, top_k, top_p)


def _sample_rows_triton(cond: torch.Tensor, uncond: tp.Optional[torch.Tensor], cfg_coef: torch.Tensor,
                        temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                        row_ids: tp.Optional[torch.Tensor], use_sampling: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    return _run_sample_kernel(cond, uncond, cfg_coef, temperature, seed, offset, row_ids, PER_ROW, top_k, top_p,
                              use_sampling)


# ----------------------------------------------------------------------------- C++
def _sample_cpp(cond, uncond, cfg_coef, temperature, seed, offset, row_ids, mode, top_k, top_p, use_sampling=None):
    # numpy has no bf16: the C++ kernel reads fp32 (a copy only for fp16 / bf16 logits).
    cond = cond.float()
    uncond = None if uncond is None else uncond.float()
    n_rows = cond.shape[0]
    tokens = torch.empty(n_rows, dtype=torch.int64)
    prob = torch.empty(n_rows, dtype=torch.float32)
    if mode == PER_ROW:
        options = (use_sampling.numpy(), top_k.numpy(), top_p.numpy())
    else:  # the kernel derives the mode by the same precedence
        options = (mode != GREEDY, top_k, top_p)

    def value(x):  # reading a CPU scalar is a memory load, not a device sync; [N] goes as an array
        return x.numpy() if x.dim() else x.item()

    backend.cpp_module().sample_tokens(
        cond.numpy(), None if uncond is None else uncond.numpy(), value(cfg_coef), value(temperature), *options,
        value(seed), value(offset), None if row_ids is None else row_ids.numpy(), tokens.numpy(), prob.numpy(),
    )
    return tokens, prob


# ----------------------------------------------------------------------------- torch
def _nucleus_keep(probs: torch.Tensor, top_p: tp.Union[float, torch.Tensor]) -> torch.Tensor:
    """[N, C] bool: the reference's nucleus (sort, cumsum), extended to whole tie groups.
    top_p: a float, or [N, 1] fp32 (one per row; compared in fp32 either way)."""
    probs_sort = torch.sort(probs, dim=-1, descending=True).values
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    drop = probs_sum - probs_sort > top_p
    # The kept entries are a prefix of the sort; its last value is the threshold.
    n_kept = (~drop).sum(dim=-1, keepdim=True)
    threshold = probs_sort.gather(-1, n_kept - 1)
    return probs >= threshold


def _cfg_mix(cond: torch.Tensor, uncond: tp.Optional[torch.Tensor], cfg_coef: torch.Tensor) -> torch.Tensor:
    """fp32 l of the module docstring; cfg_coef 0-d or [N, 1]."""
    cond = cond.float()
    if uncond is None:
        return cond
    uncond = uncond.float()
    mixed = torch.where(cond == uncond, uncond, uncond + (cond - uncond) * cfg_coef)
    return torch.where(cfg_coef == 1, cond, mixed)  # u + (c - u) * 1 rounds away from c


def _sample_torch(cond, uncond, cfg_coef, temperature, seed, offset, row_ids, mode, top_k, top_p, use_sampling=None):
    """The plain twin: torch ops as the reference writes them, the keyed RNG for the draw.
    mode GREEDY..CATEGORICAL with int top_k / float top_p, or PER_ROW with [N] use_sampling,
    top_k and top_p; a [N] cfg_coef / temperature / offset applies row by row."""
    n_rows, card = cond.shape
    # A per-row value becomes an [N, 1] column; a 0-d one stays 0-d, as the ops always ran.
    g = cfg_coef.reshape(-1, 1) if cfg_coef.dim() else cfg_coef
    t = temperature.reshape(-1, 1) if temperature.dim() else temperature
    logits = _cfg_mix(cond, uncond, g)
    probs = torch.softmax(logits / t, dim=-1)

    if mode == GREEDY:
        tokens = logits.argmax(dim=-1)
        prob = probs.gather(-1, tokens[:, None])[:, 0]
    else:
        if mode == TOP_P:
            kept = _nucleus_keep(probs, top_p)
        elif mode == TOP_K:
            kth = torch.topk(probs, min(top_k, card), dim=-1).values[:, -1:]
            kept = probs >= kth
        elif mode == PER_ROW:
            modes = sampling_modes(use_sampling, top_k, top_p)[:, None]
            # The k-th largest value is the same whether topk or a sort finds it.
            kth = torch.sort(probs, dim=-1, descending=True).values.gather(-1, top_k.clamp(1, card)[:, None] - 1)
            kept = torch.where(modes == TOP_P, _nucleus_keep(probs, top_p[:, None]),
                               torch.where(modes == TOP_K, probs >= kth, True))
        else:
            kept = torch.ones_like(probs, dtype=torch.bool)
        if row_ids is None:
            row_ids = torch.arange(n_rows, device=cond.device)
        index = row_ids[:, None] * card + torch.arange(card, device=cond.device)
        # [1, 1] (0-d) or [N, 1] (per row) keys, broadcast over C.
        exponential = -torch.log(rng.uniform(seed.reshape(-1, 1), offset.reshape(-1, 1), index))
        tokens = torch.where(kept, probs / exponential, -1.0).argmax(dim=-1)
        if mode == PER_ROW:
            tokens = torch.where(modes[:, 0] == GREEDY, logits.argmax(dim=-1), tokens)
        prob = probs.gather(-1, tokens[:, None])[:, 0]
        if mode == TOP_K:
            prob = prob / (probs * kept.float()).sum(dim=-1)
        elif mode == PER_ROW:
            prob = torch.where(modes[:, 0] == TOP_K, prob / (probs * kept.float()).sum(dim=-1), prob)

    l_max = logits.max(dim=-1).values  # NaN if the row holds one
    invalid = ~torch.isfinite(l_max)
    tokens = torch.where(invalid, 0, tokens)
    prob = torch.where(invalid, float("nan"), prob)
    return tokens, prob


# ----------------------------------------------------------------------------- ops
_HOST_IMPLS = {"cpp": _sample_cpp, "torch": _sample_torch}


def _sample_host(cond: torch.Tensor, uncond: tp.Optional[torch.Tensor], cfg_coef: torch.Tensor,
                 temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                 row_ids: tp.Optional[torch.Tensor], mode: int, top_k: int, top_p: float, impl: str
                 ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """The C++ (impl='cpp', CPU) and torch (impl='torch') implementations."""
    return _HOST_IMPLS[impl](cond, uncond, cfg_coef, temperature, seed, offset, row_ids, mode, top_k, top_p)


def _sample_rows_host(cond: torch.Tensor, uncond: tp.Optional[torch.Tensor], cfg_coef: torch.Tensor,
                      temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                      row_ids: tp.Optional[torch.Tensor], use_sampling: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, impl: str) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """_sample_host with per-row options ([N] bool, int64, fp32)."""
    return _HOST_IMPLS[impl](cond, uncond, cfg_coef, temperature, seed, offset, row_ids, PER_ROW, top_k, top_p,
                             use_sampling)


def _sample_fake(cond, *_):  # both ops: the outputs depend on cond's shape and device only
    n_rows = cond.shape[0]
    return cond.new_empty(n_rows, dtype=torch.int64), cond.new_empty(n_rows, dtype=torch.float32)


_sample_op = torch.library.custom_op("magnet_engine::sample_tokens", _sample_host, mutates_args=())
_sample_op.register_fake(_sample_fake)
_sample_rows_op = torch.library.custom_op("magnet_engine::sample_tokens_rows", _sample_rows_host, mutates_args=())
_sample_rows_op.register_fake(_sample_fake)

if triton is not None:
    _sample_triton_op = backend.register_triton_op(
        "magnet_engine::sample_tokens_triton", _sample_kernel, _sample_triton, mutates_args=(), fake=_sample_fake)
    _sample_rows_triton_op = backend.register_triton_op(
        "magnet_engine::sample_tokens_rows_triton", _sample_kernel, _sample_rows_triton, mutates_args=(),
        fake=_sample_fake)


def _check_row_tensor(name: str, value: torch.Tensor, dtype: torch.dtype, n_rows: int, scalar_ok: bool) -> None:
    shapes = ((), (n_rows,)) if scalar_ok else ((n_rows,),)
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) not in shapes:
        found = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        kind = str(dtype).removeprefix("torch.")
        expected = f"a 0-d or [N] {kind} tensor" if scalar_ok else f"an [N] {kind} tensor"
        raise ValueError(f"sample_tokens: {name} must be {expected} (N = {n_rows}), found {found}")


def sample_tokens(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    cfg_coef: torch.Tensor,
    temperature: torch.Tensor,
    *,
    use_sampling: bool | torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    row_ids: torch.Tensor | None = None,
    impl: backend.Impls | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; see the module docstring for the full contract.

    cond_logits / uncond_logits: [N, C] fp32|fp16|bf16; cfg_coef, temperature: 0-d or [N]
    fp32; use_sampling / top_k / top_p: bool / int / float, or [N] bool / int64 / fp32;
    seed, offset: 0-d or [N] int64; row_ids: [N] int64 or None
    -> (tokens [N] int64, prob [N] fp32).
    """
    if cond_logits.dim() != 2:
        raise ValueError(f"sample_tokens: cond_logits must be [N, C], found shape {tuple(cond_logits.shape)}")
    if uncond_logits is not None and uncond_logits.shape != cond_logits.shape:
        raise ValueError(f"sample_tokens: uncond_logits shape {tuple(uncond_logits.shape)} "
                         f"!= cond_logits shape {tuple(cond_logits.shape)}")
    n_rows = cond_logits.shape[0]
    for name, value, dtype in (("cfg_coef", cfg_coef, torch.float32), ("temperature", temperature, torch.float32),
                               ("seed", seed, torch.int64), ("offset", offset, torch.int64)):
        _check_row_tensor(name, value, dtype, n_rows, scalar_ok=True)
    if row_ids is not None and (row_ids.shape != cond_logits.shape[:1] or row_ids.dtype != torch.int64):
        raise ValueError(f"sample_tokens: row_ids must be [N] int64, found {row_ids.dtype} {tuple(row_ids.shape)}")
    per_row = [isinstance(v, torch.Tensor) for v in (use_sampling, top_k, top_p)]
    if any(per_row) and not all(per_row):
        raise ValueError(f"sample_tokens: use_sampling, top_k and top_p must be all Python scalars or all [N] "
                         f"tensors, found {', '.join(type(v).__name__ for v in (use_sampling, top_k, top_p))}")
    if all(per_row):
        for name, value, dtype in (("use_sampling", use_sampling, torch.bool), ("top_k", top_k, torch.int64),
                                   ("top_p", top_p, torch.float32)):
            _check_row_tensor(name, value, dtype, n_rows, scalar_ok=False)
    elif top_k < 0 or top_p < 0:
        raise ValueError(f"sample_tokens: top_k and top_p must be >= 0, found top_k={top_k}, top_p={top_p}")
    chosen = backend.pick(impl, cond_logits.device).sample_tokens
    cond_logits = cond_logits.contiguous()
    uncond_logits = None if uncond_logits is None else uncond_logits.contiguous()
    row_ids = None if row_ids is None else row_ids.contiguous()
    tensors = tuple(v.contiguous() for v in (cfg_coef, temperature, seed, offset))
    if all(per_row):
        options = tuple(v.contiguous() for v in (use_sampling, top_k, top_p))
        op, fn = (_sample_rows_triton_op, _sample_rows_triton) if chosen == "triton" else (_sample_rows_op,
                                                                                          _sample_rows_host)
    else:
        options = (sampling_mode(use_sampling, top_k, top_p), top_k, float(top_p))
        op, fn = (_sample_triton_op, _sample_triton) if chosen == "triton" else (_sample_op, _sample_host)
    args = (cond_logits, uncond_logits, *tensors, row_ids, *options)
    if chosen == "triton":
        return backend.call(op, fn, *args)
    return backend.call(op, fn, *args, chosen)
