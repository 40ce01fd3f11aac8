"""EditingTracer: ``with model.edit() as edited:``, interventions kept as a default graph.

The block records like a trace but never runs. On exit it hands its graph
to ``store`` (given by `NNsight.edit`, which makes it the target model's
*edits*, the graph every later trace of that model starts from); the
tracer itself writes nothing of the wrapper's. Edits are written outside
any invoke, so they apply to every row of every later batch, and they run
first at each module call. Ad-hoc module calls inside an edit are hooked
calls, so that an attached module's own values can be traced later.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import TraceError
from ..graph import Graph, SourceLoc
from ..ops import ApplyModule
from ..runner import ModelAdapter
from .tracer import Invoker, Tracer

_NEVER_RUNS = "edits are not run where they are written; they run in every later trace of the edited model."


class EditingTracer(Tracer):
    """The context of `NNsight.edit`; entering it gives ``entered`` (the edited
    model, as in nnsight 0.4); on a clean exit ``store`` gets the graph."""

    def __init__(
        self,
        adapter: ModelAdapter,
        where: SourceLoc | None,
        *,
        edits: Graph | None = None,
        entered: Any = None,
        store: Callable[[Graph], None] | None = None,
    ) -> None:
        super().__init__(adapter, None, {}, where, edits=edits, never_runs=_NEVER_RUNS)
        self._entered = entered
        self._store = store

    def __enter__(self) -> Any:  # the edited model, as in nnsight 0.4
        super().__enter__()
        return self._entered

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._pop()
        self._forget_accesses()
        if exc_type is None and self._store is not None:
            self._store(self.graph)

    def _enter_invoke(self, invoker: Invoker) -> int:
        raise TraceError("edits apply to every row of every later trace: they take no invokes")

    def _hooked(self, op: ApplyModule) -> ApplyModule:
        return ApplyModule(op.path, hook=True)

    @property
    def edits(self) -> Graph:
        """The graph this edit adds (including the edits it started from)."""
        return self.graph
