"""Compiling one decoding step whole, and capturing it as a CUDA graph: the mechanisms the
masked runtime (`decoding.Runtime`) and the speech runtime (`playdiffusion.unmasking.SpeechRuntime`)
share.

A step that reads and writes only static buffers, takes every per-step value from device
tables through a device cursor and never syncs traces as one graph (torch.compile with
fullgraph=True), and can be captured once per step shape and replayed for every later step
of that shape.
"""
from __future__ import annotations

import typing as tp

import torch


def compile_step(step: tp.Callable) -> tp.Callable:
    """`step` through torch.compile(fullgraph=True). A new step shape (or buffer geometry)
    recompiles once, then what changed is symbolic (automatic dynamic shapes): a few graphs
    per runtime, so the recompile limit is raised above dynamo's default of 8 rather than
    letting later shapes fall back to eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(step, fullgraph=True)


def capture_step(step: tp.Callable[[], None], state: tp.Sequence[torch.Tensor]) -> "torch.cuda.CUDAGraph":
    """Capture `step()` as a CUDA graph and return it, un-replayed.

    The warm-up run, on a side stream, compiles any Triton variant and sets up cuBLAS before
    the capture, and it really runs the step: `state` (every buffer the step changes, its
    cursor included) is saved before it and restored after it, so the caller's next replay
    is the step it meant to run. The capture itself runs nothing."""
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(state, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
