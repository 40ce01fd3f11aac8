"""Compiling a graph into a plan: what the interpreter needs, computed once.

A `Plan` says, for every node, how to run it (a `Step`, steps.py), which
hook event it waits for, which values it uses (so values die after their
last use), and which writes must run inside a particular hook (the
out-of-order guard). It splits the steps into *programs*, one per invoke
(and one for the nodes outside any invoke, one per gradient hook), in the
order the programs began in the code, records the cross-invoke waits that
keep accesses of one module call in text order, and lists the hook sites
the run must install, including those of the condition and loop bodies
nested in it (each body has a plan of its own).

A plan is built in two passes: the analysis computes every fact about every
node first (its program, its body's plan, the body values later nodes read,
what it reads and writes, what it must run after), and only then are the
steps made, each once, complete and frozen. A plan holds no mutable
container and no graph object, so it can be shared: plans depend only on the
graph's structure, never on the model, the inputs or the values of tensor
constants, and `plan_for` keeps them per structure (plan_cache.py), so
replaying a graph, or tracing the same code again, pays no planning.

Pure: building a plan reads the graph and nothing else.
"""

from __future__ import annotations

from typing import Sequence, TypedDict

import attrs
from pyrsistent import pmap

from .arguments import Ref, refs_in
from .effects import aliases_argument, writes_in_place
from .evaluate import computer, resolver
from .events import (
    END_KEY,
    EndProgram,
    Event,
    EventKey,
    GradKey,
    GradProgram,
    ProgramKey,
    Site,
    in_scope,
    is_pseudo,
    operation_of,
    site_of,
)
from .graph import Graph, GraphError, Node, check_graph, node_refs, saved_refs, use_counts
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
    Result,
    Save,
    SetAttr,
    SetGrad,
    Skip,
    Stop,
    TraceRun,
)
from .plan_cache import cached_plan
from .steps import (
    NO_STOPS,
    BridgeStep,
    CacheStep,
    ComputeStep,
    CondStep,
    EachCallStep,
    ExportStep,
    GradHookStep,
    GradStep,
    Guard,
    IterateStep,
    IterItemStep,
    ModuleGetStep,
    ModuleSetStep,
    Plan,
    SaveStep,
    SetGradStep,
    Step,
    StopStep,
    TraceRunStep,
    WaitEvent,
    WaitStep,
    WaitValue,
)


def plan_for(graph: Graph) -> Plan:
    """The plan of ``graph``, compiled once per graph structure (plan_cache.py)."""
    memo = graph._plan  # (a replay finds it here: no call further)
    if memo is not None:
        return memo  # type: ignore[return-value]  # only plans are stored there
    return cached_plan(graph, compile_plan)


# --- what a write can touch ----------------------------------------------------------

# Which ops write in place or alias an argument: effects.py.


def _aliased_access(graph: Graph, ref: Ref) -> Node | None:
    """The module access (or gradient) whose value ``ref``'s value is (a view of), if any."""
    target = graph.nodes[ref.index]
    while True:
        if isinstance(target.op, (ModuleGet, Grad)):
            return target
        if not aliases_argument(target) or not target.args or type(target.args[0]) is not Ref:
            return None
        target = graph.nodes[target.args[0].index]


def _event_of(access: Node) -> Event:
    """The hook event whose value a module access (or gradient) reads."""
    op = access.op
    if isinstance(op, ModuleGet):
        return (op.path, site_of(op.kind), op.call)
    return GradKey(access.ref.index)


def written_access(graph: Graph, node: Node) -> Node | None:
    """The module access (or gradient) whose value an in-place node writes into, if any."""
    if not node.args or type(node.args[0]) is not Ref:
        return None
    return _aliased_access(graph, node.args[0])


# --- the analysis -------------------------------------------------------------------


