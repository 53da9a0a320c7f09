"""Random-weight packages in the published layout: the embedded demo, tests and benchmarks.

Nothing can be downloaded in this project's tests or CI, so these write what the loaders read
from a real export, exactly: an LM package (`state_dict.bin`'s dict: `best_state`, `xp.cfg`,
...) for MAGNeT, hybrid-MAGNeT and MusicGen layouts, an EnCodec package in audiocraft's
format, and a small T5 encoder with a sentencepiece tokenizer trained on the spot. Weights
are seeded: the same arguments give the same files. Untrained weights make noise, not music.
"""
from __future__ import annotations

import io
import os
import shutil
import string
import tempfile
import typing as tp
from pathlib import Path

import torch

from magnet_engine.engine import codec, conditioning
from magnet_engine.engine.checkpoint import CONDITIONER_PREFIX, expected_lm_shapes
from magnet_engine.engine.config import ModelConfig, parse_yaml_config
from magnet_engine.engine.errors import InvalidInputError


# ------------------------------------------------------------------------------ the LM
XP_CFG_TEMPLATE = """\
device: cuda
dtype: float32
autocast: true
autocast_dtype: float16
seed: {seed}
efficient_attention_backend: xformers
dora:
  dir: /checkpoint/${{oc.env:USER}}/experiments/audiocraft/outputs
  use_rendezvous: false
dataset:
  batch_size: 64
  segment_duration: {duration}
  return_info: true
generate:
  every: 25
  audio:
    format: wav
    sample_rate: ${{sample_rate}}
  lm:
{lm_generate}classifier_free_guidance:
  training_dropout: 0.3
  inference_coef: 3.0
fuser:
  cross_attention_pos_emb: false
  cross_attention_pos_emb_scale: 1
  sum: []
  prepend: []
  cross: [description]
  input_interpolate: []
conditioners:
  description:
    model: t5
    t5:
      name: {t5_name}
      finetune: false
      word_dropout: 0.3
      normalize_text: false
sample_rate: {sample_rate}
channels: 1
compression_model_checkpoint: //pretrained/facebook/encodec_{khz}khz
compression_model_n_q: null
lm_model: {lm_model}
codebooks_pattern:
  modeling: {modeling}
  delay:
    delays: [0, 1, 2, 3]
    flatten_first: 0
    empty_initial: 0
  parallel:
    empty_initial: -1
transformer_lm:
  dim: {dim}
  num_heads: {num_heads}
  num_layers: {num_layers}
  hidden_scale: 4
  n_q: {n_q}
  card: {card}
  dropout: 0.0
  emb_lr: null
  activation: gelu
  norm_first: true
  bias_ff: false
  bias_attn: false
  bias_proj: false
  past_context: null
  causal: {causal}
  custom: false
  memory_efficient: true
  attention_as_float32: false
  layer_scale: null
  positional_embedding: sin
  xpos: false
  checkpointing: none
  weight_init: gaussian
  norm: layer_norm
  cross_attention: false
  qk_layer_norm: false
  qk_layer_norm_cross: false
  kv_repeat: 1
  two_step_cfg: false
{magnet_fields}"""

_MAGNET_GENERATE = """\
    use_sampling: true
    temp: 3.0
    top_k: 0
    top_p: 0.9
    max_cfg_coef: 10.0
    min_cfg_coef: 1.0
    decoding_steps: [{steps}, 10, 10, 10]
    anneal_temp: true
    span_scoring: max
    span_arrangement: nonoverlap
"""
_AR_GENERATE = """\
    use_sampling: true
    temp: 1.0
    top_k: 250
    top_p: 0.0
"""
_MAGNET_FIELDS = """\
  subcodes_context: {subcodes_context}
  segment_duration: ${{dataset.segment_duration}}
  span_len: ${{masking.span_len}}
masking:
  span_len: {span_len}
"""

# kind -> (lm_model, codebooks_pattern.modeling, transformer_lm.causal)
LM_KINDS = {
    "magnet": ("transformer_lm_magnet", "parallel", "false"),
    # hybrid-MAGNeT: MAGNeT's network and masking fields, MusicGen's delay layout
    "hybrid": ("transformer_lm_magnet", "delay", "false"),
    # MusicGen / AudioGen: the plain causal transformer LM, delay layout, no masking section
    "musicgen": ("transformer_lm", "delay", "true"),
}


