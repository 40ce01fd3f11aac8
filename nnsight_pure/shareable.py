"""Which callables a process-wide table may hold.

Plans (the plan cache) and recorded nodes (graph.py) are shared between
traces through tables that outlive any one trace (see caches.py). A value in
such a table must not keep large objects alive: a closure, a bound method or
a function with defaults can hold a model or a tensor. And it should be a
function the next trace will name again: a ``lambda`` written in a loop is a
new object each time, so keying a table on it only fills the table. So only
builtins and descriptors not bound to an object, classes, and plain
functions without closure or defaults that a module holds by their name
qualify. Nothing is remembered: the test is a few ``isinstance`` checks and
attribute reads.
"""

from __future__ import annotations

import sys
import types

from .caches import SHAREABLE_BUILTINS

_BUILTINS = (
    types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
    types.ClassMethodDescriptorType,
)


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


def _named_by_its_module(fn: types.FunctionType) -> bool:
    """Whether ``fn``'s module holds it under its qualified name (not a
    ``lambda``, nor a function defined inside another)."""
    found: object = sys.modules.get(fn.__module__)
    for part in fn.__qualname__.split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    return found is fn


def shareable(fn: object) -> bool:
    """Whether a table kept across traces may hold ``fn``: it holds nothing
    large, and, for a Python function, its module holds it by name.

    Builtins that pass are remembered (a bounded set): they are module-level
    objects that live as long as the process anyway, and every recorded
    operator or torch call asks this, so the answer costs one lookup."""
    try:
        if fn in _PASSED:
            return True
    except TypeError:  # an unhashable callable
        return False
    if not holds_nothing_large(fn):
        return False
    if isinstance(fn, _BUILTINS):
        SHAREABLE_BUILTINS.put(fn, True)
        return True
    return not isinstance(fn, types.FunctionType) or _named_by_its_module(fn)


_PASSED = SHAREABLE_BUILTINS.table  # read directly: one dict lookup (the table clears in place)
