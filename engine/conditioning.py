"""Text conditioning (docs/model.md §3): T5 tokenizer -> frozen T5 encoder -> the checkpoint's Linear(d_t5 -> D).

    conditioner = TextConditioner.load("t5-base", weight, bias)   # or a local T5 directory
    cond = conditioner.encode(["80s pop with synths"])
    cond.embeds                                                    # [2B, S, D]: B texts, then B null rows

As audiocraft's T5Conditioner: the slow sentencepiece `T5Tokenizer`, padding to the longest of
the 2B rows, no truncation, EOS appended; None or "" is the empty text, whose mask row is
zeroed, and that zeroed mask is what the T5 sees too. The LM's cross-attention ignores the
mask, so the padded length S changes every row's output: it must not be trimmed.

`random_weights.build_random_t5` writes a small random T5 with a sentencepiece tokenizer trained on the spot,
for tests and the offline demo.
"""
from __future__ import annotations

import typing as tp
from pathlib import Path

import torch
from torch import nn

from magnet_engine.engine import hub
from magnet_engine.engine.errors import (CheckpointError, DependencyError, InvalidInputError,
                                         InvalidOptionError, ModelNotFoundError)

# T5 widths of the published checkpoints' text encoders, for error messages.
_T5_BY_WIDTH = {512: "t5-small", 768: "t5-base", 1024: "t5-large"}
_LOCAL_FILES = "config.json, model.safetensors and spiece.model, as written by save_pretrained"
# The tokenizer only uses its max length to warn that a longer text would break a model with
# learned positions; T5's positions are relative, and audiocraft never truncates.
_NO_MAX_LENGTH = 2 ** 62


class Condition(tp.NamedTuple):
    embeds: torch.Tensor     # [2B, S, D] float32: output_proj(hidden) * mask; null rows exactly 0
    mask: torch.Tensor       # [2B, S] int64: 1 on tokens; all 0 on empty and null rows
    input_ids: torch.Tensor  # [2B, S] int64: EOS 1 ends each text, pad 0 after
    t5_hidden: torch.Tensor  # [2B, S, d_t5] float32: T5 last_hidden_state, before projection


