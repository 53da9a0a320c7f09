"""The edit planner (docs/model.md §13.8, §13.10): which unit frames to
regenerate for a text edit, with which text and audio context, and how to stitch the result.

    texts --unidecode, jiwer word diff--> alignment chunks
    word times --repair against the input words--> one entry per input word (untimed if unmatched)
    timed words --speech time / syllables--> frames per syllable
    diff chunks --dynamic (1 word) and static (5 words) buffers, merge--> word spans
    word spans --times × 50--> Region(start/end frame, n frames, context frames, text)

Pure Python over lists and ints; the only tensors are the units being stitched.
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import numpy as np

from magnet_engine.engine.errors import InvalidInputError

FRAME_RATE = 50
DEFAULT_RATIO = FRAME_RATE / 4          # an average English speaker: 4 syllables / s
MAX_AUDIO_FRAMES = 750
DYNAMIC_WORDS = 1
STATIC_WORDS = 5
BREAK_SECONDS = 0.5
BREAK_FRAMES = int(BREAK_SECONDS * FRAME_RATE)
MAX_TTS_CHARS = 500


@dataclasses.dataclass(frozen=True)
class PlannerOptions:
    """Named fixes of upstream planner quirks (docs/model.md §13.11), all off by default."""
    # Quirk 4: an insertion at the very end compares a frame count × 50 with a time, so it
    # never takes its left neighbour; the fix uses the audio's end time.
    fix_end_insertion_buffer: bool = False
    # Quirks 1-2: upstream generates n + 1 positions before a right context of >= 2 frames
    # (drops a 1-frame one), keeps the first n, and drops original frame `end_frame`; the fix
    # generates exactly n between the full left and right contexts and keeps that frame.
    exact_region_length: bool = False


@dataclasses.dataclass
class Region:
    """One inpainter call (upstream InpainterChunk). None = no such edge (split regions)."""
    start_frame: int | None
    end_frame: int | None
    n_frames: int
    buf_start_frame: int | None
    buf_end_frame: int | None
    text: str


@dataclasses.dataclass
class _Chunk:
    ref_start: int
    ref_end: int
    hyp_start: int
    hyp_end: int
    ref_buf_start: int
    ref_buf_end: int
    hyp_buf_start: int
    hyp_buf_end: int
    ref_diff_start: int
    ref_diff_end: int


def syllables(text: str) -> int:
    """Upstream's estimate: the PyPI `syllables` package on the whole (multi-word) string."""
    import syllables as syl

    return syl.estimate(text)


def normalise(text: str) -> str:
    from unidecode import unidecode

    return unidecode(text)


def align(reference: str, hypothesis: str):
    """jiwer word alignment (default transform: collapse spaces, strip, split on ' ')."""
    import jiwer

    if not reference.strip():
        raise InvalidInputError("input_text is empty: there is nothing to align the edit against")
    if not hypothesis.strip():
        raise InvalidInputError("output_text is empty")
    return jiwer.process_words(reference, hypothesis)


