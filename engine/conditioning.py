"""Text conditioning (spec §3): T5 tokenizer -> frozen T5 encoder -> the checkpoint's Linear(d_t5 -> D).

    conditioner = TextConditioner.load("t5-base", weight, bias)   # or a local T5 directory
    cond = conditioner.encode(["80s pop with synths"])
    cond.embeds                                                    # [2B, S, D]: B texts, then B null rows

As audiocraft's T5Conditioner: the slow sentencepiece `T5Tokenizer`, padding to the longest of
the 2B rows, no truncation, EOS appended; None or "" is the empty text, whose mask row is
zeroed, and that zeroed mask is what the T5 sees too. The LM's cross-attention ignores the
mask, so the padded length S changes every row's output: it must not be trimmed.

`build_random_t5` writes a small random T5 with a sentencepiece tokenizer trained on the spot,
for tests and the offline demo.
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
from torch import nn

from magnet_engine.errors import (CheckpointError, DependencyError, InvalidInputError, InvalidOptionError,
                                  ModelNotFoundError)

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
        transformers = _require_transformers()
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


def build_random_t5(out_dir: tp.Union[str, os.PathLike], d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                    d_ff: int = 64, vocab_size: int = 256, seed: int = 0,
                    corpus: tp.Optional[tp.Iterable[str]] = None) -> Path:
    """Write a random T5 encoder and a sentencepiece tokenizer to `out_dir` (new or empty).

    The tokenizer is a unigram model of `vocab_size` pieces trained on `corpus` (default: a
    built-in set of music descriptions), with T5's special ids (pad 0, EOS 1, unk 2) and its
    100 `<extra_id_*>` tokens after them. Both load with `from_pretrained(out_dir)`. The same
    arguments give the same files; only the weights depend on `seed`.
    """
    transformers = _require_transformers()
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


def check_descriptions(texts) -> tp.List[tp.Optional[str]]:
    """A non-empty list of str | None (None: no text), else InvalidInputError."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise InvalidInputError(f"descriptions must be a non-empty list of strings (or None for no text), "
                                f"found {texts!r:.100}")
    for text in texts:
        if not (text is None or isinstance(text, str)):
            raise InvalidInputError(f"each description must be a string or None, found {type(text).__name__}")
    return list(texts)


def _require_transformers():
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
    try:
        try:  # the cache first: without network the Hub client retries for minutes before giving up
            return kind.from_pretrained(t5, local_files_only=True, **kwargs)
        except OSError:
            return kind.from_pretrained(t5, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load T5 {t5!r} from the Hugging Face cache or Hub "
                                 f"({str(exc).splitlines()[0]}); without network, pass a local directory with "
                                 f"{_LOCAL_FILES} (t5=DIR, or --t5 DIR on the command line)") from exc


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
