"""The service's bounded queue and its one worker thread, which runs every job through the
runner (server.runner): generate rows batched by the runner's policy, an edit, a streamed
long-form run or a speech edit alone. All of them wait in the same queue, count in the same
bound and queue depth, and are cancelled the same way.

`EntryQueue` is the source a runner pulls from (here, and on every Ray replica); `Batcher` puts
a job's entries on it, at most `queue_size` jobs waiting (else QueueFull: the routes answer
503 + Retry-After), and runs the worker thread. What a job's run events mean to the job is
server.jobs'.
"""
from __future__ import annotations

import math
import threading
import time
import typing as tp

from magnet_engine.server.metrics import Metrics
from magnet_engine.server.runner import Choice, Entry, Runner

if tp.TYPE_CHECKING:   # the HTTP layer's limits, read here as plain data
    from magnet_engine.server.schema import Settings


class QueueFull(Exception):
    pass


class EntryQueue:
    """Entries waiting for a runner, oldest first (server.runner.Source); thread-safe. `cond`
    guards them: hold it to check and put in one step (its lock is reentrant)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.pending: tp.List[Entry] = []
        self.closed = False

    def put(self, entries: tp.Sequence[Entry]) -> None:
        with self.cond:
            self.pending.extend(entries)
            self.cond.notify_all()

    def remove(self, which: tp.Callable[[Entry], bool]) -> None:
        """Drop the waiting entries `which` picks (their request was cancelled)."""
        with self.cond:
            self.pending = [e for e in self.pending if not which(e)]
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def pull(self, choose: tp.Callable[[tp.List[Entry], tp.Sequence[Entry], float], Choice],
             running: tp.Sequence[Entry] = (), block: bool = True) -> tp.Optional[tp.List[Entry]]:
        """The entries `choose` picks, taken out of the queue; blocking, it asks again after the
        wait it names or when the queue changes, until it picks some. None once closed."""
        with self.cond:
            while not self.closed:
                taken, wait = choose(list(self.pending), running, time.monotonic())
                if taken:
                    ids = set(map(id, taken))
                    self.pending = [e for e in self.pending if id(e) not in ids]
                    return taken
                if not block:
                    return []
                self.cond.wait(wait)
            return None


class Batcher:
    """The bounded queue and the one worker thread that runs every job on `models`
    (server.models.Models)."""

    def __init__(self, models, settings: Settings):
        self.settings = settings
        self.queue = EntryQueue()
        self.runner = Runner(models, settings.max_batch, settings.max_wait_ms, batching=settings.batching)
        self.max_batch = self.runner.max_batch
        self.metrics = Metrics(self.queue_depth, lambda: self.runner.running,
                               getattr(models.music, "memory_stats", None))
        self.thread = threading.Thread(target=self.runner.serve, args=(self.queue,),
                                       name="magnet-generation-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.close()
        self.thread.join(timeout=30)

    def submit(self, job) -> None:
        """Queue a job's entries (server.jobs.Job / Task), or raise QueueFull (and leave the queue as it was)."""
        with self.queue.cond:
            waiting = self.queue_depth()
            if waiting >= self.settings.queue_size:
                raise QueueFull()
            self.queue.put(job.entries)
            # under the lock, so `queued` precedes the worker's `started`
            job.channel.publish("queued", {"request_id": job.request_id, "position": waiting + 1,
                                           "rows": len(job.entries), "kind": job.kind})

    def cancel(self, job) -> None:
        """Drop a job's waiting entries; a run whose entries are all cancelled stops after its current step."""
        if job.close():
            self.queue.remove(lambda e: e.job is job)
            self.metrics.cancelled.inc()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def queue_depth(self) -> int:
        """Jobs with an entry still waiting."""
        with self.queue.cond:
            return len({id(e.job) for e in self.queue.pending})

    def retry_after_s(self) -> int:
        runs_ahead = self.queue_depth() / self.max_batch + 1
        return int(min(60, max(1, math.ceil(runs_ahead * self.runner.run_seconds))))