def random_lm_package(dim: int, num_heads: int, num_layers: int, *, d_t5: int, n_q: int = 4, card: int = 2048,
                      duration: float = 10, sample_rate: int = 32000, span_len: int = 3,
                      subcodes_context: int = 5, t5_name: str = "t5-base", seed: int = 0,
                      dtype: torch.dtype = torch.float32, kind: str = "magnet") -> dict:
    """An LM package with seeded random weights, in the exporter's exact layout.

    kind: 'magnet' (plain MAGNeT), 'hybrid' (hybrid-MAGNeT: delay layout) or 'musicgen'
    (a MusicGen / AudioGen LM: causal, delay layout, no masking fields)."""
    if kind not in LM_KINDS:
        raise ValueError(f"kind must be one of {sorted(LM_KINDS)}, found {kind!r}")
    lm_model, modeling, causal = LM_KINDS[kind]
    steps = 20 if duration <= 10 else 60
    magnet = kind != "musicgen"
    xp_cfg = XP_CFG_TEMPLATE.format(
        seed=seed, duration=duration if duration != int(duration) else int(duration),
        t5_name=t5_name, sample_rate=sample_rate, khz=sample_rate // 1000, dim=dim, num_heads=num_heads,
        num_layers=num_layers, n_q=n_q, card=card, lm_model=lm_model, modeling=modeling, causal=causal,
        lm_generate=(_MAGNET_GENERATE.format(steps=steps) if magnet else _AR_GENERATE),
        magnet_fields=(_MAGNET_FIELDS.format(subcodes_context=subcodes_context, span_len=span_len)
                       if magnet else ""))
    cfg = ModelConfig.from_xp_cfg(parse_yaml_config(xp_cfg), frame_rate=50)
    gen = torch.Generator().manual_seed(seed)
    state: tp.Dict[str, torch.Tensor] = {
        CONDITIONER_PREFIX + "weight": torch.randn(dim, d_t5, generator=gen) / d_t5 ** 0.5,
        CONDITIONER_PREFIX + "bias": torch.randn(dim, generator=gen) * 0.02,
    }
    for key, shape in expected_lm_shapes(cfg).items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm_cross.weight", "out_norm.weight")):
            value = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            value = 0.02 * torch.randn(shape, generator=gen)
        else:  # gaussian init scaled by fan-in, as audiocraft's weight_init='gaussian' roughly does
            value = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        state[key] = value.to(dtype)
    return {"best_state": state, "xp.cfg": xp_cfg, "version": "1.3.0", "exported": True}


# --------------------------------------------------------------------------- EnCodec
CODEC_XP_CFG_TEMPLATE = """\
device: cuda
dtype: float32
autocast: false
seed: {seed}
dora:
  dir: /checkpoint/${{oc.env:USER}}/experiments/audiocraft/outputs
  use_rendezvous: false
solver: compression
sample_rate: {sample_rate}
channels: 1
generate:
  audio:
    sample_rate: ${{sample_rate}}
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${{sample_rate}}
  channels: ${{channels}}
  causal: false
  renormalize: false
seanet:
  dimension: {dimension}
  channels: ${{channels}}
  causal: ${{encodec.causal}}
  n_filters: {n_filters}
  n_residual_layers: 1
  ratios: {ratios}
  activation: ELU
  activation_params:
    alpha: 1.0
  norm: weight_norm
  norm_params: {{}}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: {pad_mode}
  true_skip: {true_skip}
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: 1.0
    final_activation: null
    final_activation_params: null
  encoder: {{}}
rvq:
  n_q: {n_q}
  q_dropout: false
  bins: {bins}
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
  orthogonal_reg_weight: 0.0
  orthogonal_reg_active_codes_only: false
"""


def random_compression_package(sample_rate: int = 32000, n_filters: int = 64,
                               ratios: tp.Sequence[int] = (8, 5, 4, 4), n_q: int = 4, bins: int = 2048,
                               dimension: int = 128, seed: int = 0, pad_mode: str = "constant",
                               true_skip: bool = True) -> dict:
    """A format-(a) package with seeded random weights, laid out as audiocraft's exporter writes it."""
    xp_cfg = CODEC_XP_CFG_TEMPLATE.format(
        seed=seed, sample_rate=sample_rate, dimension=dimension, n_filters=n_filters,
        ratios=[int(r) for r in ratios], pad_mode=pad_mode, true_skip=str(bool(true_skip)).lower(),
        n_q=n_q, bins=bins)
    cfg = codec.CodecConfig.from_xp_cfg(parse_yaml_config(xp_cfg, codec.CODEC_WHAT))
    # torch's default initialisation, seeded without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = codec.audiocraft_modules(cfg).state_dict()  # detached tensors; the modules are dropped
        for key, value in state.items():
            if key.endswith("weight_g"):  # off its default ‖v‖, so a dropped gain shows
                value.mul_(torch.empty_like(value).uniform_(0.5, 1.5))
            elif key.endswith("_codebook.embed"):  # as after k-means init: small vectors
                value.normal_(0.0, 0.1)
        for k in range(n_q):
            book = f"quantizer.vq.layers.{k}._codebook."
            state[book + "inited"].fill_(1.0)
            state[book + "cluster_size"].fill_(1.0)
            state[book + "embed_avg"].copy_(state[book + "embed"])
    return {"best_state": state, "xp.cfg": xp_cfg, "version": "1.3.0", "exported": True}


