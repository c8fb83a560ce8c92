"""Timing helpers shared by every benchmark and worker.

Importable without torch or Keras (the Keras workers import it, and TensorFlow must never share a process
with torch): :func:`sync` only touches torch when the calling process already imported it.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence


def now() -> float:
    """Monotonic wall clock in seconds."""
    return time.perf_counter()


def sync() -> None:
    """Wait for queued CUDA work of this process (no-op without torch or without an initialised GPU)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median(values: Sequence[float]) -> float:
    """Median, ``nan`` for an empty sequence."""
    return statistics.median(values) if values else float("nan")


def window_rate(ends: Sequence[float], sizes: Sequence[int], first: int, last: Optional[int] = None,
                start: Optional[float] = None) -> float:
    """Images per second over batches ``first..last`` (inclusive) from their end timestamps.

    The window opens when batch ``first - 1`` ended (or at ``start`` for ``first == 0``), so time spent
    waiting for data between batches counts: this is pipeline throughput, not model-only throughput.
    """
    last = len(ends) - 1 if last is None else last
    if last < first or (first == 0 and start is None):
        return float("nan")
    opened = ends[first - 1] if first > 0 else start
    return sum(sizes[first:last + 1]) / max(ends[last] - opened, 1e-12)


def images_per_second(step: Callable[[], object], images_per_step: int, repeats: int = 3, warmup: int = 1) -> float:
    """Median throughput of ``step`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times: List[float] = []
    for _ in range(repeats):
        start = now()
        step()
        times.append(now() - start)
    return images_per_step / statistics.median(times)


__all__ = ["images_per_second", "median", "now", "sync", "window_rate"]
