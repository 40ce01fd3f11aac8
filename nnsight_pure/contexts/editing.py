"""EditingTracer: ``with model.edit() as edited:``, interventions kept as a default graph.

The block records like a trace but never runs: on exit its graph becomes the
target model's *edits*, the graph every later trace of that model starts
from (later traces append their own nodes to it). Edits are written outside
any invoke, so they apply to every row of every later batch, and they run
first at each module call. Ad-hoc module calls inside an edit are hooked
calls, so that an attached module's own values can be traced later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import TraceError
from ..graph import Graph, SourceLoc
from ..ops import ApplyModule
from .invoker import Invoker
from .tracer import Tracer

if TYPE_CHECKING:
    from ..models.nnsight import NNsight


class EditingTracer(Tracer):
    """The context of `NNsight.edit`; entering it gives the edited model."""

    _runs = False
    _why_no_run = "edits are not run where they are written; they run in every later trace of the edited model."

    def __init__(self, target: NNsight, where: SourceLoc | None) -> None:
        super().__init__(target, None, {}, where)
        self._target = target

    def __enter__(self) -> Any:  # the edited model, as in nnsight 0.4
        super().__enter__()
        return self._target

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._pop()
        self._accesses.clear()
        if exc_type is None:
            self._target._edits = self._graph

    def _enter_invoke(self, invoker: Invoker) -> int | None:
        raise TraceError("edits apply to every row of every later trace: they take no invokes")

    def _hooked(self, op: ApplyModule) -> ApplyModule:
        return ApplyModule(op.path, hook=True)

    @property
    def edits(self) -> Graph:
        """The graph this edit adds (including the edits it started from)."""
        return self._graph
