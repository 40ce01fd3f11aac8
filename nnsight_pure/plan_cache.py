"""Where plans are kept: on their graph, and in a table shared by structure.

A plan depends only on a graph's structure (plan.py), so it is kept twice:
in the graph's memo slot (replaying a graph finds it at once) and in a
bounded LRU table keyed by the graph's *structure key* (a fresh trace of
the same code, with other tensor constants and on other lines, finds it
too). A graph is left out of the table when sharing its plan could keep
large objects alive or would defeat the table:

* it calls a function that could hold large objects (a closure, a bound
  method, a function with defaults: see shareable.py);
* it calls a plain function that no module-level name holds (a ``lambda``
  written in a loop or a notebook cell is a fresh object at every trace:
  keyed on it, every trace would add an entry and push the others out);
* one of its ops was read from a document (its plan runs under the guard).

Only the table is process-wide state; it changes how fast a trace starts,
never what it computes.
"""

from __future__ import annotations

import sys
import threading
import types
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import attrs

from .arguments import ATOMS, DictConst, ListConst, Ref, SliceConst, TensorConst, TupleOf, structural_key
from .graph import _NO_KWARGS, Graph, Node
from .guard import untrusted
from .ops import Call, Cond, EachCall, Iterate, Op, TraceRun
from .shareable import shareable

if TYPE_CHECKING:
    from .plan import Plan


def cached_plan(graph: Graph, compile_plan: Callable[[Graph], Plan]) -> Plan:
    """``graph``'s plan: from its memo slot, else from the table, else
    ``compile_plan(graph)`` (kept in both)."""
    memo = graph._plan
    if memo is not None:
        return memo  # type: ignore[return-value]  # only plans are stored there
    key = structure_key(graph)
    shared: Plan | None = None
    if key is not None:
        with _PLANS_LOCK:
            shared = _PLANS.get(key)
            if shared is not None:
                _PLANS.move_to_end(key)
    plan = shared if shared is not None else compile_plan(graph)
    if key is not None and shared is None:
        with _PLANS_LOCK:
            _PLANS[key] = plan
            while len(_PLANS) > _PLANS_KEPT:
                _PLANS.popitem(last=False)
    object.__setattr__(graph, "_plan", plan)  # the graph's memo slot (frozen, not part of its value)
    return plan


_PLANS: OrderedDict[object, Plan] = OrderedDict()
_PLANS_LOCK = threading.Lock()
_PLANS_KEPT = 256


# --- the structure key -------------------------------------------------------------------

_NOT_SHARED: Any = object()


def structure_key(graph: Graph) -> object | None:
    """What a plan depends on: the graph with its tensor constants and other
    non-immutable constants replaced by markers (and source lines left out).

    ``None`` when the graph's plan must not go in the table (see the module
    docstring): it then stays with the graph alone.
    """
    key = _graph_key(graph)
    return None if key is _NOT_SHARED else _Key(key)


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


def _graph_key(graph: Graph) -> object:
    keys = []
    for node in graph.nodes:
        key = node._key
        if key is None:
            key = _node_key(node)
            object.__setattr__(node, "_key", key)  # the node's memo slot
        if key is _NOT_SHARED:
            return _NOT_SHARED
        keys.append(key)
    return (tuple(keys), _arg_key(graph.outputs))


def plan_shareable(fn: object) -> bool:
    """Whether a plan keyed on ``fn`` may go in the table: it holds nothing
    large, and, if it is a plain function, a module-level name holds it (so
    it is the same object at every trace)."""
    if not shareable(fn):
        return False
    return not isinstance(fn, types.FunctionType) or _held_by_module(fn)


def _held_by_module(fn: types.FunctionType) -> bool:
    qualname = fn.__qualname__
    if "<" in qualname:  # a lambda, or a function defined inside another
        return False
    found: object = sys.modules.get(fn.__module__)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is fn


_FIELDS: dict[type, tuple[str, ...]] = {}


def _op_key(op: Op) -> object:
    """An op as a plain tuple (hashed and compared in C, unlike attrs classes)."""
    kind = type(op)
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(field.name for field in attrs.fields(kind))
    if not names:
        return kind
    if kind is Call:
        return (kind, op.fn)  # type: ignore[union-attr]  # a Call
    return (kind,) + tuple(getattr(op, name) for name in names)


def _node_key(node: Node) -> object:
    op = node.op
    if untrusted(op):
        return _NOT_SHARED  # a loaded graph's plan runs under its guard: never shared
    if isinstance(op, (Cond, Iterate, EachCall, TraceRun)):
        body = _graph_key(op.body)
        if body is _NOT_SHARED:
            return _NOT_SHARED
        fields = tuple(getattr(op, field.name) for field in attrs.fields(type(op)) if field.name != "body")
        op_key: object = (type(op), body, fields)
    elif type(op) is Call:
        fn = op.fn
        if not plan_shareable(fn):
            return _NOT_SHARED
        op_key = (Call, fn)
    else:
        op_key = _op_key(op)
    args = node.args
    if len(args) == 1:
        args_key: object = _arg_key(args[0])
    else:
        args_key = tuple([_arg_key(arg) for arg in args])
    kwargs = node.kwargs
    if kwargs is _NO_KWARGS:
        return (op_key, args_key, (), node.invoke)
    return (op_key, args_key, tuple([(name, _arg_key(kwargs[name])) for name in kwargs]), node.invoke)


def _arg_key(arg: object) -> object:
    kind = type(arg)
    if kind is Ref:
        return -1 - arg.index  # type: ignore[attr-defined]  # a Ref (negative: no atom key is an int)
    if kind is float:
        return (float, arg.hex())  # type: ignore[attr-defined]  # as structural_key, inlined: the usual constant
    if kind in ATOMS:
        return structural_key(arg)
    if kind is tuple:
        return ("tuple", tuple(_arg_key(item) for item in arg))  # type: ignore[attr-defined]  # a tuple
    if kind is TensorConst:
        return ("tensor",)  # (no atom's key is a 1-tuple: a string stays a string)
    if kind is ListConst:
        return ("list", tuple(_arg_key(item) for item in arg.items))  # type: ignore[attr-defined]
    if kind is DictConst:
        return ("dict", tuple((structural_key(k), _arg_key(v)) for k, v in arg.items))  # type: ignore[attr-defined]
    if kind is SliceConst:
        return ("slice", _arg_key(arg.start), _arg_key(arg.stop), _arg_key(arg.step))  # type: ignore[attr-defined]
    if kind is TupleOf:
        return ("tupleof", arg.cls, tuple(_arg_key(item) for item in arg.items))  # type: ignore[attr-defined]
    return ("constant",)  # read from the run's own graph, never held by a plan
