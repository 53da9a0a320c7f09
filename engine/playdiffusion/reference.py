"""The plain unmasking loop: a direct transcription of upstream `MaskGCT.generate` /
`reverse_diffusion` (docs/model.md §13.9), one forward per pass, the CFG passes run
separately, every tensor rebuilt each step. It is the oracle of unmasking.py's fast loop and
is not used at run time.
"""
from __future__ import annotations

import torch

from magnet_engine.engine.playdiffusion.inpainter import Inpainter
from magnet_engine.engine.playdiffusion.unmasking import Draws, UnmaskOptions


def _gumbel(u):
    return -torch.log(-torch.log(u + 1e-10) + 1e-10)


@torch.inference_mode()
def reference_generate(model: Inpainter, text: torch.Tensor, options: UnmaskOptions, draws: Draws, *,
                       target_len: int | None = None, code: torch.Tensor | None = None,
                       start_frame: int | None = None, end_frame: int | None = None) -> torch.Tensor:
    """text [Lt'] ids; code [T] units or None (TTS) -> units [T'] (context + generated)."""
    cfg = model.cfg
    vocab, mask_id = cfg.vocab_size, cfg.mask
    text_codes = torch.cat([torch.tensor([cfg.bos]), text, torch.tensor([cfg.eos])])[None]
    before = after = None
    if code is not None:
        t = code.numel()
        if start_frame > 0:
            before = code[None, :start_frame] + vocab
        else:
            start_frame = 0
        if end_frame < t - 1:
            after = code[None, end_frame:] + vocab
        else:
            end_frame = t - 1
        target_len = end_frame - start_frame + 1
    n_before = 0 if before is None else before.shape[1]
    codes = torch.full((1, target_len), mask_id)
    mask = torch.full((1, target_len), True)
    g, r = options.guidance, options.rescale
    if g > 0:
        text_drop = torch.full_like(text_codes, cfg.text_guidance)
        text_drop[:, 0], text_drop[:, -1] = cfg.bos, cfg.eos
    n = options.steps
    h = 1.0 / n
    t_list = [1.0 - i * h for i in range(n)] + [0.0]
    text_len = text_codes.shape[1]
    sample_u = torch.empty(target_len, cfg.codebook_size)
    score_u = torch.empty(target_len)
    for i in range(n):
        full = torch.cat([x for x in (before, codes, after) if x is not None], dim=-1)
        embeds = model.hidden(torch.cat([text_codes, full], dim=-1))[:, text_len:]
        if g > 0:
            null = model.hidden(torch.cat([text_drop, full], dim=-1))[:, text_len:]
            rows = slice(n_before, n_before + target_len) if options.cfg_std_target_only else slice(None)
            pos_std = embeds[:, rows].std()
            embeds = embeds + g * (embeds - null)
            rescaled = embeds * pos_std / embeds[:, rows].std()
            embeds = r * rescaled + (1 - r) * embeds
        logits = model.to_logits(embeds[:, n_before:n_before + target_len])
        temp = options.init_temp * t_list[i]
        diversity = options.init_diversity * t_list[i]
        values, index = logits.topk(options.topk, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(2, index, values)
        next_num = int((torch.sin(t_list[i + 1] * torch.ones(1) * torch.pi / 2) * target_len).long()[0])
        greedy = i == n - 1 or (options.greedy_last_step_always and next_num == 0)
        if greedy:
            sampled = logits.argmax(dim=-1)
        else:
            draws.sample(i, sample_u)
            sampled = (logits / max(temp, 1e-3) + _gumbel(sample_u[None])).argmax(dim=-1)
        codes = torch.where(mask, sampled + vocab, codes)
        scores = logits.softmax(dim=-1).gather(2, sampled[..., None])[..., 0]
        draws.score(i, score_u)
        scores = -1 * (diversity * _gumbel(score_u[None]) + torch.log(scores + 1e-10)).float()
        if next_num == 0:
            break
        scores = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(next_num, dim=-1).indices, True)
        codes = codes.masked_fill(mask, mask_id)
    out = torch.cat([x for x in (before, codes, after) if x is not None], dim=-1)
    return (out - vocab)[0]
