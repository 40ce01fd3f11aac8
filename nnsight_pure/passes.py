"""Pure passes over graphs: composition and pruning.

Each takes graph values and returns a new one; none runs anything. They keep
the graph invariants (`check_graph`): nodes in program order, each referring
only to earlier ones, bodies with their own numbering. What an op does (reads
a model, holds a body, has an effect) is asked of `effects`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import attrs

from .arguments import DictConst, Ref, map_refs, refs_in
from .effects import is_pure as is_pure
from .graph import Graph, GraphError, Node, node_refs
from .ops import (
    CONTEXT_OPS,
    TRACE_OPS,
    ApplyModule,
    Bridge,
    Cond,
    EachCall,
    Export,
    Iterate,
    ModuleAttr,
    ModuleGet,
    ModuleSet,
    Op,
    TraceRun,
)
from .printing import format_node
from .source import short

# --- what a graph is ------------------------------------------------------------------


def graph_kind(graph: Graph) -> str | None:
    """``"session"`` (it runs traces, maybe inside its loops and conditions),
    ``"trace"`` (it reads or writes a model), or ``None`` (neither: plain
    computation, or empty)."""
    kinds = _kinds(graph)
    return "session" if "session" in kinds else "trace" if "trace" in kinds else None


def _kinds(graph: Graph) -> set[str]:
    found: set[str] = set()
    for node in graph.nodes:
        op = node.op
        if isinstance(op, TraceRun):
            found.add("session")
        elif isinstance(op, TRACE_OPS):
            found.add("trace")
        if isinstance(op, (Cond, Iterate)):
            found |= _kinds(op.body)
    return found


def invoke_count(graph: Graph) -> int:
    """How many invokes a trace graph's nodes use (``1 + `` the largest index)."""
    return 1 + max((node.invoke for node in graph.nodes if node.invoke is not None), default=-1)


def check_standalone(graph: Graph, what: str) -> None:
    """Refuse a graph that only makes sense inside another: the body of a
    trace of a session, whose `Bridge` nodes read values of that session."""
    for node in graph.nodes:
        if isinstance(node.op, Bridge):
            raise GraphError(
                f"{what}: `{format_node(node)}` (made at {short(node.source)}) reads a value "
                "from an enclosing session, so this graph is the body of a session's trace and "
                "cannot stand alone; use the session's graph"
            )


def module_paths(graph: Graph) -> Iterator[tuple[str, Node]]:
    """Every module path the graph (bodies included) names, with its node."""
    for node in graph.nodes:
        op = node.op
        if isinstance(op, (ModuleGet, ModuleSet, ModuleAttr, ApplyModule)):
            yield op.path, node
        elif isinstance(op, EachCall):
            for path in op.scope:
                yield path, node
        if isinstance(op, CONTEXT_OPS):
            yield from module_paths(op.body)


# --- composition ----------------------------------------------------------------------


def _copy(graph: Graph, node: Node, renumber: Callable[[Ref], Ref], op: Op | None = None) -> tuple[Graph, Ref]:
    """``graph`` with ``node`` appended, its refs renumbered (and its op
    replaced by ``op``, if given)."""
    return graph.add(
        node.op if op is None else op,
        tuple(map_refs(arg, renumber) for arg in node.args),
        {name: map_refs(value, renumber) for name, value in node.kwargs.items()},
        node.source,
        node.invoke,
    )


def _append(graph: Graph, nodes: Iterable[Node], offset: int) -> Graph:
    """``graph`` followed by ``nodes``, their refs moved up by ``offset``."""

    def shift(ref: Ref) -> Ref:
        return Ref(ref.index + offset)

    for node in nodes:
        graph, _ = _copy(graph, node, shift)
    return graph


def _merge_outputs(first: object, second: object) -> object:
    if first is None:
        return second
    if second is None:
        return first
    if type(first) is DictConst and type(second) is DictConst:
        keys = [key for key, _ in first.items]
        clash = [key for key, _ in second.items if key in keys]
        if clash:
            raise ValueError(f"compose: both graphs name the output(s) {clash!r}; rename one")
        return DictConst(first.items + second.items)
    return (first, second)


