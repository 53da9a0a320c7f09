"""Autoregressive decoding on a static KV cache, and hybrid AR + masked decoding.

Read with `docs/model.md` §11. Three pieces:

* **Delay layout** (MusicGen's pattern, `codebooks_pattern.modeling: delay`): sequence
  position p holds codebook k at frame p − 1 − d_k (d_k = `delays[k]`), position 0 is one
  special step, and the output at position p predicts position p + 1. A clip of T frames is
  a sequence of T + max(d) + 1 positions; empty cells hold the special id (= card, which is
  also MAGNeT's mask id).
* **`ARRuntime`**: MusicGen-style decoding, one position per step, over a preallocated cache
  `[2B, H, T_max, d]` per layer (CFG as a doubled batch: conditional rows, then null rows).
  The step reads and writes its position through a device tensor, so it issues work and
  never waits on the host; with `cuda_graphs=True` on CUDA it is captured once and replayed.
* **Hybrid** (`plan_hybrid`, `tail_forward`; run by `generate.run`): a hybrid-MAGNeT
  checkpoint generates the first F frames with the AR runtime, hands them to masked
  decoding as a fixed prompt, and decodes the tail. In the
  default `prefix_attention='cached'` the prefix rows keep the keys/values of the AR phase
  (causal, as in training) and only rows from `query_start` on are recomputed each step;
  'bidirectional' recomputes every row each step with the masked-stage attention for all of
  them (the unfinished reference branch's inference, a train/infer mismatch).

Hand-off. With S AR steps, positions 1..S are generated, so codebook k has its frames
t < S − d_k. 'staircase' (default, as trained) runs S = F steps and fixes exactly those
cells (codebook k: F − d_k frames); 'rectangle' runs S = F + max(d) and fixes F frames of
every codebook, dropping the extra cells. Either way the rows whose outputs predict only
fixed cells are positions 0..F−1: those are the causal prefix rows.

Masked stage k inside the delay layout: the query for frame t sits at row t + d_k and the
key holding codebook k's frame t′ at row t′ + d_k + 1, so the band |t − t′| <= W of stages
> 0 becomes |i − j + 1| <= W between rows; stage 0 attends to every row.

Decisions of ours (docs/model.md §11) are named options here, with these defaults: the
staircase hand-off, cached prefix rows, AR sampling top-k 250 / temperature 1 / CFG from the
checkpoint's `classifier_free_guidance.inference_coef` (3.0), prefix length 3 s
(`DEFAULT_PREFIX_SECONDS`; the hybrid checkpoints' configs name none that we know of).
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import torch
import torch.nn.functional as F

from magnet_engine.engine import graphs
from magnet_engine.engine.config import DecodingParams, ModelConfig, check_sampling_options
from magnet_engine.engine.errors import InvalidOptionError, NumericalError
from magnet_engine.engine.model import KVCache, MagnetLM
from magnet_engine.engine.schedule import kept_frames
from magnet_engine.kernels import backend, masking, sampling

HANDOFFS = ("staircase", "rectangle")
PREFIX_ATTENTIONS = ("cached", "bidirectional")
DEFAULT_PREFIX_SECONDS = 3.0
AR_RNG_OFFSET = 1 << 40   # the AR phase's RNG offset: disjoint from the masked steps' (0, 1, ...)
MAX_CACHES = 4            # KV caches, and AR step states, kept per runtime (most recently used shapes)


# ------------------------------------------------------------------------ delay layout
def delayed_length(frames: int, delays: tp.Sequence[int]) -> int:
    return frames + max(delays) + 1


def build_delayed(codes: torch.Tensor, delays: tp.Sequence[int], special: int) -> torch.Tensor:
    """codes [B, K, T] -> delay-layout sequence [B, K, T + max(d) + 1]."""
    b, k, t = codes.shape
    seq = torch.full((b, k, delayed_length(t, delays)), special, dtype=codes.dtype, device=codes.device)
    for q, d in enumerate(delays):
        seq[:, q, 1 + d:1 + d + t] = codes[:, q]
    return seq


def revert_delayed(seq: torch.Tensor, delays: tp.Sequence[int], frames: int) -> torch.Tensor:
    """Delay-layout sequence [B, K, S] -> codes [B, K, frames] (cells past S: none, S must fit)."""
    if seq.shape[-1] < frames + max(delays) + 1:
        raise ValueError(f"sequence of {seq.shape[-1]} positions holds fewer than {frames} frames of every codebook")
    return torch.stack([seq[:, q, 1 + d:1 + d + frames] for q, d in enumerate(delays)], dim=1)


# ------------------------------------------------------------------------ AR sampling
@dataclasses.dataclass(frozen=True)
class ARParams:
    """Sampling of the AR phase; defaults are MusicGen's API defaults (docs/model.md §11.2)."""
    use_sampling: bool = True
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0

    def validate(self) -> "ARParams":
        check_sampling_options(self.use_sampling, self.top_k, self.top_p, self.temperature, what="AR ")
        c = self.cfg_coef
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise InvalidOptionError(f"AR cfg_coef must be a finite number, found {c!r}")
        return self


