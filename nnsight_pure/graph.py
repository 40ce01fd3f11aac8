"""Ref, Node and Graph: the immutable program a trace builds, and pure functions on it.

A `Graph` is a persistent vector of `Node`s in creation (program) order. A
node's id is its position, and every `Ref` in a node's arguments points to an
earlier node, so a graph is topologically sorted by construction. Graphs are
values: equality and hashing are structural, `add` returns a new graph that
shares structure with the old one, and nothing here ever changes a graph that
exists. Source locations ride along for error messages but are not part of a
graph's identity.

This module is pure: no torch hooks, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence, cast

import attrs
from pyrsistent import pmap, pvector

from .arguments import ATOMS, refs_in, structural_key
from .arguments import Ref as Ref
from .guard import graph_untrusted, untrusted
from .ops import (
    ApplyModule,
    Bridge,
    Call,
    CallMethod,
    Export,
    GetAttr,
    Grad,
    IterItem,
    ModuleAttr,
    ModuleGet,
    ModuleSet,
    Op,
    Save,
    SetAttr,
    SetGrad,
    Stop,
)
from .shareable import shareable

if TYPE_CHECKING:
    from pyrsistent.typing import PMap, PVector


@attrs.frozen(cache_hash=True)
class SourceLoc:
    """Where in the user's code a node was made (for error messages)."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f'File "{self.filename}", line {self.lineno}, in {self.function}'


def _args_key(args: PVector[object]) -> object:
    return tuple(structural_key(arg) for arg in args)


def _kwargs_key(kwargs: PMap[str, object]) -> object:
    return frozenset((name, structural_key(value)) for name, value in kwargs.items())


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
    args: PVector[object] = attrs.field(eq=_args_key)
    kwargs: PMap[str, object] = attrs.field(eq=_kwargs_key)
    invoke: int | None = None
    source: SourceLoc | None = attrs.field(default=None, eq=False)
    # Memo of the node's structure key (see plan.structure_key): not part of its value.
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
    outputs: object = attrs.field(default=None, eq=structural_key)
    # Memo of the graph's plan (see plan.plan_for): not part of its value.
    _plan: object = attrs.field(default=None, init=False, eq=False, repr=False)

    def __reduce__(self) -> tuple[Callable[..., Graph], tuple[object, ...]]:
        # Pickled as its value (for workers of a sweep): the plan holds run-time
        # closures and is remade where the graph runs.
        # A graph holding ops read from a document travels as JSON, so that
        # it is read back under the guard (guard.py) where it runs.
        if graph_untrusted(self):
            from .serialize import from_json, to_json

            return (from_json, (to_json(self),))
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
        node = None if key is None else _NODES.get(key)
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
                if len(_NODES) >= _NODES_KEPT:
                    _NODES.clear()
                _NODES[key] = node
        return Graph(self.nodes.append(node), self.outputs), ref

    def with_outputs(self, outputs: object) -> Graph:
        """A new graph returning ``outputs`` (a tree of `Ref`s to its nodes)."""
        return Graph(self.nodes, outputs)

    def digest(self) -> str:
        """A content hash, the same in any process: the SHA-256 of the graph's
        canonical JSON (source lines excluded). For caching results by graph."""
        from .serialize import digest

        return digest(self)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, ref: Ref) -> Node:
        return self.nodes[ref.index]

    def __repr__(self) -> str:
        from .printing import format_graph

        return format_graph(self)

    # Jupyter shows a graph as its picture, or its text without Graphviz (notebook.py).
    def _repr_mimebundle_(self, include: object = None, exclude: object = None, **kwargs: object) -> dict[str, str]:
        from .notebook import mimebundle

        return mimebundle(self, include, exclude)

    def _repr_svg_(self) -> str | None:
        from .notebook import svg

        return svg(self)


# --- shared nodes -------------------------------------------------------------------------
#
# Running the same code again records the same nodes: the same operation on
# the same references and constants, at the same position and source line.
# Nodes are immutable values, so the graphs of every such trace can share one
# node object, made (and its structure key worked out, see plan.py) once.
# Only nodes that hold nothing large are shared: plain operations on
# references and atoms, and calls of functions that hold nothing.

_NODES: dict[tuple[object, ...], Node] = {}
_NODES_KEPT = 50_000
_PLAIN_OPS = frozenset({ModuleGet, ModuleSet, ModuleAttr, ApplyModule, CallMethod, GetAttr, SetAttr, Save, Stop, Grad, SetGrad, Bridge, IterItem, Export})


def _intern_key(index: int, op: Op, args: Sequence[object], invoke: int | None, source: SourceLoc | None) -> tuple[object, ...] | None:
    """What makes a node the same value *and* the same source line, when it
    holds nothing large (else ``None``: the node is made afresh)."""
    kind = type(op)
    if untrusted(op):
        return None  # read from a document: never shared (guard.py)
    if kind is Call:
        if not shareable(op.fn):  # type: ignore[union-attr]  # a Call
            return None
    elif kind not in _PLAIN_OPS:
        return None  # (an op with a body: keyed by a whole graph)
    parts: list[object] = [index, op, invoke, source]
    for arg in args:
        arg_kind = type(arg)
        if arg_kind is Ref:
            parts.append(-1 - arg.index)  # type: ignore[attr-defined]  # a Ref
        elif arg_kind is float:
            parts.append(arg.hex())  # type: ignore[attr-defined]  # exact: -0.0 is not 0.0, 1.0 is not 1
        elif arg_kind in _EXACT_ATOMS:
            parts.append((arg_kind, arg))
        else:
            return None
    return tuple(parts)


_EXACT_ATOMS = ATOMS - {float, complex}  # (float keyed above; complex's -0.0 parts are rare)


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