class TextConditioner(nn.Module):
    """The T5 description conditioner of a MAGNeT checkpoint, in float32."""

    def __init__(self, tokenizer, t5: nn.Module, output_proj: nn.Linear, max_text_tokens: tp.Optional[int] = None):
        super().__init__()
        if max_text_tokens is not None and (isinstance(max_text_tokens, bool) or not isinstance(max_text_tokens, int)
                                            or max_text_tokens < 1):
            raise InvalidOptionError(f"max_text_tokens must be None or an int >= 1, found {max_text_tokens!r}")
        self.tokenizer = tokenizer
        self.t5 = t5.float().eval().requires_grad_(False)
        self.output_proj = output_proj.float().requires_grad_(False)
        self.max_text_tokens = max_text_tokens  # per text, EOS included; None = unlimited

    @classmethod
    def load(cls, t5: str, output_proj_weight: torch.Tensor, output_proj_bias: torch.Tensor,
             device: tp.Union[str, torch.device] = "cpu", max_text_tokens: tp.Optional[int] = None
             ) -> "TextConditioner":
        """T5 from a local directory or a Hub name (cache first), plus output_proj [D, d_t5], [D]."""
        if output_proj_weight.dim() != 2 or tuple(output_proj_bias.shape) != output_proj_weight.shape[:1]:
            raise CheckpointError(f"output_proj must be weight [D, d_t5] and bias [D], found "
                                  f"{tuple(output_proj_weight.shape)} and {tuple(output_proj_bias.shape)}")
        transformers = require_transformers()
        local = _is_local_t5(t5)
        model = _from_pretrained(transformers.T5EncoderModel, t5, local)
        dim, d_t5 = output_proj_weight.shape
        if model.config.d_model != d_t5:
            known = f" ({_T5_BY_WIDTH[d_t5]})" if d_t5 in _T5_BY_WIDTH else ""
            raise CheckpointError(f"checkpoint's output_proj expects d_t5={d_t5}{known} but the T5 at {t5} "
                                  f"has d_model {model.config.d_model}")
        # legacy=True is what T5Tokenizer did by default when audiocraft was written; saying
        # so also silences its warning about the default.
        tokenizer = _from_pretrained(transformers.T5Tokenizer, t5, local, legacy=True, model_max_length=_NO_MAX_LENGTH)
        with torch.device("meta"):   # the checkpoint's tensors become the parameters, no copy
            output_proj = nn.Linear(d_t5, dim)
        output_proj.load_state_dict({"weight": output_proj_weight.float(), "bias": output_proj_bias.float()},
                                    assign=True)
        return cls(tokenizer, model, output_proj, max_text_tokens).to(device)

    @property
    def device(self) -> torch.device:
        return self.output_proj.weight.device

    def tokenize(self, texts: tp.Sequence[tp.Optional[str]]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """texts -> (input_ids [N, S], attention_mask [N, S]), S the longest row, EOS included."""
        entries = [text or "" for text in check_descriptions(texts)]
        batch = self.tokenizer(entries, return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.max_text_tokens is not None:
            lengths = mask.sum(1).tolist()
            longest = max(range(len(entries)), key=lengths.__getitem__)
            if lengths[longest] > self.max_text_tokens:
                raise InvalidInputError(f"description {longest} is {lengths[longest]} tokens long (EOS included); "
                                        f"the limit is {self.max_text_tokens} (max_text_tokens)")
        mask[torch.tensor([entry == "" for entry in entries])] = 0
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode(self, descriptions: tp.Sequence[tp.Optional[str]]) -> Condition:
        """B descriptions -> the 2B condition rows: the texts, then B null rows."""
        descriptions = check_descriptions(descriptions)
        ids, mask = self.tokenize(descriptions + [None] * len(descriptions))
        hidden = self.t5(input_ids=ids, attention_mask=mask).last_hidden_state
        return Condition(self.output_proj(hidden) * mask[..., None], mask, ids, hidden)


def check_descriptions(texts) -> tp.List[tp.Optional[str]]:
    """A non-empty list of str | None (None: no text), else InvalidInputError."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise InvalidInputError(f"descriptions must be a non-empty list of strings (or None for no text), "
                                f"found {texts!r:.100}")
    for text in texts:
        if not (text is None or isinstance(text, str)):
            raise InvalidInputError(f"each description must be a string or None, found {type(text).__name__}")
    return list(texts)


def require_transformers():
    try:
        import sentencepiece  # noqa: F401  (the slow T5Tokenizer is a sentencepiece model)
        import transformers
    except ImportError as exc:
        raise DependencyError(f"the T5 text encoder needs transformers<5 and sentencepiece "
                              f"(pip install 'transformers<5' sentencepiece): {exc}") from exc
    return transformers


def _is_local_t5(t5: str) -> bool:
    """True for an existing directory; False for a Hub name; a missing path raises."""
    if Path(t5).expanduser().is_dir():
        return True
    if Path(t5).expanduser().exists() or str(t5).startswith((".", "/", "~")) or str(t5).count("/") > 1:
        raise ModelNotFoundError(f"T5 directory not found: {t5} (expected a directory with {_LOCAL_FILES})")
    return False


def _from_pretrained(kind, t5: str, local: bool, **kwargs):
    """kind.from_pretrained for a local directory, or a Hub name from the cache, else the Hub."""
    if local:
        try:
            return kind.from_pretrained(str(Path(t5).expanduser()), **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelNotFoundError(f"{t5} is not a loadable T5 directory (expected {_LOCAL_FILES}): "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    try:  # the cache first: without network the Hub client retries for minutes before giving up
        return kind.from_pretrained(t5, local_files_only=True, **kwargs)
    except (OSError, ValueError):  # T5Tokenizer misses the cache with a ValueError (no vocab file)
        pass
    hub.check_reachable(t5)
    try:
        return kind.from_pretrained(t5, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load T5 {t5!r} from the Hugging Face cache or Hub "
                                 f"({str(exc).splitlines()[0]}); without network, pass a local directory with "
                                 f"{_LOCAL_FILES} (t5=DIR, or --t5 DIR on the command line)") from exc