def sample_heads(logits: torch.Tensor, batch: int, params: ARParams, coef: torch.Tensor, temp: torch.Tensor,
                  seed_rows: torch.Tensor, row_ids: torch.Tensor, impl: tp.Optional[str]) -> torch.Tensor:
    """logits [2B, K, C] (cond rows, then null) -> tokens [B, K] through the sampling kernel."""
    k, card = logits.shape[1], logits.shape[2]
    cond = logits[:batch].reshape(batch * k, card)
    uncond = logits[batch:].reshape(batch * k, card) if params.cfg_coef != 1.0 else None
    tokens, prob = sampling.sample_tokens(cond, uncond, coef, temp, use_sampling=params.use_sampling,
                                          top_k=params.top_k, top_p=params.top_p, seed=seed_rows,
                                          offset=torch.full_like(coef, AR_RNG_OFFSET, dtype=torch.long),
                                          row_ids=row_ids, impl=impl)
    return tokens.view(batch, k), prob


@dataclasses.dataclass
class ARResult:
    seq: torch.Tensor                 # [B, K, seq_len] delay layout; positions > steps hold the special id
    cache: KVCache                    # keys/values of positions 0..steps-1, both CFG halves
    cross_kv: tp.List[tp.Tuple[torch.Tensor, torch.Tensor]]
    steps: int


