"""Timing and memory measurement shared by the benchmarks, and their progress log."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
                 warmup: int) -> dict[str, float]:
    """Median seconds per call of each function; calls are interleaved to share any drift."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def median_time(fn: Callable[[], object], device: torch.device, reps: int,
                warmup: int = 1) -> float:
    """Median seconds per call of one function (``median_times`` of it alone)."""
    return median_times({"fn": fn}, device, reps, warmup)["fn"]


def peak_memory_delta(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Bytes allocated at the peak of ``step`` above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def saved_for_backward_bytes(forward: Callable[[], object], inputs: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward`` runs,
    leaving out the inputs' own storages: the activation memory it adds, on any device."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


def log(message: str) -> None:
    """Progress line on stderr (stdout carries the report)."""
    print(message, file=sys.stderr, flush=True)
