"""A node as a hashable key: one encoding for equality, interning and plan sharing.

A key is a plain tuple of plain values (hashed and compared in C, unlike
attrs classes). Arguments encode as:

* a `Ref` as ``-1 - index`` (a bare negative int: no constant's key is a
  bare int, see `arguments.structural_key`);
* an atom by `arguments.structural_key` (its type made explicit, a float by
  its exact bits);
* a tuple, list, dict, slice or tuple subclass by a tagged tuple of its
  items' keys.

Two flavours, chosen by ``constants``:

* ``"exact"``: tensor and opaque constants by value (a `TensorConst` or
  `Opaque` is its own key). Two nodes are equal exactly when their exact
  keys are (`graph.Node` compares by these parts), and recorded nodes are
  shared by them (`graph.Graph.add`).
* ``"masked"``: what a plan depends on. Tensor constants become a marker,
  other non-atom constants another (a run reads them from its own graph),
  bodies are keyed by their own nodes, and source lines are left out. A
  node holding a function that could keep large objects alive (a closure,
  a bound method), or an op read from a document, has no masked key:
  `NOT_SHARED`.

Pure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import attrs

from .arguments import ATOMS, DictConst, ListConst, Ref, SliceConst, TensorConst, TupleOf, structural_key
from .caches import FIELDS
from .effects import CONTEXT_OPS
from .guard import untrusted
from .ops import Call, Op
from .shareable import shareable

if TYPE_CHECKING:
    from pyrsistent.typing import PMap, PVector

    from .graph import Graph, Node

Constants = Literal["exact", "masked"]

NOT_SHARED: Any = object()
"""The masked key of a node whose plan must stay with its own graph."""


def arg_key(arg: object, constants: Constants = "exact") -> object:
    """The key of one argument (see the module docstring)."""
    kind = type(arg)
    if kind is Ref:
        return -1 - arg.index  # type: ignore[attr-defined]  # a Ref (negative: no atom key is an int)
    if kind is float:
        return (float, arg.hex())  # type: ignore[attr-defined]  # as structural_key, inlined: the usual constant
    if kind in ATOMS:
        return structural_key(arg)
    if kind is tuple:
        return ("tuple", tuple([arg_key(item, constants) for item in arg]))  # type: ignore[attr-defined]
    if kind is ListConst:
        return ("list", tuple([arg_key(item, constants) for item in arg.items]))  # type: ignore[attr-defined]
    if kind is DictConst:
        items = arg.items  # type: ignore[attr-defined]
        return ("dict", tuple([(structural_key(k), arg_key(v, constants)) for k, v in items]))
    if kind is SliceConst:
        return (
            "slice",
            arg_key(arg.start, constants),  # type: ignore[attr-defined]
            arg_key(arg.stop, constants),  # type: ignore[attr-defined]
            arg_key(arg.step, constants),  # type: ignore[attr-defined]
        )
    if kind is TupleOf:
        return ("tupleof", arg.cls, tuple([arg_key(item, constants) for item in arg.items]))  # type: ignore[attr-defined]
    if constants == "exact":
        return arg  # a TensorConst (by value), an Opaque (by identity), another hashable constant
    if kind is TensorConst:
        return ("tensor",)  # (no atom's key is a 1-tuple: a string stays a string)
    return ("constant",)  # read from the run's own graph, never held by a plan


def args_key(args: PVector[object], constants: Constants = "exact") -> object:
    """The key of a node's positional arguments."""
    return tuple([arg_key(arg, constants) for arg in args])


def kwargs_key(kwargs: PMap[str, object]) -> object:
    """The exact key of a node's keyword arguments (their order does not count)."""
    return frozenset([(name, arg_key(value)) for name, value in kwargs.items()])


def atoms_key(args: Sequence[object]) -> tuple[object, ...] | None:
    """The exact key of arguments that are all `Ref`s and atoms (no complex
    number: ``-0.0j`` equals ``0j``), else ``None``: what `graph.Graph.add`
    interns nodes by, as such arguments hold nothing large."""
    parts: list[object] = []
    for arg in args:
        kind = type(arg)
        if kind is Ref:
            parts.append(-1 - arg.index)  # type: ignore[attr-defined]  # a Ref
        elif kind is float:
            parts.append((float, arg.hex()))  # type: ignore[attr-defined]  # exact: -0.0 is not 0.0, 1.0 is not 1
        elif kind in ATOMS and kind is not complex:
            parts.append(structural_key(arg))
        else:
            return None
    return tuple(parts)


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
