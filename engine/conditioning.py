"""Text conditioning: T5 tokenizer + T5 encoder + the checkpoint's output projection.

    c = Linear(d_t5 -> D)(T5(ids, mask).last_hidden_state) * mask[..., None]   # [2B, S, D]

Rows are the B descriptions followed by B null rows (the CFG condition: description None,
which tokenizes to EOS only with an all-zero mask, so its rows are exactly zero). As in
the original, text padding is *not* masked later in cross-attention: padded positions hold
zero vectors that still take softmax mass, so S (the longest of the 2B rows) matters.
The T5 runs in fp32 and is frozen; it is not part of MAGNeT checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import random
import typing as tp
from pathlib import Path

import torch
from torch import nn

from magnet_engine.errors import CheckpointError, InvalidInputError, ModelNotFoundError


@dataclasses.dataclass
class Condition:
    embeds: torch.Tensor          # [2B, S, D] float32, null rows all zero
    mask: torch.Tensor            # [2B, S] int64
    input_ids: torch.Tensor       # [2B, S] int64
    t5_hidden: torch.Tensor       # [2B, S, d_t5] float32 (before projection and masking)


class TextConditioner(nn.Module):
    """Owns the tokenizer, the frozen T5 encoder and the output projection."""

    def __init__(self, tokenizer, t5: nn.Module, output_proj: nn.Linear, max_text_tokens: tp.Optional[int] = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.t5 = t5
        self.output_proj = output_proj
        self.max_text_tokens = max_text_tokens

    @classmethod
    def load(cls, t5: str, output_proj_weight: torch.Tensor, output_proj_bias: torch.Tensor,
             device: tp.Union[str, torch.device] = "cpu", max_text_tokens: tp.Optional[int] = None
             ) -> "TextConditioner":
        """`t5`: a local directory (always works) or a Hub name such as 't5-base' (needs the
        Hugging Face cache or network)."""
        from transformers import T5EncoderModel, T5Tokenizer
        from transformers.utils import logging as hf_logging

        local = Path(t5).expanduser()
        if not local.is_dir() and (os.sep in str(t5) or str(t5).startswith(".")):
            raise ModelNotFoundError(f"T5 directory not found: {t5}")
        source = str(local) if local.is_dir() else str(t5)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the tokenizer's notice about its `legacy` default
        try:
            # legacy=True: the behaviour of the T5Tokenizer audiocraft tokenized with.
            tokenizer = T5Tokenizer.from_pretrained(source, legacy=True)
            model = T5EncoderModel.from_pretrained(source, torch_dtype=torch.float32)
        except OSError as exc:
            raise ModelNotFoundError(
                f"cannot load the T5 text encoder {t5!r} ({exc.__class__.__name__}: {str(exc)[:200]}); "
                "without network, pass a local directory holding a saved T5 (--t5 DIR / t5=...)") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        d_t5 = model.config.d_model
        if output_proj_weight.dim() != 2 or output_proj_weight.shape[1] != d_t5:
            raise CheckpointError(f"the checkpoint's output_proj expects d_t5={output_proj_weight.shape[-1]} but the "
                                  f"T5 at {t5!r} has d_model {d_t5} (music MAGNeT uses t5-base: 768; "
                                  "audio-magnet t5-large: 1024)")
        proj = nn.Linear(d_t5, output_proj_weight.shape[0])
        with torch.no_grad():
            proj.weight.copy_(output_proj_weight)
            proj.bias.copy_(output_proj_bias)
        model.eval().requires_grad_(False)
        return cls(tokenizer, model, proj.requires_grad_(False), max_text_tokens).to(device)

    @property
    def device(self) -> torch.device:
        return self.output_proj.weight.device

    def tokenize(self, texts: tp.Sequence[tp.Optional[str]]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids, attention_mask) [N, S], padded to the longest row, EOS appended,
        no truncation. None or "" tokenizes as "" (EOS only) with a zero mask row."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise InvalidInputError(f"descriptions must be a non-empty list of strings or None, found {texts!r:.100}")
        for text in texts:
            if text is not None and not isinstance(text, str):
                raise InvalidInputError(f"each description must be a string or None, found {type(text).__name__}")
        empty = [text is None or text == "" for text in texts]
        batch = self.tokenizer(["" if e else t for t, e in zip(texts, empty)], return_tensors="pt",
                               padding=True, truncation=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        mask[torch.tensor(empty, dtype=torch.bool)] = 0
        if self.max_text_tokens is not None and ids.shape[-1] > self.max_text_tokens:
            raise InvalidInputError(f"description is {ids.shape[-1]} tokens long; the limit is {self.max_text_tokens}")
        return ids, mask

    @torch.no_grad()
    def encode(self, descriptions: tp.Sequence[tp.Optional[str]]) -> Condition:
        """B descriptions -> Condition with 2B rows: conditional first, then the null rows."""
        if isinstance(descriptions, str) or not isinstance(descriptions, (list, tuple)) or not descriptions:
            raise InvalidInputError("descriptions must be a non-empty list of strings or None, "
                                    f"found {descriptions!r:.100}")
        ids, mask = self.tokenize(list(descriptions) + [None] * len(descriptions))
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.t5(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        embeds = self.output_proj(hidden) * mask[..., None]
        return Condition(embeds, mask, ids, hidden)


# ------------------------------------------------------------------ random T5 for tests and the demo
_WORDS = ("warm lo-fi piano soft vinyl crackle upbeat electronic dance track with synth bass and drums "
          "ambient pad slow cinematic strings orchestral brass epic choir acoustic guitar folk song gentle "
          "male female vocals jazz saxophone trumpet swing rock electric guitar riff heavy distortion hip hop "
          "beat boom bap sampled soul chords techno kick hi hat reggae skank bass funk groove slap disco "
          "string section bird chirping rain thunder dog barking car engine footsteps crowd cheering wind "
          "waves ocean city traffic calm happy sad dark bright energetic relaxing 80s 90s pop chill melody "
          "harmony rhythm tempo fast slow loud quiet reverb echo delay vintage modern retro").split()


def _corpus(seed: int, lines: int = 400) -> tp.List[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(lines)]


def build_random_t5(out_dir: tp.Union[str, Path], d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                    d_ff: int = 64, vocab_size: int = 200, seed: int = 0,
                    corpus: tp.Optional[tp.Sequence[str]] = None) -> Path:
    """Save a random T5 encoder and a sentencepiece tokenizer trained on the spot to `out_dir`.

    Loadable with T5Tokenizer / T5EncoderModel.from_pretrained(out_dir); special ids as
    T5's (pad 0, eos 1, unk 2). Deterministic for a seed.
    """
    import io

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or _corpus(seed)), model_writer=model_proto, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    spiece = out / "spiece.model"
    spiece.write_bytes(model_proto.getvalue())
    tokenizer = T5Tokenizer(str(spiece), extra_ids=0, legacy=True)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)  # T5's initialisation draws from the global generator
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, feed_forward_proj="relu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(out)
    return out
