"""The runner: the one road from the shell down to the interpreter.

The contexts (`Tracer`, `Session`, `EditingTracer`) and the functional API
(`nnsight_pure.run`) do not know how a model family prepares, batches and
runs its inputs: a `ModelAdapter` does. `run_invokes` takes the adapter, a
graph and the invokes' inputs, and makes one model run of it;
`session_runner` makes a session's trace nodes run the same way. So
``with model.trace(x): ...`` and ``run(model, trace(model, fn), x)`` take the
same path, and the contexts need nothing of the wrapper but this Protocol.

A model wrapper (`NNsight`) gives its adapter to the contexts it builds;
a test can give them any object with these methods (no real model wrapper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, Union

import attrs

from .batching import BatchGroups
from .interpreter import Interleaver, TraceRunner, run_trace
from .open_blocks import _OPEN, resume, suspend, suspended
from .ops import TraceRun

if TYPE_CHECKING:
    import torch

    from .graph import Graph, Node, SourceLoc
    from .handle import ModelHandle
    from .results import Results

Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # one invoke's ``(args, kwargs)``


class ModelAdapter(Protocol):
    """What the shell needs of a model family (implemented by `NNsight`'s adapter)."""

    @property
    def handle(self) -> ModelHandle:
        """The module tree traced (and its envoy-level aliases)."""

    def prepare_input(self, *inputs: Any, **kwargs: Any) -> tuple[Inputs, int]:
        """Normalise one invoke's inputs: ``((args, kwargs), batch_size)``."""

    def invoker_inputs(self, prepared: Inputs) -> Any:
        """``invoker.inputs`` in nnsight 0.4's shape, from the prepared inputs."""

    def batch(self, batched: Inputs | None, *args: Any, **kwargs: Any) -> Inputs:
        """Fold one invoke's prepared inputs into the batch (``None`` at first)."""

    def before_run(self) -> None:
        """Called before each real run (a language model loads its weights here)."""

    def interleave(self, interleaver: Interleaver, *args: Any, fn: Callable[..., Any] | str | None = None,
                   **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` with the interleaver's hooks in place."""

    def method_fn(self, method: str | None) -> Callable[..., Any]:
        """The callable a trace of ``method`` runs (``None``: the model's forward)."""

    def on_module(self, module: torch.nn.Module) -> ModelAdapter:
        """The same adapter over another module tree of the same shape (a fake copy, for scans)."""


@attrs.frozen
class Prepared:
    """One invoke's inputs, prepared by the adapter while tracing, and its batch size."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    size: int


Invoke = Union[Prepared, Inputs, None]
"""One invoke of a run: prepared inputs, inputs to prepare now, or ``None``
(an invoke without inputs, which sees the whole batch)."""


def prepare(adapter: ModelAdapter, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
    """One invoke's inputs prepared by ``adapter`` (recording nothing, even in an open block)."""
    with suspended():
        return _prepared(adapter, inputs, kwargs)


def _prepared(adapter: ModelAdapter, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
    (args, prepared_kwargs), size = adapter.prepare_input(*inputs, **kwargs)
    return Prepared(tuple(args), dict(prepared_kwargs), size)


def run_invokes(
    adapter: ModelAdapter,
    graph: Graph,
    invokes: Sequence[Invoke],
    *,
    method: str | None = None,
    kwargs: dict[str, Any] | None = None,
    where: SourceLoc | None = None,
    captures: tuple[Any, ...] = (),
    keep: frozenset[int] = frozenset(),
    keep_result: bool = False,
) -> tuple[Results, dict[int, Any]]:
    """Prepare the invokes not yet prepared, batch them, and run ``graph`` over
    one call of ``method`` (``kwargs`` go to it). ``captures`` are the values of
    the graph's bridges, ``keep`` the nodes whose values to hand back (for a
    session's later traces), ``keep_result`` keeps what the method returned.

    A run records nothing, even inside an open block (`recorded_calls`).
    """
    method_kwargs = kwargs or {}
    token = suspend() if _OPEN.get() else None
    try:
        ready = [invoke if invoke is None or isinstance(invoke, Prepared) else _prepared(adapter, *invoke)
                 for invoke in invokes]
        adapter.before_run()
        batched: Inputs | None = None
        for invoke in ready:
            if invoke is not None:
                batched = adapter.batch(batched, *invoke.args, **invoke.kwargs)
        args, batch_kwargs = batched if batched is not None else ((), {})
        if method_kwargs:
            clash = sorted(set(batch_kwargs) & set(method_kwargs))
            if clash:
                raise TypeError(
                    f"keyword argument(s) {clash} were given both to the invokes and to trace(...); "
                    "give each once"
                )
            batch_kwargs = {**batch_kwargs, **method_kwargs}
        return run_trace(
            graph,
            adapter.handle.module,
            adapter.interleave,
            adapter.method_fn(method),
            args,
            batch_kwargs,
            BatchGroups.from_sizes([None if invoke is None else invoke.size for invoke in ready]),
            where,
            captures,
            keep,
            keep_result,
        )
    finally:
        if token is not None:
            resume(token)


def session_runner(adapter: ModelAdapter) -> TraceRunner:
    """How a session's `TraceRun` nodes run: each through `run_invokes` (their
    inputs, values of the session, are known only now)."""

    def run_node(
        node: Node, invokes: Any, kwargs: dict[str, Any], captures: tuple[Any, ...], keep: frozenset[int]
    ) -> tuple[Results, dict[int, Any]]:
        op = node.op
        assert isinstance(op, TraceRun)
        return run_invokes(
            adapter, op.body, list(invokes), method=op.method, kwargs=kwargs, where=node.source,
            captures=captures, keep=keep,
        )

    return run_node
