"""Helpers shared by the HTTP service tests: Prometheus samples, SSE parsing, polling."""
import json
import time
import typing as tp


def metric(client, name: str, **labels) -> float:
    """One sample of the Prometheus exposition, parsed by prometheus_client; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {k: str(v) for k, v in labels.items()}:
                return sample.value
    return 0.0


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def sse_events(lines: tp.Union[str, tp.Iterable[str]]) -> tp.List[tp.Tuple[str, tp.Any]]:
    """(event, data) pairs of a server-sent event stream (its text, or its lines as they
    arrive), up to and including the first `done` or `error`; comments are skipped."""
    seen, kind = [], None
    for line in (lines.splitlines() if isinstance(lines, str) else lines):
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            seen.append((kind, json.loads(line[6:])))
            if kind in ("done", "error"):
                break
    return seen
