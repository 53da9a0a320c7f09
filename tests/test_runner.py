"""The runner (server.runner) on its own: its policy, its events, cancellation and failures, on
an EntryQueue (server.batcher) with a stand-in model, no HTTP. The same runner runs the
single-process worker and every Ray replica (tests/test_server*.py, tests/test_cluster.py).
"""
import subprocess
import sys
import threading
import types

import pytest
import torch

from magnet_engine.engine.config import DecodingParams, rows_per_batch
from magnet_engine.engine.events import StageStep
from magnet_engine.server.batcher import EntryQueue
from magnet_engine.server.models import Models
from magnet_engine.server.runner import (BatchKey, Begun, Cancelled, Failed, Finished, GenerateRow, KeyedBatches, Runner,
                                         Step, Work)

KEY = BatchKey(DecodingParams(), 1.0, 3)
OTHER = BatchKey(DecodingParams(temperature=1.0), 1.0, 3)


class StandIn:
    """generate_tokens / decode with MAGNeT's call shape: `steps` masked steps, each row's
    tokens its seed; the audio of a row is its seed, 4 samples."""

    engine = "fast"
    sample_rate = 8000
    config = types.SimpleNamespace(card=16)

    def __init__(self, steps: int = 3, fail: bool = False, hold: threading.Event = None):
        self.steps, self.fail, self.hold = steps, fail, hold
        self.batches = []

    def generate_tokens(self, texts, on_event, seed, params, duration, on_prefix):
        self.batches.append(list(texts))
        canvas = torch.zeros(len(texts), 1, 2, dtype=torch.long)
        for i in range(self.steps):
            on_event(StageStep(0, i, self.steps, i + 1, self.steps, canvas, torch.ones(len(texts), 2)))
            if self.hold is not None and i == 0:
                assert self.hold.wait(30)
            if self.fail:
                raise RuntimeError("injected")
        return torch.tensor(seed, dtype=torch.float)[:, None, None]   # [B, 1, 1]

    def decode(self, tokens):
        return tokens.expand(-1, 1, 4)                                  # [B, C=1, 4]


class Entry:
    def __init__(self, work, tag="a", arrived=0.0, watched=False):
        self.work, self.tag, self.arrived, self._watched = work, tag, arrived, watched
        self.events, self.gone = [], False

    def cancelled(self):
        return self.gone

    def watched(self):
        return self._watched

    def emit(self, event):
        self.events.append(event)

    def kinds(self):
        return [type(e).__name__ for e in self.events]


def row(seed, key=KEY, **kw):
    return Entry(GenerateRow(f"text {seed}", seed, key), **kw)


@pytest.mark.parametrize("waiting, running, now, taken, wait", [
    ([], (), 0.0, [], None),
    (["a0", "b1", "a2", "a3"], (), 0.0, ["a0", "a2", "a3"], None),       # max_batch of the oldest's key
    (["a0", "b1"], (), 0.0, [], 0.05),                                   # not full: wait for companions
    (["a0", "b1"], (), 0.05, ["a0"], None),                              # the oldest waited max_wait
    (["t0", "a1", "a2", "a3"], (), 0.0, ["t0"], None),                   # work without a key: alone, at once
    (["a0", "a1", "a2"], ["a9"], 0.0, [], None),                         # nothing joins a running batch
])
def test_keyed_batches_choose(waiting, running, now, taken, wait):
    class Solo(Work):
        pass

    made = {name: (Entry(Solo()) if name[0] == "t" else row(int(name[1]), KEY if name[0] == "a" else OTHER))
            for name in waiting + list(running)}
    picked, after = KeyedBatches(max_batch=3, max_wait_s=0.05).choose([made[n] for n in waiting],
                                                                     [made[n] for n in running], now)
    assert picked == [made[n] for n in taken]
    assert after == pytest.approx(wait)


def test_reference_engine_runs_one_row_at_a_time():
    assert rows_per_batch("reference", 8) == 1 and rows_per_batch("fast", 8) == 8
    model = StandIn()
    model.engine = "reference"
    assert Runner(Models(model), 8, 0).policy.max_batch == 1


def serve(runner, queue):
    thread = threading.Thread(target=runner.serve, args=(queue,), daemon=True)
    thread.start()
    return thread