def _programs_of(graph: Graph) -> list[ProgramKey]:
    """Each node's program: its invoke's, or, for a node computed from a
    gradient, that of the gradient node it depends on (the latest one); a
    `Cache` and what is computed from it run in a program of their own
    (`EndProgram`: it waits for the end of the run, its invoke goes on)."""
    source_of: list[tuple[int, ProgramKey] | None] = []
    programs: list[ProgramKey] = []
    for node in graph.nodes:
        op = node.op
        source: tuple[int, ProgramKey] | None
        if isinstance(op, (Grad, SetGrad)):
            source = (node.ref.index, GradProgram(node.ref.index))
        elif isinstance(op, Cache):
            source = (node.ref.index, EndProgram(node.ref.index))
        else:
            sources = [source_of[ref.index] for ref in node_refs(node)]
            source = max((s for s in sources if s is not None), default=None, key=lambda s: s[0])
        source_of.append(source)
        programs.append(node.invoke if source is None else source[1])
    return programs


def _event_key(node: Node) -> Event | None:
    """The hook event a node waits for (a module access's call, a gradient's hook)."""
    op = node.op
    if isinstance(op, (ModuleGet, ModuleSet)):
        return (op.path, site_of(op.kind), op.call)
    if isinstance(op, (Grad, SetGrad)):
        return GradKey(node.ref.index)
    if isinstance(op, Skip):
        return (op.path, "pre", op.call)  # handed over before the forward runs
    if isinstance(op, (Result, Cache)):
        return END_KEY
    return None


def _body_plan(node: Node) -> Plan | None:
    op = node.op
    return plan_for(op.body) if isinstance(op, (Cond, Iterate, EachCall)) else None


def _reads(graph: Graph, node: Node) -> tuple[Event, ...]:
    """The events whose values (or views of them) an ordinary node uses."""
    reads = set()
    for ref in node_refs(node):
        access = _aliased_access(graph, ref)
        if access is not None:
            reads.add(_event_of(access))
    return tuple(sorted(reads, key=_sort_key))


def _sort_key(key: Event) -> tuple[object, ...]:
    return (1, key.node) if isinstance(key, GradKey) else (0, *key)


def _guard(graph: Graph, node: Node) -> Guard | None:
    """The event an in-place node must run in: the one whose value it writes into."""
    if not writes_in_place(node):
        return None
    access = written_access(graph, node)
    return None if access is None else Guard(_event_of(access), access.ref.index)


def _accesses(
    node: Node, key: Event | None, reads: tuple[Event, ...], guard: Guard | None, body: Plan | None
) -> list[tuple[Event, bool]]:
    """The events a node reads or writes, each with whether it writes.

    A node reads a call when it accesses it, or when it uses a value that is
    (a view of) that call's value; it writes a call when it sets it, or
    writes in place into such a value. A condition or loop touches what its
    body touches (a loop over calls shifts its body's calls: not static).
    """
    found = [(each, False) for each in reads]
    op = node.op
    if key is not None:
        found.append((key, isinstance(op, (ModuleSet, SetGrad, Skip))))
    elif guard is not None:
        found.append((guard.key, True))
    elif body is not None and not isinstance(op, EachCall):
        found.extend(body.touches)
    return found


def _order_accesses_across_invokes(
    accesses: Sequence[list[tuple[Event, bool]]], program_of: Sequence[ProgramKey]
) -> list[tuple[int, ...]]:
    """Per node, the nodes it must run after: accesses of one module call from
    different invokes keep the order they were written in. A write waits for
    the reads and writes written before it; a read waits for the writes before it."""
    seen: dict[Event, list[tuple[int, bool]]] = {}
    result = []
    for index, found in enumerate(accesses):
        after: set[int] = set()
        for key, writes in found:
            earlier = seen.setdefault(key, [])
            after.update(
                other for other, other_writes in earlier
                if program_of[other] != program_of[index] and (writes or other_writes)
            )
            earlier.append((index, writes))
        result.append(tuple(sorted(after)))
    return result


def _stop_calls(graph: Graph, node: Node) -> tuple[EventKey, ...] | None:
    """The module calls a stop's value is computed from, when it is computed
    only from module accesses (and constants and plain operations on them);
    otherwise ``None`` (the stop runs where its program reaches it)."""
    calls: set[EventKey] = set()
    seen: set[int] = set()
    pending = [ref.index for ref in node_refs(node)]
    while pending:
        index = pending.pop()
        if index in seen:
            continue
        seen.add(index)
        source = graph.nodes[index]
        op = source.op
        if isinstance(op, ModuleGet):
            calls.add((op.path, site_of(op.kind), op.call))
        elif isinstance(op, (Call, CallMethod, GetAttr, ModuleAttr, Bridge)):
            pending.extend(ref.index for ref in node_refs(source))
        else:
            return None  # a gradient, a body's value, ...: only its program knows when
    return tuple(sorted(calls)) if calls else None


