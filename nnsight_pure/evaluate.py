"""How an ordinary op computes, and how a node gets its arguments.

`op_function` is the meaning of the ordinary ops (a call, a method, an
attribute, a module's weight or an ad-hoc module call): the interpreter
runs it inside a trace, the shell on finished values after one (with no
modules) and scan on fake values. `resolver` and `computer` are what a
plan stores per node: how to get the node's arguments from a run's
environment, and the whole "fetch the arguments and call" of an ordinary
node as one closure (the common shapes, ``h * 2``, ``a + b``, ``h.sum()``,
without argument tuples: they sit on the interpreter's hot path).

Pure: nothing here runs anything until a run calls it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .arguments import Ref, is_plain_constant, thaw
from .graph import Node
from .guard import describe_op, guarded
from .marks import untrusted
from .ops import (
    ApplyModule,
    Bridge,
    Cache,
    Call,
    CallMethod,
    Cond,
    EachCall,
    Export,
    GetAttr,
    Grad,
    Iterate,
    IterItem,
    ModuleAttr,
    ModuleGet,
    ModuleSet,
    Op,
    Result,
    Save,
    SetAttr,
    SetGrad,
    Skip,
    Stop,
    TraceRun,
)
from .steps import Compute, Resolver

OpFunction = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
"""``run(modules, args, kwargs)``: an op's value. ``modules`` has a
``module(path)`` method (the run, or scan's fake model); only module ops read
it, and the shell passes ``None`` for the others."""


def op_function(op: Op) -> OpFunction:
    """How an ordinary node computes its value from (modules, args, kwargs).

    An op read from a document runs under the guard (guard.py)."""
    run = _op_function(op)
    if untrusted(op):
        return guarded(op, describe_op(op), run)
    return run


def _op_function(op: Op) -> OpFunction:
    match op:
        case Call(fn):
            return lambda state, args, kwargs: fn(*args, **kwargs)
        case CallMethod(name):
            return lambda state, args, kwargs: getattr(args[0], name)(*args[1:], **kwargs)
        case GetAttr(name):
            return lambda state, args, kwargs: getattr(args[0], name)
        case SetAttr(name):
            return lambda state, args, kwargs: setattr(args[0], name, args[1])
        case ModuleAttr(path, name):
            return lambda state, args, kwargs: getattr(state.module(path), name).clone()
        case ApplyModule(path, hook):
            if hook:
                return lambda state, args, kwargs: state.module(path)(*args, **kwargs)
            return lambda state, args, kwargs: state.module(path).forward(*args, **kwargs)
        case (
            ModuleGet() | ModuleSet() | Skip() | Result() | Cache() | Save() | Stop() | Grad() | SetGrad()
            | Bridge() | IterItem() | Export() | Cond() | Iterate() | EachCall() | TraceRun()
        ):
            raise AssertionError(f"{type(op).__name__} is not an ordinary node")


def resolver(node: Node) -> Resolver:
    """How to get the node's (args, kwargs) at run time.

    Immutable constants are thawed once here; flat `Ref`s become list
    lookups; anything else (tensor constants, fresh lists and dicts) is
    thawed from the run's own node at each run.
    """
    index = node.ref.index
    args = tuple(node.args)
    names = tuple(node.kwargs.keys()) if node.kwargs else ()
    if all(is_plain_constant(arg) for arg in args) and all(is_plain_constant(node.kwargs[name]) for name in names):
        const_args = tuple(thaw(arg, ()) for arg in args)
        const_kwargs = {name: thaw(node.kwargs[name], ()) for name in names}
        if not const_kwargs:
            return lambda env, nodes: (const_args, {})
        return lambda env, nodes: (const_args, dict(const_kwargs))
    if not names and all(type(arg) is Ref or is_plain_constant(arg) for arg in args):
        parts = tuple((arg.index, None) if type(arg) is Ref else (-1, thaw(arg, ())) for arg in args)
        return lambda env, nodes: (tuple(env[i] if i >= 0 else c for i, c in parts), {})

    def generic(env: list[Any], nodes: Sequence[Node]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        own = nodes[index]
        kwargs = own.kwargs
        return (
            tuple(thaw(arg, env) for arg in own.args),
            {name: thaw(kwargs[name], env) for name in names},
        )

    return generic


def computer(node: Node) -> Compute:
    """An ordinary node's whole step, ``compute(env, nodes, modules) -> value``.

    The most common node, a function or method on one or two values, is one
    closure straight from the environment; any other resolves its arguments
    and calls `op_function`.
    """
    direct = _direct(node)
    if direct is not None:
        return direct
    resolve = resolver(node)
    run = op_function(node.op)

    def compute(env: list[Any], nodes: Sequence[Node], modules: Any) -> Any:
        args, kwargs = resolve(env, nodes)
        return run(modules, args, kwargs)

    return compute


def _direct(node: Node) -> Compute | None:
    op = node.op
    head = node.args[0] if node.args else None
    if node.kwargs or not 1 <= len(node.args) <= 2 or not isinstance(head, Ref) or untrusted(op):
        return None  # (a loaded graph's op runs under its guard, in `op_function`)
    first = head.index
    if len(node.args) == 1:
        if type(op) is Call:
            fn1 = op.fn
            return lambda env, nodes, modules: fn1(env[first])
        if type(op) is CallMethod:
            name = op.name
            return lambda env, nodes, modules: getattr(env[first], name)()
        return None
    second = node.args[1]
    if type(op) is not Call:
        return None
    fn = op.fn
    if type(second) is Ref:
        other = second.index
        return lambda env, nodes, modules: fn(env[first], env[other])
    if is_plain_constant(second):
        constant = thaw(second, ())
        return lambda env, nodes, modules: fn(env[first], constant)
    return None