class ARRuntime:
    """MusicGen-style delay-pattern decoding over a static KV cache (see module docstring).

    lm: a MagnetLM in the delay layout (a MusicGen / AudioGen LM or a hybrid-MAGNeT one),
    its transformer in `dtype`; embeddings, out_norm and heads fp32 (as `decoding.Runtime`).
    """

    def __init__(self, lm: MagnetLM, dtype: torch.dtype = torch.float32, impl: tp.Optional[str] = None,
                 cuda_graphs: bool = False):
        cfg = lm.cfg
        if cfg.pattern != "delay":
            raise InvalidOptionError(f"autoregressive decoding needs a delay-layout checkpoint "
                                     f"(codebooks_pattern.modeling), this one is {cfg.pattern!r}")
        self.lm, self.cfg, self.dtype = lm, cfg, dtype
        self.device = next(lm.parameters()).device
        self.impl = backend.resolve(self.device, impl)   # once: the traced step holds no lookup
        graphs.check_device(cuda_graphs, self.device)
        self.cuda_graphs = cuda_graphs
        self._caches: graphs.StateCache[KVCache] = graphs.StateCache(MAX_CACHES)
        self._states: graphs.StateCache[_ARState] = graphs.StateCache(MAX_CACHES)

    # -------------------------------------------------------------- shared state
    def cache(self, rows: int, max_len: int) -> KVCache:
        """A KV cache of this shape (the rescorer's teacher-forced forward), the MAX_CACHES
        most recently used kept."""
        return self._caches.get((rows, max_len), lambda: self.lm.new_cache(rows, max_len))   # the matmul dtype

    def cross_kv(self, cond: torch.Tensor):
        """Per-layer cross K/V of CFG rows [2B, S, D] in this runtime's dtype (`MagnetLM.cfg_cross_kv`)."""
        return self.lm.cfg_cross_kv(cond, self.dtype)

    def hidden(self, codes: torch.Tensor, positions: torch.Tensor, cross_kv, cache: KVCache,
               mask: torch.Tensor) -> torch.Tensor:
        """Rows at `positions` over the cache -> LN_out output [R, t, D] fp32."""
        x = self.lm.forward_cached(codes, positions, cross_kv, cache, mask, self.dtype)
        return self.lm.out_norm(x.float())

    # ----------------------------------------------------------------- decoding
    @torch.no_grad()
    def prepare(self, cond: torch.Tensor, seq_len: int, params: ARParams,
                seeds: tp.Optional[tp.Sequence[int]] = None) -> "_ARState":
        """The static state of a run: buffers of this (batch, length, text length, sampling
        options), reused across calls (with their CUDA graph), the call's inputs copied in."""
        params = params.validate()
        cfg, dev = self.cfg, self.device
        batch = cond.shape[0] // 2
        seeds = [0] * batch if seeds is None else list(seeds)
        if len(seeds) != batch:
            raise InvalidOptionError(f"expected {batch} seeds (one per row), found {len(seeds)}")

        def new_state() -> _ARState:
            kv = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in self.cross_kv(cond)]
            return _ARState(
                seq=torch.full((batch, cfg.n_q, seq_len), cfg.card, dtype=torch.long, device=dev),
                pos=torch.zeros(1, dtype=torch.long, device=dev),
                key_pos=torch.arange(seq_len, device=dev),
                delays=torch.tensor(cfg.delays, dtype=torch.long, device=dev),
                frames=seq_len - cfg.max_delay - 1,
                heads=torch.arange(cfg.n_q, device=dev),
                coef=torch.zeros((), device=dev), temp=torch.zeros((), device=dev),
                seed_rows=torch.zeros(batch * cfg.n_q, dtype=torch.long, device=dev),
                cross_kv=kv, cache=self.lm.new_cache(2 * batch, seq_len), params=params,
                nonfinite=torch.zeros((), dtype=torch.bool, device=dev))
        s = self._states.get((batch, seq_len, cond.shape[1], params), new_state)
        s.seq.fill_(cfg.card)
        s.coef.fill_(float(params.cfg_coef))
        s.temp.fill_(max(float(params.temperature), 1e-2))
        s.seed_rows.copy_(torch.tensor(seeds, dtype=torch.long).repeat_interleave(cfg.n_q))
        for (k, v), (k_new, v_new) in zip(s.cross_kv, self.cross_kv(cond)):
            k.copy_(k_new)
            v.copy_(v_new)
        for k, v in zip(s.cache.keys, s.cache.values):   # a masked slot still enters SDPA as 0·v
            k.zero_()
            v.zero_()
        s.nonfinite.zero_()
        return s

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, steps: int, seq_len: int, params: ARParams,
                 seeds: tp.Optional[tp.Sequence[int]] = None, *,
                 callback: tp.Optional[tp.Callable[[int, int], None]] = None) -> ARResult:
        """Generate positions 1..steps of a delay-layout sequence of `seq_len` positions.

        cond: [2B, S, D] condition rows (conditional, then null). seeds: one per row. The
        cells of position p + 1 whose frame p − d_k lies outside [0, seq_len − max(d) − 1)
        get the special id, as MusicGen's valid mask does. callback(done, steps) after each step.
        """
        if not 1 <= steps < seq_len:
            raise InvalidOptionError(f"AR steps must be in [1, {seq_len - 1}], found {steps}")
        state = self.prepare(cond, seq_len, params, seeds)
        # one step shape per state: its graph is captured on the first call and replayed after
        step = (self._states.graph(state, None, lambda: self._step(state),
                                   (state.seq, state.nonfinite, *state.cache.keys, *state.cache.values)).replay
                if self.cuda_graphs else (lambda: self._step(state)))
        for p in range(steps):
            state.pos.fill_(p)              # a host int written to the device: no read-back
            step()
            if callback is not None:
                callback(p + 1, steps)
        if bool(state.nonfinite):
            raise NumericalError("non-finite probabilities in the autoregressive phase (NaN/inf logits): "
                                 "check the checkpoint weights and the precision setting")
        return ARResult(state.seq, state.cache, state.cross_kv, steps)

    def _step(self, s: "_ARState") -> None:
        """Feed position pos, sample position pos + 1. Reads and writes through device tensors
        only, so the same call serves every position and a CUDA graph can capture it."""
        cfg, batch = self.cfg, s.seq.shape[0]
        codes = s.seq.index_select(2, s.pos)                                     # [B, K, 1]
        mask = s.key_pos[None, :] <= s.pos[:, None]                              # [1, T_max]
        h = self.hidden(codes, s.pos, s.cross_kv, s.cache, mask)               # [2B, 1, D]
        logits = self.lm.head_logits(h)[:, :, 0]                               # [2B, K, C]
        row_ids = (s.pos * cfg.n_q + s.heads).repeat(batch)
        tokens, prob = sample_heads(logits, batch, s.params, s.coef, s.temp, s.seed_rows, row_ids, self.impl)
        s.nonfinite.logical_or_(~torch.isfinite(prob).all())
        frame = s.pos - s.delays                                                # frame of each cell at pos + 1
        valid = (frame >= 0) & (frame < s.frames)
        s.seq.index_copy_(2, s.pos + 1, torch.where(valid, tokens, cfg.card)[..., None])



