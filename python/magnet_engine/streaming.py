"""Streamed output and progress of the public API, all as listeners of the engine's typed
events (`engine.events`): the progress bar or callback, the long-form chunk decoder, the
hybrid prefix's audio, fanned out to one listener per run; and the worker thread that turns a
generate call into an iterator of ('prefix' | 'chunk' | 'full', wav).
"""
from __future__ import annotations

import queue
import threading
import typing as tp

import torch

from magnet_engine.engine import events
from magnet_engine.engine.codec import Codec, StreamDecoder

Progress = tp.Callable[[int, int], None]
Put = tp.Callable[[tp.Tuple[str, torch.Tensor]], None]


def stream(work: tp.Callable[[Put], torch.Tensor]) -> tp.Iterator[tp.Tuple[str, torch.Tensor]]:
    """Run work(put) on a worker thread; yield what it puts, then ('full', its result). An
    error in the worker is raised in the consumer."""
    results: "queue.Queue" = queue.Queue()

    def run():
        try:
            results.put(("full", work(results.put)))
        except BaseException as exc:  # handed to the consumer
            results.put(("error", exc))

    thread = threading.Thread(target=run, name="magnet-generate", daemon=True)
    thread.start()
    while True:
        kind, value = results.get()
        if kind == "error":
            raise value
        yield kind, value
        if kind == "full":
            thread.join()
            return


def chunker(codec: Codec, put: Put) -> events.Listener:
    """A listener that decodes each long-form window's new frames as it is final and puts
    ('chunk', wav) (`StreamDecoder`: the chunks joined equal one whole decode within 1e-4)."""
    decoder = StreamDecoder(codec)

    def listen(event: events.Event) -> None:
        if isinstance(event, events.WindowReady):
            for wav in decoder.window(event):
                put(("chunk", wav))
    return listen


def prefix_audio(codec: Codec, on_prefix: tp.Callable[[torch.Tensor], None]) -> events.Listener:
    """A listener that decodes a hybrid run's AR prefix as soon as it is final: on_prefix(wav)."""
    def listen(event: events.Event) -> None:
        if isinstance(event, events.PrefixReady):
            on_prefix(codec.decode(event.codes))
    return listen


class ProgressBar:
    """progress=True: a tqdm bar over every step of the run (AR steps included)."""

    def __init__(self, total: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="step", desc="decoding")

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, (events.ARStep, events.StageStep)):
            self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def fan_out(listeners: tp.Sequence[tp.Optional[events.Listener]]) -> tp.Optional[events.Listener]:
    """One listener calling each given one in order (None when none is given)."""
    listeners = [listener for listener in listeners if listener is not None]
    if not listeners:
        return None
    if len(listeners) == 1:
        return listeners[0]

    def listen(event: events.Event) -> None:
        for listener in listeners:
            listener(event)
    return listen
