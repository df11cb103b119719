"""Sampling speed: milliseconds per image, warmed up, median of several timed repeats.

Student and teacher are timed by the same function in the same process with the same threads,
so their ratio (the speed-up) is fair; absolute numbers depend on the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ms_per_image(sample: Callable[[int], object], batch_size: int, warmup: int = 1, repeats: int = 3) -> float:
    """Median over ``repeats`` timed calls of ``sample(batch_size)``, after ``warmup`` untimed ones, in ms/image."""
    if repeats < 3:
        raise ValueError(f"speed is the median of at least 3 repeats, got repeats={repeats}")
    with torch.inference_mode():
        for _ in range(warmup):
            sample(batch_size)
        _sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            sample(batch_size)
            _sync()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch_size
