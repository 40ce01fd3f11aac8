"""Where the benchmarks run: ``NNSIGHT_PURE_DEVICE`` (default ``"cpu"``).

Models and inputs are moved there; on CUDA every timed sample ends with
``torch.cuda.synchronize()`` so that a sample measures the work, not its
launch. The tests read the same variable (the ``device`` fixture in
tests/conftest.py).
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch

DEVICE = torch.device(os.environ.get("NNSIGHT_PURE_DEVICE", "cpu"))

T = TypeVar("T", torch.nn.Module, torch.Tensor)


def on(value: T) -> T:
    """``value`` (a module or a tensor) on the benchmarks' device."""
    return value.to(DEVICE)


def sync() -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def describe() -> str:
    """The device, in words, for RESULTS.md."""
    if DEVICE.type == "cuda":
        return f"{DEVICE} ({torch.cuda.get_device_name(DEVICE)})"
    return str(DEVICE)
