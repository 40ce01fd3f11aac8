"""Ref, Node and Graph: the immutable program a trace builds, and pure functions on it.

A `Graph` is a persistent vector of `Node`s in creation (program) order. A
node's id is its position, and every `Ref` in a node's arguments points to an
earlier node, so a graph is topologically sorted by construction. Graphs are
values: equality and hashing are structural, `add` returns a new graph that
shares structure with the old one, and nothing here ever changes a graph that
exists. Source locations (`source.SourceLoc`) ride along for error messages
but are not part of a graph's identity, which `plan_cache.node_key` encodes.

Graph, Node and the ops (ops.py) form one recursive data type: ops.py names
`Graph` in annotations only. ``repr(graph)`` calls `printing` lazily (a value
and its text form); nothing else here reaches above the values it is made of.

This module is pure: no torch hooks, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence, cast

import attrs
from pyrsistent import pmap, pvector

from .arguments import Ref as Ref
from .arguments import refs_in
from .caches import NODES
from .keys import arg_key, args_key, atoms_key, kwargs_key
from .marks import untrusted
from .ops import PLAIN_OPS, Call, Op, Save
from .shareable import shareable
from .source import SourceLoc as SourceLoc  # (re-exported: its home is source.py)

if TYPE_CHECKING:
    from pyrsistent.typing import PMap, PVector


_NO_KWARGS: PMap[str, object] = pmap()
_REFS = [Ref(index) for index in range(4096)]  # shared: a Ref is an immutable value


@attrs.frozen(cache_hash=True)
class Node:
    """One operation of a graph: ``op`` applied to ``args`` and ``kwargs``.

    Arguments are constants and `Ref`s to earlier nodes, possibly nested in
    tuples and the constant wrappers of `nnsight_pure.arguments`. ``invoke``
    is the invoke the node was written in (``None``: outside any): each
    invoke is its own program, and its module accesses see only its rows.
    """

    ref: Ref
    op: Op
    args: PVector[object] = attrs.field(eq=args_key)
    kwargs: PMap[str, object] = attrs.field(eq=kwargs_key)
    invoke: int | None = None
    source: SourceLoc | None = attrs.field(default=None, eq=False)
    # Memo of the node's masked key (see plan_cache.graph_key): not part of its value.
    _key: object = attrs.field(default=None, init=False, eq=False, repr=False)

    def __reduce__(self) -> tuple[type[Node], tuple[object, ...]]:
        # Pickled as its value: the memo stays behind (another process keys anew).
        return (Node, (self.ref, self.op, self.args, self.kwargs, self.invoke, self.source))


def _nodes(nodes: Iterable[Node]) -> PVector[Node]:
    if type(nodes) is _PVECTOR:
        return cast("PVector[Node]", nodes)  # already persistent: share it (no O(n) copy per add)
    return pvector(nodes)


_PVECTOR: type = type(pvector())


@attrs.frozen(cache_hash=True, repr=False)
class Graph:
    """An immutable intervention program: nodes in program order.

    Build one with `Graph()` and `add`; every builder returns a new graph and
    leaves the one it was given unchanged. ``outputs`` names what a run
    returns: an argument tree (tuples, lists, dicts) of `Ref`s, or ``None``.
    """

    nodes: PVector[Node] = attrs.field(factory=pvector, converter=_nodes)
    outputs: object = attrs.field(default=None, eq=arg_key)
    # Memo of the graph's plan (see plan.plan_for): not part of its value.
    _plan: object = attrs.field(default=None, init=False, eq=False, repr=False)

    def __reduce__(self) -> tuple[Callable[..., Graph], tuple[object, ...]]:
        # Pickled as its value (for workers of a sweep): the plan holds run-time
        # closures and is remade where the graph runs. (A graph holding ops read
        # from a document travels as JSON instead: serialize.py, which made
        # those ops, registers that with copyreg; see serialize.reduce_graph.)
        return (Graph, (self.nodes, self.outputs))

    def add(
        self,
        op: Op,
        args: Sequence[object] = (),
        kwargs: Mapping[str, object] | None = None,
        source: SourceLoc | None = None,
        invoke: int | None = None,
    ) -> tuple[Graph, Ref]:
        """Return a new graph with one more node, and the new node's `Ref`.

        Every `Ref` inside ``args`` and ``kwargs`` must point to a node of
        this graph (`check_graph` verifies it). The input graph is unchanged.
        """
        index = len(self.nodes)
        ref = _REFS[index] if index < len(_REFS) else Ref(index)
        key = None if kwargs else _intern_key(index, op, args, invoke, source)
        node = None if key is None else NODES.table.get(key)
        if node is None:
            node = Node(
                ref,
                op,
                pvector(args),
                _NO_KWARGS if not kwargs else pmap(kwargs),
                invoke,
                source,
            )
            if key is not None:
                NODES.put(key, node)
        return grown(self, node), ref

    def with_outputs(self, outputs: object) -> Graph:
        """A new graph returning ``outputs`` (a tree of `Ref`s to its nodes)."""
        return Graph(self.nodes, outputs)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, ref: Ref) -> Node:
        return self.nodes[ref.index]

    def __repr__(self) -> str:
        from .printing import format_graph

        return format_graph(self)

    # Jupyter shows a graph as its picture, or its text without Graphviz: IPython
    # looks these up on the class; they hand over to the display that
    # notebook.py registers (`display_with`), and show the text without one.
    def _repr_mimebundle_(self, include: object = None, exclude: object = None, **kwargs: object) -> dict[str, str]:
        if not _DISPLAY:
            return {"text/plain": repr(self)}
        return _DISPLAY[0][0](self, include, exclude)

    def _repr_svg_(self) -> str | None:
        return _DISPLAY[0][1](self) if _DISPLAY else None


_NEW = object.__new__
_SET = object.__setattr__


def grown(graph: Graph, node: Node) -> Graph:
    """``graph`` with ``node`` appended (its ref must be ``Ref(len(graph))``).

    The same value ``Graph(graph.nodes.append(node), graph.outputs)`` makes,
    built by filling the slots directly: `Graph.add` makes one per node, and
    attrs' ``__init__`` with its converter is two Python calls more than a
    persistent vector's C-level append needs. (The recording fast path,
    contexts/base.py, makes no graph per node at all.) Every slot attrs gives
    a `Graph` but ``__weakref__`` is filled (`GRAPH_SLOTS`).
    """
    new = _NEW(Graph)
    _SET(new, "nodes", graph.nodes.append(node))
    _SET(new, "outputs", graph.outputs)
    _SET(new, "_plan", None)
    _SET(new, "_attrs_cached_hash", None)
    return new


GRAPH_SLOTS = ("nodes", "outputs", "_plan", "_attrs_cached_hash")
"""The slots `grown` fills: every slot of `Graph` but ``__weakref__``."""


# --- how a graph shows itself in a notebook -------------------------------------------------
#
# The picture is drawn above the values (vis.py, notebook.py), so a graph does
# not import it: notebook.py registers its two functions here when it is
# imported (nnsight_pure/__init__.py imports it), much as serialize.py
# registers with copyreg how a document's graph pickles.

Mimebundle = Callable[[Graph, object, object], dict[str, str]]
"""``mimebundle(graph, include, exclude)``: IPython's display bundle of a graph."""

