"""The transformer against an independent computation, the fixtures, and the band."""
import math

import pytest
import torch

from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.engine import random_weights
from magnet_engine.engine.config import ModelConfig, parse_yaml_config
from magnet_engine.engine.model import MagnetLM


def tiny_lm(seed=0, layers=2, bias=False, dim=32, heads=4, card=40, window=5) -> MagnetLM:
    pkg = random_weights.random_lm_package(dim=dim, num_heads=heads, num_layers=layers, d_t5=8, card=card,
                                 subcodes_context=window, seed=seed)
    cfg = ModelConfig.from_xp_cfg(parse_yaml_config(pkg["xp.cfg"]), frame_rate=50)
    if bias:
        import dataclasses
        cfg = dataclasses.replace(cfg, bias_attn=True, bias_ff=True, bias_proj=True)
    lm = MagnetLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1) + (1 if "norm" in name and name.endswith("weight") else 0))
    return lm.eval()


def naive_logits(lm: MagnetLM, codes, cond, stage):
    """Independent float64 transcription of docs/model.md §4 with explicit loops over heads."""
    cfg = lm.cfg
    P = {k: v.double() for k, v in lm.state_dict().items()}
    b, k, t = codes.shape
    d, h = cfg.dim, cfg.num_heads
    hd = d // h
    x = sum(P[f"emb.{i}.weight"][codes[:, i]] for i in range(k))
    half = d // 2
    pos = torch.arange(t, dtype=torch.float64)[:, None]
    freqs = torch.tensor([10000.0 ** (-j / (half - 1)) for j in range(half)], dtype=torch.float64)
    x = x + torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=-1)

    def ln(v, name):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * P[name + ".weight"] + P[name + ".bias"]

    def lin(v, name):
        out = v @ P[name + ".weight"].T
        return out + P[name + ".bias"] if name + ".bias" in P else out

    def mha(qin, kvin, prefix, allowed):
        w = P[prefix + ".in_proj_weight"]
        bias = P.get(prefix + ".in_proj_bias")
        q, kk, vv = (qin @ w[:d].T, kvin @ w[d:2 * d].T, kvin @ w[2 * d:].T)
        if bias is not None:
            q, kk, vv = q + bias[:d], kk + bias[d:2 * d], vv + bias[2 * d:]
        outs = []
        for head in range(h):
            sl = slice(head * hd, (head + 1) * hd)
            s = q[..., sl] @ kk[..., sl].transpose(-1, -2) / math.sqrt(hd)
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            outs.append(torch.softmax(s, -1) @ vv[..., sl])
        return lin(torch.cat(outs, -1), prefix + ".out_proj")

    i_ = torch.arange(t)
    allowed = None if stage == 0 else (i_[:, None] - i_[None, :]).abs() <= cfg.subcodes_context
    c = cond.double()
    for layer in range(cfg.num_layers):
        p = f"transformer.layers.{layer}"
        x = x + mha(ln(x, p + ".norm1"), ln(x, p + ".norm1"), p + ".self_attn", allowed)
        x = x + mha(ln(x, p + ".norm_cross"), c, p + ".cross_attention", None)
        hdn = lin(ln(x, p + ".norm2"), p + ".linear1")
        x = x + lin(0.5 * hdn * (1 + torch.erf(hdn / math.sqrt(2))), p + ".linear2")
    return lin(ln(x, "out_norm"), f"linears.{stage}")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stage", [0, 2])
def test_logits_equal_independent_computation(stage, bias):
    lm = tiny_lm(bias=bias)
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, lm.cfg.card + 1, (2, 4, 19), generator=gen)
    cond = torch.randn(2, 7, lm.cfg.dim, generator=gen)
    with torch.no_grad():
        got = lm.stage_logits(codes, cond, stage)
    want = naive_logits(lm, codes, cond, stage)
    assert got.shape == (2, 19, lm.cfg.card)
    assert (got.double() - want).abs().max() < 1e-4


def test_restricted_context_band():
    lm = tiny_lm(layers=1, window=5)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, lm.cfg.card, (1, 4, 30), generator=gen)
    cond = torch.randn(1, 4, lm.cfg.dim, generator=gen)
    changed = codes.clone()
    changed[0, 0, 20] = (codes[0, 0, 20] + 1) % lm.cfg.card
    with torch.no_grad():
        for stage in (1, 3):
            a, b = lm.stage_logits(codes, cond, stage), lm.stage_logits(changed, cond, stage)
            diff = (a - b).abs().amax(-1)[0]
            far = [i for i in range(30) if abs(i - 20) > 5]
            near = [i for i in range(30) if abs(i - 20) <= 5]
            assert diff[far].max() == 0          # outside the window: exactly unchanged
            assert (diff[near] > 0).all()        # inside: changed
        a, b = lm.stage_logits(codes, cond, 0), lm.stage_logits(changed, cond, 0)
        assert ((a - b).abs().amax(-1)[0] > 0).all()   # stage 0 sees everything


def test_fixture_logits_and_hidden(fixtures, golden):
    loaded = ckpt.read_lm_package(ckpt.load_package(fixtures / "checkpoint" / ckpt.LM_FILE), frame_rate=50)
    lm = MagnetLM(loaded.cfg)
    lm.load_state_dict(loaded.lm_state, strict=True)
    lm.eval()
    ref = golden["lm_logits"]
    cond = golden["conditioning"]["cond_embeds"]
    with torch.no_grad():
        for stage in range(4):
            hidden = lm.hidden(ref["inputs"][stage], cond, stage)
            logits = lm.linears[stage](hidden)
            assert (hidden - ref["hidden"][stage]).abs().max() < 1e-4, stage
            assert (logits - ref["logits"][stage]).abs().max() < 1e-4, stage


def test_null_rows_cross_attention_is_zero():
    lm = tiny_lm()
    x = torch.randn(1, 6, lm.cfg.dim)
    zero_cond = torch.zeros(1, 5, lm.cfg.dim)
    layer = lm.transformer.layers[0]
    with torch.no_grad():
        out = layer.cross_attention.cross_attend(x, layer.cross_attention.kv(zero_cond))
    assert torch.equal(out, torch.zeros_like(out))
