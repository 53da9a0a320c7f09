"""Memory of a loaded model and of this process: the weights' bytes per component in the dtype
each runs in, the resident set now and at its peak, and the CUDA allocator's figures
(`MAGNeT.memory_stats`; `bench_memory` reads the same /proc fields).
"""
from __future__ import annotations

import sys
import typing as tp
from pathlib import Path

import torch

from magnet_engine.engine.model import weight_bytes


def proc_status(*keys: str) -> tp.Dict[str, int]:
    """Fields of /proc/self/status given in kB (VmRSS, VmHWM, RssAnon, ...), in bytes (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            fields[key] = int(value.split()[0]) * 1024
    return fields


def process_memory() -> tp.Dict[str, int]:
    """rss_bytes and peak_rss_bytes of this process (VmRSS / VmHWM); peak only where there is no /proc."""
    try:
        fields = proc_status("VmRSS", "VmHWM")
        return {"rss_bytes": fields["VmRSS"], "peak_rss_bytes": fields["VmHWM"]}
    except (OSError, KeyError, ValueError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
        return {"peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}


def memory_stats(components: tp.Mapping[str, torch.nn.Module], device: torch.device) -> tp.Dict[str, tp.Any]:
    """Bytes of the weights per component (a tensor shared by two components counted once, at
    the first), the process's memory, and on CUDA the allocator's current and peak bytes."""
    seen: tp.Set[int] = set()
    weights = {key: weight_bytes(module, seen) for key, module in components.items()}
    stats: tp.Dict[str, tp.Any] = {"weights_bytes": weights, "weights_total_bytes": sum(weights.values()),
                                   "device": str(device), **process_memory()}
    if device.type == "cuda":
        stats.update(cuda_allocated_bytes=torch.cuda.memory_allocated(device),
                     cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                     cuda_reserved_bytes=torch.cuda.memory_reserved(device),
                     cuda_peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
    return stats