def touches_scope(plan: Plan, scope: tuple[str, ...]) -> bool:
    """Whether a body (its plan) reads or writes a call of a module in ``scope``."""
    return any(not isinstance(key, GradKey) and in_scope(key[0], scope) for key in plan.event_keys) or any(
        in_scope(path, scope) for path, _ in plan.dynamic_sites
    )


def _per_call_part(body: Graph, plan: Plan, scope: tuple[str, ...]) -> tuple[tuple[Step, ...], frozenset[int]]:
    """Split a loop over calls' body: the steps that run at every call (they
    access a module in ``scope``, or use a value that does, or hold a body
    that does), and the values of the other steps that those use or save.

    The other steps run once, in the first iteration: a value that does not
    depend on the scope's calls is the same at every call (nnsight 0.4's
    rule: ``.all()`` only applies to the module and those below it, so an
    append of another module's value appends once).
    """
    per_call = [False] * len(plan.steps)
    for node, step in zip(body.nodes, plan.steps):
        if isinstance(step, (ModuleGetStep, ModuleSetStep)):
            again = in_scope(step.key[0], scope)
        elif isinstance(step, (CondStep, IterateStep, EachCallStep)):
            again = touches_scope(step.body, scope)
        else:
            again = False
        per_call[step.index] = again or any(per_call[ref.index] for ref in node_refs(node))
    carry = {
        ref.index
        for node in body.nodes
        if per_call[node.ref.index]
        for ref in node_refs(node)
        if not per_call[ref.index]
    }
    carry.update(index for index in plan.saved if not per_call[index])
    return tuple(step for step in plan.steps if per_call[step.index]), frozenset(carry)


@attrs.frozen
class _Facts:
    """What the analysis found about one node (the first pass)."""

    used: tuple[int, ...]  # the values the node's own step uses
    hook_used: tuple[int, ...]  # for a gradient node: the values its hook step uses (the tensor)
    key: Event | None
    body: Plan | None
    reads: tuple[Event, ...]
    guard: Guard | None


def _facts(graph: Graph, node: Node) -> _Facts:
    used = tuple(sorted({ref.index for ref in node_refs(node)}))
    hook_used: tuple[int, ...] = ()
    if isinstance(node.op, (Grad, SetGrad)):
        # The tensor is used where the hook is put; the new gradient (SetGrad) where the hook fires.
        hook_used = _uses_in(node.args[:1])
        used = _uses_in(node.args[1:])
    ordinary = isinstance(node.op, (Call, CallMethod, GetAttr, SetAttr, ModuleAttr, ApplyModule))
    return _Facts(
        used=used,
        hook_used=hook_used,
        key=_event_key(node),
        body=_body_plan(node),
        reads=_reads(graph, node) if ordinary else (),
        guard=_guard(graph, node) if ordinary else None,
    )


def _uses_in(arguments: Sequence[object]) -> tuple[int, ...]:
    return tuple(sorted({ref.index for arg in arguments for ref in refs_in(arg)}))


