"""Random-weight PlayDiffusion models in the real file formats, under the upstream names
(files.py), for the demo, tests and benchmarks: the loader cannot tell them from the real ones.

Presets: "tiny" (a few MB, seconds on a CPU) and "default", the sizes docs/model.md §13 states
or upstream implies (inpainter D 1024 / 20 layers / 16 heads, V 13512, A 10000; XLS-R 1280 / 35 layers;
voice encoder 1024; a BigVGAN-v2 24 kHz body), which is several GB and slow on a laptop CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from magnet_engine.engine.playdiffusion import files
from magnet_engine.engine.playdiffusion.inpainter import Inpainter, InpainterConfig
from magnet_engine.engine.playdiffusion.speech_tokenizer import fairseq2_key, wav2vec2_config
from magnet_engine.engine.playdiffusion.voice_encoder import VoiceEncoder
from magnet_engine.engine.playdiffusion.vocoder import Vocoder, WNConv

SPECIALS = ["[STOP]", "[UNK]", "[SPACE]"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    inpainter: dict
    xlsr_dim: int
    xlsr_conv: int
    xlsr_heads: int
    xlsr_ffn: int
    xlsr_pos_kernel: int
    xlsr_pos_groups: int
    voice_dim: int
    voice_depth: int
    vocoder: dict


def _vocoder_params(ar_dim: int, speaker_dim: int, channels: int) -> dict:
    return dict(sampling_rate=24000, hop_size=256, ar_tokens_hop_size=512, codes_hop_size=480, ar_tokens_dim=ar_dim,
                num_mels=100, upsample_rates=[4, 4, 2, 2, 2, 2], upsample_kernel_sizes=[8, 8, 4, 4, 4, 4],
                upsample_initial_channel=channels, resblock_kernel_sizes=[3, 7, 11],
                resblock_dilation_sizes=[[1, 3, 5]] * 3, activation="snakebeta", snake_logscale=True,
                speaker_cond_dim=speaker_dim, use_mrf=True, add_upsampler=True, add_leaky_relu_in_mrf=True,
                use_ar_speaker_cond=True, use_scaler=True, use_tanh_at_final=True, use_bias_at_final=True,
                no_mel_simulation=False, use_snake_pre_processing=False, from_codes=True)


PRESETS = {
    "tiny": Sizes(dict(codebook_size=64, num_layers_lm=2, num_heads=4, num_kv_heads=2, hidden_size=64),
                  xlsr_dim=64, xlsr_conv=32, xlsr_heads=4, xlsr_ffn=128, xlsr_pos_kernel=16, xlsr_pos_groups=4,
                  voice_dim=64, voice_depth=1, vocoder=_vocoder_params(64, 64, 64)),
    "default": Sizes(dict(codebook_size=10000, num_layers_lm=20, num_heads=16, num_kv_heads=16, hidden_size=1024),
                     xlsr_dim=1280, xlsr_conv=512, xlsr_heads=16, xlsr_ffn=5120, xlsr_pos_kernel=128,
                     xlsr_pos_groups=16, voice_dim=1024, voice_depth=6, vocoder=_vocoder_params(1024, 1024, 1536)),
}


def _atomic_save(obj, path: Path, save) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_tokenizer(path: Path) -> int:
    """A character-level BPE (printable ASCII) with upstream's special tokens; returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in map(chr, range(33, 127)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    _atomic_save(tok, path, lambda t, p: t.save(p))
    return tok.get_vocab_size()


def _init_wn(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, WNConv):
            m.weight_v.data.normal_(0.0, std, generator=generator)
            dims = tuple(range(1, m.weight_v.dim()))
            m.weight_g.data.copy_(m.weight_v.data.norm(dim=dims, keepdim=True))


def _kaiser_sinc(cutoff: float = 0.25, half_width: float = 0.3, size: int = 12) -> torch.Tensor:
    """BigVGAN's anti-aliasing filter taps [1, 1, 12] (a buffer in the real checkpoint)."""
    half = size // 2
    delta_f = 4 * half_width
    a = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    beta = 0.1102 * (a - 8.7) if a > 50 else (0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21) if a >= 21 else 0.0)
    window = torch.kaiser_window(size, beta=beta, periodic=False)
    time = torch.arange(-half, half) + 0.5
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (taps / taps.sum()).view(1, 1, size)