def test_one_run_of_equal_keys_events_per_request():
    """Two requests (tags), three rows of one key, one of another: two runs. Begun to each entry
    (its request's row count), one Step and one Codec per request per step, Finished to each
    with its own audio, the run counted once (lead); the canvas only for a watched request."""
    model, queue = StandIn(), EntryQueue()
    entries = [row(1, tag="x", watched=True), row(2, tag="y"), row(3, tag="x"), row(4, key=OTHER, tag="y")]
    queue.put(entries)
    runner = Runner(Models(model), max_batch=8, max_wait_ms=0)
    thread = serve(runner, queue)
    while sum(isinstance(e.events[-1:] and e.events[-1], Finished) for e in entries) < 4:
        thread.join(0.01)
    queue.close()
    thread.join(5)
    assert model.batches == [["text 1", "text 2", "text 3"], ["text 4"]]
    first, other, second, alone = entries
    assert first.kinds() == ["Begun"] + ["Step"] * 3 + ["Codec", "Finished"]
    assert second.kinds() == ["Begun", "Finished"]                     # x's progress goes to its first row
    assert other.kinds() == first.kinds() and alone.kinds() == first.kinds()
    assert [e.events[0].rows for e in entries] == [2, 1, 2, 1] and first.events[0].batch == ("", 1)
    assert all("canvas" in s.data for s in first.events if isinstance(s, Step))
    assert not any("canvas" in s.data for s in other.events if isinstance(s, Step))
    assert [e.events[-1].result.tolist() for e in entries] == [[[i] * 4] for i in (1, 2, 3, 4)]
    assert [e.events[-1].lead for e in entries] == [True, False, False, True]
    assert runner.runs == 2 and runner.running == 0


def test_a_run_stops_after_the_step_where_every_entry_was_cancelled():
    hold = threading.Event()
    model, queue = StandIn(steps=5, hold=hold), EntryQueue()
    a, b = row(1, tag="a"), row(2, tag="b")
    queue.put([a, b])
    thread = serve(Runner(Models(model), 2, 0), queue)
    while not a.events or not isinstance(a.events[-1], Step):
        thread.join(0.01)
    a.gone = True                      # one of two: the run goes on
    b.gone = True                      # both: it stops before step 2
    hold.set()
    while not b.events or not isinstance(b.events[-1], Cancelled):
        thread.join(0.01)
    queue.close()
    thread.join(5)
    assert a.kinds() == ["Begun", "Step", "Cancelled"] and b.kinds() == a.kinds()


def test_a_failed_run_fails_its_entries_and_the_runner_goes_on():
    model, queue = StandIn(fail=True), EntryQueue()
    a, b = row(1, tag="a"), row(2, key=OTHER, tag="b")
    queue.put([a, b])
    thread = serve(Runner(Models(model), 2, 0), queue)
    while not b.events or not isinstance(b.events[-1], Failed):
        thread.join(0.01)
    queue.close()
    thread.join(5)
    assert isinstance(a.events[-1], Failed) and str(a.events[-1].error) == "injected"
    assert len(model.batches) == 2


def test_work_runs_alone_with_its_listener_and_partial_output():
    class Counted(Work):
        kind = "count"
        canvas = False

        def run(self, models, listen, emit):
            listen(StageStep(0, 0, 1, 1, 1))
            emit("partial")
            return "result"

    entry = Entry(Counted())
    Runner(Models(None), 4, 0).run([entry])
    assert [type(e).__name__ if not isinstance(e, str) else e for e in entry.events] == [
        "Begun", "Step", "partial", "Finished"]
    assert entry.events[-1].result == "result" and "run_ms" in entry.events[-1].timing


def test_a_policy_plugs_in_and_is_asked_only_when_the_runner_has_room():
    """The runner pulls: it asks its policy (with nothing running) each time it is free, and
    runs what the policy picked together."""
    asked = []

    class Pairs:
        def choose(self, waiting, running, now):
            asked.append((len(waiting), len(running)))
            return waiting[:2], None

    model, queue = StandIn(steps=1), EntryQueue()
    runner = Runner(Models(model), 8, 0)
    runner.policy = Pairs()
    entries = [row(i, key=KEY if i % 2 else OTHER) for i in range(4)]   # keys mixed: the policy decides
    queue.put(entries)
    thread = serve(runner, queue)
    while not all(e.events and isinstance(e.events[-1], Finished) for e in entries):
        thread.join(0.01)
    queue.close()
    thread.join(5)
    assert model.batches == [["text 0", "text 1"], ["text 2", "text 3"]]
    assert asked[:2] == [(4, 0), (2, 0)]


