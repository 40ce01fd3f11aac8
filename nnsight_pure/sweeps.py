"""Sweeps: one graph over every batch of a dataset, outputs combined by reducers.

``sweep(model_factory, graph, dataset, batch_size=..., reduce=...)`` runs
``run(model, graph, batch)`` for each batch and folds the outputs with
`nnsight_pure.reducers`. Where the batches run is the engine's business:
``"local"`` runs them here, one after another; ``"ray"`` on a pool of Ray
actors (`nnsight_pure.ray_engine`), each building its model once with
``model_factory()`` and receiving the graph once. Either way the partial
results are merged in batch order, so the result is the same whatever the
number of workers or the retries. Importing this module never imports Ray.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import attrs
import torch
import torch.utils.data

from .arguments import DictConst, ListConst, Ref, TupleOf
from .batching import batch_size_of
from .errors import TraceError
from .functional import as_wrapper as _wrapper
from .functional import graph_facts as _facts
from .functional import run
from .graph import Graph, SourceLoc
from .models.nnsight import NNsight
from .reducers import Concat, Reducer
from .source import add_note, describe, user_location

Inputs = Callable[[Any], "tuple[tuple[Any, ...], dict[str, Any]]"]
ModelFactory = Callable[[], "NNsight | torch.nn.Module"]


# --- the result -------------------------------------------------------------------------


@attrs.frozen(eq=False)
class SweepResults:
    """What a sweep returns: the reduced ``outputs``, in the structure the
    graph's function returned them (``results["name"]`` for a dict), and how
    it went: the number of ``batches`` and ``examples``, and the indexes of
    the batches that were ``retried`` after their worker died."""

    outputs: Any
    batches: int
    examples: int
    retried: tuple[int, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        return self.outputs[key]


# --- reducers over the outputs' structure ------------------------------------------------


@attrs.frozen
class _Constant:
    """The 'reducer' of an output that is a constant of the graph: kept as is."""

    def lift(self, value: Any, start: int) -> Any:
        return value

    def merge(self, parts: Sequence[Any]) -> Any:
        return parts[0]

    def finish(self, part: Any) -> Any:
        return part


Spec = Any  # a Reducer, or a dict / list / tuple of specs (the outputs' structure)


def reducer_tree(reduce: Any, outputs: object) -> Spec:
    """The reducer of every output: ``reduce`` (one reducer for all, or a
    dict/list/tuple matching the outputs, possibly with one reducer for a
    whole sub-tree) laid over the graph's frozen ``outputs`` tree."""
    return _lay(reduce, outputs, "outputs")


def _is_reducer(value: object) -> bool:
    return not isinstance(value, (Mapping, list, tuple)) and isinstance(value, Reducer)


def _items(outputs: object) -> list[tuple[Any, object]] | None:
    """The (key, child) pairs of a container of the frozen outputs tree."""
    if type(outputs) is DictConst:
        return list(outputs.items)
    if type(outputs) is ListConst or type(outputs) is TupleOf:
        return list(enumerate(outputs.items))
    if type(outputs) is tuple:
        return list(enumerate(outputs))
    return None


def _lay(reduce: Any, outputs: object, where: str) -> Spec:
    items = _items(outputs)
    if _is_reducer(reduce):
        if items is None:
            return reduce if type(outputs) is Ref else _Constant()
        laid = {key: _lay(reduce, child, f"{where}[{key!r}]") for key, child in items}
        return laid if type(outputs) is DictConst else [laid[key] for key, _ in items]
    if items is None:
        raise TypeError(f"reduce: {where} is one value and needs one reducer, got {reduce!r}")
    if type(outputs) is DictConst:
        if not isinstance(reduce, Mapping):
            raise TypeError(f"reduce: {where} is a dict {[k for k, _ in items]}: give a reducer or a dict of them")
        names = [key for key, _ in items]
        missing = [name for name in names if name not in reduce]
        extra = [name for name in reduce if name not in names]
        if missing or extra:
            raise KeyError(f"reduce: the outputs are {names}; no reducer for {missing}, unknown names {extra}")
        return {key: _lay(reduce[key], child, f"{where}[{key!r}]") for key, child in items}
    if not isinstance(reduce, (list, tuple)) or len(reduce) != len(items):
        raise TypeError(f"reduce: {where} is a sequence of {len(items)} outputs: give a reducer or {len(items)} of them")
    return [_lay(part, child, f"{where}[{key}]") for (key, child), part in zip(items, reduce)]


def lift(spec: Spec, value: Any, start: int) -> Any:
    """One batch's outputs as partials (on the worker that ran the batch)."""
    if type(spec) is dict:
        return {key: lift(child, value[key], start) for key, child in spec.items()}
    if type(spec) is list:
        return [lift(child, item, start) for child, item in zip(spec, value)]
    return spec.lift(value, start)