def _calibrate_output(vocoder: Vocoder, codebook: int, speaker_dim: int, gen: torch.Generator) -> None:
    """Scale conv_post so random units give a pre-tanh std of ~0.3: audible, not saturated."""
    seen = []
    hook = vocoder.conv_post.register_forward_hook(lambda m, i, o: seen.append(o - (m.bias[:, None] if m.bias is not None else 0)))
    vocoder(torch.randint(0, codebook, (1, 20), generator=gen), torch.randn(1, speaker_dim, generator=gen))
    hook.remove()
    std = float(seen[0].std())
    if std > 0:
        vocoder.conv_post.weight_g.data.mul_(0.3 / std)
    if vocoder.conv_post.bias is not None:
        vocoder.conv_post.bias.data.zero_()


def write_random_model(root: os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Writes the six files (and, for non-default XLS-R heads, the sidecar) into root."""
    from transformers import Wav2Vec2Model

    sizes = PRESETS[preset]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module constructors draw from the global generator

    text_vocab = write_tokenizer(root / files.FILES["tokenizer"])
    cfg = InpainterConfig.from_checkpoint(dict(sizes.inpainter, vocab_size=text_vocab + 2))
    model = Inpainter(cfg)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.data.normal_(1.0, 0.1, generator=gen)
    _atomic_save({"config": cfg.to_checkpoint(), "model": model.state_dict()},
                 root / files.FILES["inpainter"], torch.save)

    overrides = {"num_encoder_attn_heads": sizes.xlsr_heads}
    state = {"encoder_frontend.model_dim_proj.weight": torch.empty(sizes.xlsr_dim, sizes.xlsr_conv),
             "encoder_frontend.pos_encoder.conv.weight_v": torch.empty(sizes.xlsr_dim,
                                                                       sizes.xlsr_dim // sizes.xlsr_pos_groups,
                                                                       sizes.xlsr_pos_kernel),
             "encoder.layers.0.ffn.inner_proj.weight": torch.empty(sizes.xlsr_ffn, sizes.xlsr_dim)}
    for i, k in enumerate((10, 3, 3, 3, 3, 2, 2)):
        state[f"encoder_frontend.feature_extractor.layers.{i}.conv.weight"] = torch.empty(sizes.xlsr_conv, 1, k)
    xlsr = Wav2Vec2Model(wav2vec2_config(state, overrides))
    xlsr_state = {fairseq2_key(k): v.contiguous() for k, v in xlsr.state_dict().items()
                  if not k.startswith("encoder.layer_norm.")}
    _atomic_save(xlsr_state, root / files.FILES["speech_tokenizer"], torch.save)
    if sizes.xlsr_heads != 16:
        (root / files.XLSR_SIDECAR).write_text(json.dumps({"encoder_overrides": overrides}))

    centroids = torch.randn(cfg.codebook_size, sizes.xlsr_dim, generator=gen)
    _atomic_save(centroids.numpy().astype(np.float32), root / files.FILES["kmeans"],
                 lambda a, p: np.save(open(p, "wb"), a))

    voice = VoiceEncoder(100, sizes.voice_dim, sizes.voice_depth)
    _atomic_save({"config": {"mel_dim": 100, "model_dim": sizes.voice_dim, "voice_encoder_depth": sizes.voice_depth},
                  "model_state_dict": voice.state_dict()}, root / files.FILES["voice_encoder"], torch.save)

    vocoder = Vocoder(sizes.vocoder, cfg.codebook_size, sizes.xlsr_dim)
    _init_wn(vocoder, 0.02, gen)
    for name, buf in vocoder.named_buffers():
        if name.endswith("filter"):
            buf.copy_(_kaiser_sinc())
    vocoder.lookup_table.centroids.copy_(centroids)
    _calibrate_output(vocoder, cfg.codebook_size, sizes.voice_dim, gen)
    generator = {k: v for k, v in vocoder.state_dict().items()}
    _atomic_save({"params": dict(sizes.vocoder), "generator": generator}, root / files.FILES["vocoder"], torch.save)
    return root
