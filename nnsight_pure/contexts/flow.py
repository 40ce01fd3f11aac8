"""The blocks of control flow: conditions, loops over items, loops over calls.

They build each other (a condition's ``.cond`` and ``.iter`` open a nested
condition or loop, a loop's too), so they live in one module, above the
block base class (base.py), which builds none of them:

* `FlowContext`: a block that opens control-flow blocks in it (``ctx.cond``,
  ``ctx.iter(...)``, ``ctx.iter[calls]``, and a native ``if``/``for`` on a
  traced value, contexts/native_flow.py). Every concrete block is one: the
  ones here, `Tracer` and `Session`.
* `Conditional`, `IteratorContext` (with `ItemProxy`), `EachCallContext`.
* The factories ``cond(...)``, ``iterate(...)`` and `IterSelector`, which the
  module-level ``nnsight_pure.cond``/``iter`` (`toplevel`) call too.

**Conditional**: ``with tracer.cond(condition):``, a branch as a sub-graph.

The block is recorded as the body of a `Cond` node and runs only when the
condition (a Python value or a proxy, e.g. ``h[:, 0] > 0``) is true at run
time. Nothing inside leaks out: values made in a branch that did not run
have none.

Chains (nnsight 0.4's ``cond.else_()``): after a condition's block has
exited, ``with cond.else_(other):`` is an ``elif`` and ``with cond.else_():``
an ``else``. A chained branch is an ordinary `Cond` node whose condition is
computed by nodes of the graph from the chain's conditions: ``not
any([earlier...])`` for an ``else``, ``all([that, other])`` for an ``elif``.
The chain is in the graph, not in any state kept aside. (The earlier
conditions are read again when the chained condition runs: a branch that
changes its own condition's tensor in place, ``if flag: flag[:] = 0``,
changes what the ``else`` sees; branch on a fresh value, ``flag.clone()``.)

**IteratorContext**: ``with session.iter(collection) as item:``, a loop as a sub-graph.

The block is recorded once, as the body of an `Iterate` node; at run time the
body runs once per item of the collection (a Python iterable, a DataLoader,
or a value made in the session). Both ``as item`` and ``as (item, iterator)``
work; ``iterator`` is this context.

**EachCallContext**: a block run once per call of some modules (generation steps).

``with model.lm_head.all():``, ``with model.h[0].iter[1:3]:`` and
``tracer.all()`` record their block as the body of an `EachCall` node: at
run time it runs once per call index, and in it every access to a module in
scope reads that call. Opened without ``with`` (``envoy.all()``), the block
stays open until its invoke or trace ends (nnsight's "sticky" selection).

As in nnsight 0.4, the selection applies to the scope's modules (the envoy
and those below it) only: the part of the block that touches none of their
calls runs once, at the first iteration (docs/interpreter.md, "Loops over
calls"). A block that touches none at all therefore runs once, and a
`MissedCallsWarning` says so when it closes.
"""

from __future__ import annotations

import dis
import operator
import sys
import warnings
from types import FrameType
from typing import Any, Iterator

from ..arguments import Ref
from ..errors import MissedCallsWarning, TraceError
from ..events import in_scope
from ..graph import Graph, SourceLoc
from ..ops import Call, Cond, EachCall, Iterate, IterItem, ModuleGet, ModuleSet, Skip, TraceRun
from ..printing import module_expr
from ..proxy import Proxy
from ..source import short, user_location
from . import native_flow
from .base import BodyContext, GraphContext, innermost

# --- a block that opens blocks --------------------------------------------------------


class FlowContext(GraphContext):
    """A block in which conditions and loops open (see the module docstring)."""

    @property
    def iter(self) -> IterSelector:
        """``ctx.iter(collection)``: a block run once per item of ``collection``
        (``with ... as item:``); inside a trace, ``ctx.iter[i]``, ``[a:b]`` or
        ``[[i, j]]``: a block run once per selected call of every module."""
        return IterSelector(self)

    def cond(self, condition: Any) -> Conditional:
        """A block run only when ``condition`` is true at run time."""
        return cond(self._within("cond"), condition)

    def _native_branch(self, proxy: Proxy, frame: FrameType) -> bool:
        """``if proxy:`` in ``frame`` inside this block: open its condition."""
        return native_flow.branch(self, proxy, frame, Conditional)

    def _native_loop(self, proxy: Proxy, frame: FrameType) -> Any:
        """``for item in proxy:`` in ``frame`` inside this block: open its loop."""
        return native_flow.loop(self, proxy, frame, IteratorContext)


# --- conditions -----------------------------------------------------------------------

_ELSE = object()  # `else_()` without a condition


