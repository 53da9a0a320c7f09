"""External autoregressive models: loading a MusicGen / AudioGen checkpoint, and rescoring
MAGNeT's samples with it (docs/model.md §12).

Rescoring, per masked step that re-masks afterwards (every step but a stage's last):

    1.–3. MAGNeT samples the masked positions of stage k and writes them (p_magnet kept)
    4.    one teacher-forced causal forward of the external LM over the current canvas in its
          delay layout; p_ext(t) = its probability of the token now at (t, k)
    5.    conf = w · p_magnet + (1 − w) · p_ext, then span scoring ('max' / 'prod') on conf

w = 1 skips step 4 entirely, so decoding is bit-for-bit the plain one. The open decisions
of docs/model.md §12 are `RescoreOptions` fields:

* temperature: 'tempered' (default) — p_magnet is the sampled token's probability under
  the step's temperature (what plain decoding scores with) and p_ext uses the same
  temperature; 'raw' — both at temperature 1 (p_magnet from the CFG-mixed logits).
* fill: codebooks above k do not exist yet at stage k, but under the delay layout p_ext of
  (t, k) reads them at earlier frames. 'special' (default) leaves them the special id (it is
  the mask id, card); 'greedy' fills them with MAGNeT's argmax of the current step's
  CFG-mixed logits of those heads (an extra head evaluation per step; parallel layout only).
* cfg_coef: None (default) runs the external LM on the conditional rows only (1x); a number
  runs it with CFG at that coefficient (2x rows).
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing as tp

import torch

from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine.conditioning import TextConditioner
from magnet_engine.engine.config import check_same_codes
from magnet_engine.engine.decoding import StepContext
from magnet_engine.engine.errors import CheckpointError, InvalidOptionError
from magnet_engine.engine.hybrid import ARRuntime, build_delayed
from magnet_engine.engine.model import MagnetLM
from magnet_engine.engine.precision import PRECISIONS, cast_for_precision, check_precision

TEMPERATURES = ("tempered", "raw")
FILLS = ("special", "greedy")


class ExternalLM:
    """A MusicGen / AudioGen checkpoint (plain causal transformer LM, delay layout) with its
    own text conditioner: the prefix model of the two-model hybrid, or a rescorer."""

    def __init__(self, name: str, lm: MagnetLM, conditioner: TextConditioner, precision: str = "fp32"):
        if not lm.cfg.is_autoregressive:
            raise CheckpointError(f"{name}: not an autoregressive (MusicGen / AudioGen) checkpoint: "
                                  f"lm_model={lm.cfg.lm_model!r}")
        check_precision(precision)
        self.name, self.cfg, self.conditioner = name, lm.cfg, conditioner
        self.lm = cast_for_precision(lm, precision)
        self.runtime = ARRuntime(self.lm, PRECISIONS[precision][1])

    @classmethod
    def from_pretrained(cls, name_or_dir: tp.Union[str, os.PathLike], *, frame_rate: int,
                        device: tp.Union[str, torch.device] = "cpu", t5: tp.Optional[str] = None,
                        precision: str = "fp32",
                        shared_t5: tp.Optional[tp.Tuple[str, str, TextConditioner]] = None) -> "ExternalLM":
        """Load a MusicGen / AudioGen directory (or Hub id) in the Hugging Face layout.

        frame_rate: the codec frame rate of the model it works with (its codes must match).
        shared_t5: (T5 name in the main model's xp.cfg, where it was loaded from, its
        conditioner). A checkpoint naming the same T5 (and shipping no t5/ folder) uses the
        same source, and when the sources agree the encoder and tokenizer are reused."""
        directory = ckpt.resolve_model_dir(name_or_dir)
        loaded = ckpt.load_lm_checkpoint(directory / ckpt.LM_FILE, frame_rate=frame_rate)
        matmul, residual = PRECISIONS.get(precision, (torch.float32, torch.float32))
        lm = ckpt.build_lm(loaded, device, matmul, residual)
        if t5 is None:
            if (directory / "t5" / "config.json").is_file():
                t5 = str(directory / "t5")
            elif shared_t5 is not None and loaded.cfg.t5_name == shared_t5[0]:
                t5 = shared_t5[1]
            else:
                t5 = loaded.cfg.t5_name
        weight, bias = (v.float() for v in loaded.output_proj)
        if shared_t5 is not None and os.path.realpath(shared_t5[1]) == os.path.realpath(t5) \
                and shared_t5[2].t5.config.d_model == weight.shape[1]:
            main = shared_t5[2]
            proj = torch.nn.Linear(weight.shape[1], weight.shape[0])
            proj.load_state_dict({"weight": weight, "bias": bias})
            conditioner = TextConditioner(main.tokenizer, main.t5, proj, main.max_text_tokens).to(device)
        else:
            conditioner = TextConditioner.load(t5, weight, bias, device=device)
        return cls(str(name_or_dir), lm, conditioner, precision)

    def check_compatible(self, cfg) -> None:
        check_same_codes(self.cfg, cfg, self.name)


@dataclasses.dataclass(frozen=True)
class RescoreOptions:
    weight: float = 1.0                 # w: conf = w · p_magnet + (1 − w) · p_ext
    temperature: str = "tempered"
    fill: str = "special"
    cfg_coef: tp.Optional[float] = None

    def validate(self) -> "RescoreOptions":
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0 or math.isnan(w):
            raise InvalidOptionError(f"rescore_weight must be in [0, 1], found {w!r}")
        if self.temperature not in TEMPERATURES:
            raise InvalidOptionError(f"rescore_temperature must be one of {TEMPERATURES}, found {self.temperature!r}")
        if self.fill not in FILLS:
            raise InvalidOptionError(f"rescore_fill must be one of {FILLS}, found {self.fill!r}")
        c = self.cfg_coef
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)):
            raise InvalidOptionError(f"rescore_cfg_coef must be None or a finite number, found {c!r}")
        return self


class BoundRescorer:
    """A rescorer bound to one call's descriptions: the external condition and its
    cross-attention keys/values are computed once and reused by every step."""

    def __init__(self, model: ExternalLM, options: RescoreOptions, descriptions: tp.Sequence[tp.Optional[str]]):
        self.model, self.options = model, options.validate()
        self.batch = len(descriptions)
        cond = model.conditioner.encode(list(descriptions)).embeds
        self.rows = 2 * self.batch if options.cfg_coef is not None else self.batch
        self.cross_kv = model.runtime.cross_kv(cond) if options.cfg_coef is not None else \
            model.lm.cross_kv(cond[:self.batch].to(model.runtime.dtype))

    def active(self, step: int, n_steps: int) -> bool:
        """Rescore this step? Never at w = 1, never on a stage's last step (nothing is
        re-masked after it)."""
        return self.options.weight != 1.0 and step < n_steps - 1

    def confidence(self, ctx: StepContext) -> torch.Tensor:
        """The step's confidence hook (`decoding.ConfidenceHook`): w · p_magnet + (1 − w) · p_ext."""
        prob = ctx.prob
        if self.options.temperature == "raw":   # p_magnet at temperature 1
            prob = prob.scatter(1, ctx.positions,
                                self.raw_probability(ctx.cond_logits, ctx.uncond_logits, ctx.cfg_coef, ctx.tokens))
        view = ctx.codes
        if self.options.fill == "greedy" and ctx.stage + 1 < self.model.cfg.n_q:
            view = ctx.codes.clone()
            view[:, ctx.stage + 1:] = _greedy_guesses(ctx)
        return self.mix(prob, self.probabilities(view, ctx.stage, ctx.temperature))

    def mix(self, p_magnet: torch.Tensor, p_ext: torch.Tensor) -> torch.Tensor:
        w = self.options.weight
        return w * p_magnet + (1.0 - w) * p_ext

    @torch.no_grad()
    def probabilities(self, codes: torch.Tensor, stage: int, temperature: torch.Tensor) -> torch.Tensor:
        """p_ext [B, T'] of the tokens at codebook `stage` of the canvas codes [B, K, T'],
        by one teacher-forced causal forward (all positions at once)."""
        model, cfg = self.model, self.model.cfg
        frames = codes.shape[-1]
        seq = build_delayed(codes, cfg.delays, cfg.card)[..., :-1]              # inputs 0..S-2
        length = seq.shape[-1]
        positions = torch.arange(length, device=codes.device)
        mask = positions[None, :] <= positions[:, None]
        cache = model.runtime.cache(self.rows, length)
        hidden = model.runtime.hidden(seq, positions, self.cross_kv, cache, mask)   # [R, S-1, D]
        d = cfg.delays[stage]
        logits = model.lm.linears[stage](hidden[:, d:d + frames])                   # [R, T', C]
        if self.options.cfg_coef is not None:
            cond, uncond = logits[:self.batch], logits[self.batch:]
            logits = uncond + (cond - uncond) * self.options.cfg_coef
        if self.options.temperature == "tempered":
            logits = logits / temperature
        logp = torch.log_softmax(logits.float(), dim=-1)
        return torch.gather(logp, -1, codes[:, stage, :, None])[..., 0].exp()

    @staticmethod
    def raw_probability(cond: torch.Tensor, uncond: tp.Optional[torch.Tensor], coef: torch.Tensor,
                        tokens: torch.Tensor) -> torch.Tensor:
        """MAGNeT's probability of `tokens` [B, M] at temperature 1: softmax of the CFG-mixed
        logits; cond [B, M, C], uncond flattened [B·M, C] or None (coefficient 1)."""
        logits = cond if uncond is None else uncond.view_as(cond) + (cond - uncond.view_as(cond)) * coef
        return torch.gather(torch.log_softmax(logits.float(), dim=-1), -1, tokens[..., None])[..., 0].exp()


def _greedy_guesses(ctx: StepContext) -> torch.Tensor:
    """Argmax of the CFG-mixed logits of every head above the step's stage, all frames:
    [B, K-s-1, T'] ('greedy' fill of the codebooks that do not exist yet)."""
    lm, batch = ctx.lm, ctx.codes.shape[0]
    logits = lm.head_logits(lm.out_norm(ctx.hidden.float()), range(ctx.stage + 1, lm.cfg.n_q))
    if ctx.uncond_logits is not None:
        cond, uncond = logits[:batch], logits[batch:]
        logits = uncond + (cond - uncond) * ctx.cfg_coef
    return logits[:batch].argmax(dim=-1)
