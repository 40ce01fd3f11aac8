"""The closed set of operation kinds a graph node can hold.

Every kind is a frozen attrs class holding only the *static* description of
what the node does (which module, which call, which function); the values it
works on are the node's arguments. The interpreter, the printer and the
visualizer each dispatch on `Op` with `match`, so a new kind that one of them
forgets is a type error (mypy's ``exhaustive-match``). What the library
knows about each kind beyond its fields (effects, purity, aliasing) lives in
`effects`; which kinds touch a model, hold a body or only plain fields
(`TRACE_OPS`, `CONTEXT_OPS`, `PLAIN_OPS`) is said at the end, with the kinds.

Ops with a body hold a `graph.Graph`, and a graph holds nodes that hold ops:
one recursive data type, so this module names `Graph` in annotations only
(as jax keeps `Jaxpr`, `JaxprEqn` and `Primitive` together); that is the one
tie between ops.py and graph.py, and it is type-only.

This module is pure: no torch hooks, no I/O.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any, Callable, Union

import attrs

from .events import AccessKind as AccessKind  # (re-exported: its home is events.py)

if TYPE_CHECKING:
    from .graph import Graph


def _callable_key(fn: object) -> object:
    """Equality key for a callable: itself when hashable, else its identity.

    Functions, builtins and bound methods compare by identity of what they
    wrap, which is what a graph needs; the rare unhashable callable object
    falls back to ``id`` so that hashing a graph never fails.
    """
    try:
        hash(fn)
    except TypeError:
        return ("unhashable", id(fn))
    return fn


def print_at_run_time(*args: Any, **kwargs: Any) -> None:
    """What a ``log`` node calls: ``builtins.print`` as it is when the node runs.

    Recording the builtin itself would record whatever a library had put in
    its place when the trace was made (Ray swaps in its own for its progress
    bars, for good), which no serialization whitelist knows.
    """
    builtins.print(*args, **kwargs)


print_at_run_time.__name__ = "print"  # how graphs show it (pickled by its qualified name)


def callable_name(fn: object) -> str:
    """A short, stable, human-readable name for a callable (no addresses)."""
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


@attrs.frozen
class ModuleGet:
    """Read a value of one call of a module: its output, input or inputs.

    The node waits until the model makes that call. It sees the rows of its
    node's invoke (the whole batch outside any invoke).
    """

    path: str
    kind: AccessKind
    call: int = 0


@attrs.frozen
class ModuleSet:
    """Replace a value of one call of a module (args: the new value).

    It replaces only the rows of its node's invoke, and must run while that
    call's hook is active: writing to a call the model has already moved past
    is an error, not a silent no-op.
    """

    path: str
    kind: AccessKind
    call: int = 0


@attrs.frozen
class Skip:
    """Skip one call of a module (args: the value it returns instead).

    The module's forward does not run for this call; the value (which may be
    computed from the call's own ``.input``) is its output, for the rows of
    the node's invoke (the other invokes' rows are computed as usual). It is
    handed over at the call's ``pre`` event, so it must be written before
    anything reads that call's output. On an operation site
    (``envoy.source.<name>``) it skips that operation instead.
    """

    path: str
    call: int = 0


@attrs.frozen
class Result:
    """What the traced method returned (``tracer.result``): the model's output
    for ``trace``, the generated ids for ``generate``; this invoke's rows."""


@attrs.frozen
class Cache:
    """Every call's values of the ``modules`` (real paths), recorded after the
    interventions, as one value read after the run (``tracer.cache(...)``).

    ``names`` are the keys users read them by (``"model.transformer.h.0"``,
    with aliases), one per module. Each call's output (and, with
    ``include_inputs``, its ``(args, kwargs)``) is stored, ``detach``-ed and
    moved to ``device``/``dtype`` (by name: ``"cpu"``, ``"float16"``) when
    given; the value is this invoke's rows, complete when the method returns.
    """

    modules: tuple[str, ...]
    names: tuple[str, ...]
    include_inputs: bool = False
    include_output: bool = True
    detach: bool = True
    device: str | None = None
    dtype: str | None = None


@attrs.frozen
class ModuleAttr:
    """Read a tensor attribute of a module (a parameter or buffer) as a clone.

    A clone, so that writing into it inside a trace never changes the model.
    """

    path: str
    name: str


@attrs.frozen
class ApplyModule:
    """Call a submodule ad hoc on values of the trace (args: the call's).

    ``hook=False`` calls ``forward`` directly, so no interventions fire and
    call counters do not move; ``hook=True`` makes it a real, hooked call.
    """

    path: str
    hook: bool = False


@attrs.frozen(cache_hash=True)  # one Call per operator is hashed on every record
class Call:
    """Call a Python or torch function on the arguments."""

    fn: Callable[..., object] = attrs.field(eq=_callable_key)

    @property
    def name(self) -> str:
        return callable_name(self.fn)