class Conditional(BodyContext, FlowContext):
    """A branch taken when ``condition`` is true."""

    _node_kind = Cond

    def __init__(
        self, parent: GraphContext, condition: Any, where: SourceLoc | None, chain: tuple[Any, ...] | None = None
    ) -> None:
        super().__init__(parent, condition, where)
        if not isinstance(condition, Proxy):
            try:
                bool(condition)
            except Exception as error:
                raise TypeError(
                    f"cond(...) at {short(where)} needs a value with a truth value; "
                    f"bool() of a {type(condition).__name__} failed: {error}"
                ) from error
        # The chain so far: the conditions of this branch and of the earlier ones
        # (what `else_` builds the next branch's condition from).
        self._chain = (condition,) if chain is None else chain
        self._ends_chain = False

    def __enter__(self) -> Conditional:
        self._push()
        return self

    def else_(self, condition: Any = None) -> Conditional:
        """The next branch of this chain: ``else_(other)`` is an ``elif``,
        ``else_()`` an ``else`` (as in nnsight 0.4). Call it after this block
        has exited, in the block that holds it."""
        return self._chained(_ELSE if condition is None else condition, user_location())

    def _else(self, where: SourceLoc | None) -> Conditional:
        """The ``else`` of this chain, opened at ``where`` (a native ``else``)."""
        return self._chained(_ELSE, where)

    def _chained(self, condition: Any, where: SourceLoc | None) -> Conditional:
        if not self._closed or self._node_ref is None:
            raise TraceError(
                f"else_() at {short(where)}: the condition opened at {short(self._where)} must "
                "have exited (without an error) first"
            )
        if self._ends_chain:
            raise TraceError(
                f"else_() at {short(where)}: the chain ending at {short(self._where)} already has its else"
            )
        parent = self._parent
        assert parent is not None
        if innermost() is not parent:
            raise TraceError(
                f"else_() at {short(where)}: call it in the block that holds the condition opened "
                f"at {short(self._where)}, right after that condition"
            )
        final = condition is _ELSE
        conditions = self._chain if final else self._chain + (condition,)
        if not final and not isinstance(condition, Proxy):
            Conditional(parent, condition, where)  # the same check of a plain condition's truth value
        earlier = self._chain
        if any(isinstance(item, Proxy) for item in conditions):
            # `not any(earlier)`, and for an elif `all([that, condition])`: nodes of
            # whitelisted callables, so the chain serializes like any graph.
            taken = parent.record(Call(any), ([*earlier],), source=where)
            none_taken = parent.record(Call(operator.not_), (taken,), source=where)
            test: Any = none_taken if final else parent.record(Call(all), ([none_taken, condition],), source=where)
        else:
            none = not any(earlier)
            test = none if final else none and bool(condition)
        branch = Conditional(parent, test, where, conditions)
        branch._ends_chain = final
        return branch

    def __repr__(self) -> str:
        return f"<condition opened at {short(self._where)}>"


# --- loops over items -----------------------------------------------------------------


class ItemProxy(Proxy):
    """The loop's current item. Unpacking it gives ``(item, iterator)``, so that
    ``with session.iter(xs) as (item, iterator):`` works too; a native ``for``
    over it is a nested loop (`native_flow`)."""

    __slots__ = ("_iterator",)

    @classmethod
    def of(cls, iterator: IteratorContext, ref: Ref | None) -> ItemProxy:
        """The item proxy of node ``ref`` of ``iterator``'s body, knowing its loop."""
        item = cls(iterator, ref)
        object.__setattr__(item, "_iterator", iterator)  # (the slot's own setter: Proxy records attribute writes)
        return item

    def __iter__(self) -> Iterator[Any]:
        frame = sys._getframe(1)
        if dis.opname[frame.f_code.co_code[frame.f_lasti]] == "UNPACK_SEQUENCE":
            return iter((self, object.__getattribute__(self, "_iterator")))
        return self._iterate(frame)  # type: ignore[no-any-return]  # a native `for` over the item


class IteratorContext(BodyContext, FlowContext):
    """A loop over ``collection`` whose body is this block."""

    _node_kind = Iterate

    def __init__(self, parent: GraphContext, collection: Any, where: SourceLoc | None) -> None:
        super().__init__(parent, collection, where)
        if not isinstance(collection, Proxy):
            try:
                iter(collection)
            except TypeError:
                raise TypeError(
                    f"iter(...) at {short(where)} needs an iterable; got a {type(collection).__name__}"
                ) from None

    def __enter__(self) -> ItemProxy:
        self._push()
        proxy = self.record(IterItem(), source=self._where)
        return ItemProxy.of(self, proxy._ref)


    def __repr__(self) -> str:
        return f"<loop opened at {short(self._where)}>"


