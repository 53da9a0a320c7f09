"""Text BPE for the inpainter (docs/model.md §13.4): the `tokenizers` JSON, with " " spelled `[SPACE]`.

The ids carry no BOS/EOS (the unmasking loop adds them). Whatever normaliser and
post-processor the JSON defines apply, as upstream (`encode` with its default
add_special_tokens=True).
"""
from __future__ import annotations

from pathlib import Path

import torch

from magnet_engine.engine.errors import CheckpointError, InvalidInputError


class TextTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{path}: not a tokenizers JSON ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> torch.Tensor:
        """text -> ids [1, Lt] int64 (upstream makes int32; the value range is the same)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, found {type(text).__name__}")
        ids = self.tokenizer.encode(text.replace(" ", "[SPACE]")).ids
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        """For logs: spaces inside tokens removed, [SPACE] -> " ", [STOP] / [UNK] dropped."""
        text = self.tokenizer.decode([int(i) for i in ids.reshape(-1)], skip_special_tokens=False)
        text = text.replace(" ", "").replace("[SPACE]", " ")
        return text.replace("[STOP]", "").replace("[UNK]", "")
