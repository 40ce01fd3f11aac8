"""The run-time guard of graphs read from a document (`serialize.from_json`).

A loaded graph is data from someone else. What its document names is
checked when it is read (callables on an explicit list, method names on a
list, no attribute set on a constant); what depends on the values of the run
is checked here, while it runs. The ops `from_json` builds are marked
untrusted (by identity: an equal op recorded in a trace is not; the marks
are kept in marks.py, which imports no op, so the values can ask), and every
``Call``, ``CallMethod``, ``GetAttr`` and ``SetAttr`` node holding a marked
op runs through a check:

* its value may not be something that has effects when used: a callable
  (a bound method reached by attribute, ``storage.from_file``, a class), a
  module, or a storage object (``x.untyped_storage()``), nor hold one
  directly (a tuple or list of them);
* an attribute may only be set on a plain run value: never on a callable
  (a function, a class), a module or a storage object.

So no function off the list can be reached, let alone called: a run value
is never a callable. The marks go with the op objects, so graphs that passes
(`compose`, `prune`, ...) build from a loaded graph's nodes keep them; a
pickled graph holding marked ops travels as JSON and is read back (marked)
where it is unpickled. Marked ops are never shared through the
process-wide tables of nodes and plans.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

from .errors import SerializationError
from .ops import Call, CallMethod, GetAttr, Op, SetAttr

_STORAGES = (torch.UntypedStorage, torch.TypedStorage)


def _effectful(value: object) -> str | None:
    """What makes ``value`` unsafe to hand to a loaded graph, if anything."""
    if isinstance(value, types.ModuleType):
        return f"the module {value.__name__!r}"
    if isinstance(value, _STORAGES):
        return f"a storage object ({type(value).__name__})"
    if callable(value):
        return f"a callable ({getattr(value, '__qualname__', type(value).__name__)})"
    return None


def _refuse(what: str, why: str) -> Exception:
    return SerializationError(
        f"refused in a graph read from a document: {what} gave {why}; a loaded graph may only "
        "compute on tensors and plain values (no callables, modules or storage objects)"
    )


def checked_value(value: Any, what: str) -> Any:
    """``value`` if a loaded graph may hold it (looking one level into tuples
    and lists); else a `SerializationError` saying what made it."""
    why = _effectful(value)
    if why is None and type(value) in (tuple, list):
        for item in value:
            why = _effectful(item)
            if why is not None:
                break
    if why is not None:
        raise _refuse(what, why)
    return value


def checked_target(target: Any, name: str) -> Any:
    """``target`` if a loaded graph may set its attribute ``name``."""
    why = _effectful(target)
    if why is None and isinstance(target, type):
        why = "a class"
    if why is not None:
        raise SerializationError(
            f"refused in a graph read from a document: setting `.{name}` on {why}; a loaded "
            "graph may only set attributes of plain run values"
        )
    return target


def describe_op(op: Op) -> str:
    """A short text of ``op`` for the guard's errors (``.from_file``, ``sum(...)``)."""
    if isinstance(op, GetAttr):
        return f"reading .{op.name}"
    if isinstance(op, CallMethod):
        return f"calling .{op.name}(...)"
    if isinstance(op, SetAttr):
        return f"setting .{op.name}"
    if isinstance(op, Call):
        return f"calling {op.name}(...)"
    return type(op).__name__


Run = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]


def guarded(op: Op, what: str, run: Run) -> Run:
    """``run`` (how ``op`` computes its value) with the checks above."""
    if isinstance(op, SetAttr):
        name = op.name

        def set_checked(state: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            checked_target(args[0], name)
            return run(state, args, kwargs)

        return set_checked

    def value_checked(state: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return checked_value(run(state, args, kwargs), what)

    return value_checked