# --- loops over calls -----------------------------------------------------------------


class EachCallContext(FlowContext):
    """A block over calls ``range(start, stop, step)`` (or ``calls``) of ``scope``."""

    def __init__(
        self,
        parent: GraphContext,
        scope: tuple[str, ...],
        where: SourceLoc | None,
        start: int = 0,
        stop: int | None = None,
        step: int = 1,
        calls: tuple[int, ...] = (),
    ) -> None:
        super().__init__(parent._handle, where, parent)
        if step < 1 or start < 0 or (stop is not None and stop < 0) or any(call < 0 for call in calls):
            raise ValueError(
                f"calls are counted from 0 with a positive step; got start={start}, stop={stop}, step={step}"
            )
        self._selection = (start, stop, step)
        self._scope = scope
        self._calls = calls
        self._sticky = False

    @property
    def scope(self) -> tuple[str, ...]:
        """The module paths whose calls the loop selects (``""``: every module)."""
        return self._scope

    def _begin(self, sticky: bool) -> EachCallContext:
        self._push()
        self._sticky = sticky
        return self

    def __enter__(self) -> EachCallContext:
        if not self._open:
            self._push()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._close(exc_type is None)

    def _close(self, record: bool) -> None:
        if self._closed:
            return
        self._pop()
        if record:
            assert self._parent is not None
            start, stop, step = self._selection
            graph, scope = self.graph, self._scope
            if len(graph.nodes) and not touches(graph, scope):
                self._warn_runs_once(scope)
            self._parent._close_child(self, EachCall(graph, start, stop, step, scope, self._calls), ())

    def _warn_runs_once(self, scope: tuple[str, ...]) -> None:
        names = " or ".join(module_expr(path) for path in scope)
        what = "no module" if "" in scope else f"no call of {names} or of a module below it"
        message = (
            f"this loop over calls reads {what}, so it has no call to follow: its block runs once. "
            "As in nnsight 0.4, .all() and .iter[...] select the calls of the module they are "
            "called on and of those below it only; use model.all() (or tracer.all()) to "
            "select every module's calls."
        )
        if self._where is None:
            warnings.warn(message, MissedCallsWarning, stacklevel=4)
        else:
            warnings.warn_explicit(message, MissedCallsWarning, self._where.filename, self._where.lineno)

    def __repr__(self) -> str:
        return f"<loop over calls opened at {short(self._where)}>"


def touches(graph: Graph, scope: tuple[str, ...]) -> bool:
    """Whether ``graph`` (or a body in it) reads or writes a module in ``scope``."""
    for node in graph.nodes:
        op = node.op
        if isinstance(op, (ModuleGet, ModuleSet, Skip)):
            if in_scope(op.path, scope):
                return True
        elif isinstance(op, (Cond, Iterate, EachCall, TraceRun)) and touches(op.body, scope):
            return True
    return False


def calls_from(key: Any) -> dict[str, Any]:
    """The call selection of an ``iter[...]`` key: an int, a slice or a list of ints."""
    if isinstance(key, slice):
        if key.start is not None and key.start < 0 or key.stop is not None and key.stop < 0:
            raise ValueError("iter[...] counts calls from 0; negative indexes have no meaning here")
        return {"start": key.start or 0, "stop": key.stop, "step": key.step or 1}
    if isinstance(key, (list, tuple)):
        return {"calls": tuple(int(call) for call in key)}
    raise TypeError(f"iter[...] takes an int, a slice or a list of ints; got {type(key).__name__}")


# --- the factories --------------------------------------------------------------------


def cond(context: GraphContext, condition: Any) -> Conditional:
    """A block in ``context`` run only when ``condition`` is true at run time."""
    return Conditional(context, condition, user_location())


def iterate(context: GraphContext, collection: Any) -> IteratorContext:
    """A block in ``context`` run once per item of ``collection``."""
    return IteratorContext(context, collection, user_location())


class IterSelector:
    """What ``ctx.iter`` gives: call it with a collection, or index it with calls."""

    def __init__(self, context: GraphContext) -> None:
        self._context = context

    def __call__(self, collection: Any) -> IteratorContext:
        return iterate(self._context._within("iter"), collection)

    def __getitem__(self, key: Any) -> EachCallContext:
        trace = self._context._trace
        if trace is None:
            raise TraceError("iter[...] selects calls of modules, so it needs a trace")
        selection = calls_from([key] if isinstance(key, int) else key)
        return EachCallContext(trace._current(), ("",), user_location(), **selection)
