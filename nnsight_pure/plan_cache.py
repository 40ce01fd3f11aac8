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

The key is `graph_key`: its nodes' masked keys (`node_key`, which also
gives a node's exact key), built on the argument keys of keys.py; the table
is `caches.PLANS`. Only the table is process-wide state; it changes how fast
a trace starts, never what it computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import attrs

from .caches import FIELDS, PLANS
from .graph import Graph, Node
from .keys import Constants, arg_key, args_key, kwargs_key
from .marks import untrusted
from .ops import CONTEXT_OPS, Call, Op
from .shareable import shareable

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


# --- the masked key of a node and a graph --------------------------------------------

NOT_SHARED: Any = object()
"""The masked key of a node whose plan must stay with its own graph."""


def op_key(op: Op) -> object:
    """An op as a plain tuple: its kind, then its fields (a body op's body
    as the body's masked key; see `node_key`)."""
    kind = type(op)
    names = FIELDS.get(kind)
    if names is None:
        names = tuple(field.name for field in attrs.fields(kind))
        FIELDS.put(kind, names)
    if not names:
        return kind
    if kind is Call:
        return (kind, op.fn)  # type: ignore[union-attr]  # a Call
    return (kind,) + tuple(getattr(op, name) for name in names)


def node_key(node: Node, constants: Constants = "exact") -> object:
    """The node as a key.

    ``"exact"``: ``(index, op, args, kwargs, invoke)``, equal exactly when
    the nodes are. ``"masked"``: what its plan depends on (no position, no
    tensor values), or `NOT_SHARED`.
    """
    if constants == "exact":
        return (node.ref.index, node.op, args_key(node.args), kwargs_key(node.kwargs), node.invoke)
    op = node.op
    if untrusted(op):
        return NOT_SHARED  # a loaded graph's plan runs under its guard: never shared
    if isinstance(op, CONTEXT_OPS):
        body = graph_key(op.body)
        if body is NOT_SHARED:
            return NOT_SHARED
        fields = tuple(getattr(op, field.name) for field in attrs.fields(type(op)) if field.name != "body")
        key: object = (type(op), body, fields)
    elif type(op) is Call:
        fn = op.fn
        if not shareable(fn):
            return NOT_SHARED
        key = (Call, fn)
    else:
        key = op_key(op)
    args = node.args
    if len(args) == 1:
        positional: object = arg_key(args[0], "masked")
    else:
        positional = tuple([arg_key(arg, "masked") for arg in args])
    kwargs = node.kwargs
    if not kwargs:
        return (key, positional, (), node.invoke)
    return (key, positional, tuple([(name, arg_key(kwargs[name], "masked")) for name in kwargs]), node.invoke)


def graph_key(graph: Graph) -> object:
    """The masked key of a whole graph: its nodes' masked keys (remembered on
    each node, whose value never changes) and its outputs, or `NOT_SHARED`."""
    keys = []
    for node in graph.nodes:
        key = node._key
        if key is None:
            key = node_key(node, "masked")
            object.__setattr__(node, "_key", key)
        if key is NOT_SHARED:
            return NOT_SHARED
        keys.append(key)
    return (tuple(keys), arg_key(graph.outputs, "masked"))


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
