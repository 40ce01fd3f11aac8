"""Issue 20, scenario 12: a loop of 10,000 fresh traces of the tiny model.

Each tool runs the loop in chunks of 1,000 traces; the table gives traces
per second per chunk (the first and the last chunk should match: nothing
grows with the number of traces run) and the process's resident memory
after the loop minus before it (garbage collected both times).
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import attrs
import torch

from benchmarks.device import sync
from benchmarks.scenarios import tiny_cases

TRACES = 10_000
CHUNK = 1_000


@attrs.frozen
class LoopResult:
    """Traces per second of each chunk, and the RSS growth over the loop (MiB)."""

    per_second: tuple[float, ...]
    rss_growth_mib: float


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _loop(one: Callable[[], Any], traces: int, chunk: int) -> LoopResult:
    for _ in range(50):  # warm-up: plans, allocator
        one()
    gc.collect()
    before = _rss_mib()
    rates = []
    for _ in range(traces // chunk):
        start = time.perf_counter()
        for _ in range(chunk):
            one()
        sync()
        rates.append(chunk / (time.perf_counter() - start))
    gc.collect()
    return LoopResult(tuple(rates), _rss_mib() - before)


def cases() -> dict[str, Callable[[], Any]]:
    """Scenario 1's fresh traces (and the hooks they are checked against); no replay."""
    found = tiny_cases()
    del found["nnsight_pure replay"]
    return found


def measure(traces: int = TRACES, chunk: int = CHUNK) -> dict[str, LoopResult]:
    """Each tool's loop, one after the other, checked against the hooks first."""
    found = cases()
    with torch.no_grad():
        expected = found["hand-written hooks"]()
        for name, one in found.items():
            if not torch.equal(one(), expected):
                raise AssertionError(f"loop: {name} does not give the hand-written hooks' result")
        return {name: _loop(one, traces, chunk) for name, one in found.items()}


def table(results: dict[str, LoopResult], chunk: int = CHUNK) -> list[str]:
    lines = [f"### 12. tiny model, a loop of {TRACES:,} fresh traces in chunks of {chunk:,}", "",
             "| case | traces/s, first chunk | traces/s, last chunk | last / first | min chunk | max chunk "
             "| RSS growth over the loop MiB |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        rates = result.per_second
        lines.append(f"| {name} | {rates[0]:,.0f} | {rates[-1]:,.0f} | {rates[-1] / rates[0]:.2f} | "
                     f"{min(rates):,.0f} | {max(rates):,.0f} | {result.rss_growth_mib:.1f} |")
    return lines + [""]