def compile_plan(graph: Graph) -> Plan:
    """Compile ``graph`` into a `Plan` (pure; prefer the cached `plan_for`)."""
    check_graph(graph)
    saved = saved_refs(graph)
    uses = use_counts(graph)
    program_of = _programs_of(graph)
    nodes = graph.nodes

    # First pass: every fact about every node.
    facts = [_facts(graph, node) for node in nodes]
    exports: dict[int, set[int]] = {}
    for node in nodes:
        if isinstance(node.op, Export):
            source = node.args[0]
            assert type(source) is Ref, "an export's argument is its context node"
            exports.setdefault(source.index, set()).add(node.op.index)
    accesses = [_accesses(node, fact.key, fact.reads, fact.guard, fact.body) for node, fact in zip(nodes, facts)]
    after = _order_accesses_across_invokes(accesses, program_of)
    readers: dict[Event, int] = {}
    kept_to_end: set[Event] = set()
    sites: set[tuple[str, Site]] = set()
    operation_sites: set[tuple[str, Site]] = set()
    skipped: set[str] = set()
    caches: list[tuple[int, Cache]] = []
    dynamic: set[tuple[str, Site]] = set()
    stops: dict[EventKey, list[tuple[int, tuple[EventKey, ...]]]] = {}
    for node, fact in zip(nodes, facts):
        key = fact.key
        if key is not None:
            readers[key] = readers.get(key, 0) + 1
            if not isinstance(key, GradKey):
                _add_site(key[0], key[1], sites, operation_sites)
        op = node.op
        if isinstance(op, Skip):
            skipped.add(op.path)
        elif isinstance(op, Cache):
            caches.append((node.ref.index, op))
        body = fact.body
        if body is not None:
            if body.caches:
                raise GraphError(
                    "tracer.cache(...) records the whole run: call it in the trace or an invoke, "
                    "not inside a condition or a loop"
                )
            operation_sites.update(body.operation_sites)
            skipped.update(body.skipped)
            # A loop reads its body's module calls again at every iteration; a
            # loop over calls reads a different call of its scope's modules.
            again = isinstance(node.op, (Iterate, EachCall))
            scope = node.op.scope if isinstance(node.op, EachCall) else None
            for key, count in body.readers + tuple((each, 0) for each in body.kept_to_end):
                if scope is not None and not isinstance(key, GradKey) and in_scope(key[0], scope):
                    dynamic.add((key[0], key[1]))
                elif again or key in body.kept_to_end:
                    kept_to_end.add(key)
                else:
                    readers[key] = readers.get(key, 0) + count
            sites.update(body.hook_sites)
            dynamic.update(body.dynamic_sites)
        derived = _stop_calls(graph, node) if isinstance(node.op, Stop) else None
        if derived is not None:
            for call_key in derived:
                stops.setdefault(call_key, []).append((node.ref.index, derived))

    # Second pass: the steps, each made once, complete.
    def common(index: int, used: tuple[int, ...], program: ProgramKey, after: tuple[int, ...], unused: bool) -> _Common:
        return _Common(
            index=index,
            release=tuple(each for each in used if each not in saved),
            foreign=tuple(WaitValue(each, index) for each in used if program_of[each] != program),
            after=tuple(WaitStep(each, index) for each in after),
            unused=unused,
        )

    steps: list[Step] = []
    programs: dict[ProgramKey, list[Step]] = {}
    for node, fact in zip(nodes, facts):
        index = node.ref.index
        program = program_of[index]
        if isinstance(node.op, (Grad, SetGrad)):
            # The hook goes on where the node is written: in its invoke's program.
            hook_fields = common(index, fact.hook_used, node.invoke, (), False)
            hook = GradHookStep(key=GradKey(index), resolve=resolver(node), **hook_fields)
            programs.setdefault(node.invoke, []).append(hook)
        unused = uses[index] == 0 and index not in saved
        fields = common(index, fact.used, program, after[index], unused)
        step = _step(node, fact, frozenset(exports.get(index, ())), fields)
        steps.append(step)
        programs.setdefault(program, []).append(step)
    writes = frozenset(
        index for index, fact in enumerate(facts)
        if isinstance(nodes[index].op, (ModuleSet, SetGrad, Skip)) or fact.guard is not None
    )
    return Plan(
        steps=tuple(steps),
        # Programs resume in the order they began in the code (dicts keep insertion order).
        programs=tuple((key, tuple(program)) for key, program in programs.items()),
        program_of=tuple(program_of),
        uses=tuple(uses),
        saved=saved,
        event_keys=frozenset(readers) | frozenset(kept_to_end),
        readers=tuple((key, count) for key, count in readers.items() if key not in kept_to_end),
        kept_to_end=frozenset(kept_to_end),
        hook_sites=tuple(sorted(sites)),
        dynamic_sites=frozenset(dynamic),
        writes=writes,
        touches=frozenset(access for found in accesses for access in found),
        stops=pmap({key: tuple(found) for key, found in stops.items()}) if stops else NO_STOPS,
        operation_sites=tuple(sorted(operation_sites)),
        skipped=frozenset(skipped),
        caches=tuple(caches),
    )


