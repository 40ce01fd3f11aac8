"""Reducers: how a sweep combines one graph output over many batches.

A reducer is a small immutable value with three pure functions:

* ``lift(value, start)``: one batch's output (``start`` is the dataset index
  of the batch's first example) as a *partial*, computed where the batch ran,
  so a worker sends back a reduced value, not raw activations;
* ``merge(parts)``: partials of consecutive batches, in dataset order, as one
  partial (associative: merging merged partials gives the same value);
* ``finish(part)``: the sweep's result from the partial of every batch.

A reducer may also have ``shape(part)``: what must be the same in the
partials of every batch (the shape, but for the dimension concatenated
along); a sweep refuses partials whose shapes differ, naming both batches,
instead of letting them broadcast into a result of neither shape.

Sweeps merge partials in batch order whatever the order batches finish in,
so a result depends neither on the number of workers nor on retries.
Reducers are data: they compare, hash and pickle like graphs do.
"""

from __future__ import annotations

import builtins
import functools
from typing import Any, Protocol, Sequence, runtime_checkable

import attrs
import torch


@runtime_checkable
class Reducer(Protocol):
    """What a sweep needs of a reducer (see the module docstring)."""

    def lift(self, value: Any, start: int) -> Any: ...

    def merge(self, parts: Sequence[Any]) -> Any: ...

    def finish(self, part: Any) -> Any: ...


def _tensor(value: Any, reducer: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{reducer!r} reduces tensors; this output is a {type(value).__name__}")
    return value.detach()


def _batched(value: Any, reducer: object) -> torch.Tensor:
    tensor = _tensor(value, reducer)
    if tensor.dim() == 0:
        raise ValueError(
            f"{reducer!r} reduces over the batch (dim 0), but this output is a scalar; "
            "use stack() to collect one value per batch"
        )
    return tensor


@attrs.frozen
class Concat:
    """Every example's value, concatenated along ``dim`` (the batch dimension):
    the raw outputs, as if the whole dataset were one batch."""

    dim: int = 0

    def lift(self, value: Any, start: int) -> Any:
        return _batched(value, self)

    def merge(self, parts: Sequence[Any]) -> Any:
        return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=self.dim)

    def shape(self, part: Any) -> tuple[int | str, ...]:
        dims: list[int | str] = list(part.shape)
        if -len(dims) <= self.dim < len(dims):
            dims[self.dim] = "*"  # the dimension concatenated along may differ
        return tuple(dims)

    def finish(self, part: Any) -> Any:
        return part


@attrs.frozen
class Stack:
    """One value per batch (a loss, a per-batch statistic), stacked along a
    new dim 0: ``[number of batches, *value.shape]``."""

    def lift(self, value: Any, start: int) -> Any:
        return [_tensor(value, self)]

    def merge(self, parts: Sequence[Any]) -> Any:
        return [item for part in parts for item in part]

    def shape(self, part: Any) -> tuple[int | str, ...]:
        return tuple(part[0].shape)

    def finish(self, part: Any) -> Any:
        return torch.stack(part)


@attrs.frozen
class Sum:
    """The sum over all examples (over the batch dimension, dim 0)."""

    def lift(self, value: Any, start: int) -> Any:
        return _batched(value, self).sum(dim=0)

    def merge(self, parts: Sequence[Any]) -> Any:
        return functools.reduce(torch.add, parts)

    def shape(self, part: Any) -> tuple[int | str, ...]:
        return tuple(part.shape)

    def finish(self, part: Any) -> Any:
        return part


@attrs.frozen
class Mean:
    """The mean over all examples (over the batch dimension, dim 0), in float
    (an integer output is averaged as float32)."""

    def lift(self, value: Any, start: int) -> Any:
        tensor = _batched(value, self)
        if not (tensor.is_floating_point() or tensor.is_complex()):
            tensor = tensor.float()
        return (tensor.sum(dim=0), tensor.shape[0])

    def merge(self, parts: Sequence[Any]) -> Any:
        return (functools.reduce(torch.add, [total for total, _ in parts]), builtins.sum(count for _, count in parts))

    def shape(self, part: Any) -> tuple[int | str, ...]:
        return tuple(part[0].shape)

    def finish(self, part: Any) -> Any:
        total, count = part
        return total / count


@attrs.frozen
class TopK:
    """The ``k`` largest (``largest=False``: smallest) per-example scores of
    the whole dataset, as ``(values, indices)``; indices are dataset indexes.
    The output must be one score per example (shape ``[batch]``). Ties keep
    the earlier example, so the result is deterministic."""

    k: int
    largest: bool = True

    def __attrs_post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"top_k needs k >= 1, got {self.k}")

    def _best(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.sort(values, descending=self.largest, stable=True).indices[: self.k]
        return values[order], indices[order]

    def lift(self, value: Any, start: int) -> Any:
        scores = _batched(value, self)
        if scores.dim() != 1:
            raise ValueError(
                f"top_k ranks one score per example: the output must have shape [batch], "
                f"not {list(scores.shape)} (reduce it to a score in the graph, e.g. .norm(dim=-1))"
            )
        return self._best(scores, torch.arange(start, start + scores.shape[0]))

    def merge(self, parts: Sequence[Any]) -> Any:
        if len(parts) == 1:
            return parts[0]
        return self._best(torch.cat([values for values, _ in parts]), torch.cat([indices for _, indices in parts]))

    def finish(self, part: Any) -> Any:
        return part


@attrs.frozen
class Histogram:
    """A running histogram of every element of the output: ``bins`` equal
    bins over ``[low, high]`` (values outside are not counted), as
    ``(counts, edges)`` with ``len(edges) == bins + 1``."""

    bins: int
    low: float
    high: float

    def __attrs_post_init__(self) -> None:
        if self.bins < 1 or not self.low < self.high:
            raise ValueError(f"histogram needs bins >= 1 and low < high, got {self.bins}, [{self.low}, {self.high}]")

    def lift(self, value: Any, start: int) -> Any:
        tensor = _tensor(value, self)
        return torch.histc(tensor.to(torch.float64), bins=self.bins, min=self.low, max=self.high)

    def merge(self, parts: Sequence[Any]) -> Any:
        return functools.reduce(torch.add, parts)

    def finish(self, part: Any) -> Any:
        return part, torch.linspace(self.low, self.high, self.bins + 1, dtype=torch.float64)


def concat(dim: int = 0) -> Concat:
    """Keep every example's value (concatenated along the batch dimension)."""
    return Concat(dim)


def stack() -> Stack:
    """Keep one value per batch, stacked along a new dim 0."""
    return Stack()


def sum() -> Sum:  # noqa: A001 - the reducer's obvious name, used as nnsight_pure.reducers.sum
    """Sum over all examples."""
    return Sum()


def mean() -> Mean:
    """Mean over all examples."""
    return Mean()


def top_k(k: int, largest: bool = True) -> TopK:
    """The ``k`` best per-example scores and their dataset indexes."""
    return TopK(k, largest)


def histogram(bins: int, low: float, high: float) -> Histogram:
    """A histogram of every element over ``[low, high]``."""
    return Histogram(bins, low, high)
