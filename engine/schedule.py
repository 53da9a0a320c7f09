"""Per-step decoding tables, computed on the host before the loop (docs/model.md §6), and
the frame counts they run over: the frames a duration asks for, the frames span trimming keeps.

The original computes these inside the loop with a device sync per step; here they are
made once, with the same fp32 torch ops so that every value is bitwise the same:

    τ_i = linspace(0, 1, n)[i]                  (fp32)
    ρ_i = cos(π/2 · τ_i)                         (fp32)
    m_i = max(trunc(ρ_i · G), 1)                spans to mask; G = spans to generate
    g_i = ρ_i · g_max + (1 − ρ_i) · g_min       (float64 from the fp32 ρ, as the original)
    t_i = max(τ0 · (n − 1 − i) / n, 0.01)       (τ0 if not annealing)
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import torch

from magnet_engine.engine.config import DecodingParams
from magnet_engine.engine.errors import InvalidOptionError
from magnet_engine.kernels import masking


@dataclasses.dataclass(frozen=True)
class StageSchedule:
    mask_p: tp.Tuple[float, ...]
    num_masked: tp.Tuple[int, ...]
    cfg_coef: tp.Tuple[float, ...]
    temperature: tp.Tuple[float, ...]   # already clamped to >= 0.01

    @property
    def steps(self) -> int:
        return len(self.num_masked)


def stage_schedule(n_steps: int, spans_to_generate: int, params: DecodingParams) -> StageSchedule:
    tau = torch.linspace(0, 1, n_steps)
    rho = torch.cos(tau * math.pi * 0.5)
    num_masked = (rho * spans_to_generate).tolist()  # fp32 product, as `(mask_p * G).item()`
    mask_p = rho.tolist()
    temps = [params.temperature * ((n_steps - 1 - i) / n_steps) if params.anneal_temp else params.temperature
             for i in range(n_steps)]
    return StageSchedule(
        mask_p=tuple(mask_p),
        num_masked=tuple(max(int(m), 1) for m in num_masked),
        cfg_coef=tuple(p * params.max_cfg_coef + (1 - p) * params.min_cfg_coef for p in mask_p),
        temperature=tuple(max(t, 1e-2) for t in temps),
    )


def stage_schedules(params: DecodingParams, to_generate: tp.Sequence[int]) -> tp.List[StageSchedule]:
    """The schedule of every stage of a run; to_generate: spans to generate G per codebook
    (fixed spans excluded)."""
    out = []
    for stage, n_steps in enumerate(params.decoding_steps):
        if to_generate[stage] < 1:
            raise InvalidOptionError(f"codebook {stage} has every cell fixed: nothing to decode")
        out.append(stage_schedule(n_steps, to_generate[stage], params))
    return out


def duration_frames(seconds: float, frame_rate: float) -> int:
    """T = ⌊seconds · frame_rate⌋: the frames a duration asks for (the original's max_gen_len)."""
    return int(seconds * frame_rate)


def kept_frames(frames: int, span_len: int, arrangement: str) -> int:
    """T': the frames a T-frame generation keeps. 'nonoverlap' decodes whole spans and drops
    the last T mod span_len frames (span trimming, as the original); 'stride1' keeps T."""
    if masking.mode(span_len, arrangement) == "chunk":
        return frames // span_len * span_len
    return frames


def span_fixed(fixed: torch.Tensor, span_len: int, layout: str) -> torch.Tensor:
    """[K, T'] fixed cells -> [K, n] fixed spans. In 'chunk' layout a chunk is fixed iff all
    its frames are (a partly fixed chunk is decoded, its fixed frames restored after each
    re-masking, as the reference restores a prompt); otherwise spans are the frames."""
    if layout == "chunk":
        return fixed.reshape(fixed.shape[0], -1, span_len).all(dim=-1)
    return fixed
