"""A frame: one execution of one graph (a trace's, a session's, or a body's).

It holds the environment (one slot per node), the values' remaining uses,
which nodes ran, and, for a body, what it was given (captures, the loop's
item) and what it hands back (exports). Bodies run in frames of their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..events import Event, GradKey, in_scope
from ..graph import Graph, Node
from ..ops import Cond, EachCall, Iterate
from ..results import Results

if TYPE_CHECKING:
    from pyrsistent.typing import PVector

    from ..events import ProgramKey
    from ..steps import BodyStep, Plan, Step


class _Sentinel:
    """A marker value, named in its repr."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNSET: Any = _Sentinel("UNSET")
"""Marks an environment slot whose node has not run (or whose value died)."""

NOT_RUN: Any = _Sentinel("NOT_RUN")
"""The value of a context node whose body never ran (a false condition, an
empty loop): it has no exports."""

Offsets = tuple[tuple[tuple[str, ...], int], ...]
"""The call shifts of the enclosing loops over calls: ``(scope, i)`` each."""


class Frame:
    """One execution of one graph: its environment and bookkeeping."""

    __slots__ = ("plan", "nodes", "env", "uses", "ran", "captures", "item", "keep", "children", "offsets",
                 "open_ended", "marks", "in_loop")

    def __init__(
        self,
        plan: Plan,
        graph: Graph,
        captures: Sequence[Any] = (),
        item: Any = None,
        keep: frozenset[int] = frozenset(),
        offsets: Offsets = (),
        open_ended: bool = False,
        marks: tuple[list[bool], ...] = (),
        in_loop: bool = False,
    ) -> None:
        size = len(plan.steps)
        self.plan = plan
        self.nodes: PVector[Node] = graph.nodes  # this run's graph: its constants, source lines and bodies
        self.env: list[Any] = [UNSET] * size
        self.uses = list(plan.uses)
        self.ran = [False] * size
        self.captures = tuple(captures)
        self.item = item
        self.keep = keep  # nodes a later node outside this graph reads (exports)
        self.children: dict[int, Results] = {}
        self.offsets = offsets  # the call shifts of enclosing loops over calls
        self.open_ended = open_ended  # inside a loop over calls that ends with the run
        # One cell per enclosing loop over calls (parallel to ``offsets``): set
        # when this iteration received a call of that loop's scope.
        self.marks = marks
        self.in_loop = in_loop  # a stop here ends a loop, not the run

    def inner(self, step: BodyStep, captures: Sequence[Any], item: Any, keep: frozenset[int], in_loop: bool) -> Frame:
        """A frame for the body of ``step`` run by this frame (a condition's,
        a loop's): it keeps this frame's call shifts."""
        return Frame(step.body, self.body_graph(step), captures, item, keep, self.offsets, self.open_ended,
                     self.marks, in_loop or self.in_loop)

    def mark(self, path: str) -> None:
        """This iteration received a call of ``path``: mark the loops it is in scope of."""
        for (scope, _), cell in zip(self.offsets, self.marks):
            if in_scope(path, scope):
                cell[0] = True

    def shifted(self, key: Event) -> Event:
        """``key`` with its call shifted by the enclosing loops over calls."""
        if not self.offsets or isinstance(key, GradKey):
            return key
        path, site, call = key
        return (path, site, call + sum(i for scope, i in self.offsets if in_scope(path, scope)))

    def node(self, step: Step) -> Node:
        """The node ``step`` runs, in this frame's graph."""
        return self.nodes[step.index]

    def body_graph(self, step: BodyStep) -> Graph:
        """The graph of a context step's body (this run's: its constants and lines)."""
        op = self.nodes[step.index].op
        assert isinstance(op, (Cond, Iterate, EachCall))
        return op.body

    def finish_body(self, step: BodyStep, child: Frame) -> None:
        """``step``'s body ran (or stopped) in ``child``: keep its results and hand its exports on."""
        self.children[step.index] = child.results()
        self.env[step.index] = child.exports()

    def results(
        self,
        stopped: bool = False,
        blocked: dict[ProgramKey, tuple[int, int]] | None = None,
        graph: Graph | None = None,
    ) -> Results:
        """The saved values of this frame (and of its bodies), as `Results`."""
        env = self.env
        values = {i: env[i] for i in self.plan.saved if env[i] is not UNSET}
        return Results(values, stopped, blocked or {}, self.children, None, graph)

    def exports(self) -> dict[int, Any]:
        """The values later nodes outside this graph read."""
        env = self.env
        return {i: env[i] for i in self.keep if env[i] is not UNSET}