@dataclasses.dataclass
class _ARState:
    seq: torch.Tensor
    pos: torch.Tensor
    key_pos: torch.Tensor
    delays: torch.Tensor
    frames: int
    heads: torch.Tensor
    coef: torch.Tensor
    temp: torch.Tensor
    seed_rows: torch.Tensor
    cross_kv: tp.Any
    cache: KVCache
    params: ARParams
    nonfinite: torch.Tensor


# --------------------------------------------------------------------------- hybrid
@dataclasses.dataclass(frozen=True)
class HybridOptions:
    """What the API exposes of hybrid decoding. prefix_seconds None: the default for the
    checkpoint (DEFAULT_PREFIX_SECONDS for a hybrid-MAGNeT one, none for a plain one)."""
    prefix_seconds: tp.Optional[float] = None
    handoff: str = "staircase"
    prefix_attention: str = "cached"
    ar: ARParams = ARParams()

    def validate(self) -> "HybridOptions":
        s = self.prefix_seconds
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0):
            raise InvalidOptionError(f"hybrid_prefix_seconds must be None or a number >= 0, found {s!r}")
        check_handoff(self.handoff, self.prefix_attention)
        self.ar.validate()
        return self

    def prefix_frames(self, cfg: ModelConfig, frame_rate: float, clip_seconds: float) -> int:
        """Frames of the AR prefix of a `clip_seconds` clip; 0 when decoding is not hybrid. A
        hybrid checkpoint's default is DEFAULT_PREFIX_SECONDS, or half of a shorter clip."""
        seconds = self.prefix_seconds
        if seconds is None:
            seconds = min(DEFAULT_PREFIX_SECONDS, clip_seconds / 2) if cfg.is_hybrid else 0.0
        return int(round(seconds * frame_rate))


def check_handoff(handoff: str, prefix_attention: str) -> None:
    if handoff not in HANDOFFS:
        raise InvalidOptionError(f"hybrid_handoff must be one of {HANDOFFS}, found {handoff!r}")
    if prefix_attention not in PREFIX_ATTENTIONS:
        raise InvalidOptionError(f"hybrid_prefix_attention must be one of {PREFIX_ATTENTIONS}, "
                                 f"found {prefix_attention!r}")


@dataclasses.dataclass(frozen=True)
class HybridPlan:
    """Host-side layout of one hybrid generation (see module docstring)."""
    frames: int                        # T': frames of the clip kept after span trimming
    prefix_frames: int                 # F
    ar_steps: int                      # S
    prompt_lens: tp.Tuple[int, ...]    # fixed frames per codebook
    seq_len: int                       # T' + max(d) + 1
    query_start: int                   # first row recomputed in masked steps
    handoff: str
    prefix_attention: str

    @property
    def audio_frames(self) -> int:
        """Frames with every codebook fixed: decodable as soon as the AR phase ends."""
        return min(self.prompt_lens)


def check_tail(cfg: ModelConfig, frames: int, prefix_frames: int) -> None:
    """An AR prefix of `prefix_frames` leaves at least one span of a `frames`-frame clip to
    masked decoding (so at least one frame past it is kept, whatever the arrangement)."""
    if not 1 <= prefix_frames <= frames - cfg.span_len:
        raise InvalidOptionError(f"the AR prefix must be 1 to {frames - cfg.span_len} frames, leaving at least one "
                                 f"span ({cfg.span_len} frames) of the {frames}-frame clip to masked decoding; "
                                 f"found {prefix_frames}")