def merge(spec: Spec, parts: Sequence[Any]) -> Any:
    """Partials of consecutive batches, in order, as one partial."""
    if type(spec) is dict:
        return {key: merge(child, [part[key] for part in parts]) for key, child in spec.items()}
    if type(spec) is list:
        return [merge(child, [part[i] for part in parts]) for i, child in enumerate(spec)]
    return spec.merge(parts)


def finish(spec: Spec, part: Any, outputs: object) -> Any:
    """The sweep's outputs, in the structure of the graph's outputs."""
    if type(spec) is dict:
        return {key: finish(child, part[key], _child(outputs, key)) for key, child in spec.items()}
    if type(spec) is list:
        done = [finish(child, part[i], _child(outputs, i)) for i, child in enumerate(spec)]
        return done if type(outputs) is ListConst else tuple(done)
    return spec.finish(part)


def shapes(spec: Spec, part: Any, where: str = "the output") -> list[tuple[str, Any, tuple[int | str, ...]]]:
    """``(which output, reducer, shape)`` for each reducer of ``spec`` that
    says what its partials must share (see reducers.py)."""
    if type(spec) is dict:
        return [found for key, child in spec.items() for found in shapes(child, part[key], f"output {key!r}")]
    if type(spec) is list:
        return [found for i, child in enumerate(spec) for found in shapes(child, part[i], f"output {i}")]
    shape = getattr(spec, "shape", None)
    return [] if shape is None else [(where, spec, shape(part))]


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _child(outputs: object, key: Any) -> object:
    for name, child in _items(outputs) or ():
        if name == key:
            return child
    raise KeyError(key)  # pragma: no cover - the spec was laid over these outputs


class OrderedFold:
    """Partials arriving in any order, merged in batch order.

    Consecutive partials are merged in chunks as soon as they are all here,
    so the fold holds few partials however long the sweep; the merge order
    is a function of the batch indexes only (not of arrival times).
    """

    CHUNK = 32

    def __init__(self, spec: Spec) -> None:
        self._spec = spec
        self._next = 0
        self._waiting: dict[int, Any] = {}
        self._merged: list[Any] = []  # in order: at most CHUNK partials and merged chunks
        self.examples = 0
        self._first: tuple[int, list[tuple[str, Any, tuple[int | str, ...]]]] | None = None

    def add(self, index: int, part: Any, size: int) -> None:
        """Batch ``index`` (of ``size`` examples) is done: its partial is ``part``.
        Raises `ValueError` naming both batches if its shapes differ from the
        first batch's."""
        self._check_shapes(index, part)
        self._waiting[index] = part
        self.examples += size
        while self._next in self._waiting:
            self._merged.append(self._waiting.pop(self._next))
            self._next += 1
            if self._next % self.CHUNK == 0:
                self._merged = [merge(self._spec, self._merged)]

    def _check_shapes(self, index: int, part: Any) -> None:
        found = shapes(self._spec, part)
        if self._first is None:
            self._first = (index, found)
            return
        first, expected = self._first
        for (where, reducer, shape), (_, _, wanted) in zip(found, expected):
            if shape != wanted:
                low, high = sorted(((first, wanted), (index, shape)))
                raise ValueError(
                    f"{reducer!r} cannot combine {where} of batch {low[0]} (shape {_shape_text(low[1])}) "
                    f"with that of batch {high[0]} (shape {_shape_text(high[1])}): the batches' "
                    "partials must have the same shape (pad the outputs to one shape, or "
                    "collect them with stack() per batch)"
                )

    @property
    def count(self) -> int:
        """How many batches have been merged (all of them, at the end)."""
        return self._next

    def result(self) -> Any:
        assert not self._waiting, "a batch is missing"
        if not self._merged:
            raise ValueError("the dataset gave no batches: there is nothing to reduce")
        return merge(self._spec, self._merged)


# --- batches ------------------------------------------------------------------------------


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
    _check_batch_size(batch_size)
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


def _check_batch_size(batch_size: int | None) -> None:
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


# --- running one batch (here, or in a worker) ------------------------------------------------


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
            self._model = _wrapper(model_factory())
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
        results = run(self._model, self._graph, invokes=[(tuple(args), dict(kwargs))], method=self._method, **self._method_kwargs)
        return lift(self._spec, results.outputs, start)


def note_batch(error: BaseException, batch: Batch, where: SourceLoc | None) -> BaseException:
    """The error of a batch, noting which batch, and the user's line that
    started the sweep (its type is kept)."""
    last = batch.start + batch.size - 1
    add_note(
        error,
        f"nnsight_pure: in batch {batch.index} (examples {batch.start} to {last}) of the sweep started at\n  {describe(where)}",
    )
    return error


