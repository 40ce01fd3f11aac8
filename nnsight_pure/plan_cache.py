"""Where plans are kept: on their graph, and in a table shared by structure.

A plan depends only on a graph's structure (plan.py), so it is kept twice:
in the graph's memo slot (replaying a graph finds it at once) and in a
bounded LRU table keyed by the graph's *structure key* (a fresh trace of
the same code, with other tensor constants and on other lines, finds it
too). A graph is left out of the table when sharing its plan could keep
large objects alive or would defeat the table:

* it calls a function that could hold large objects (a closure, a bound
  method, a function with defaults), or a plain function that no
  module-level name holds (a ``lambda`` written in a loop or a notebook cell
  is a fresh object at every trace: keyed on it, every trace would add an
  entry and push the others out): see shareable.py;
* one of its ops was read from a document (its plan runs under the guard).

The key is `keys.graph_key` (the masked node key); the table is
`caches.PLANS`. Only the table is process-wide state; it changes how fast a
trace starts, never what it computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .caches import PLANS
from .graph import Graph
from .keys import NOT_SHARED, graph_key

if TYPE_CHECKING:
    from .steps import Plan


def cached_plan(graph: Graph, compile_plan: Callable[[Graph], Plan]) -> Plan:
    """``graph``'s plan: from its memo slot, else from the table, else
    ``compile_plan(graph)`` (kept in both)."""
    memo = graph._plan
    if memo is not None:
        return memo  # type: ignore[return-value]  # only plans are stored there
    key = structure_key(graph)
    shared: Plan | None = None if key is None else PLANS.get(key)
    plan = shared if shared is not None else compile_plan(graph)
    if key is not None and shared is None:
        PLANS.put(key, plan)
    object.__setattr__(graph, "_plan", plan)  # the graph's memo slot (frozen, not part of its value)
    return plan


def structure_key(graph: Graph) -> object | None:
    """What a plan depends on: the graph with its tensor constants and other
    non-immutable constants replaced by markers (and source lines left out).

    ``None`` when the graph's plan must not go in the table (see the module
    docstring): it then stays with the graph alone.
    """
    key = graph_key(graph)
    return None if key is NOT_SHARED else _Key(key)


class _Key:
    """A structure key with its hash computed once (a table lookup hashes it
    and a hit compares it; both are C-level walks of plain tuples)."""

    __slots__ = ("items", "hash")

    def __init__(self, items: object) -> None:
        self.items = items
        self.hash = hash(items)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Key) and self.hash == other.hash and self.items == other.items)
