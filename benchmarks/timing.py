"""Interleaved wall-clock timing: the contenders of one comparison take turns, so a slow spell of a
shared machine (another job, thermal throttling) hits all of them instead of one."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Timings:
    """Seconds per call of each contender: ``samples[name]`` has one entry per repeat."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)  # the untimed warm-up call (one-off costs show here)
    results: dict[str, Any] = field(default_factory=dict)  # what each contender returned on its last call

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, slow: str, fast: str) -> float:
        """Median of ``slow`` over median of ``fast``."""
        return self.median(slow) / self.median(fast)

    def summary(self) -> dict[str, dict[str, float | list[float]]]:
        """JSON-ready: per contender the median, the spread and every sample, in seconds."""
        return {name: {"median_s": self.median(name), "min_s": min(times), "max_s": max(times),
                       "first_call_s": self.first.get(name, float("nan")), "samples_s": times}
                for name, times in self.samples.items()}


def _clock(fn: Callable[[], Any], inner: int) -> tuple[float, Any]:
    """Mean seconds of ``inner`` back-to-back calls, and the last call's result."""
    start = time.perf_counter()
    for _ in range(inner):
        result = fn()
    return (time.perf_counter() - start) / inner, result


@torch.no_grad()
def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int, inner: int = 1,
                warmup: bool = True) -> Timings:
    """Time every contender ``repeats`` times, taking turns (a, b, c, a, b, c, ...).

    ``inner`` calls are averaged into each sample, for contenders too fast for one call to read well.
    The order rotates each repeat so no contender always runs right after the same neighbour.
    """
    timings = Timings({name: [] for name in contenders})
    names = list(contenders)
    if warmup:  # first calls pay for lazy imports, nnsight's source parsing, allocator growth
        for name in names:
            timings.first[name], timings.results[name] = _clock(contenders[name], 1)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, timings.results[name] = _clock(contenders[name], inner)
            timings.samples[name].append(seconds)
    return timings
