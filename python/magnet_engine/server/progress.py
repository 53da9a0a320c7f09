"""Progress streams: the events of each request_id, published from the worker thread and
replayed to server-sent-event subscribers on the event loop."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import typing as tp

from magnet_engine.server.schema import ApiError

TERMINAL_EVENTS = ("done", "error")


class ProgressChannel:
    """The events of one request_id, replayed to late subscribers.

    A subscriber may connect before the POST arrives (the page opens the stream first),
    so a channel exists from whichever comes first. Only the latest `step` is kept.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.events: tp.List[tp.Tuple[str, dict]] = []
        self.subscribers: tp.List[asyncio.Queue] = []
        self.claimed = False            # a POST owns this id
        self.created = time.monotonic()
        self.finished: tp.Optional[float] = None
        self.prefix: tp.Dict[int, bytes] = {}   # hybrid: row index -> the AR prefix as a wav, served early

    def publish(self, kind: str, data: dict) -> None:
        """Any thread."""
        with self.lock:
            if self.finished is not None:
                return
            if kind == "step" and self.events and self.events[-1][0] == "step":
                self.events[-1] = (kind, data)
            else:
                self.events.append((kind, data))
            if kind in TERMINAL_EVENTS:
                self.finished = time.monotonic()
            subscribers = list(self.subscribers)
        for queue in subscribers:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                self.loop.call_soon_threadsafe(queue.put_nowait, (kind, data))

    def subscribe(self) -> tp.Tuple[asyncio.Queue, tp.List[tp.Tuple[str, dict]]]:
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            self.subscribers.append(queue)
            return queue, list(self.events)

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self.lock:
            self.subscribers.remove(queue)


class ProgressHub:
    """request_id -> channel. An id belongs to the first POST that claims it; a stream may be
    opened before (it waits for the POST) or after (it replays until `ttl_s` past the end)."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self.lock = threading.Lock()
        self.channels: tp.Dict[str, ProgressChannel] = {}

    def claim(self, request_id: str, loop) -> ProgressChannel:
        """The POST's channel; a second POST with a live id is a conflict and touches nothing."""
        with self.lock:
            self._purge()
            channel = self.channels.get(request_id)
            if channel is not None and channel.claimed:
                raise ApiError(409, "Conflict", f"request_id {request_id!r} is already in use")
            channel = channel or ProgressChannel(loop)
            channel.claimed = True
            self.channels[request_id] = channel
            return channel

    def get(self, request_id: str) -> tp.Optional[ProgressChannel]:
        with self.lock:
            return self.channels.get(request_id)

    def watch(self, request_id: str, loop) -> ProgressChannel:
        with self.lock:
            self._purge()
            return self.channels.setdefault(request_id, ProgressChannel(loop))

    def _purge(self) -> None:
        now = time.monotonic()
        for key, ch in list(self.channels.items()):
            stale = ch.finished is not None and now - ch.finished > self.ttl_s
            orphan = not ch.claimed and now - ch.created > self.ttl_s
            if stale or (orphan and not ch.subscribers):
                del self.channels[key]


def sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
