"""Arguments as hashable keys: one encoding for equality, interning and plan sharing.

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
  `Opaque` is its own key). Two nodes are equal exactly when their
  arguments' exact keys are (`graph.Node` compares by them), and recorded
  nodes are shared by them (`graph.Graph.add`, `atoms_key`).
* ``"masked"``: what a plan depends on. Tensor constants become a marker,
  other non-atom constants another (a run reads them from its own graph).
  The masked key of a whole node or graph (bodies keyed by their own nodes,
  source lines left out, `NOT_SHARED` for what must not be shared) is the
  plan table's structure key: `plan_cache.node_key`, which builds on these.

This module knows arguments alone (arguments.py): no op, no graph, so the
values (graph.py) can key their arguments with it. Pure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence

import torch

from .arguments import ATOMS, DictConst, ListConst, Ref, SliceConst, TensorConst, TupleOf, structural_key

if TYPE_CHECKING:
    from pyrsistent.typing import PMap, PVector

Constants = Literal["exact", "masked"]


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
        elif kind is int or kind is bool:
            parts.append((kind, arg))  # structural_key, inlined: the usual constant of an op
        elif kind in _OWN_KEY_ATOMS:
            parts.append(arg)  # (structural_key: a string, None, a dtype ... is its own key)
        elif kind is torch_size:
            parts.append(structural_key(arg))
        else:
            return None  # (complex: -0.0j equals 0j; anything else may hold something large)
    return tuple(parts)


torch_size = torch.Size
_OWN_KEY_ATOMS = ATOMS - {int, bool, float, complex, torch_size}
