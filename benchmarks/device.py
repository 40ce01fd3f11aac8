"""Where the benchmarks run: ``NNSIGHT_PURE_DEVICE`` (default ``"cpu"``).

Models and inputs are moved there; on CUDA every timed sample ends with
``torch.cuda.synchronize()`` so that a sample measures the work, not its
launch. The tests read the same variable (the ``device`` fixture in
tests/conftest.py).
"""

from __future__ import annotations

import os
from typing import TypeVar, overload

import torch

DEVICE = torch.device(os.environ.get("NNSIGHT_PURE_DEVICE", "cpu"))

M = TypeVar("M", bound=torch.nn.Module)


@overload
def on(value: torch.Tensor) -> torch.Tensor: ...


@overload
def on(value: M) -> M: ...


def on(value: torch.Tensor | torch.nn.Module) -> torch.Tensor | torch.nn.Module:
    """``value`` (a module, moved in place, or a tensor) on the benchmarks' device."""
    if isinstance(value, torch.Tensor):
        return value.to(DEVICE)
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
