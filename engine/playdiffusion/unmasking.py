"""The iterative unmasking loop (spec/playdiffusion.md §4.7) on static buffers.

One call fills L target positions between a fixed left (P units) and right (Q units) context:

    ids   [R, S]   R = 2 with CFG (row 1: inner text -> TEXT_GUIDANCE), S = Lt + P + L + Q
    step i:  hidden = model(ids)                        [R, S, D]  one batched forward
             E = CFG mix of the audio rows, std-rescaled (head linear: mix hidden, run head once)
             logits = E[target] @ W_outᵀ                [L, A]
             tokens, scores = gumbel_topk_sample(...)   kernels/gumbel_sampling.py
             target = tokens + V where masked; masked = the next_masked[i] highest scores
             among the masked positions (kernels.masking.remask, token mode); context never moves

Everything that depends on the step index only (t_i, τ_i, δ_i, how many stay masked, which
step is greedy, how many steps run) is a host table made before the loop (`Schedule`), so a
step reads no device value and branches on nothing the device computed: it can be captured
as a CUDA graph. The uniforms come from a `Draws` object in upstream's call order (per step:
sampling [L, A] unless greedy, then scores [L]), so the global torch generator, a seeded
generator or recorded draws replay upstream bit for bit on the CPU.
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import torch

from magnet_engine.engine.events import Listener, StageStep
from magnet_engine.engine.playdiffusion.inpainter import Inpainter
from magnet_engine.errors import InvalidOptionError
from magnet_engine.kernels import backend
from magnet_engine.kernels.gumbel_sampling import gumbel_topk_sample
from magnet_engine.kernels.masking import remask

FLT_MAX = torch.finfo(torch.float32).max


@dataclasses.dataclass(frozen=True)
class UnmaskOptions:
    """The loop's settings (upstream `generate` kwargs, fed from the API's input models) and
    the named fixes of upstream quirks, all off by default (spec §4.10)."""
    steps: int = 30
    init_temp: float = 1.0
    init_diversity: float = 1.0
    guidance: float = 0.5
    rescale: float = 0.7
    topk: int = 25
    # Fix of quirk 3: when the schedule stops early (L·sin(π/2n) < 1), make the last step run
    # greedy instead of keeping tokens drawn at temperature τ0·t_i > 0.
    greedy_last_step_always: bool = False
    # Fix of quirk 14: take the CFG rescale std over the target rows only (not the context).
    cfg_std_target_only: bool = False

    def check(self, codebook: int) -> None:
        if not 1 <= self.steps:
            raise InvalidOptionError(f"steps must be >= 1, found {self.steps}")
        if not 1 <= self.topk <= codebook:
            raise InvalidOptionError(f"topk must be in [1, {codebook}] (the codebook size), found {self.topk}")
        for name in ("init_temp", "init_diversity", "guidance", "rescale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidOptionError(f"{name} must be a finite number >= 0, found {value!r}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Host tables for one loop over L positions; index i = step."""
    target_len: int
    steps_run: int
    temperature: torch.Tensor   # [steps_run] fp32: max(τ0·t_i, 1e-3)
    diversity: torch.Tensor     # [steps_run] fp32: δ0·t_i
    next_masked: torch.Tensor   # [steps_run] int64: positions still masked after step i
    greedy: tuple               # [steps_run] bool: argmax instead of Gumbel-max at step i


def make_schedule(target_len: int, options: UnmaskOptions) -> Schedule:
    """t_i = 1 - i·(1/n) in double as upstream; the mask count uses upstream's fp32 torch ops
    (t·π, /2, sin, ×L, trunc), so boundary cases such as sin(π/6) = 0.5 come out the same."""
    n = options.steps
    h = 1.0 / n
    t = [1.0 - i * h for i in range(n)] + [0.0]
    temps, divs, counts, greedy = [], [], [], []
    for i in range(n):
        temps.append(max(options.init_temp * t[i], 1e-3))
        divs.append(options.init_diversity * t[i])
        count = int((torch.sin(t[i + 1] * torch.ones(1) * torch.pi / 2) * target_len).long()[0])
        counts.append(count)
        greedy.append(i == n - 1)
        if count == 0:
            break
    if options.greedy_last_step_always:
        greedy[-1] = True
    return Schedule(target_len, len(counts), torch.tensor(temps, dtype=torch.float32),
                    torch.tensor(divs, dtype=torch.float32), torch.tensor(counts, dtype=torch.int64), tuple(greedy))