def test_the_runner_and_the_queue_import_no_http_and_the_server_package_is_lazy():
    """server/__init__ imports its names on first use: importing the runner or the batcher runs
    neither the app nor fastapi; `from magnet_engine.server import ...` still works."""
    code = ("import sys, magnet_engine.server.runner, magnet_engine.server.batcher\n"
            "assert 'fastapi' not in sys.modules and 'magnet_engine.server.app' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('fastapi', 'magnet_engine.server')))\n"
            "from magnet_engine.server import Settings, create_app\n"
            "assert 'magnet_engine.server.app' in sys.modules and Settings().max_batch >= 1\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------ continuous batching
class Arrivals(Entry):
    """An entry that makes things happen at its `at`-th Step, on the runner's thread: more
    entries arrive (`then`), or other entries' clients leave (`gone`). Deterministic: what
    arrives is admitted at the next step boundary, or waits for the run to end (grouped)."""

    def __init__(self, work, queue, tag, then=(), gone=(), at=1):
        super().__init__(work, tag=tag)
        self.queue, self.then, self.to_cancel, self.at = queue, list(then), list(gone), at

    def emit(self, event):
        super().emit(event)
        if isinstance(event, Finished):   # which of the arrivals had begun before this row finished
            self.joined = [isinstance(e.events[:1] and e.events[0], Begun) for e in self.then]
        if isinstance(event, Step) and sum(isinstance(e, Step) for e in self.events) == self.at:
            self.queue.put(self.then)
            for other in self.to_cancel:
                other.gone = True


def tiny_key(model, text, duration=0.3, **params):
    from magnet_engine.server.schema import text_token_count
    return BatchKey(DecodingParams(**{"decoding_steps": [2, 1, 1, 1], **params}), duration,
                    text_token_count(model, text))


def run_until_done(runner, queue, entries, watch):
    thread = serve(runner, queue)
    while not all(e.events and isinstance(e.events[-1], (Finished, Failed, Cancelled)) for e in watch):
        assert thread.is_alive(), "the runner died"
        thread.join(0.01)
    queue.close()
    thread.join(30)
    return [e.events[-1] for e in watch]


def wavs(model, finished):
    from magnet_engine.audio import wav_bytes
    return [wav_bytes(f.result, model.sample_rate) if isinstance(f, Finished) else type(f).__name__ for f in finished]


ROWS = [   # (text, seed, duration, options): options, durations and seeds all differ
    ("warm piano", 7, 0.5, {}),
    ("fast drums", 8, 0.3, {"use_sampling": False}),                                    # greedy
    ("soft strings", 9, 0.4, {"temperature": 1.5, "top_k": 5, "decoding_steps": [3, 2, 1, 1]}),
    ("warm piano", 10, 0.3, {"top_k": 0, "top_p": 0.9, "decoding_steps": [4, 2, 2, 1]}),
]


def arrivals(model, queue, rows, at=1):
    """The first row queued at once, the others arriving at its `at`-th step."""
    later = [Entry(GenerateRow(t, s, tiny_key(model, t, d, **o)), tag=f"r{i + 1}") for i, (t, s, d, o) in enumerate(rows[1:])]
    t, s, d, o = rows[0]
    first = Arrivals(GenerateRow(t, s, tiny_key(model, t, d, **o)), queue, "r0", then=later, at=at)
    queue.put([first])
    return [first] + later


@pytest.mark.parametrize("batching", ["grouped", "continuous"])
def test_a_row_arriving_mid_run_joins_it_and_each_gets_its_grouped_audio(tiny_model, batching):
    """Rows of other options, durations and seeds arrive while the first runs: continuous
    batching admits them at the next step boundary (their Begun before the first's Finished, a
    batch of 4), grouped starts them after it. Either way each row's WAV is the same bytes:
    a row's tokens depend on its seed and options only, greedy and sampled alike."""
    queue = EntryQueue()
    entries = arrivals(tiny_model, queue, ROWS)
    done = run_until_done(Runner(Models(tiny_model), 4, 0, batching=batching), queue, entries, entries)
    assert all(isinstance(f, Finished) for f in done)
    continuous = batching == "continuous"
    assert entries[0].joined == [continuous] * 3
    assert max(e.events[0].batch_size for e in entries) == (4 if continuous else 1)
    grouped_queue = EntryQueue()
    alone = [Entry(GenerateRow(t, s, tiny_key(tiny_model, t, d, **o)), tag=f"r{i}") for i, (t, s, d, o) in enumerate(ROWS)]
    grouped_queue.put(alone)
    want = run_until_done(Runner(Models(tiny_model), 4, 0), grouped_queue, alone, alone)
    assert wavs(tiny_model, done) == wavs(tiny_model, want)
    steps = [sum(isinstance(e, Step) for e in entry.events) for entry in entries]
    assert steps == [sum(o.get("decoding_steps", [2, 1, 1, 1])) for _, _, _, o in ROWS]   # every request's progress


def test_a_cancelled_row_leaves_its_slot_and_the_others_finish_as_grouped(tiny_model):
    """The second row joins, then its client leaves after its first step: its slot is freed
    before the next step (Cancelled), the first row finishes with its grouped audio."""
    queue = EntryQueue()
    (t, s, d, o), (t2, s2, d2, o2) = ROWS[0], ROWS[2]
    second = Arrivals(GenerateRow(t2, s2, tiny_key(tiny_model, t2, d2, **o2)), queue, "b")
    second.to_cancel = [second]
    first = Arrivals(GenerateRow(t, s, tiny_key(tiny_model, t, d, **o)), queue, "a", then=[second])
    queue.put([first])
    runner = Runner(Models(tiny_model), 4, 0, batching="continuous")
    done = run_until_done(runner, queue, [first, second], [first, second])
    assert second.kinds() == ["Begun", "Step", "Cancelled"] and first.joined == [True]
    assert isinstance(done[0], Finished) and runner.slots.active == 0
    alone = Entry(GenerateRow(t, s, tiny_key(tiny_model, t, d, **o)))
    Runner(Models(tiny_model), 4, 0).run([alone])
    assert wavs(tiny_model, done[:1]) == wavs(tiny_model, alone.events[-1:])


class Slotted(StandIn):
    """A stand-in whose generate rows run in slots: records the slot runtime it builds and its warm-up."""

    config = types.SimpleNamespace(card=16, pattern="parallel")

    def slot_runtime(self, rows, text_len):
        self.slots = types.SimpleNamespace(rows=rows, text_len=text_len, warmed=0)
        self.slots.warm = lambda: setattr(self.slots, "warmed", self.slots.warmed + 1)
        return self.slots


def test_continuous_runner_builds_and_warms_its_slots_at_start():
    """The slot runtime is built and warmed (its step shapes compiled and captured) when the
    runner is made (the Batcher's or the Ray replica's constructor, before serving), not by
    the first request; grouped batching builds none."""
    model = Slotted()
    runner = Runner(Models(model), 4, 0, batching="continuous")
    assert runner.slots is model.slots and model.slots.warmed == 1
    assert (model.slots.rows, model.slots.text_len) == (4, runner.text_len)
    grouped = Slotted()
    assert Runner(Models(grouped), 4, 0).slots is None and not hasattr(grouped, "slots")


def test_continuous_with_compile_warms_at_start_and_answers_the_grouped_audio(tiny_dir, tiny_model):
    """`serve --batching continuous --compile`: the slot runtime compiles its ladder when the
    runner is made; rows that join mid-run then never recompile (fail_on_recompile) and get
    the audio the eager grouped runner gives them."""
    import torch._dynamo

    from magnet_engine.api import MAGNeT

    compiled_model = MAGNeT.from_pretrained(tiny_dir, device="cpu", engine="fast", compile=True)
    torch._dynamo.reset()
    runner = Runner(Models(compiled_model), 2, 0, batching="continuous")
    slots = runner.slots
    assert slots.compiled and slots.ladders[0] == (1, 2) and torch._dynamo.utils.counters["stats"]["unique_graphs"]
    queue = EntryQueue()
    entries = arrivals(compiled_model, queue, ROWS[:3])
    with torch.compiler.set_stance("fail_on_recompile"):
        done = run_until_done(runner, queue, entries, entries)
    assert all(isinstance(f, Finished) for f in done), done
    assert max(e.events[0].batch_size for e in entries) == 2
    grouped_queue = EntryQueue()
    alone = [Entry(GenerateRow(t, s, tiny_key(tiny_model, t, d, **o)), tag=f"r{i}") for i, (t, s, d, o) in enumerate(ROWS[:3])]
    grouped_queue.put(alone)
    want = run_until_done(Runner(Models(tiny_model), 4, 0), grouped_queue, alone, alone)
    assert wavs(tiny_model, done) == wavs(tiny_model, want)
