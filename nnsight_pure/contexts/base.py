"""GraphContext: a `with` block of the shell, holding its recording in one cell.

Every context (a trace, a session, a condition, a loop) owns one `Recording`
value: its `Graph` and what goes with it (the bridges and exports made so
far, the finished children, the factory calls it could take back).
Recording an operation replaces that value with a new one (``_replace``)
whose graph is one node longer; the old value is untouched, so a block can
be snapshot and restored (`GraphContext._snapshot`, `_restore`). Besides it,
a block has lifecycle flags (open, closed, ran) that only its own methods
set, and, once run, its results. Contexts nest: a child records into its own graph
and, when its block exits, its whole graph becomes one node of its parent's
graph (the child's *context node*).

A value from outside a child is brought in as a `Bridge` node: the child's
context node lists the outer value among its arguments. A value made inside a
finished child (an earlier trace of a session, a finished loop) is brought out
as an `Export` node of the parent, which reads it from the child's last run.

Once the outermost context has run, each context holds its `Results` (the
last run of its body), which its proxies read.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, NamedTuple, Protocol, Sequence, cast

import attrs
from pyrsistent import PMap, PVector, pmap, pvector

from .. import open_blocks as active
from ..arguments import ATOMS, Ref, freeze
from ..caches import INTERNAL_CODE, LOCATIONS, NODES, SHAREABLE_BUILTINS
from ..config import CONFIG
from ..errors import TraceError
from ..graph import _NO_KWARGS, _REFS, Graph, Node, SourceLoc, saved_refs
from ..marks import _UNTRUSTED
from ..ops import PLAIN_OPS, Bridge, Call, Cond, Export, Iterate, Op, Stop, print_at_run_time
from ..printing import format_node
from ..proxy import _SET_CONTEXT, _SET_FAKE, _SET_PENDING, _SET_REF, Proxy, Recorder
from ..results import Results, missing_value_message
from ..scan import UNKNOWN
from ..source import short, user_location
from . import recorded_calls
from .recorded_calls import FactoryRecord

if TYPE_CHECKING:
    from types import FrameType

    from ..handle import ModelHandle


@attrs.frozen
class Bridged:
    """A value of the parent brought into a block: its bridge slot and the `Bridge` node."""

    slot: int
    ref: Ref


class Recording(NamedTuple):
    """What a block has recorded: one value, replaced on every change.

    ``bridges`` maps a node of the parent's graph to its `Bridge` node here
    (the slots, in order, are the block's captures: one structure for one
    fact); ``exports`` maps (a finished child's context node, a node of it)
    to the `Export` node reading it; ``children`` are the finished child
    blocks that get results after the run; ``factory_records`` the factory
    calls (torch.zeros ...) that could be taken back (`recorded_calls`).

    The graph is kept as its parts, ``nodes`` and ``outputs`` (`graph`
    makes the `Graph` value of them): recording an operation appends to the
    persistent vector of nodes and makes no `Graph` object, which
    `GraphContext.graph` makes when one is asked for (and keeps while the
    recording does not change).
    """

    nodes: PVector[Node] = pvector()
    outputs: object = None
    bridges: PMap[int, Bridged] = pmap()
    exports: PMap[tuple[int, int], Ref] = pmap()
    children: tuple[GraphContext, ...] = ()
    factory_records: PVector[FactoryRecord] = pvector()

    @property
    def graph(self) -> Graph:
        """The recorded graph, as a `Graph` value (a new object: `GraphContext.graph` keeps one)."""
        return Graph(self.nodes, self.outputs)

    @property
    def captures(self) -> tuple[Ref, ...]:
        """Per bridge slot, the node of the parent's graph it stands for."""
        by_slot = sorted((bridged.slot, index) for index, bridged in self.bridges.items())
        return tuple(Ref(index) for _, index in by_slot)


_EMPTY = Recording()  # every block starts from it (a value: sharing it is safe)

# What the recording fast path (`GraphContext.record`) reads: the tables read
# directly (each clears in place), and the C-level constructors.
_NODE_TABLE = NODES.table
_INTERNAL_CODE = INTERNAL_CODE.table
_LOCATIONS = LOCATIONS.table
_SHAREABLE_BUILTINS = SHAREABLE_BUILTINS.table
_REF_COUNT = len(_REFS)
_NEW = object.__new__
_getframe = sys._getframe


class _Setup(Protocol):
    @property
    def open_invoke(self) -> int | None:
        """The invoke new nodes belong to (``None``: outside any invoke)."""


class TraceLike(Protocol):
    """What a block needs of the trace it records into (`Tracer`)."""

    _fake_mode: Any

    @property
    def _setup(self) -> _Setup:
        """The trace's `TraceSetup` (read at every record: its open invoke)."""

    def _current_invoke(self) -> int | None: ...

    def _fake_of(self, op: Op, args: Sequence[Any], kwargs: Mapping[str, Any], invoke: int | None) -> Any: ...

    def _current(self) -> GraphContext: ...


class GraphContext:
    """A `with` block that records operations into its own graph value."""

    # Defaults of the state every block starts with (reassigned, never mutated
    # in place, so they can live on the class: a trace is made per call).
    _open = False
    _closed = False
    _ran = False  # the outermost context has run and handed out results
    _results: Results | None = None
    _node_ref: Ref | None = None  # our context node in the parent's graph (set by `_placed`)
    _is_trace = False  # True for a Tracer (which records into itself)
    _records_factories = False  # True for the first open block of a thread (see `_push`)
    _never_runs: str | None = None  # why the block never runs (a scan, an edit), if it never does

    def __init__(self, handle: ModelHandle, where: SourceLoc | None, parent: GraphContext | None) -> None:
        self._recording = _EMPTY
        self._graph_memo: Graph | None = None  # the Graph of ``_recording`` (see `graph`)
        self._handle = handle
        self._where = where
        self._parent = parent
        self._enclosing_trace: TraceLike | None = parent._trace if parent is not None else None

    @property
    def _trace(self) -> TraceLike | None:
        """The trace this block records into (None at session level)."""
        return self._enclosing_trace

    @property
    def graph(self) -> Graph:
        """The graph recorded so far (an immutable value; later records do not change it).

        Made from the recording's nodes when first asked for, and the same
        object while nothing more is recorded (a plan memoised on it stays)."""
        recording = self._recording
        memo = self._graph_memo
        if memo is not None and memo.nodes is recording.nodes and memo.outputs is recording.outputs:
            return memo
        graph = self._graph_memo = recording.graph
        return graph

    def _grew(self, recording: Recording, graph: Graph, **changes: Any) -> None:
        """Make ``recording`` with ``graph`` (and ``changes``) the block's recording."""
        self._recording = recording._replace(nodes=graph.nodes, outputs=graph.outputs, **changes)
        self._graph_memo = graph

    # --- the recording cell -----------------------------------------------------------

    def _snapshot(self) -> Recording:
        """The block's recording now (a value: restoring it undoes what came after)."""
        return self._recording

    def _restore(self, recording: Recording) -> None:
        """Make ``recording`` (an earlier `_snapshot`) the block's recording again."""
        self._recording = recording

    def _restart_from(self, graph: Graph) -> None:
        """Start the recording from ``graph`` (a model's edits) instead of the empty graph."""
        self._grew(self._recording, graph)

    def _note_factory(self, record: FactoryRecord) -> None:
        """Remember a factory call recorded here, to take it back if it is an input."""
        recording = self._recording
        self._recording = recording._replace(factory_records=recording.factory_records.append(record))

    def _placed(self, node_ref: Ref | None) -> None:
        """Called by the parent: this finished block is node ``node_ref`` of its graph."""
        self._node_ref = node_ref

    @property
    def closed(self) -> bool:
        """True once the block has exited (whether or not it ran)."""
        return self._closed

    @property
    def handle(self) -> ModelHandle:
        """The model this context traces."""
        return self._handle

    # --- entering and leaving ---------------------------------------------------------

    def _push(self) -> None:
        if self._open or self._closed:
            raise TraceError(f"the block opened at {short(self._where)} cannot be entered twice")
        first = not active.open_contexts()  # (a closed block an interrupt left behind does not count)
        self._open = True
        active.push(self)  # (undone by `_pop` through `active.remove`: no token to lose to an interrupt)
        if first and CONFIG.APP.GLOBAL_TRACING:
            # The first block of this thread records factory calls (torch.zeros ...)
            # until it closes; see `recorded_calls`. (The flag first: stopping a
            # recording an interrupt kept from starting is a no-op.)
            self._records_factories = True
            recorded_calls.start_thread_recording()

    def _push_safely(self) -> None:
        """`_push` for a ``with`` block's ``__enter__``: undone when an interrupt
        lands after it, since no ``__exit__`` would pop it then."""
        entered = self._open or self._closed  # (then _push refuses: not ours to pop)
        try:
            self._push()
        except BaseException:
            if not entered:
                self._pop()
            raise

    def _pop(self) -> None:
        self._open = False
        self._closed = True
        if self._recording.factory_records:  # each holds a proxy of this block: a cycle once closed
            self._recording = self._recording._replace(factory_records=pvector())
        interrupted: KeyboardInterrupt | None = None
        attempts = 3  # (a counter, not range(): no call before the ``try`` for an interrupt to land at)
        while attempts:  # an interrupt (Ctrl-C) inside the removal does not stop it
            attempts -= 1
            try:
                active.remove(self)
                if self._records_factories:
                    recorded_calls.stop_thread_recording()  # (again after an interrupt: a no-op)
                    self._records_factories = False
                break
            except KeyboardInterrupt as error:
                interrupted = interrupted or error
        if interrupted is not None:
            raise interrupted

    def _is_ancestor_of(self, other: GraphContext) -> bool:
        context = other._parent
        while context is not None:
            if context is self:
                return True
            context = context._parent
        return False

    def _outermost(self) -> GraphContext:
        context = self
        while context._parent is not None:
            context = context._parent
        return context

    def _within(self, what: str) -> GraphContext:
        """The innermost open context, which must be this one or inside it."""
        context = innermost()
        if context is None or not (context is self or self._is_ancestor_of(context)):
            raise TraceError(f"{what}: the block opened at {short(self._where)} is not open here")
        return context

    # --- recording --------------------------------------------------------------------

    def record(
        self,
        op: Op,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        source: SourceLoc | None = None,
    ) -> Proxy:
        """Append ``op`` applied to ``args``/``kwargs`` and return a proxy of its value.

        The usual case, a shared op (an operator, a builtin torch function, a
        module access ...) on this block's own proxies and plain numbers,
        without keywords, in a trace without fake tensors, at a line of user
        code seen before, takes the fast path below: the node's intern key
        (`graph._intern_key`'s tuple), the user's line (`source.user_location`'s
        walk over its caches) and the new graph (`graph.grown`) and proxy are
        all made inline, with no Python call but the op's ``__hash__`` (none
        for a `Call`). Anything else, or any table missing an entry, takes
        `_record`, which does the same in general (and fills the tables).
        """
        if not self._open:
            raise TraceError(f"the block opened at {short(self._where)} is not open")
        trace: TraceLike | None = self if self._is_trace else self._enclosing_trace  # type: ignore[assignment]
        if kwargs or source is not None or (_UNTRUSTED and id(op) in _UNTRUSTED):
            return self._record(op, args, kwargs, source, trace)
        if trace is None:
            invoke = None
        elif trace._fake_mode is None:
            invoke = trace._setup.open_invoke  # (trace._current_invoke(), inlined)
        else:
            return self._record(op, args, kwargs, source, trace)
        kind = type(op)
        if kind is Call:
            op_key: object = op.fn  # type: ignore[union-attr]  # a Call
            try:
                if op_key not in _SHAREABLE_BUILTINS:  # (shareable(), for the builtins it remembers)
                    return self._record(op, args, kwargs, source, trace)
            except TypeError:  # an unhashable callable
                return self._record(op, args, kwargs, source, trace)
        elif kind in PLAIN_OPS:
            op_key = op
        else:
            return self._record(op, args, kwargs, source, trace)
        # The user's line: source.user_location's walk, on its caches only.
        frame: FrameType | None = _getframe(1)
        while True:
            if frame is None:  # pragma: no cover - there is always a caller
                return self._record(op, args, kwargs, source, trace)
            code = frame.f_code
            known = _INTERNAL_CODE.get(id(code))  # (by id, holding the code: see source.py)
            if known is None or known[0] is not code:
                return self._record(op, args, kwargs, source, trace)
            if not known[1]:
                break
            frame = frame.f_back
        found = _LOCATIONS.get((id(code), frame.f_lineno))
        if found is None or found[0] is not code:
            return self._record(op, args, kwargs, source, trace)
        location: SourceLoc = found[1]
        recording = self._recording
        nodes = recording.nodes
        index = len(nodes)
        key: list[object] = [index, kind, op_key, invoke, location]
        for arg in args:  # (keys.atoms_key, inlined for the usual arguments)
            arg_kind = type(arg)
            if arg_kind is Proxy:
                if arg._context is not self or arg._pending is not None:
                    return self._record(op, args, kwargs, source, trace)
                key.append(-1 - arg._ref.index)
            elif arg_kind is float:
                key.append((float, arg.hex()))  # exact: -0.0 is not 0.0, 1.0 is not 1
            elif arg_kind is int or arg_kind is bool:
                key.append((arg_kind, arg))
            else:
                return self._record(op, args, kwargs, source, trace)
        interned = tuple(key)
        ref = _REFS[index] if index < _REF_COUNT else Ref(index)
        node = _NODE_TABLE.get(interned)
        if node is None:  # (the first time: the arguments frozen as _frozen would, own proxies to Refs)
            frozen = [arg._ref if type(arg) is Proxy else arg for arg in args]
            node = Node(ref, op, pvector(frozen), _NO_KWARGS, invoke, location)
            NODES.put(interned, node)
        # (the hot path: one C-level tuple instead of _replace, and no Graph object: see `graph`)
        self._recording = tuple.__new__(Recording, (nodes.append(node),) + recording[1:])
        proxy = _NEW(Proxy)  # (Proxy(self, ref), with the slots' own setters)
        _SET_CONTEXT(proxy, self)
        _SET_REF(proxy, ref)
        _SET_PENDING(proxy, None)
        _SET_FAKE(proxy, UNKNOWN)
        return proxy

    def _record(
        self,
        op: Op,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        source: SourceLoc | None,
        trace: TraceLike | None,
    ) -> Proxy:
        """`record` in general: any op, arguments and keywords."""
        frozen = self._frozen
        if len(args) == 2:  # the usual: a binary operator
            frozen_args: tuple[object, ...] = (frozen(args[0]), frozen(args[1]))
        else:
            frozen_args = tuple([frozen(arg) for arg in args])
        frozen_kwargs = {name: frozen(value) for name, value in kwargs.items()} if kwargs else None
        invoke = None if trace is None else trace._setup.open_invoke  # (trace._current_invoke(), inlined)
        recording = self._recording
        graph, ref = self.graph.add(op, frozen_args, frozen_kwargs, source or user_location(), invoke)
        self._grew(recording, graph)
        if trace is None or trace._fake_mode is None:
            return Proxy(self, ref)
        return Proxy(self, ref, fake=trace._fake_of(op, args, kwargs or {}, invoke))

    def _frozen(self, arg: Any) -> object:
        """`freeze` with the usual cases first: this block's own proxies, plain numbers."""
        if type(arg) is Proxy and arg._context is self and arg._pending is None:
            return arg._ref
        if type(arg) in ATOMS:
            return arg
        return freeze(arg, Proxy, self._argument)

    def _as_argument(self, value: Any) -> object:
        """``value`` (proxies and constants, in any nesting) as an argument of
        this block's graph (a graph's outputs, say)."""
        return freeze(value, Proxy, self._argument)

    def _current_invoke(self) -> int | None:
        trace = self._trace
        return trace._current_invoke() if trace is not None else None

    def _argument(self, proxy: Proxy) -> object:
        """What a proxy becomes as an argument of this context's next node."""
        if proxy._pending is not None:
            return proxy._materialize(self)
        assert proxy._ref is not None
        return self._import(proxy._context, proxy._ref)

    def _import(self, owner: Recorder, ref: Ref) -> object:
        """An argument of this graph standing for node ``ref`` of ``owner``'s graph."""
        if owner is self:
            return ref
        if owner._ran and owner.has_value(ref):
            # A finished value (saved by an earlier run) is just a constant here.
            # (Checked first: a block that ran is no longer open.)
            return freeze(owner.value_of(ref), Proxy, self._argument)
        if not isinstance(owner, GraphContext):
            raise TraceError(f"a traced value of {owner!r} has no value here")
        if owner._open and owner._is_ancestor_of(self):
            assert self._parent is not None
            return self._bridge(self._parent._import(owner, ref))
        parent = owner._parent
        if owner._closed and parent is not None and parent._open and owner._node_ref is not None:
            # Made inside a finished child of an open context: export it from there.
            return self._import(parent, parent._export(owner._node_ref, ref))
        node = owner.graph.nodes[ref.index]
        made = f"`{format_node(node)}` (made at {short(node.source)})"
        if owner._closed:
            raise TraceError(
                f"{made} belongs to a block that has closed, and it has no value there: save "
                "it (.save()) inside the block it was made in, or, in a session, use it in "
                "the session or a later trace before the enclosing loop or branch ends."
            )
        raise TraceError(
            f"{made} belongs to another open trace (opened at {short(owner._where)}); a value "
            "cannot cross between traces or models unless a session holds both, or it was "
            "saved by a trace that already ran."
        )

    def _bridge(self, outer: object) -> object:
        """A node of this graph for ``outer``, an argument of the parent's graph."""
        if type(outer) is not Ref:
            return outer  # a constant needs no bridge
        recording = self._recording
        bridged = recording.bridges.get(outer.index)
        if bridged is not None:
            return bridged.ref
        slot = len(recording.bridges)
        graph, ref = self.graph.add(Bridge(slot), source=user_location(), invoke=self._current_invoke())
        self._grew(recording, graph, bridges=recording.bridges.set(outer.index, Bridged(slot, ref)))
        return ref

    def _export(self, context_node: Ref, inner: Ref) -> Ref:
        """A node of this graph reading node ``inner`` of a finished child's last run."""
        key = (context_node.index, inner.index)
        recording = self._recording
        ref = recording.exports.get(key)
        if ref is None:
            graph, ref = self.graph.add(
                Export(inner.index), (context_node,), source=user_location(), invoke=self._current_invoke()
            )
            self._grew(recording, graph, exports=recording.exports.set(key, ref))
        return ref

    def _close_child(
        self, child: GraphContext, op: Op, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None
    ) -> None:
        """Record a closed child's context node (its graph in ``op``; ``args``
        first, then the parent's values for the child's bridges)."""
        proxy = self.record(op, tuple(args) + child._recording.captures, kwargs, source=child._where)
        child._placed(proxy._ref)
        self._recording = self._recording._replace(children=self._recording.children + (child,))

    # --- results ----------------------------------------------------------------------

    def _assign(self, results: Results | None) -> None:
        """Hand out a run's results to this context and its children.

        The list of children is dropped afterwards: it is only needed for
        this, and it would make a reference cycle with the children's links
        to their parent (keeping saved values alive until the collector ran).
        """
        self._results = results
        self._ran = True
        children = self._recording.children
        if children:  # (most blocks have none: no new value then)
            self._recording = self._recording._replace(children=())
        for child in children:
            found = None
            if results is not None and child._node_ref is not None:
                found = results.children.get(child._node_ref.index)
            child._assign(found)

    def _release(self) -> None:
        """Drop the links to children of a block that will never run."""
        children = self._recording.children
        if children:  # (most blocks have none: no new value then)
            self._recording = self._recording._replace(children=())
        for child in children:
            child._release()

    def has_value(self, ref: Ref) -> bool:
        return self._results is not None and self._results.has(ref.index)

    def value_of(self, ref: Ref) -> Any:
        """The value of a node after the run, or a `ValueError` saying why there is none."""
        results = self._results
        if results is not None and ref.index in results.values:
            return results.values[ref.index]
        graph = self.graph
        node = graph.nodes[ref.index]
        made = f"`{format_node(node)}` (made at {short(node.source)})"
        if not self._ran:
            outer = self._outermost()
            if outer._never_runs is not None:
                raise ValueError(f"{made} has no value: {outer._never_runs}")
            if outer._open or not outer._closed:
                raise ValueError(
                    f"{made} has no value yet: the trace has not run. Values exist after the "
                    "outermost `with` block exits (if saved)."
                )
            raise ValueError(f"{made} has no value: its trace never ran (it raised).")
        if self._results is None:
            raise ValueError(
                f"{made} has no value: the block it was made in never ran (a false condition, "
                "an empty loop, or a trace of a session that was never reached)."
            )
        saved = ref.index in saved_refs(graph)
        raise ValueError(missing_value_message(graph, ref.index, self._results, saved))

    # --- pictures -----------------------------------------------------------------------

    def vis(
        self,
        title: str = "graph",
        path: str | os.PathLike[str] = ".",
        recursive: bool = False,
        group: bool = False,
        format: str = "png",
        *,
        display: bool = False,
        save: bool = True,
    ) -> pathlib.Path:
        """Draw this block's graph so far into ``{path}/{title}.{format}``; returns the file.

        Works inside the block or after it; it never runs the model and never
        changes the graph. ``recursive`` also draws the bodies of loops,
        conditions and traces; ``group`` boxes each body. ``display`` and
        ``save`` are nnsight 0.4's: the picture is always saved, and showing it
        is left to the caller (e.g. ``IPython.display.Image(str(path))``).
        """
        from ..vis import render

        return render(self.graph, title=title, path=path, format=format, recursive=recursive, group=group)

    # --- what every context offers (recorded in the innermost open block) ------------

    def apply(self, fn: Any, *args: Any, **kwargs: Any) -> Proxy:
        """Call ``fn(*args, **kwargs)`` at run time; returns a proxy of its result."""
        return self._within("apply").record(Call(fn), args, kwargs)

    def log(self, *args: Any) -> None:
        """Print the arguments at run time (with their real values)."""
        self._within("log").record(Call(print_at_run_time), args)

    def stop(self) -> None:
        """End the run where execution reaches this point: inside a loop, the
        loop; otherwise the trace's model run, or the session."""
        self._within("stop").record(Stop())

    # --- native control flow on a traced value ------------------------------------------

    # ``if proxy:`` and ``for item in proxy:`` inside a block: the proxy asks the
    # innermost block (open_blocks.OpenBlock) to open a condition or a loop.
    # The block kinds are above this class: `flow.FlowContext`, which every
    # concrete block is, opens them (contexts/native_flow.py).

    def _native_branch(self, proxy: Proxy, frame: FrameType) -> bool:
        raise NotImplementedError(f"{type(self).__name__} opens no condition (see flow.FlowContext)")

    def _native_loop(self, proxy: Proxy, frame: FrameType) -> Any:
        raise NotImplementedError(f"{type(self).__name__} opens no loop (see flow.FlowContext)")

    # Jupyter shows a block as the picture of its graph so far (notebook.py).
    def _repr_mimebundle_(self, include: object = None, exclude: object = None, **kwargs: object) -> dict[str, str]:
        from ..notebook import mimebundle

        return mimebundle(self.graph, include, exclude)

    def _repr_svg_(self) -> str | None:
        from ..notebook import svg

        return svg(self.graph)


class BodyContext(GraphContext):
    """A block whose graph becomes the body of one node of its parent: a
    `Cond` or `Iterate` node (``_node_kind``), whose first argument is
    ``first`` (the condition, the collection)."""

    _node_kind: ClassVar[type[Cond] | type[Iterate]]

    def __init__(self, parent: GraphContext, first: Any, where: SourceLoc | None) -> None:
        super().__init__(parent._handle, where, parent)
        self._first = first

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._pop()
        if exc_type is None:
            assert self._parent is not None
            self._parent._close_child(self, type(self)._node_kind(self.graph), (self._first,))


# `open_blocks.innermost` / `open_contexts`, typed for the shell (every open
# block is a `GraphContext`): the same functions, so a module access pays no
# extra call.
innermost = cast("Callable[[], GraphContext | None]", active.innermost)
"""The innermost open block of this thread, or ``None``."""
open_contexts = cast("Callable[[], tuple[GraphContext, ...]]", active.open_contexts)
"""Every open block of this thread, outermost first."""
