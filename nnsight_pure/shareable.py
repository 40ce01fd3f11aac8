"""Which callables a process-wide table may hold.

Plans (plan.py) and recorded nodes (graph.py) are shared between traces
through tables that outlive any one trace. A value in such a table must not
keep large objects alive: a closure, a bound method or a function with
defaults can hold a model or a tensor, so only builtins and descriptors not
bound to an object, classes, and plain functions without closure or
defaults qualify.
"""

from __future__ import annotations

import types
from typing import Any

_BUILTINS = (
    types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
    types.ClassMethodDescriptorType,
)

_KNOWN: set[Any] = set()  # callables that passed (they hold nothing large, by the same test)
KNOWN_KEPT = 4096
"""At most this many remembered (emptied when full: a fresh ``lambda`` per
trace must not grow a table for the life of the process)."""


def holds_nothing_large(fn: object) -> bool:
    """True for a builtin or descriptor not bound to an object, a class, or a
    plain function without closure or defaults."""
    if isinstance(fn, _BUILTINS):
        owner = getattr(fn, "__self__", None)
        return owner is None or isinstance(owner, (types.ModuleType, type))
    if isinstance(fn, type):
        return True
    if isinstance(fn, types.FunctionType):
        return fn.__closure__ is None and not fn.__defaults__ and not fn.__kwdefaults__
    return False


def shareable(fn: object) -> bool:
    """`holds_nothing_large`, remembered for the callables that pass (a
    callable that fails is not remembered: that would keep it alive)."""
    try:
        if fn in _KNOWN:
            return True
    except TypeError:  # an unhashable callable
        return False
    if not holds_nothing_large(fn):
        return False
    if len(_KNOWN) >= KNOWN_KEPT:
        _KNOWN.clear()
    _KNOWN.add(fn)
    return True
