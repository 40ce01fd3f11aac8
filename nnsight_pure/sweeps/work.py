"""The work of a sweep, engine-neutral: numbered batches, and what runs one.

`batches` turns a dataset into numbered `Batch`es, lazily; a `BatchRunner`
holds one model and one graph and runs a batch into its partials (what an
engine's worker holds); `note_batch` marks an error with the batch it came
from. Both engines (`local`, `ray`) are built on these.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator, Mapping

import attrs
import torch
import torch.utils.data

from ..batching import batch_size_of
from ..errors import add_note
from ..functional import as_wrapper, run
from ..graph import Graph
from ..models.nnsight import NNsight
from ..source import SourceLoc, describe
from .fold import Spec, lift

Inputs = Callable[[Any], "tuple[tuple[Any, ...], dict[str, Any]]"]
ModelFactory = Callable[[], "NNsight | torch.nn.Module"]


@attrs.frozen
class Batch:
    """Unit of work: batch ``index``, whose first example is example ``start``."""

    index: int
    start: int
    size: int
    data: Any


def _is_ray_dataset(dataset: object) -> bool:
    return type(dataset).__module__.startswith("ray.data") and hasattr(dataset, "iter_torch_batches")


def _examples(dataset: Any) -> Iterator[Any]:
    if isinstance(dataset, torch.utils.data.Dataset) and not isinstance(dataset, torch.utils.data.IterableDataset):
        # A map-style dataset: by index (it need not be iterable).
        return (dataset[i] for i in range(len(dataset)))  # type: ignore[arg-type]  # map-style has __len__
    return iter(dataset)


def _raw_batches(dataset: Any, batch_size: int | None, collate: Callable[[list[Any]], Any]) -> Iterator[Any]:
    if isinstance(dataset, torch.utils.data.DataLoader):
        if batch_size is not None:
            raise TypeError("a DataLoader makes its own batches: leave batch_size out")
        return iter(dataset)
    if _is_ray_dataset(dataset):
        if batch_size is None:
            raise TypeError("a Ray Dataset needs batch_size")
        return iter(dataset.iter_torch_batches(batch_size=batch_size))
    if batch_size is None:
        return iter(dataset)  # each item is a batch
    check_batch_size(batch_size)
    examples = _examples(dataset)
    return (collate(chunk) for chunk in iter(lambda: list(itertools.islice(examples, batch_size)), []))


def batches(
    dataset: Any,
    batch_size: int | None,
    collate: Callable[[list[Any]], Any] | None = None,
    inputs: Inputs | None = None,
) -> Iterator[Batch]:
    """The dataset as numbered batches (made lazily: a dataset need not fit in
    memory); a batch's size is that of the inputs ``inputs`` makes of it."""
    raw = _raw_batches(dataset, batch_size, collate or torch.utils.data.default_collate)
    start = 0
    for index in itertools.count():
        try:
            data = next(raw)
        except StopIteration:
            return
        except Exception as error:
            add_note(error, f"nnsight_pure: while making batch {index} of the sweep (examples from {start})")
            raise
        args, kwargs = (inputs or default_inputs)(data)
        size = batch_size_of(tuple(args), dict(kwargs))
        yield Batch(index, start, size, data)
        start += size


def check_batch_size(batch_size: int | None) -> None:
    """Refuse a batch size that is not a positive integer (``None``: the dataset's own batches)."""
    if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
        raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")


def batch_count(dataset: Any, batch_size: int | None) -> int | None:
    """The number of batches, when the dataset knows its length (for progress)."""
    if _is_ray_dataset(dataset):
        return None  # counting would run the dataset's pipeline
    try:
        length = len(dataset)
    except TypeError:
        return None
    if isinstance(dataset, torch.utils.data.DataLoader) or batch_size is None:
        return length
    return math.ceil(length / batch_size)


def default_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch as the model's inputs: a dict gives keyword inputs, a tuple or
    list of tensors positional ones (a ``TensorDataset``'s), anything else
    (a tensor, a list of prompts) is the one positional input."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(item, torch.Tensor) for item in batch):
        return tuple(batch), {}
    return (batch,), {}


# --- running one batch (here, or in a worker) -------------------------------------------


class BatchRunner:
    """Runs batches of one graph on one model: what a worker holds.

    The model is built once, here; an error building it is kept and raised
    by the first batch (so a Ray worker reports it instead of dying).
    """

    def __init__(
        self,
        model_factory: ModelFactory,
        graph: Graph | None,  # None: set before the first batch (a Ray worker fetches it)
        spec: Spec,
        method: str | None,
        method_kwargs: Mapping[str, Any],
        inputs: Inputs | None,
    ) -> None:
        self._graph = graph
        self._spec = spec
        self._method = method
        self._method_kwargs = dict(method_kwargs)
        self._inputs = inputs or default_inputs
        self._model: NNsight | None = None
        self._error: BaseException | None = None
        try:
            self._model = as_wrapper(model_factory())
        except Exception as error:
            add_note(error, "nnsight_pure: raised by model_factory() while building a sweep's model")
            self._error = error

    def run_batch(self, start: int, data: Any) -> Any:
        """The partials of one batch (``start``: its first example's index)."""
        if self._model is None:
            assert self._error is not None
            raise self._error
        assert self._graph is not None
        args, kwargs = self._inputs(data)
        results = run(
            self._model, self._graph, invokes=[(tuple(args), dict(kwargs))], method=self._method, **self._method_kwargs
        )
        return lift(self._spec, results.outputs, start)


def note_batch(error: BaseException, batch: Batch, where: SourceLoc | None) -> BaseException:
    """The error of a batch, noting which batch, and the user's line that
    started the sweep (its type is kept)."""
    last = batch.start + batch.size - 1
    add_note(
        error,
        f"nnsight_pure: in batch {batch.index} (examples {batch.start} to {last}) of the sweep started at\n"
        f"  {describe(where)}",
    )
    return error
