"""Timing on a noisy machine: interleaved rounds, medians, IQRs, paired ratios.

Every case of a group runs in the same process, in rounds. Each round visits
the cases in a rotating order and takes a few *samples* of each; a sample is
the mean time of ``k`` back-to-back calls, with ``k`` calibrated so that a
sample lasts a few milliseconds. A case's ratio against the group's baseline
is the median over rounds of (its round median / the baseline's round
median): both were measured moments apart, so machine drift cancels.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable, Mapping

import attrs

from benchmarks.device import sync as device_sync


@attrs.frozen
class Stats:
    """One case's timing: median and IQR of its samples (µs per call), its
    per-round medians, and its median ratio to the group's baseline."""

    median_us: float
    iqr_us: float
    rounds_us: tuple[float, ...]
    ratio: float
    ratio_iqr: float
    delta_us: float  # median over rounds of (case - baseline)


def _calibrate(fn: Callable[[], Any], target_s: float, sync: Callable[[], None]) -> int:
    """How many calls make one sample of about ``target_s`` seconds."""
    k = 1
    while True:
        start = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= target_s / 4 or k >= 1 << 16:
            return max(1, int(k * target_s / max(elapsed, 1e-9)))
        k *= 4


def quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if len(ordered) < 4:
        middle = statistics.median(ordered)
        return middle, middle, middle
    q1, q2, q3 = statistics.quantiles(ordered, n=4)
    return q1, q2, q3


def measure(
    cases: Mapping[str, Callable[[], Any]],
    baseline: str,
    *,
    rounds: int = 30,
    samples: int = 5,
    target_s: float = 0.004,
    warmup_s: float = 0.2,
    sync: Callable[[], None] = device_sync,
) -> dict[str, Stats]:
    """Time every case of a group against ``baseline`` (see module docstring).
    ``sync`` ends every sample (``torch.cuda.synchronize`` on CUDA)."""
    names = list(cases)
    for name in names:  # warm-up: caches, allocator, lazy imports
        deadline = time.perf_counter() + warmup_s
        cases[name]()
        while time.perf_counter() < deadline:
            cases[name]()
        sync()
    ks = {name: _calibrate(cases[name], target_s, sync) for name in names}
    samples_us: dict[str, list[float]] = {name: [] for name in names}
    round_medians: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        order = names[shift:] + names[:shift]
        taken: dict[str, list[float]] = {name: [] for name in names}
        for name in order:
            fn, k = cases[name], ks[name]
            for _ in range(samples):
                start = time.perf_counter()
                for _ in range(k):
                    fn()
                sync()
                taken[name].append((time.perf_counter() - start) / k * 1e6)
        for name in names:
            samples_us[name].extend(taken[name])
            round_medians[name].append(statistics.median(taken[name]))
        gc.collect()
    result: dict[str, Stats] = {}
    base = round_medians[baseline]
    for name in names:
        q1, median, q3 = quartiles(samples_us[name])
        ratios = [case / ref for case, ref in zip(round_medians[name], base)]
        r1, ratio, r3 = quartiles(ratios)
        delta = statistics.median(case - ref for case, ref in zip(round_medians[name], base))
        result[name] = Stats(median, q3 - q1, tuple(round_medians[name]), ratio, r3 - r1, delta)
    return result