def repair_word_times(word_times: tp.Sequence[dict], input_text: str) -> list[dict]:
    """One entry per word of the punctuation-stripped input text (docs/model.md §13.8 step 2); words the timings
    miss are added untimed. Raises InvalidInputError when they cannot be made to match."""
    if not isinstance(word_times, (list, tuple)):
        raise InvalidInputError(f"word times must be a list of {{word, start, end}}, found {type(word_times).__name__}")
    entries = []
    for i, w in enumerate(word_times):
        if not isinstance(w, dict) or not isinstance(w.get("word"), str):
            raise InvalidInputError(f"word times entry {i}: expected {{'word': str, 'start': s, 'end': s}}, found {w!r}")
        start, end = w.get("start"), w.get("end")
        for name, value in (("start", start), ("end", end)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise InvalidInputError(f"word times entry {i} ({w['word']!r}): {name} must be seconds >= 0, "
                                        f"found {value!r}")
        if start is not None and end is not None and end < start:
            raise InvalidInputError(f"word times entry {i} ({w['word']!r}): end {end} is before start {start}")
        entries.append({"word": w["word"].lower(), "start": start, "end": end})
    kept = "".join(c for c in input_text if c.isalnum() or c.isspace() or c in "'-")
    if not entries:
        raise InvalidInputError("word times are empty: an edit needs the input words' start and end times")
    result = align(kept.lower(), " ".join(e["word"] for e in entries))
    repaired: list[dict] = []
    last_hyp = 0
    for chunk in result.alignments[0]:
        if chunk.type != "equal":
            repaired.extend(entries[last_hyp:chunk.hyp_start_idx])
            repaired.extend({"word": word} for word in result.references[0][chunk.ref_start_idx:chunk.ref_end_idx])
            last_hyp = chunk.hyp_end_idx
    repaired.extend(entries[last_hyp:])
    return repaired


def syllable_ratio(word_times: tp.Sequence[dict]) -> float:
    """Frames per syllable from the timed words (docs/model.md §13.8 step 3); pauses >= 0.5 s count as 0.5 s."""
    speech, last_end, words = 0.0, -BREAK_SECONDS, []
    for w in word_times:
        if w["word"] == "<|unknown|>" or w.get("start") is None or w.get("end") is None:
            continue
        words.append(w["word"])
        if w["start"] - last_end < BREAK_SECONDS:
            speech += w["end"] - last_end
        else:
            speech += w["end"] - w["start"] + BREAK_SECONDS
        last_end = w["end"]
    return speech * FRAME_RATE / syllables(" ".join(words))


def diff_chunks(alignment, word_times: list[dict], n_units: int, options: PlannerOptions) -> list[_Chunk]:
    """Word spans to regenerate, with buffers, merged when they touch (docs/model.md §13.8 step 4)."""
    n_words, n_hyp = len(word_times), len(alignment.hypotheses[0])
    chunks: list[_Chunk] = []
    last_end = None
    for a in alignment.alignments[0]:
        if a.type == "equal":
            continue
        rs, re_, hs, he = a.ref_start_idx, a.ref_end_idx, a.hyp_start_idx, a.hyp_end_idx
        for i in range(DYNAMIC_WORDS):
            if rs - i <= 0:
                break
            if rs - i == n_words:  # an insertion at the very end
                current_start = (n_units / FRAME_RATE if options.fix_end_insertion_buffer
                                 else n_units * FRAME_RATE)  # upstream: frames × 50 (quirk 4)
            else:
                current_start = word_times[rs - i].get("start")
            prev_end = word_times[rs - i - 1].get("end")
            if current_start is not None and prev_end is not None and current_start - prev_end > BREAK_SECONDS:
                break
            rs -= 1
            hs -= 1 if hs > 0 else 0
        for i in range(DYNAMIC_WORDS):
            if re_ + i >= n_words:
                break
            current_end = word_times[re_ + i - 1].get("end")  # re_ = 0: W[-1], the last word (quirk 6)
            next_start = word_times[re_ + i].get("start")
            if (current_end is not None and next_start is not None and next_start - current_end > BREAK_SECONDS
                    and not (a.type == "insert" and i == 0)):
                break
            re_ += 1
            he += 1 if he < n_hyp else 0
        while 0 < rs < n_words and word_times[rs].get("start") is None:
            rs -= 1
            hs -= 1 if hs > 0 else 0
        while re_ < n_words and word_times[re_ - 1].get("end") is None:
            re_ += 1
            he += 1 if he < n_hyp else 0
        rbs, hbs = max(0, rs - STATIC_WORDS), max(0, hs - STATIC_WORDS)
        rbe, hbe = min(n_words, re_ + STATIC_WORDS), min(n_hyp, he + STATIC_WORDS)
        while rbs > 0 and word_times[rbs].get("start") is None:
            rbs -= 1
            hbs -= 1 if hbs > 0 else 0
        while rbe < n_words and word_times[rbe - 1].get("end") is None:
            rbe += 1
            hbe += 1 if hbe < n_hyp else 0
        if last_end is not None and rs <= last_end:
            prev = chunks[-1]
            prev.ref_end, prev.ref_buf_end, prev.hyp_end, prev.hyp_buf_end = re_, rbe, he, hbe
            prev.ref_diff_end = a.ref_end_idx
        else:
            chunks.append(_Chunk(rs, re_, hs, he, rbs, rbe, hbs, hbe, a.ref_start_idx, a.ref_end_idx))
        last_end = re_
    return chunks


def _frame(seconds: float) -> int:
    return int(seconds * FRAME_RATE)


def regions(chunks: list[_Chunk], alignment, word_times: list[dict], n_units: int, ratio: float) -> list[Region]:
    """Frames, context and text of each chunk (docs/model.md §13.8 step 5); regions over 750 frames are split."""
    refs, hyps = alignment.references[0], alignment.hypotheses[0]
    n_words = len(word_times)
    out: list[Region] = []
    for c in chunks:
        if c.ref_start == 0:
            if word_times[0].get("start") is None:
                sf, ss = 0, 0
            else:
                sf = max(0, _frame(word_times[0]["start"]))
                ss = min(sf, BREAK_FRAMES)
        elif c.ref_start == n_words:
            sf, ss = n_units, 0
        else:
            sf = _frame(word_times[c.ref_start]["start"])
            prev_end = word_times[c.ref_start - 1].get("end")
            if prev_end is not None and word_times[c.ref_start]["start"] - prev_end > BREAK_SECONDS:
                ss = min(_frame((word_times[c.ref_start]["start"] - prev_end) / 2), BREAK_FRAMES)
            else:
                ss = 0
        if c.ref_end == n_words and c.ref_end != c.ref_start:
            if word_times[-1].get("end") is None:
                ef, es = n_units, 0
            else:
                ef = min(n_units, _frame(word_times[-1]["end"]))
                es = min(n_units - ef, BREAK_FRAMES)
        else:
            ef = sf if c.ref_end == c.ref_start else _frame(word_times[c.ref_end - 1]["end"])
            next_start = word_times[c.ref_end].get("start") if c.ref_end < n_words else None
            if next_start is not None and next_start - word_times[c.ref_end - 1]["end"] > BREAK_SECONDS:
                es = min(_frame((next_start - word_times[c.ref_end - 1]["end"]) / 2), BREAK_FRAMES)
            else:
                es = 0
        bsf = 0 if c.ref_buf_start == 0 else _frame(word_times[c.ref_buf_start]["start"])
        bef = n_units if c.ref_buf_end == n_words else _frame(word_times[c.ref_buf_end - 1]["end"])
        ss = min(ss, sf - bsf) if c.ref_diff_start == c.ref_start else 0
        es = min(es, bef - ef) if c.ref_diff_end == c.ref_end else 0
        sf, ef = sf - ss, ef + es
        hyp_words = hyps[c.hyp_start:c.hyp_end]
        words = refs[c.ref_buf_start:c.ref_start] + hyp_words + refs[c.ref_end:c.ref_buf_end]
        n = int(syllables(" ".join(hyp_words)) * ratio)
        if n <= MAX_AUDIO_FRAMES:
            out.append(Region(sf, ef, n, bsf, bef, " ".join(words)))
            continue
        # Upstream's crude split: k near-equal word groups; assumes 5 static words each side,
        # and middle groups get no audio context (quirk 9).
        k = 1 + n // MAX_AUDIO_FRAMES
        groups = np.array_split(np.array(words, dtype=object), k)
        for i, group in enumerate(groups):
            group = list(group)
            if i == 0:
                region_words, edges = group[STATIC_WORDS:], (sf, None, bsf, None)
            elif i == k - 1:
                region_words, edges = group[:-STATIC_WORDS], (None, ef, None, bef)
            else:
                region_words, edges = group, (None, None, None, None)
            n_i = int(syllables(" ".join(region_words)) * ratio)
            out.append(Region(edges[0], edges[1], n_i, edges[2], edges[3], " ".join(group)))
    return out


@dataclasses.dataclass
class EditPlan:
    input_text: str
    output_text: str
    word_times: list[dict]
    ratio: float
    regions: list[Region]


def plan_edit(input_text: str, output_text: str, word_times: tp.Sequence[dict], n_units: int,
              ratio: float | None = None, options: PlannerOptions = PlannerOptions()) -> EditPlan:
    """Texts (as the user gave them), word times, the input's unit count -> the regions."""
    in_text, out_text = normalise(input_text), normalise(output_text)
    alignment = align(in_text, out_text)
    repaired = repair_word_times(word_times, in_text)
    if len(repaired) != len(alignment.references[0]):
        raise InvalidInputError(
            f"word times do not match the input text: {len(alignment.references[0])} words in the text, "
            f"{len(repaired)} after aligning the timed words (a word made only of punctuation cannot be timed)")
    if not any(w.get("start") is not None and w.get("end") is not None for w in repaired):
        # Upstream would go on with 0 frames per syllable and regenerate nothing (quirk 7).
        raise InvalidInputError("none of the timed words match the input text: the edit cannot be placed")
    duration = n_units / FRAME_RATE
    for w in repaired:
        if w.get("end") is not None and w["end"] > duration + 1.0 / FRAME_RATE:
            raise InvalidInputError(f"word {w['word']!r} ends at {w['end']} s, after the end of the audio "
                                    f"({duration:.2f} s)")
    if ratio is None:
        ratio = syllable_ratio(repaired)
    chunks = diff_chunks(alignment, repaired, n_units, options)
    return EditPlan(in_text, out_text, repaired, ratio, regions(chunks, alignment, repaired, n_units, ratio))


def split_tts_text(text: str) -> list[str]:
    """Pieces of <= 500 characters (docs/model.md §13.10): at sentence ends, then ,;:, then spaces, then the middle."""
    text = text.strip()
    if len(text) <= MAX_TTS_CHARS:
        return [text]
    for delimiters in (".!?", ",;:", " "):
        pieces = _split_at(text, delimiters)
        if pieces is not None:
            return pieces
    half = len(text) // 2
    return split_tts_text(text[:half]) + split_tts_text(text[half:])


def _split_at(text: str, delimiters: str) -> list[str] | None:
    mid = len(text) // 2
    for i in range(mid):
        high = mid + i
        if high < len(text) - 1 and text[high] in delimiters:
            return split_tts_text(text[:high + 1]) + split_tts_text(text[high + 1:])
        low = mid - i - 1
        if low > 0 and text[low] in delimiters:
            return split_tts_text(text[:low + 1]) + split_tts_text(text[low + 1:])
    return None
