"""``nnsight_pure.util``: the helpers nnsight 0.4 scripts import from ``nnsight.util``.

* `WrapperModule` (defined in `models.wrapper_module`): a module that returns
  its input. Attach one (``model.layer1.probe = WrapperModule()``) and route
  a value through it with ``hook=True``, and that value gets
  ``.input``/``.output`` hook points of its own in later traces.
* `apply`: map a function over every value of one type in nested data.
* `fetch_attr`: read a dotted attribute path (``"transformer.h.0.mlp"``).
"""

from __future__ import annotations

from typing import Any, Callable

from .models.wrapper_module import WrapperModule

__all__ = ["WrapperModule", "apply", "fetch_attr"]


def apply(data: Any, fn: Callable[[Any], Any], cls: type | tuple[type, ...], inplace: bool = False) -> Any:
    """``fn(x)`` for every ``x`` of type ``cls`` in ``data`` (lists, tuples, dicts,
    slices and their nesting), other values kept; nnsight 0.4's ``util.apply``.

    With ``inplace=True`` lists and dicts are updated in place (tuples and
    slices, being immutable, are rebuilt).
    """
    if isinstance(data, cls):
        return fn(data)
    if isinstance(data, list):
        if inplace:
            for index, item in enumerate(data):
                data[index] = apply(item, fn, cls, inplace)
            return data
        return [apply(item, fn, cls, inplace) for item in data]
    if isinstance(data, tuple):
        items = [apply(item, fn, cls, inplace) for item in data]
        return type(data)(*items) if hasattr(data, "_fields") else tuple(items)
    if isinstance(data, dict):
        if inplace:
            for key, item in data.items():
                data[key] = apply(item, fn, cls, inplace)
            return data
        return {key: apply(item, fn, cls, inplace) for key, item in data.items()}
    if isinstance(data, slice):
        return slice(
            apply(data.start, fn, cls, inplace), apply(data.stop, fn, cls, inplace), apply(data.step, fn, cls, inplace)
        )
    return data


def fetch_attr(obj: Any, target: str) -> Any:
    """``obj.a.b.c`` for ``target="a.b.c"`` (empty parts are skipped, so nnsight 0.4's
    leading-dot paths such as ``".transformer.h.0"`` work too)."""
    for part in target.split("."):
        if part:
            obj = getattr(obj, part)
    return obj