class Draws(tp.Protocol):
    """Fills the step's uniform buffers in upstream's order: sample (if not greedy), then score."""

    def sample(self, step: int, out: torch.Tensor) -> None: ...

    def score(self, step: int, out: torch.Tensor) -> None: ...


class GeneratorDraws:
    """uniform_ on a torch generator (None: the global one, as upstream)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def sample(self, step: int, out: torch.Tensor) -> None:
        out.uniform_(0, 1, generator=self.generator)

    def score(self, step: int, out: torch.Tensor) -> None:
        out.uniform_(0, 1, generator=self.generator)


class RecordedDraws:
    """Replays recorded uniforms: sample[i] [1, L, A] (absent on a greedy step), score[i] [1, L]."""

    def __init__(self, sample: tp.Sequence[torch.Tensor], score: tp.Sequence[torch.Tensor]):
        self.sample_u, self.score_u = list(sample), list(score)

    def sample(self, step: int, out: torch.Tensor) -> None:
        out.copy_(self.sample_u[step].reshape(out.shape))

    def score(self, step: int, out: torch.Tensor) -> None:
        out.copy_(self.score_u[step].reshape(out.shape))


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, guidance: float, rescale: float,
            std_rows: slice | None = None) -> torch.Tensor:
    """[N, D] audio rows of both passes -> guided rows; upstream's op order (§4.7 step 2).
    std over all elements of `std_rows` (all rows by default), unbiased."""
    rows = slice(None) if std_rows is None else std_rows
    pos_std = cond[rows].std()
    mixed = cond + guidance * (cond - uncond)
    rescaled = mixed * pos_std / mixed[rows].std()
    return rescale * rescaled + (1 - rescale) * mixed


def build_ids(model: Inpainter, text: torch.Tensor, left: torch.Tensor, right: torch.Tensor, target_len: int,
              with_null: bool) -> torch.Tensor:
    """[R, S] int64: [BOS, text, EOS, left + V, MASK × L, right + V]; row 1 has the inner text
    replaced by TEXT_GUIDANCE. text, left, right: [n] int64 (units, not ids)."""
    cfg = model.cfg
    dev = text.device
    row = torch.cat([torch.tensor([cfg.bos], device=dev), text, torch.tensor([cfg.eos], device=dev),
                     left + cfg.vocab_size, torch.full((target_len,), cfg.mask, device=dev),
                     right + cfg.vocab_size])
    if not with_null:
        return row[None].clone()
    null = row.clone()
    null[1:1 + text.numel()] = cfg.text_guidance
    return torch.stack([row, null])


class Unmasker:
    """Static buffers and the step for one loop; `run` walks the schedule.

    text: [Lt'] text ids without BOS/EOS; left: [P], right: [Q] units; all int64 on the
    model's device."""

    def __init__(self, model: Inpainter, text: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                 target_len: int, options: UnmaskOptions):
        options.check(model.cfg.codebook_size)
        self.model, self.options = model, options
        self.schedule = make_schedule(target_len, options)
        dev = model.to_logits.weight.device
        cfg = model.cfg
        self.cfg_on = options.guidance > 0
        self.ids = build_ids(model, text.to(dev), left.to(dev), right.to(dev), target_len, self.cfg_on)
        self.text_len = text.numel() + 2
        self.left, self.target_len, self.right = left.numel(), target_len, right.numel()
        start = self.text_len + self.left
        self.target = self.ids[0, start:start + target_len]          # view: the canvas being filled
        self.target_rows = self.ids[:, start:start + target_len]     # both CFG rows
        self.masked = torch.ones(target_len, dtype=torch.bool, device=dev)
        self.sample_u = torch.empty(target_len, cfg.codebook_size, device=dev)
        self.score_u = torch.empty(target_len, device=dev)
        sched = self.schedule
        self.temperature = sched.temperature.to(dev)
        self.diversity = sched.diversity.to(dev)
        self.next_masked = sched.next_masked.to(dev)
        self.neg_max = torch.tensor(-FLT_MAX, device=dev)
        self.impls = backend.resolve(dev)  # once, outside the step: the step reads one attribute

    @torch.inference_mode()
    def logits(self) -> torch.Tensor:
        """[L, A] fp32: guided logits of the target rows from one batched forward."""
        # fp32 from here on (a no-op for an fp32 model): the CFG stds and the sampling need it.
        hidden = self.model.hidden(self.ids)[:, self.text_len:].float()      # [R, P + L + Q, D]
        rows = slice(self.left, self.left + self.target_len)
        if self.cfg_on:
            std_rows = rows if self.options.cfg_std_target_only else None
            guided = cfg_mix(hidden[0], hidden[1], self.options.guidance, self.options.rescale, std_rows)
        else:
            guided = hidden[0]
        head = self.model.to_logits
        return head(guided[rows].to(head.weight.dtype)).float()

    @torch.inference_mode()
    def step(self, i: int, draws: Draws) -> None:
        """One unmasking step on the static buffers; reads no device value."""
        logits = self.logits()
        greedy = self.schedule.greedy[i]
        if not greedy:
            draws.sample(i, self.sample_u)
        draws.score(i, self.score_u)
        tokens, scores = gumbel_topk_sample(logits, None if greedy else self.sample_u, self.score_u,
                                            self.temperature[i], self.diversity[i], top_k=self.options.topk,
                                            impl=self.impls)
        vocab = self.model.cfg.vocab_size
        self.target.copy_(torch.where(self.masked, tokens + vocab, self.target))
        if i + 1 < self.schedule.steps_run:
            scores = torch.where(self.masked, scores, self.neg_max)
            masked = remask(self.target[None], scores[None], self.next_masked[i], span_len=1,
                            arrangement="token", prompt_len=0, mask_id=self.model.cfg.mask, impl=self.impls)
            self.masked.copy_(masked[0])
        if self.cfg_on:
            self.target_rows[1].copy_(self.target)

    @torch.inference_mode()
    def run(self, draws: Draws, listener: Listener | None = None) -> torch.Tensor:
        """-> units [P + L + Q] int64 (context unchanged, target filled). A listener gets
        StageStep events whose canvas [1, 1, P + L + Q] holds units, MASK as A (the card)."""
        steps = self.schedule.steps_run
        vocab = self.model.cfg.vocab_size
        for i in range(steps):
            self.step(i, draws)
            if listener is not None:
                listener(StageStep(stage=0, step=i, steps=steps, done=i + 1, total=steps,
                                   canvas=self.ids[0:1, None, self.text_len:] - vocab))
        return self.ids[0, self.text_len:] - vocab


def split_code(code: torch.Tensor, start_frame: int, end_frame: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Upstream `generate`'s reading of (code [T], start, end) -> (left, L, right) (spec §4.6).

    L = end - start + 1: one more than the n placeholders when a right context of >= 2 frames
    follows; a right context of exactly 1 frame is dropped (quirk 1)."""
    t = code.numel()
    left = code[:start_frame] if start_frame > 0 else code[:0]
    start_frame = max(start_frame, 0)
    if end_frame < t - 1:
        right = code[end_frame:]
    else:
        end_frame, right = t - 1, code[:0]
    return left, end_frame - start_frame + 1, right


def generate(model: Inpainter, text: torch.Tensor, options: UnmaskOptions, draws: Draws, *,
             target_len: int | None = None, code: torch.Tensor | None = None, start_frame: int | None = None,
             end_frame: int | None = None, listener: Listener | None = None) -> torch.Tensor:
    """Upstream `MaskGCT.generate` on the fast loop: TTS (target_len, no code) or inpainting
    (code [T] units with the target at [start_frame, end_frame]). text: [Lt'] ids. -> units [T']."""
    if code is None:
        left = right = text.new_zeros(0)
        length = int(target_len)
    else:
        left, length, right = split_code(code, int(start_frame), int(end_frame))
    return Unmasker(model, text, left, right, length, options).run(draws, listener)