def compose(first: Graph, second: Graph) -> Graph:
    """One graph that runs ``first``'s nodes, then ``second``'s, in the same run.

    This is exactly what writing both in one trace does: same invokes, same
    program order (so ``second``'s writes must come after ``first``'s reads
    in the model, as in one trace). Outputs merge: two dicts into one dict
    (names must differ), otherwise ``(first's, second's)``; a graph without
    outputs adds none. Both must be trace graphs, or both session graphs.
    """
    check_standalone(first, "compose")
    check_standalone(second, "compose")
    kinds = {graph_kind(first), graph_kind(second)} - {None}
    if len(kinds) > 1:
        raise GraphError("compose: a session's graph and a trace's graph cannot be composed")
    offset = len(first)
    merged = _append(first, second.nodes, offset)
    outputs = map_refs(second.outputs, lambda ref: Ref(ref.index + offset))
    return merged.with_outputs(_merge_outputs(first.outputs, outputs))


def as_edit(graph: Graph) -> Graph:
    """``graph`` made into edits: every node outside any invoke (so it applies
    to every row of every later batch), no outputs. A graph of several invokes
    cannot be one edit."""
    check_standalone(graph, "edit")
    if graph_kind(graph) == "session":
        raise GraphError("a session's graph cannot be an edit: edits are trace graphs")
    if invoke_count(graph) > 1:
        raise GraphError(
            f"this graph has {invoke_count(graph)} invokes; an edit applies to every row, so it "
            "must be written in one invoke (or none)"
        )
    return Graph(attrs.evolve(node, invoke=None) for node in graph.nodes)


# --- pruning --------------------------------------------------------------------------

def prune(graph: Graph) -> Graph:
    """``graph`` without the nodes that reach no output, save or effect.

    Kept: saves, outputs, writes (module values, attributes, items,
    gradients), stops, ad-hoc module calls, traces of a session, calls not
    known to be pure (see `effects.is_pure`), and everything those use. Bodies are
    pruned too; a condition or loop left with nothing to do goes. Values of
    a run never change; a dropped read of a module that is never called no
    longer holds up the nodes after it, so a pruned graph can only complete
    more, never differ.
    """
    return _prune(graph, frozenset())[0]



def _prune(graph: Graph, keep: frozenset[int]) -> tuple[Graph, dict[int, int]]:
    """Prune ``graph`` keeping also the nodes in ``keep`` (read by the parent's
    exports); returns the new graph and the old-to-new index of kept nodes."""
    nodes = graph.nodes
    live = set(keep) | {ref.index for ref in refs_in(graph.outputs)}
    exported: dict[int, set[int]] = {}  # context node -> inner nodes its live exports read
    bodies: dict[int, tuple[Graph, dict[int, int]]] = {}
    for node in reversed(nodes):
        index = node.ref.index
        op = node.op
        if isinstance(op, CONTEXT_OPS):
            body, inner = _prune(op.body, frozenset(exported.get(index, ())))
            bodies[index] = (body, inner)
            if len(body) or isinstance(op, TraceRun) or index in live:
                live.add(index)
        elif index in live or not is_pure(node):
            live.add(index)
        if index not in live:
            continue
        if isinstance(op, Export):
            context = node.args[0]
            assert type(context) is Ref
            exported.setdefault(context.index, set()).add(op.index)
        live.update(ref.index for ref in node_refs(node))

    mapping: dict[int, int] = {}

    def renumber(ref: Ref) -> Ref:
        return Ref(mapping[ref.index])

    pruned = Graph()
    for node in nodes:
        index = node.ref.index
        if index not in live:
            continue
        new_op = node.op
        if isinstance(new_op, CONTEXT_OPS):
            new_op = attrs.evolve(new_op, body=bodies[index][0])
        elif isinstance(new_op, Export):
            context = node.args[0]
            assert type(context) is Ref
            new_op = Export(bodies[context.index][1][new_op.index])
        pruned, ref = _copy(pruned, node, renumber, new_op)
        mapping[index] = ref.index
    return pruned.with_outputs(map_refs(graph.outputs, renumber)), mapping