@attrs.frozen
class CallMethod:
    """Call the method ``name`` of the first argument on the others."""

    name: str


@attrs.frozen
class GetAttr:
    """Read attribute ``name`` of the argument."""

    name: str


@attrs.frozen
class SetAttr:
    """Set attribute ``name`` of the first argument to the second (in place)."""

    name: str


@attrs.frozen
class Save:
    """Keep the argument's value after the run (nnsight's ``.save()``)."""


@attrs.frozen
class Stop:
    """End the run here (early stop); with an argument, once that value exists.

    Inside a loop's body it ends the loop (a ``break``); elsewhere it ends the
    trace's model run, or, at session level, the session.
    """


@attrs.frozen
class Grad:
    """The gradient flowing into the argument during the next backward pass.

    Its hook is put on the value where the node is written, so a read written
    between two ``backward()`` calls sees the second one's gradient.
    """


@attrs.frozen
class SetGrad:
    """Replace the gradient flowing into the first argument, in the next
    backward pass, by the second."""


@attrs.frozen
class Bridge:
    """Inside a sub-graph: the value its context node passes in at ``slot``.

    This is how a body uses a value from outside it (a condition's body using
    a trace's value, a trace using a value of its session or of an earlier
    trace): the context node lists the outer values after its own argument.
    """

    slot: int


@attrs.frozen
class IterItem:
    """Inside a loop's body: the current item of the collection."""


@attrs.frozen
class Export:
    """The value of node ``index`` of the sub-graph run by the context node
    given as argument (its last run): a value made inside a trace or a body,
    used after it."""

    index: int


@attrs.frozen
class Cond:
    """Run ``body`` if the first argument is true (the rest are the body's bridges)."""

    body: Graph


@attrs.frozen
class Iterate:
    """Run ``body`` once per item of the first argument (the rest are bridges)."""

    body: Graph


@attrs.frozen
class EachCall:
    """Run ``body`` once per call index ``i`` in ``range(start, stop, step)``
    (``stop=None``: until the model stops calling), or in ``calls`` when
    given, each time shifting the module accesses in ``body`` under the
    ``scope`` paths (``""``: every module) by ``i`` calls. This is ``.all()``
    and ``.iter[...]``: one value per generation step. The part of ``body``
    that touches no call of the scope runs once, in the first iteration (the
    plan splits it off). The arguments are the body's bridges.
    """

    body: Graph
    start: int = 0
    stop: int | None = None
    step: int = 1
    scope: tuple[str, ...] = ("",)
    calls: tuple[int, ...] = ()


@attrs.frozen
class TraceRun:
    """Inside a session: run a trace of the session's model.

    The first argument holds each invoke's inputs (``(args, kwargs)``, or
    ``None`` for an invoke without inputs); the rest are the body's bridges;
    keyword arguments go to the model's method.
    """

    body: Graph
    method: str | None = None


Op = Union[
    ModuleGet,
    ModuleSet,
    Skip,
    Result,
    Cache,
    ModuleAttr,
    ApplyModule,
    Call,
    CallMethod,
    GetAttr,
    SetAttr,
    Save,
    Stop,
    Grad,
    SetGrad,
    Bridge,
    IterItem,
    Export,
    Cond,
    Iterate,
    EachCall,
    TraceRun,
]
"""Every operation kind a node can hold (a closed union)."""

ContextOp = Union[Cond, Iterate, EachCall, TraceRun]
"""The kinds that hold a sub-graph (`CONTEXT_OPS` lists them for ``isinstance``)."""

# --- kinds of ops ---------------------------------------------------------------------
#
# Which kinds touch a model, which hold nothing but their fields, which hold a
# body: facts of the kinds alone, so they live with them (graph.py, which
# shares plain nodes, and the passes read them; effects.py names them too).

CONTEXT_OPS = (Cond, Iterate, EachCall, TraceRun)
"""The kinds that hold a sub-graph (``body``): the members of `ContextOp`, for
``isinstance`` (``isinstance(op, CONTEXT_OPS)`` narrows ``op`` to them)."""

TRACE_OPS = (ModuleGet, ModuleSet, Skip, Result, Cache, ModuleAttr, ApplyModule, Grad, SetGrad, EachCall)
"""The kinds that read or write a model (a graph holding one is a trace's)."""

PLAIN_OPS: frozenset[type] = frozenset(
    {ModuleGet, ModuleSet, Skip, Result, Cache, ModuleAttr, ApplyModule, CallMethod, GetAttr, SetAttr, Save, Stop,
     Grad, SetGrad, Bridge, IterItem, Export}
)
"""The kinds whose fields are small plain values: no function (`Call`), no body."""


def first_bridge(op: Op) -> int:
    """Where a context node's bridges start among its arguments (after the
    condition, collection or inputs; an `EachCall` has only bridges)."""
    return 0 if isinstance(op, EachCall) else 1