def _add_site(path: str, site: Site, sites: set[tuple[str, Site]], operation_sites: set[tuple[str, Site]]) -> None:
    """File a hook site: a real module's, an operation's inside a forward, or
    none (the end of the run is fed by the run itself)."""
    if not is_pseudo(path):
        sites.add((path, site))
    elif operation_of(path) is not None:
        operation_sites.add((path, site))


class _Common(TypedDict):
    """The fields every step has (steps.py)."""

    index: int
    release: tuple[int, ...]
    foreign: tuple[WaitValue, ...]
    after: tuple[WaitStep, ...]
    unused: bool


def _step(node: Node, fact: _Facts, exports: frozenset[int], kw: _Common) -> Step:
    """The step of ``node``, from the facts the analysis found (``kw``: the fields every step has)."""
    body = fact.body
    match node.op:
        case ModuleGet(path, kind, call):
            call_key: EventKey = (path, site_of(kind), call)
            return ModuleGetStep(key=call_key, wait=WaitEvent(call_key, node.ref.index), kind=kind,
                                 invoke=node.invoke, **kw)
        case ModuleSet(path, kind, call):
            call_key = (path, site_of(kind), call)
            return ModuleSetStep(key=call_key, wait=WaitEvent(call_key, node.ref.index), kind=kind,
                                 invoke=node.invoke, resolve=resolver(node), **kw)
        case Skip(path, call):
            call_key = (path, "pre", call)
            return ModuleSetStep(key=call_key, wait=WaitEvent(call_key, node.ref.index), kind="skip",
                                 invoke=node.invoke, resolve=resolver(node), **kw)
        case Result():
            return ModuleGetStep(key=END_KEY, wait=WaitEvent(END_KEY, node.ref.index), kind="output",
                                 invoke=node.invoke, **kw)
        case Cache():
            return CacheStep(wait=WaitEvent(END_KEY, node.ref.index, True), op=node.op, invoke=node.invoke, **kw)
        case Grad():
            grad = GradKey(node.ref.index)
            return GradStep(key=grad, wait=WaitEvent(grad, node.ref.index), **kw)
        case SetGrad():
            grad = GradKey(node.ref.index)
            return SetGradStep(key=grad, wait=WaitEvent(grad, node.ref.index), resolve=resolver(node), **kw)
        case Save():
            return SaveStep(**kw)
        case Stop():
            return StopStep(**kw)
        case Bridge(slot):
            return BridgeStep(slot=slot, **kw)
        case IterItem():
            return IterItemStep(**kw)
        case Export(inner):
            return ExportStep(inner=inner, resolve=resolver(node), **kw)
        case Cond():
            assert body is not None
            return CondStep(resolve=resolver(node), body=body, exports=exports, **kw)
        case Iterate():
            assert body is not None
            return IterateStep(resolve=resolver(node), body=body, exports=exports, **kw)
        case EachCall(body_graph, scope=scope):
            assert body is not None
            again, carry = _per_call_part(body_graph, body, scope)
            # The first iteration up to the last step that later ones repeat; the rest beside them.
            cut = again[-1].index + 1 if again else 0
            return EachCallStep(
                resolve=resolver(node), body=body, exports=exports, again=again,
                again_nodes=frozenset(each.index for each in again), carry=carry,
                head=tuple(each for each in body.steps if each.index < cut),
                tail=tuple(each for each in body.steps if each.index >= cut),
                **kw,
            )
        case TraceRun():
            # A trace is its own run (with its own hooks): its plan is made then.
            return TraceRunStep(resolve=resolver(node), exports=exports, **kw)
        case Call() | CallMethod() | GetAttr() | SetAttr() | ModuleAttr() | ApplyModule():
            return ComputeStep(compute=computer(node), guard=fact.guard, reads=fact.reads, **kw)
