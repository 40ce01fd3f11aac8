"""EachCallContext: a block run once per call of some modules (generation steps).

``with model.lm_head.all():``, ``with model.h[0].iter[1:3]:`` and
``tracer.all()`` record their block as the body of an `EachCall` node: at
run time it runs once per call index, and in it every access to a module in
scope reads that call. Opened without ``with`` (``envoy.all()``), the block
stays open until its invoke or trace ends (nnsight's "sticky" selection).

As in nnsight 0.4, the selection applies to the scope's modules (the envoy
and those below it) only: the part of the block that touches none of their
calls runs once, at the first iteration (docs/interpreter.md, "Loops over
calls"). A block that touches none at all therefore runs once, and a
`MissedCallsWarning` says so when it closes.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import MissedCallsWarning
from ..events import in_scope
from ..graph import Graph, SourceLoc
from ..ops import Cond, EachCall, Iterate, ModuleGet, ModuleSet, TraceRun
from ..printing import module_expr
from ..source import short
from .base import GraphContext


class EachCallContext(GraphContext):
    """A block over calls ``range(start, stop, step)`` (or ``calls``) of ``scope``."""

    def __init__(
        self,
        parent: GraphContext,
        scope: tuple[str, ...],
        where: SourceLoc | None,
        start: int = 0,
        stop: int | None = None,
        step: int = 1,
        calls: tuple[int, ...] = (),
    ) -> None:
        super().__init__(parent._handle, where, parent)
        if step < 1 or start < 0 or (stop is not None and stop < 0) or any(call < 0 for call in calls):
            raise ValueError(
                f"calls are counted from 0 with a positive step; got start={start}, stop={stop}, step={step}"
            )
        self._selection = (start, stop, step)
        self._scope = scope
        self._calls = calls
        self._sticky = False

    @property
    def scope(self) -> tuple[str, ...]:
        """The module paths whose calls the loop selects (``""``: every module)."""
        return self._scope

    def _begin(self, sticky: bool) -> EachCallContext:
        self._push()
        self._sticky = sticky
        return self

    def __enter__(self) -> EachCallContext:
        if not self._open:
            self._push()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._close(exc_type is None)

    def _close(self, record: bool) -> None:
        if self._closed:
            return
        self._pop()
        if record:
            assert self._parent is not None
            start, stop, step = self._selection
            graph, scope = self.graph, self._scope
            if len(graph.nodes) and not touches(graph, scope):
                self._warn_runs_once(scope)
            self._parent._close_child(self, EachCall(graph, start, stop, step, scope, self._calls), ())

    def _warn_runs_once(self, scope: tuple[str, ...]) -> None:
        names = " or ".join(module_expr(path) for path in scope)
        what = "no module" if "" in scope else f"no call of {names} or of a module below it"
        message = (
            f"this loop over calls reads {what}, so it has no call to follow: its block runs once. "
            "As in nnsight 0.4, .all() and .iter[...] select the calls of the module they are "
            "called on and of those below it only; use model.all() (or tracer.all()) to "
            "select every module's calls."
        )
        if self._where is None:
            warnings.warn(message, MissedCallsWarning, stacklevel=4)
        else:
            warnings.warn_explicit(message, MissedCallsWarning, self._where.filename, self._where.lineno)

    def __repr__(self) -> str:
        return f"<loop over calls opened at {short(self._where)}>"


def touches(graph: Graph, scope: tuple[str, ...]) -> bool:
    """Whether ``graph`` (or a body in it) reads or writes a module in ``scope``."""
    for node in graph.nodes:
        op = node.op
        if isinstance(op, (ModuleGet, ModuleSet)):
            if in_scope(op.path, scope):
                return True
        elif isinstance(op, (Cond, Iterate, EachCall, TraceRun)) and touches(op.body, scope):
            return True
    return False


def calls_from(key: Any) -> dict[str, Any]:
    """The call selection of an ``iter[...]`` key: an int, a slice or a list of ints."""
    if isinstance(key, slice):
        if key.start is not None and key.start < 0 or key.stop is not None and key.stop < 0:
            raise ValueError("iter[...] counts calls from 0; negative indexes have no meaning here")
        return {"start": key.start or 0, "stop": key.stop, "step": key.step or 1}
    if isinstance(key, (list, tuple)):
        return {"calls": tuple(int(call) for call in key)}
    raise TypeError(f"iter[...] takes an int, a slice or a list of ints; got {type(key).__name__}")
