"""Small timing helpers shared by the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def images_per_second(step: Callable[[], object], images_per_step: int, repeats: int = 3, warmup: int = 1) -> float:
    """Median throughput of ``step`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return images_per_step / statistics.median(times)