Svg = Callable[[Graph], "str | None"]
"""``svg(graph)``: a graph's SVG picture, or ``None`` when none can be drawn."""

_DISPLAY: list[tuple[Mimebundle, Svg]] = []
"""The registered display, ``[(mimebundle, svg)]``, or empty (text only)."""


def display_with(mimebundle: Mimebundle, svg: Svg) -> None:
    """Show graphs in Jupyter through ``mimebundle`` and ``svg`` (notebook.py calls this at import)."""
    _DISPLAY[:] = [(mimebundle, svg)]


# --- shared nodes -------------------------------------------------------------------------
#
# Running the same code again records the same nodes: the same operation on
# the same references and constants, at the same position and source line.
# Nodes are immutable values, so the graphs of every such trace can share one
# node object, made (and its masked key worked out, see plan_cache.py) once; the
# table is `caches.NODES`.
# Only nodes that hold nothing large are shared: plain operations on
# references and atoms, and calls of functions that hold nothing.

def _intern_key(
    index: int, op: Op, args: Sequence[object], invoke: int | None, source: SourceLoc | None
) -> tuple[object, ...] | None:
    """What makes a node the same value *and* the same source line, when it
    holds nothing large (else ``None``: the node is made afresh).

    One flat tuple: ``(index, kind, op_key, invoke, source, *atoms_key(args))``,
    where a `Call`'s ``op_key`` is its function (a `Call` is equal exactly
    when its function is, and a function hashes in C where the attrs op's
    ``__hash__`` is a Python call) and any other op's is the op. The
    recording fast path (`contexts.base.GraphContext.record`) builds the
    same tuple inline, so the two share nodes."""
    kind = type(op)
    if untrusted(op):
        return None  # read from a document: never shared (guard.py)
    if kind is Call:
        fn = op.fn  # type: ignore[union-attr]  # a Call
        if not shareable(fn):
            return None
        op_key: object = fn
    elif kind not in PLAIN_OPS:
        return None  # (an op with a body: keyed by a whole graph)
    else:
        op_key = op
    key = atoms_key(args)
    return None if key is None else (index, kind, op_key, invoke, source, *key)