def plan_hybrid(cfg: ModelConfig, frames: int, prefix_frames: int, params: DecodingParams,
                handoff: str = "staircase", prefix_attention: str = "cached") -> HybridPlan:
    check_handoff(handoff, prefix_attention)
    check_tail(cfg, frames, prefix_frames)
    layout = masking.mode(cfg.span_len, params.span_arrangement)
    kept = kept_frames(frames, cfg.span_len, params.span_arrangement)
    delays = cfg.delays
    if handoff == "staircase":
        steps, lens = prefix_frames, tuple(max(prefix_frames - d, 0) for d in delays)
    else:
        steps, lens = prefix_frames + max(delays), (prefix_frames,) * len(delays)
    if prefix_attention == "cached":
        span = cfg.span_len if layout == "chunk" else 1
        first_row = min(span * (n // span) + d for n, d in zip(lens, delays))
        query_start = max(0, min(first_row, prefix_frames))
    else:
        query_start = 0
    return HybridPlan(kept, prefix_frames, steps, lens, delayed_length(kept, delays), query_start,
                      handoff, prefix_attention)


def tail_forward(runtime, plan: HybridPlan, ar: ARResult):
    """The masked steps' FrameForward of a hybrid tail (`decoding.FrameForward`): rows from
    query_start over the AR cache. runtime: the masked runtime of the same LM."""
    cfg, lm, dev = runtime.cfg, runtime.lm, runtime.device
    positions = torch.arange(plan.query_start, plan.seq_len, device=dev)
    attends = [tail_attention(plan, lm.window(k), runtime.impl) for k in range(cfg.n_q)]
    # frame t of stage k is predicted by row t + d_k (rows before query_start are never read:
    # those frames are fixed and never sampled or scored)
    rows = [(torch.arange(plan.frames, device=dev) + d - plan.query_start).clamp(min=0) for d in cfg.delays]
    batch = ar.seq.shape[0]

    def forward(codes: torch.Tensor, stage: int, cond_only: bool) -> torch.Tensor:
        seq = build_delayed(codes, cfg.delays, cfg.card)[..., plan.query_start:]
        x = lm.forward_cached(seq, positions, ar.cross_kv, ar.cache, attends[stage], runtime.dtype,
                              rows=batch if cond_only else 2 * batch)
        return x.index_select(1, rows[stage])
    return forward


def tail_attention(plan: HybridPlan, window: tp.Optional[int], impl: tp.Optional[str] = None):
    """Self-attention of the rows [query_start, seq_len) over the cache [R, H, seq_len, d],
    equal to `stage_attention_mask` without building it:

    * prefix rows (i < F, cached variant): causal over the prefix, one small SDPA;
    * tail rows at stage 0 (window None): every key, one unmasked SDPA;
    * tail rows above: keys j with |i − j + 1| <= W. Placing query i at index i + 1 turns
      this into the symmetric band |(i + 1) − j| <= W of the banded kernel (kernels/attention.py,
      O(T·W), C++ / Triton); the last row, which that index would push past the end, sees
      keys j >= seq_len − W in its own small SDPA.
    """
    from magnet_engine.kernels import attention as attn_kernels

    q0, n_seq = plan.query_start, plan.seq_len
    first_tail = max(plan.prefix_frames, q0) if plan.prefix_attention == "cached" else q0

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        n_prefix = first_tail - q0                                       # causal rows among the queries
        if n_prefix:
            i = torch.arange(q0, first_tail, device=q.device)[:, None]
            j = torch.arange(first_tail, device=q.device)[None, :]
            out[:, :, :n_prefix] = F.scaled_dot_product_attention(q[:, :, :n_prefix], k[:, :, :first_tail],
                                                                  v[:, :, :first_tail], attn_mask=j <= i)
        if window is None:
            out[:, :, n_prefix:] = F.scaled_dot_product_attention(q[:, :, n_prefix:], k, v)
            return out
        shifted = torch.zeros_like(k)                    # query of row i at index i + 1
        shifted[:, :, first_tail + 1:] = q[:, :, n_prefix:-1]
        banded = attn_kernels.attention(shifted, k, v, window, impl=impl)
        out[:, :, n_prefix:-1] = banded[:, :, first_tail + 1:]
        last = max(n_seq - window, 0)
        out[:, :, -1:] = F.scaled_dot_product_attention(q[:, :, -1:], k[:, :, last:], v[:, :, last:])
        return out
    return attend


