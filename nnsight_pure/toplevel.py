"""Module-level helpers: ``nnsight_pure.apply``, ``log``, ``cond``, ``iter``,
``stop``, ``save`` and traced builtins (``nnsight_pure.list()``, ``dict()``, ...).

Each records into the innermost open context of the current thread; none of
them patches anything. (This module's ``list``, ``iter`` ... shadow the
builtins on purpose; the real ones are used through ``builtins``.)
"""

from __future__ import annotations

import builtins
from typing import Any, Callable

from .contexts import flow
from .contexts.base import GraphContext, innermost
from .contexts.flow import Conditional, IteratorContext
from .contexts.tracer import Tracer
from .errors import TraceError
from .ops import Call, print_at_run_time
from .proxy import Proxy
from .trees import NOT_FOUND, find_leaf


def _innermost(what: builtins.str) -> GraphContext:
    context = innermost()
    if context is None:
        raise TraceError(f"nnsight_pure.{what}(...) needs an open trace or session")
    return context


def apply(fn: Any, *args: Any, **kwargs: Any) -> Proxy:
    """Call ``fn(*args, **kwargs)`` at run time; returns a proxy of the result."""
    return _innermost("apply").record(Call(fn), args, kwargs)


def log(*args: Any) -> None:
    """Print the arguments at run time, with their real values."""
    _innermost("log").record(Call(print_at_run_time), args)


def stop() -> None:
    """End the run here: inside a loop, the loop; otherwise the trace or session."""
    _innermost("stop").stop()


_BUILDERS: builtins.dict[type, Any] = {builtins.list: builtins.list, builtins.tuple: builtins.tuple,
                                      builtins.dict: builtins.dict}
"""The plain containers `save` rebuilds with their own constructor (one node)."""


def save(value: Any) -> Any:
    """The function form of ``.save()``: keep ``value`` after the block.

    A proxy is saved and returned (``value.save()``). A plain Python value
    holding proxies (a list, dict or tuple of them, in any nesting) becomes a
    node that builds it at run time; that node is saved and its proxy
    returned, the real container after the trace. A value with no proxy in
    it is returned as it is: it outlives the block anyway. Outside any trace
    or session there is nothing to keep it for, a `TraceError`.
    """
    context = innermost()
    if context is None:
        raise TraceError(
            "nnsight_pure.save(...) needs an open trace or session: it keeps a value made inside one"
        )
    if isinstance(value, Proxy):
        return value.save()
    if find_leaf(value, lambda leaf: isinstance(leaf, Proxy)) is NOT_FOUND:
        return value
    build = _BUILDERS.get(type(value))
    if build is not None:
        return context.record(Call(build), (value,)).save()
    # Another container (a namedtuple, a registered pytree class): its argument
    # form rebuilds it, so build a one-item list around it and take the item.
    return context.record(Call(builtins.list), ([value],))[0].save()


def _open_trace(what: builtins.str) -> Tracer:
    """The innermost open trace of this thread (its blocks included)."""
    context = innermost()
    trace = None if context is None else context._trace
    if not isinstance(trace, Tracer):
        raise TraceError(f"nnsight_pure.{what}(...) needs an open trace (with model.trace(...), or nnsight_pure.trace)")
    return trace


def result() -> Proxy:
    """``tracer.result`` of the innermost open trace: what the traced method
    returns (handy in a function given to ``nnsight_pure.trace``, which sees no tracer)."""
    return _open_trace("result").result


def cache(modules: Any = None, **options: Any) -> Proxy:
    """``tracer.cache(modules, **options)`` of the innermost open trace (see `Tracer.cache`)."""
    return _open_trace("cache").cache(modules, **options)


def cond(condition: Any) -> Conditional:
    """A block that runs only when ``condition`` is true at run time."""
    return flow.cond(_innermost("cond"), condition)


def iter(collection: Any) -> IteratorContext:
    """A block that runs once per item of ``collection``."""
    return flow.iterate(_innermost("iter"), collection)


class _LocalBlock:
    """What ``nnsight_pure.local()`` gives: an ordinary part of the enclosing block."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def local(fn: Callable[..., Any] | None = None) -> Any:
    """nnsight 0.4's ``local()``: remotely, code run on the client. Everything runs
    locally here, so ``with nnsight_pure.local():`` is an ordinary part of the
    enclosing block, and ``local(fn)`` is ``fn`` called at run time (`apply`)."""
    if fn is None:
        return _LocalBlock()
    function = fn

    def at_run_time(*args: Any, **kwargs: Any) -> Proxy:
        return apply(function, *args, **kwargs)

    return at_run_time


def _traced_builtin(fn: Any) -> Callable[..., Proxy]:
    name = fn.__name__

    def traced(*args: Any, **kwargs: Any) -> Proxy:
        return _innermost(name).record(Call(fn), args, kwargs)

    traced.__name__ = traced.__qualname__ = name
    traced.__doc__ = f"``{name}(...)`` made at run time (a proxy, e.g. a list to append to)."
    return traced


list = _traced_builtin(builtins.list)
dict = _traced_builtin(builtins.dict)
tuple = _traced_builtin(builtins.tuple)
set = _traced_builtin(builtins.set)
int = _traced_builtin(builtins.int)
float = _traced_builtin(builtins.float)
str = _traced_builtin(builtins.str)
bool = _traced_builtin(builtins.bool)
bytes = _traced_builtin(builtins.bytes)
bytearray = _traced_builtin(builtins.bytearray)
complex = _traced_builtin(builtins.complex)
