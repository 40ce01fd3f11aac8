"""Sweeps: one graph over every batch of a dataset, outputs combined by reducers.

``sweep(model_factory, graph, dataset, batch_size=..., reduce=...)`` runs
``run(model, graph, batch)`` for each batch and folds the outputs with
`nnsight_pure.reducers`. Where the batches run is the engine's business:
``"local"`` runs them here, one after another (`local`); ``"ray"`` on a pool
of Ray actors (`ray`), each building its model once with ``model_factory()``
and receiving the graph once. Either way the partial results are merged in
batch order (`fold`), so the result is the same whatever the number of
workers or the retries. The engine-neutral parts (`work`: batches and the
runner of one; `fold`) import no engine; importing this package never
imports Ray.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Mapping

import attrs
import torch

from ..errors import TraceError
from ..functional import graph_facts
from ..graph import Graph
from ..models.nnsight import NNsight
from ..reducers import Concat
from ..source import user_location
from .fold import OrderedFold as OrderedFold
from .fold import finish
from .fold import lift as lift
from .fold import merge as merge
from .fold import reducer_tree as reducer_tree
from .local import run_local
from .work import Batch as Batch
from .work import BatchRunner as BatchRunner
from .work import Inputs, ModelFactory, batch_count, batches, check_batch_size
from .work import note_batch as note_batch

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
    facts = graph_facts(graph)
    if facts.kind == "session":
        raise TraceError("sweep runs a trace's graph over batches; this is a session's graph")
    if facts.invokes > 1:
        raise TraceError(f"sweep runs one invoke per batch; this graph has {facts.invokes} invokes")
    spec = reducer_tree(Concat() if reduce is None else reduce, graph.outputs)
    check_batch_size(batch_size)
    work = batches(dataset, batch_size, collate, inputs)
    total = batch_count(dataset, batch_size)
    method_kwargs = dict(method_kwargs or {})
    with _progress_bar(total, progress) as bar:
        if engine == "local":
            if workers not in (None, 1):
                raise ValueError("engine='local' runs the batches in this process: use engine='ray' for workers")
            runner = BatchRunner(model_factory, graph, spec, method, method_kwargs, inputs)
            fold, retried = run_local(runner, work, spec, bar, where)
        elif engine == "ray":
            from .ray import run_on_ray

            fold, retried = run_on_ray(
                (model_factory, graph, spec, method, method_kwargs, inputs), work, spec, bar,
                workers=workers, retries=retries, options=dict(worker_options or {}), where=where,
            )
        else:
            raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    return SweepResults(finish(spec, fold.result(), graph.outputs), fold.count, fold.examples, tuple(retried))


def _progress_bar(total: int | None, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not show, desc="sweep", unit="batch")