# ------------------------------------------------------------------------------- T5
def build_random_t5(out_dir: tp.Union[str, os.PathLike], d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                    d_ff: int = 64, vocab_size: int = 256, seed: int = 0,
                    corpus: tp.Optional[tp.Iterable[str]] = None) -> Path:
    """Write a random T5 encoder and a sentencepiece tokenizer to `out_dir` (new or empty).

    The tokenizer is a unigram model of `vocab_size` pieces trained on `corpus` (default: a
    built-in set of music descriptions), with T5's special ids (pad 0, EOS 1, unk 2) and its
    100 `<extra_id_*>` tokens after them. Both load with `from_pretrained(out_dir)`. The same
    arguments give the same files; only the weights depend on `seed`.
    """
    transformers = conditioning.require_transformers()
    import sentencepiece

    if d_model % num_heads:
        raise InvalidInputError(f"d_model must be a multiple of num_heads, found {d_model} and {num_heads}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInputError(f"{out_dir} exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        proto = io.BytesIO()
        try:  # one thread: the unigram EM sums in a fixed order, so the pieces are reproducible
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(_music_corpus() if corpus is None else corpus), model_writer=proto,
                model_type="unigram", vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, num_threads=1,
                minloglevel=2)
        except RuntimeError as exc:
            raise InvalidInputError(f"cannot train a {vocab_size}-piece tokenizer on this corpus: {exc}") from exc
        (staging / "spiece.model").write_bytes(proto.getvalue())
        tokenizer = transformers.T5Tokenizer(str(staging / "spiece.model"), legacy=True)
        config = transformers.T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads,
                                       d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
                                       feed_forward_proj="relu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.T5EncoderModel(config)
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp's 0o700 would outlive the rename
        staging.rename(out_dir)  # replaces an empty out_dir
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _music_corpus(n: int = 600) -> tp.List[str]:
    def pick(words: tp.Sequence[str], i: int, stride: int, offset: int = 0) -> str:
        return words[(stride * i + offset) % len(words)]

    lines = []
    for i in range(n):
        mood, mood2, genre = pick(_MOODS, i, 1), pick(_MOODS, i, 7, 3), pick(_GENRES, i, 7)
        instr, instr2 = pick(_INSTRUMENTS, i, 3), pick(_INSTRUMENTS, i, 11, 5)
        texture, era, part = pick(_TEXTURES, i, 5), pick(_ERAS, i, 2), pick(_PARTS, i, 3)
        tempo, key, setting = pick(_TEMPOS, i, 13), pick(_KEYS, i, 5), pick(_SETTINGS, i, 1)
        lines.append((f"{mood.capitalize()} {era} {genre} with {texture} {instr} and {instr2}, {tempo}.",
                      f"A {mood} {genre} track featuring {instr} over {texture} {instr2}, {key}, {setting}.",
                      f"{instr} {part} {setting}, {mood} and {mood2}, {tempo}",
                      f"{era} {genre} song with a {mood2} {part} that builds into a {texture} {instr} {part}")[i % 4])
    return lines + [" ".join(string.ascii_letters + string.digits + string.punctuation)]  # no ASCII text is <unk>


# A built-in corpus for `build_random_t5`: descriptions enumerated from these lists, not sampled.
_MOODS = """warm bright dark dreamy energetic calm melancholic uplifting aggressive gentle nostalgic playful
haunting epic peaceful tense joyful moody romantic mysterious groovy hypnotic triumphant somber relaxed
intense soothing euphoric gritty lush cinematic sad happy angry hopeful lonely festive spooky serene
quirky""".split()
_GENRES = """lo-fi jazz rock pop techno house ambient classical hip-hop funk soul reggae metal folk country
blues disco trance dubstep drum-and-bass synthwave bossa-nova flamenco gospel punk grunge orchestral
chillwave trap afrobeat salsa tango bluegrass ska garage electro indie baroque cumbia""".split()
_INSTRUMENTS = """piano guitar bass drums synth strings violin cello saxophone trumpet flute organ choir
vocals harp marimba banjo ukulele accordion clarinet oboe trombone tuba mandolin sitar harmonica
xylophone timpani congas bongos tambourine cowbell pads arpeggios percussion handclaps bells
glockenspiel harpsichord kalimba""".split()
_TEXTURES = """soft vinyl crackly heavy sub reverberant distorted sidechained echoing delayed tape-saturated
hissing shimmering airy punchy muffled crisp layered sparse dense analog digital detuned plucked bowed
muted staccato legato swelling pulsing driving rolling syncopated""".split()
_ERAS = "60s 70s 80s 90s 2000s modern vintage retro futuristic".split()
_PARTS = "melody rhythm beat groove chorus bridge intro outro drop breakdown loop riff solo hook".split()
_SETTINGS = ("for a road trip at sunset", "in a smoky club on a rainy night", "for studying late",
             "for a wedding dance", "for a video game boss fight", "under the stars", "at a beach party",
             "in an old cathedral", "for a car chase through the city", "at dawn in the mountains",
             "for a fashion show", "in a busy market", "for meditation and yoga", "for a horror movie trailer",
             "at a summer festival", "for a cozy winter evening")
_KEYS = [f"in {note} {scale}" for note in ("C", "D", "E flat", "F sharp", "G", "A", "B flat")
         for scale in ("major", "minor")]
_TEMPOS = [f"{bpm} bpm" for bpm in range(60, 181, 10)] + ["slow tempo", "medium tempo", "fast tempo", "in 3/4 time"]
