"""Models and data for the sweep tests (shipped to Ray workers by value)."""

from __future__ import annotations

import os
from typing import Any

import torch

import nnsight_pure as nnsight


class DieOnce(torch.nn.Module):
    """Passes its input through, but the process running its second call
    exits at once (a worker dying mid-sweep), unless ``flag`` exists: the
    first process to get there creates it, so only one worker ever dies."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.flag):
            with open(self.flag, "w"):
                pass
            os._exit(1)
        return x


class Die(torch.nn.Module):
    """Ends the process that calls it (a worker that cannot survive a batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os._exit(1)


def doomed() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), Die(), torch.nn.Linear(8, 3))


def mlp(flag: str | None = None) -> torch.nn.Sequential:
    """The same weights on every call (each worker builds its own copy)."""
    torch.manual_seed(0)
    middle: torch.nn.Module = torch.nn.ReLU() if flag is None else torch.nn.Sequential(torch.nn.ReLU(), DieOnce(flag))
    return torch.nn.Sequential(torch.nn.Linear(4, 8), middle, torch.nn.Linear(8, 3))


def _probe(m: Any) -> dict[str, Any]:
    return {
        "hidden": m[0].output,
        "score": m[0].output.norm(dim=-1),
        "logits": m.output,
        "loss": m.output.pow(2).mean(),
    }


def probe_graph() -> nnsight.Graph:
    """Hidden activations, a score per example, the logits and a per-batch loss."""
    return nnsight.trace(mlp(), _probe)


def examples(count: int = 37, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, generator=generator) for _ in range(count)]


def reducers() -> dict[str, Any]:
    R = nnsight.reducers
    return {"hidden": R.concat(), "score": R.top_k(5), "logits": R.mean(), "loss": R.stack()}


def reducers_of_sums() -> dict[str, Any]:
    R = nnsight.reducers
    return {"hidden": R.histogram(10, -2.0, 2.0), "score": R.sum(), "logits": R.sum(), "loss": R.stack()}


def wide_graph() -> nnsight.Graph:
    """The probe's outputs twice, so one sweep exercises every reducer."""
    return nnsight.trace(
        mlp(),
        lambda m: _probe(m) | {
            "hidden_histogram": m[0].output, "score_sum": m[0].output.norm(dim=-1), "logits_sum": m.output
        },
    )


def every_reducer() -> dict[str, Any]:
    R = nnsight.reducers
    return reducers() | {"hidden_histogram": R.histogram(10, -2.0, 2.0), "score_sum": R.sum(), "logits_sum": R.sum()}
