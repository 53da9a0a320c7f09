"""PlayDiffusion's inpainter: a non-causal LLaMA over one text + audio-unit stream
(docs/model.md §13.5).

    ids  = [BOS, text..., EOS, left units + V, target (MASK or unit + V), right units + V]
    h    = Emb[ids]                                   # [B, S, D], no positional embedding
    each layer:  h += Wo SDPA(rope(Wq n), rope(Wk n), Wv n)     n = RMSNorm_sa(h)
                 h += W2 (silu(W1 m) * W3 m)                    m = RMSNorm_mlp(h)
    hidden = RMSNorm(h);  logits = hidden @ W_outᵀ    # over the A audio units only

Attention is full and bidirectional (no mask); rotary positions are the interleaved-pair
(Meta LLaMA / torchtune) form with base 50000 over positions 0..S-1. Parameter names equal
the checkpoint's keys, so `last_250k_fixed.pkl`'s "model" loads strictly.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from magnet_engine.engine.errors import CheckpointError, InvalidInputError

ROPE_BASE = 50000.0  # the loader's value; the class default (500000) is never used
MAX_SEQ_LEN = 4096
NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class InpainterConfig:
    vocab_size: int      # V: text ids 0..V-3, BOS V-2, EOS V-1
    codebook_size: int   # A: unit u is id V + u
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int

    @classmethod
    def from_checkpoint(cls, config: dict) -> "InpainterConfig":
        try:
            cfg = cls(vocab_size=int(config["vocab_size"]), codebook_size=int(config["codebook_size"]),
                      num_layers=int(config["num_layers_lm"]), num_heads=int(config["num_heads"]),
                      num_kv_heads=int(config.get("num_kv_heads") or config["num_heads"]),
                      hidden_size=int(config["hidden_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"inpainter config: expected vocab_size, codebook_size, num_layers_lm, num_heads, "
                                  f"num_kv_heads, hidden_size; found {sorted(config)} ({e})") from None
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise CheckpointError(f"inpainter config: hidden_size {cfg.hidden_size} must divide by num_heads "
                                  f"{cfg.num_heads}, and num_heads by num_kv_heads {cfg.num_kv_heads}")
        return cfg

    def to_checkpoint(self) -> dict:
        return dict(vocab_size=self.vocab_size, codebook_size=self.codebook_size, num_layers_lm=self.num_layers,
                    num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, hidden_size=self.hidden_size)

    @property
    def bos(self) -> int:
        return self.vocab_size - 2

    @property
    def eos(self) -> int:
        return self.vocab_size - 1

    @property
    def mask(self) -> int:
        return self.vocab_size + self.codebook_size

    @property
    def text_guidance(self) -> int:
        return self.mask + 1

    @property
    def total_vocab(self) -> int:
        return self.mask + 3  # MASK, TEXT_GUIDANCE, PAD

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + NORM_EPS)).type_as(x) * self.scale


def rope_cache(head_dim: int, positions: int, device=None) -> torch.Tensor:
    """[positions, head_dim / 2, 2] fp32 (cos, sin) of p * base^(-2j/d)."""
    theta = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.einsum("i,j->ij", torch.arange(positions, device=device, dtype=theta.dtype), theta).float()
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, d]; cache: [S, d/2, 2]. Pairs (x_2j, x_2j+1) rotate by p θ_j, in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = cache.view(1, pairs.shape[1], 1, pairs.shape[3], 2)
    out = torch.stack([pairs[..., 0] * rope[..., 0] - pairs[..., 1] * rope[..., 1],
                       pairs[..., 1] * rope[..., 0] + pairs[..., 0] * rope[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: InpainterConfig):
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=False)
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # each kv head serves `group` consecutive query heads
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: InpainterConfig):
        super().__init__()
        hidden = 4 * cfg.hidden_size  # the builder's hidden_size * 4, not LLaMA's 8/3 rule
        self.w1 = nn.Linear(cfg.hidden_size, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self, cfg: InpainterConfig):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.hidden_size)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.sa_norm(x), rope) + x
        return h + self.mlp(self.mlp_norm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: InpainterConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size)


class Inpainter(nn.Module):
    def __init__(self, cfg: InpainterConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.total_vocab, cfg.hidden_size)
        self.LM = Backbone(cfg)
        self.to_logits = nn.Linear(cfg.hidden_size, cfg.codebook_size, bias=False)
        # Non-persistent, as upstream: the checkpoint has no rope keys.
        self.register_buffer("rope", rope_cache(cfg.head_dim, MAX_SEQ_LEN), persistent=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, S] int64 -> final-RMSNorm hidden states [B, S, D]."""
        s = ids.shape[-1]
        if s > MAX_SEQ_LEN:
            raise InvalidInputError(f"inpainter sequence of {s} tokens exceeds its maximum of {MAX_SEQ_LEN}")
        rope = self.rope[:s]
        h = self.tok_embeddings(ids)
        for layer in self.LM.layers:
            h = layer(h, rope)
        return self.LM.norm(h)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, S] -> logits over the A units at every row, [B, S, A]."""
        return self.to_logits(self.hidden(ids))


def load_inpainter(package: dict) -> Inpainter:
    """From `last_250k_fixed.pkl`'s {"config", "model"}, strictly (upstream: strict=False)."""
    if not isinstance(package, dict) or "config" not in package or "model" not in package:
        raise CheckpointError("inpainter checkpoint: expected a dict with 'config' and 'model'")
    cfg = InpainterConfig.from_checkpoint(package["config"])
    model = Inpainter(cfg)
    try:
        model.load_state_dict(package["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"inpainter checkpoint does not match its config {cfg}: {e}") from None
    return model.eval()
