"""Compiling one decoding step whole, capturing it as a CUDA graph, and the bounded cache of
the static buffers (and graphs) a step runs on: the one mechanism the masked runtime
(`decoding.Runtime`), the AR runtime (`hybrid.ARRuntime`) and the speech runtime
(`playdiffusion.unmasking.SpeechRuntime`) share.

A step that reads and writes only static buffers, takes every per-step value from device
tables through a device cursor and never syncs traces as one graph (torch.compile with
fullgraph=True), and can be captured once per step shape and replayed for every later step
of that shape. The buffers are allocated once per geometry (batch, lengths, ...) and kept
across calls, so a graph captured on them stays valid for the next call of that geometry.
"""
from __future__ import annotations

import collections
import typing as tp

import torch

from magnet_engine.engine.errors import InvalidOptionError

S = tp.TypeVar("S")

MAX_GRAPHS = 256    # captured step graphs kept per cache (all its states together)


def check_device(cuda_graphs: bool, device: tp.Union[str, torch.device]) -> None:
    """CUDA graphs capture CUDA work only: refuse `cuda_graphs=True` anywhere else."""
    if cuda_graphs and torch.device(device).type != "cuda":
        raise InvalidOptionError(f"cuda_graphs=True needs a CUDA device, found {str(device)!r}")


def compile_step(step: tp.Callable) -> tp.Callable:
    """`step` through torch.compile(fullgraph=True). A new step shape (or buffer geometry)
    recompiles once, then what changed is symbolic (automatic dynamic shapes): a few graphs
    per runtime, so the recompile limit is raised above dynamo's default of 8 rather than
    letting later shapes fall back to eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(step, fullgraph=True)


def capture_step(step: tp.Callable[[], None], state: tp.Sequence[torch.Tensor],
                 pool: tp.Optional[tp.Tuple[int, int]] = None) -> "torch.cuda.CUDAGraph":
    """Capture `step()` as a CUDA graph and return it, un-replayed.

    The warm-up run, on a side stream, compiles any Triton variant and sets up cuBLAS before
    the capture, and it really runs the step: `state` (every buffer the step changes, its
    cursor included) is saved before it and restored after it, so the caller's next replay
    is the step it meant to run. The capture itself runs nothing. pool: a memory pool
    (torch.cuda.graph_pool_handle()) shared with other graphs of steps that never run at
    once and keep nothing between replays but `state` (their intermediates die in the step)."""
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(state, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


class StateCache(tp.Generic[S]):
    """Static step states keyed by their geometry, and the CUDA graphs captured on them.

    The `max_states` most recently used states are kept, so a service that sees many shapes
    holds bounded memory; an evicted state takes its graphs with it. At most `max_graphs`
    graphs are kept over all states: past that every graph is dropped and recaptured on
    demand, rather than letting captured memory grow."""

    def __init__(self, max_states: int, max_graphs: int = MAX_GRAPHS):
        self.max_states, self.max_graphs = max_states, max_graphs
        self._states: "collections.OrderedDict[tp.Hashable, S]" = collections.OrderedDict()
        # id(state) -> step shape -> graph; a state's id is stable while the cache holds it
        self._graphs: tp.Dict[int, tp.Dict[tp.Hashable, tp.Any]] = {}

    def get(self, key: tp.Hashable, make: tp.Callable[[], S]) -> S:
        """The state of `key`, made on a miss; it becomes the most recently used."""
        state = self._states.pop(key, None)
        if state is None:
            state = make()
        self._states[key] = state                       # most recently used last
        while len(self._states) > self.max_states:
            _, old = self._states.popitem(last=False)
            self._graphs.pop(id(old), None)
        return state

    def __iter__(self) -> tp.Iterator[tp.Hashable]:
        """The keys, least recently used first."""
        return iter(self._states)

    def values(self) -> tp.Iterable[S]:
        return self._states.values()

    def graphs(self, state: S) -> tp.Mapping[tp.Hashable, tp.Any]:
        """The graphs captured on `state`, by step shape."""
        return self._graphs.get(id(state), {})

    def graph(self, state: S, shape: tp.Hashable, step: tp.Callable[[], None],
              changed: tp.Sequence[torch.Tensor], pool: tp.Optional[tp.Tuple[int, int]] = None
              ) -> "torch.cuda.CUDAGraph":
        """The CUDA graph of `step` on `state` for `shape`, captured on first use
        (`capture_step`; `changed`: every buffer the step writes; pool: its) and reused after."""
        graphs = self._graphs.setdefault(id(state), {})
        graph = graphs.get(shape)
        if graph is None:
            graph = capture_step(step, changed, pool)
            if sum(len(g) for g in self._graphs.values()) >= self.max_graphs:
                for g in self._graphs.values():
                    g.clear()
            graphs[shape] = graph
        return graph