# --- the entry point ------------------------------------------------------------------------


def sweep(
    model_factory: ModelFactory,
    graph: Graph,
    dataset: Iterable[Any] | Any,
    *,
    batch_size: int | None = None,
    reduce: Any = None,
    engine: Literal["local", "ray"] = "local",
    workers: int | None = None,
    progress: bool = True,
    method: str | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
    inputs: Inputs | None = None,
    collate: Callable[[list[Any]], Any] | None = None,
    retries: int = 3,
    worker_options: Mapping[str, Any] | None = None,
) -> SweepResults:
    """Run ``graph`` over every batch of ``dataset``; return its outputs reduced.

    ``model_factory()`` builds the model (an `NNsight` or a torch module):
    once here, or once per worker, so weights never travel. The local engine
    also takes the model itself. ``graph`` is a
    graph built by ``nnsight_pure.trace(model, fn)``; its outputs (what
    ``fn`` returned) are what is reduced.

    ``dataset``: an iterable of examples grouped ``batch_size`` at a time
    (``collate``, default torch's ``default_collate``); with ``batch_size``
    left out, an iterable of ready batches; a ``torch.utils.data`` Dataset or
    DataLoader; or a Ray Dataset. A batch becomes the model's inputs by
    ``inputs(batch) -> (args, kwargs)`` (default: a dict gives keyword
    inputs, a tuple or list of tensors positional ones, anything else is
    the one input).

    ``reduce``: a reducer of `nnsight_pure.reducers` for every output, or a
    dict / list matching the outputs (default: ``concat()``, every example's
    value). Workers send back reduced values.

    ``engine="ray"`` runs batches on ``workers`` Ray actors (default: one
    per CPU of the cluster; ``ray.init()`` first to choose the cluster,
    ``worker_options`` go to each actor, e.g. ``{"num_gpus": 1}``). A batch
    whose worker dies is run again on a worker (up to ``retries`` times);
    an error raised by a batch stops the sweep with that error, noting the
    batch. ``progress`` shows a progress bar (tqdm) on stderr.
    """
    where = user_location()
    if isinstance(model_factory, (NNsight, torch.nn.Module)):
        if engine == "ray":
            raise TypeError(
                "engine='ray' needs a function that builds the model (model_factory=lambda: "
                "MyModel(...)), not a model: each worker builds its own, so weights never travel"
            )
        model = model_factory
        model_factory = lambda: model  # noqa: E731 - the local engine may use the model itself
    if not isinstance(graph, Graph):
        raise TypeError(f"sweep runs a Graph (built with nnsight_pure.trace(model, fn)), got {type(graph).__name__}")
    if graph.outputs is None:
        raise TraceError(
            "sweep reduces a graph's outputs, and this graph has none: build it with "
            "nnsight_pure.trace(model, fn) where fn returns what to collect"
        )
    facts = _facts(graph)
    if facts.kind == "session":
        raise TraceError("sweep runs a trace's graph over batches; this is a session's graph")
    if facts.invokes > 1:
        raise TraceError(f"sweep runs one invoke per batch; this graph has {facts.invokes} invokes")
    spec = reducer_tree(Concat() if reduce is None else reduce, graph.outputs)
    _check_batch_size(batch_size)
    work = batches(dataset, batch_size, collate, inputs)
    total = batch_count(dataset, batch_size)
    method_kwargs = dict(method_kwargs or {})
    with _progress_bar(total, progress) as bar:
        if engine == "local":
            if workers not in (None, 1):
                raise ValueError("engine='local' runs the batches in this process: use engine='ray' for workers")
            runner = BatchRunner(model_factory, graph, spec, method, method_kwargs, inputs)
            fold, retried = _run_local(runner, work, spec, bar, where)
        elif engine == "ray":
            from .ray_engine import run_on_ray

            fold, retried = run_on_ray(
                (model_factory, graph, spec, method, method_kwargs, inputs), work, spec, bar,
                workers=workers, retries=retries, options=dict(worker_options or {}), where=where,
            )
        else:
            raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    return SweepResults(finish(spec, fold.result(), graph.outputs), fold.count, fold.examples, tuple(retried))


def _run_local(
    runner: BatchRunner, work: Iterator[Batch], spec: Spec, bar: Any, where: SourceLoc | None
) -> tuple[OrderedFold, list[int]]:
    fold = OrderedFold(spec)
    for batch in work:
        try:
            part = runner.run_batch(batch.start, batch.data)
        except Exception as error:
            raise note_batch(error, batch, where)
        fold.add(batch.index, part, batch.size)
        bar.update(1)
    return fold, []


def _progress_bar(total: int | None, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not show, desc="sweep", unit="batch")
