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


shareable = holds_nothing_large
"""The name the node and plan tables use: nothing is remembered (the test is
three ``isinstance`` checks; remembering the callables that passed kept
every fresh ``lambda`` of a notebook alive)."""