def add(
    graph: Graph,
    op: Op,
    args: Sequence[object] = (),
    kwargs: Mapping[str, object] | None = None,
    source: SourceLoc | None = None,
    invoke: int | None = None,
) -> tuple[Graph, Ref]:
    """Return ``graph`` grown by one node, and that node's `Ref` (see `Graph.add`)."""
    return graph.add(op, args, kwargs, source, invoke)


def node_refs(node: Node) -> Iterator[Ref]:
    """Every `Ref` a node's arguments mention (its data dependencies)."""
    for arg in node.args:
        yield from refs_in(arg)
    for name in sorted(node.kwargs):
        yield from refs_in(node.kwargs[name])


def users(graph: Graph) -> list[list[int]]:
    """For each node, the indexes of the nodes that use its value, in order."""
    result: list[list[int]] = [[] for _ in graph.nodes]
    for node in graph.nodes:
        seen: set[int] = set()
        for ref in node_refs(node):
            if ref.index not in seen:
                seen.add(ref.index)
                result[ref.index].append(node.ref.index)
    return result


def saved_refs(graph: Graph) -> frozenset[int]:
    """Indexes of the nodes whose values outlive the run: saved, or outputs."""
    saved = {ref.index for node in graph.nodes if isinstance(node.op, Save) for ref in node_refs(node)}
    saved.update(ref.index for ref in refs_in(graph.outputs))
    return frozenset(saved)


def use_counts(graph: Graph) -> list[int]:
    """For each node, how many nodes use its value (each user counted once)."""
    return [len(node_users) for node_users in users(graph)]


class GraphError(ValueError):
    """A graph breaks one of its structural invariants."""


def check_graph(graph: Graph) -> None:
    """Raise `GraphError` unless every node sits at its own index and only
    refers to earlier nodes (the invariants every graph value keeps)."""
    for ref in refs_in(graph.outputs):
        if not 0 <= ref.index < len(graph.nodes):
            raise GraphError(f"the outputs refer to {ref!r}, which is not a node")
    for position, node in enumerate(graph.nodes):
        if node.ref.index != position:
            raise GraphError(f"node at position {position} has ref {node.ref!r}")
        if node.invoke is not None and node.invoke < 0:
            raise GraphError(f"node %{position} has a negative invoke {node.invoke}")
        for ref in node_refs(node):
            if not 0 <= ref.index < position:
                raise GraphError(
                    f"node %{position} refers to {ref!r}, which is not an earlier node"
                )
