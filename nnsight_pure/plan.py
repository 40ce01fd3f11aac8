"""Compiling a graph into a plan: what the interpreter needs, computed once.

A `Plan` says, for every node, how to run it (a `Step`), which hook event it
waits for, which values it uses (so values die after their last use), and
which writes must run inside a particular hook (the out-of-order guard). It
splits the steps into *programs*, one per invoke (and one for the nodes
outside any invoke), in the order the programs began in the code, records
the cross-invoke waits that keep accesses of one module call in text order,
and lists the hook sites the run must install, including those of the
condition and loop bodies nested in it (each body has a plan of its own).
Plans depend only on the graph's structure, never on the model, the inputs
or the values of tensor constants, and are cached per structure (see
`plan_for`), so replaying a graph, or tracing the same code again, pays no
planning.

Pure: building a plan reads the graph and nothing else.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from typing import Any, Callable, Literal, Sequence, Union

import attrs

from .arguments import (
    ATOMS,
    DictConst,
    ListConst,
    Ref,
    SliceConst,
    TensorConst,
    TupleOf,
    is_plain_constant,
    refs_in,
    structural_key,
    thaw,
)
from .graph import _NO_KWARGS, Graph, Node, check_graph, node_refs, saved_refs, use_counts
from .guard import describe_op, guarded, untrusted
from .ops import (
    AccessKind,
    ApplyModule,
    Bridge,
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
    Save,
    SetAttr,
    SetGrad,
    Stop,
    TraceRun,
)
from .shareable import shareable

Site = Literal["pre", "post", "grad"]
"""Which hook an event comes from: a module call's ``pre`` (inputs) or
``post`` (output) hook, or a gradient's tensor hook (``grad``)."""

EventKey = tuple[str, Site, int]
"""One hook event of a run: (module path, site, call index), or, for a
gradient, ``("", "grad", node)``: the hook of that `Grad`/`SetGrad` node."""

ProgramKey = Union[int, None, tuple[str, int]]
"""Which program a step belongs to: an invoke (``None``: outside invokes), or
``("grad", node)``: what runs when that node's gradient hook fires."""


def grad_key(index: int) -> EventKey:
    """The event of the gradient hook of node ``index``."""
    return ("", "grad", index)


def in_scope(path: str, scope: tuple[str, ...]) -> bool:
    """Whether module ``path`` is one of the ``scope`` modules or below one."""
    return any(not prefix or path == prefix or path.startswith(prefix + ".") for prefix in scope)


def site_of(kind: AccessKind) -> Site:
    """The hook that carries a module value: inputs before the call, output after."""
    return "post" if kind == "output" else "pre"


# Step kinds: the interpreter dispatches on these small ints in its hot loop.
# HOOK puts a gradient hook on a tensor (for the GRAD or SETGRAD step of the
# same node, which runs when the hook fires).
EXEC, GET, SET, SAVE, STOP, BRIDGE, ITEM, EXPORT, COND, ITER, TRACE, GRAD, SETGRAD, HOOK, CALLS = range(15)

KEEP_UNTIL_THE_END = 1 << 30
"""Reader count for module calls read inside a loop body: every iteration
reads them again, so a run keeps their values until it ends."""

Resolver = Callable[[list[Any], Any], tuple[tuple[Any, ...], dict[str, Any]]]
"""``resolve(env, nodes)``: a node's (args, kwargs) from the run's environment
and the run's graph nodes (read only for constants a plan may not hold)."""


class Step:
    """How to run one node (plain slotted class: it sits in the hot loop).

    ``release`` are the unsaved values it uses (each loses one use when the
    step runs); ``foreign`` are the values it uses that another invoke's
    program computes (it waits for them); ``after`` are the accesses of other
    invokes to the same module call that are written before it and must run
    first; ``guard`` is the module call a write must happen in, with the
    access it writes through (its index). Context steps (condition, loop,
    trace) carry their body's plan in ``body`` and, in ``exports``, the body
    nodes whose values later nodes read; ``param`` is a bridge's slot or an
    export's index. A step holds no graph object: a plan is shared by every
    graph of the same structure (see `plan_for`), and the run reads what
    varies (tensor constants, source lines, bodies) from its own graph.
    """

    __slots__ = ("index", "code", "key", "kind", "invoke", "run", "resolve", "direct", "release",
                 "foreign", "after", "unused", "guard", "reads", "body", "exports", "param", "program",
                 "again", "carry")

    def __init__(
        self,
        index: int,
        code: int,
        resolve: Resolver,
        *,
        key: EventKey | None = None,
        kind: AccessKind = "output",
        invoke: int | None = None,
        run: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any] | None = None,
        body: Plan | None = None,
        param: int = 0,
    ) -> None:
        self.index = index
        self.code = code
        self.resolve = resolve
        self.direct: Callable[[list[Any]], Any] | None = None  # a plain call, straight from the environment
        self.key = key
        self.kind = kind
        self.invoke = invoke
        self.run = run
        self.body = body
        self.param = param
        self.release: tuple[int, ...] = ()
        self.foreign: tuple[int, ...] = ()
        self.after: tuple[int, ...] = ()
        self.reads: tuple[EventKey, ...] = ()
        self.exports: frozenset[int] = frozenset()
        self.unused = False
        self.guard: tuple[EventKey, int] | None = None
        self.program: ProgramKey = invoke
        # A loop over calls (CALLS): the body steps that run again at every call
        # after the first (those that touch the scope's calls), and the values of
        # the others that they use (computed once, in the first iteration).
        self.again: tuple[Step, ...] = ()
        self.carry: frozenset[int] = frozenset()


@attrs.frozen(eq=False)
class Plan:
    """Everything the interpreter needs to run one graph (see module docstring).

    ``readers`` counts, per module call, the steps (here and in nested
    condition and loop bodies) that read or write it; ``dynamic_sites`` are
    the module hooks whose call index is only known at run time (accesses
    inside a loop over calls, `EachCall`); ``touches`` lists the module calls
    the graph reads or writes, each with whether it writes. ``stops`` maps a
    module call to the stops that take effect there: ``.stop()`` of a value
    computed from module accesses, as ``(stop node, every call it derives
    from)`` (it fires once all of them have happened, whatever its program
    is waiting for).
    """

    steps: tuple[Step, ...]
    programs: tuple[tuple[ProgramKey, tuple[Step, ...]], ...]
    program_of: tuple[ProgramKey, ...]
    uses: tuple[int, ...]
    saved: frozenset[int]
    event_keys: frozenset[EventKey]
    readers: dict[EventKey, int]
    hook_sites: tuple[tuple[str, Site], ...]
    dynamic_sites: frozenset[tuple[str, Site]]
    writes: frozenset[int]
    touches: frozenset[tuple[EventKey, bool]]
    stops: dict[EventKey, tuple[tuple[int, tuple[EventKey, ...]], ...]] = attrs.field(factory=dict)


# --- resolving arguments -------------------------------------------------------------


def _resolver(node: Node) -> Resolver:
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

    def generic(env: list[Any], nodes: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        own = nodes[index]
        kwargs = own.kwargs
        return (
            tuple(thaw(arg, env) for arg in own.args),
            {name: thaw(kwargs[name], env) for name in names},
        )

    return generic


# --- what a write can touch ----------------------------------------------------------

_INPLACE_FUNCTIONS = frozenset(
    {
        operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
        operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
        operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    }
)
_NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "register_hook"})

# Tensor methods whose result shares storage with their receiver: writing into
# the result writes into the module's value.
_VIEW_METHODS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "narrow", "select", "squeeze", "unsqueeze",
        "transpose", "t", "permute", "expand", "expand_as", "flatten", "unflatten", "detach",
        "as_strided", "diagonal", "movedim", "swapaxes", "swapdims", "unfold", "split", "chunk",
        "unbind", "tensor_split", "contiguous", "__getitem__", "real", "imag", "view_as_real",
        "T", "mT", "H", "mH", "data",
    }
)


def is_inplace(node: Node) -> bool:
    """True when running the node writes into its first argument."""
    op = node.op
    if isinstance(op, SetAttr):
        return True
    if isinstance(op, Call):
        if op.fn in _INPLACE_FUNCTIONS:
            return True
        name = op.name
        return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES
    if isinstance(op, CallMethod):
        name = op.name
        return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES
    return False


def _aliases_argument(node: Node) -> bool:
    """True when the node's value may share storage with its first argument."""
    op = node.op
    if isinstance(op, GetAttr):
        return True
    if isinstance(op, CallMethod):
        return op.name in _VIEW_METHODS
    if isinstance(op, Call):
        return op.fn is operator.getitem or op.name in _VIEW_METHODS
    return False


def _aliased_access(graph: Graph, ref: Ref) -> Node | None:
    """The module access (or gradient) whose value ``ref``'s value is (a view of), if any."""
    target = graph.nodes[ref.index]
    while True:
        if isinstance(target.op, (ModuleGet, Grad)):
            return target
        if not _aliases_argument(target) or not target.args or type(target.args[0]) is not Ref:
            return None
        target = graph.nodes[target.args[0].index]


def _event_of(access: Node) -> EventKey:
    """The hook event whose value a module access (or gradient) reads."""
    op = access.op
    if isinstance(op, ModuleGet):
        return (op.path, site_of(op.kind), op.call)
    return grad_key(access.ref.index)


def _written_access(graph: Graph, node: Node) -> Node | None:
    """The module access (or gradient) whose value an in-place node writes into, if any."""
    if not node.args or type(node.args[0]) is not Ref:
        return None
    return _aliased_access(graph, node.args[0])


# --- building steps ------------------------------------------------------------------


def op_function(op: Op) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]:
    """How an ordinary node computes its value from (run state, args, kwargs).

    The run state is only read by module ops; the shell also uses this to
    compute on finished values after a trace (with no run state). An op read
    from a document runs under the guard (guard.py)."""
    run = _op_function(op)
    if untrusted(op):
        return guarded(op, describe_op(op), run)
    return run


def _op_function(op: Op) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]:
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
            ModuleGet() | ModuleSet() | Save() | Stop() | Grad() | SetGrad() | Bridge() | IterItem()
            | Export() | Cond() | Iterate() | EachCall() | TraceRun()
        ):
            raise AssertionError(f"{type(op).__name__} is not an ordinary node")


def _step(graph: Graph, node: Node) -> Step:
    index, invoke = node.ref.index, node.invoke
    resolve = _resolver(node)
    match node.op:
        case ModuleGet(path, kind, call):
            return Step(index, GET, resolve, key=(path, site_of(kind), call), kind=kind, invoke=invoke)
        case ModuleSet(path, kind, call):
            return Step(index, SET, resolve, key=(path, site_of(kind), call), kind=kind, invoke=invoke)
        case Save():
            return Step(index, SAVE, resolve, invoke=invoke)
        case Stop():
            return Step(index, STOP, resolve, invoke=invoke)
        case Grad():
            return Step(index, GRAD, resolve, key=grad_key(index), invoke=invoke)
        case SetGrad():
            return Step(index, SETGRAD, resolve, key=grad_key(index), invoke=invoke)
        case Bridge(slot):
            return Step(index, BRIDGE, resolve, invoke=invoke, param=slot)
        case IterItem():
            return Step(index, ITEM, resolve, invoke=invoke)
        case Export(inner):
            return Step(index, EXPORT, resolve, invoke=invoke, param=inner)
        case Cond(body):
            return Step(index, COND, resolve, invoke=invoke, body=plan_for(body))
        case Iterate(body):
            return Step(index, ITER, resolve, invoke=invoke, body=plan_for(body))
        case EachCall(body, scope=scope):
            body_plan = plan_for(body)
            step = Step(index, CALLS, resolve, invoke=invoke, body=body_plan)
            step.again, step.carry = _per_call_part(body, body_plan, scope)
            return step
        case TraceRun(body):
            # A trace is its own run (with its own hooks): its plan is made then.
            return Step(index, TRACE, resolve, invoke=invoke)
        case Call() | CallMethod() | GetAttr() | SetAttr() | ModuleAttr() | ApplyModule():
            step = Step(index, EXEC, resolve, run=op_function(node.op), invoke=invoke)
            step.direct = _direct_call(node)
            reads = set()
            for ref in node_refs(node):
                access = _aliased_access(graph, ref)
                if access is not None:
                    reads.add(_event_of(access))
            step.reads = tuple(sorted(reads))
            if is_inplace(node):
                access = _written_access(graph, node)
                if access is not None:
                    step.guard = (_event_of(access), access.ref.index)
            return step


def touches_scope(plan: Plan, scope: tuple[str, ...]) -> bool:
    """Whether a body (its plan) reads or writes a call of a module in ``scope``."""
    return any(key[1] != "grad" and in_scope(key[0], scope) for key in plan.readers) or any(
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
        if step.code in (GET, SET) and step.key is not None:
            again = in_scope(step.key[0], scope)
        elif step.body is not None:
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


def _direct_call(node: Node) -> Callable[[list[Any]], Any] | None:
    """For the most common node, a function or method on one or two values
    (``h * 2``, ``a + b``, ``h.sum()``), one closure from the environment to
    the value: no argument tuples on the hot path."""
    op = node.op
    head = node.args[0] if node.args else None
    if node.kwargs or not 1 <= len(node.args) <= 2 or not isinstance(head, Ref) or untrusted(op):
        return None  # (a loaded graph's op runs under its guard, in `op_function`)
    first = head.index
    if len(node.args) == 1:
        if type(op) is Call:
            fn1 = op.fn
            return lambda env: fn1(env[first])
        if type(op) is CallMethod:
            name = op.name
            return lambda env: getattr(env[first], name)()
        return None
    second = node.args[1]
    if type(op) is not Call:
        return None
    fn = op.fn
    if type(second) is Ref:
        other = second.index
        return lambda env: fn(env[first], env[other])
    if is_plain_constant(second):
        constant = thaw(second, ())
        return lambda env: fn(env[first], constant)
    return None


def _accesses(step: Step) -> list[tuple[EventKey, bool]]:
    """The module calls a step reads or writes, each with whether it writes.

    A step reads a call when it accesses it, or when it uses a value that is
    (a view of) that call's value; it writes a call when it sets it, or
    writes in place into such a value. A condition or loop touches what its
    body touches.
    """
    found = [(key, False) for key in step.reads]
    if step.code in (GET, GRAD) and step.key is not None:
        found.append((step.key, False))
    elif step.code in (SET, SETGRAD) and step.key is not None:
        found.append((step.key, True))
    elif step.guard is not None:
        found.append((step.guard[0], True))
    elif step.body is not None and step.code != CALLS:
        found.extend(step.body.touches)  # (a loop over calls shifts its body's calls: not static)
    return found


def _order_accesses_across_invokes(steps: Sequence[Step]) -> None:
    """Fill in ``Step.after``: accesses of one module call from different
    invokes keep the order they were written in. A write waits for the reads
    and writes written before it; a read waits for the writes before it."""
    seen: dict[EventKey, list[tuple[Step, bool]]] = {}
    for step in steps:
        after: set[int] = set()
        for key, writes in _accesses(step):
            earlier = seen.setdefault(key, [])
            after.update(
                other.index
                for other, other_writes in earlier
                if other.program != step.program and (writes or other_writes)
            )
            earlier.append((step, writes))
        step.after = tuple(sorted(after))


def _programs_of(graph: Graph) -> list[ProgramKey]:
    """Each node's program: its invoke's, or, for a node computed from a
    gradient, that of the gradient node it depends on (the latest one)."""
    grad_source: list[int | None] = []
    programs: list[ProgramKey] = []
    for node in graph.nodes:
        sources = [grad_source[ref.index] for ref in node_refs(node) if grad_source[ref.index] is not None]
        if isinstance(node.op, (Grad, SetGrad)):
            source: int | None = node.ref.index
        else:
            source = max((s for s in sources if s is not None), default=None)
        grad_source.append(source)
        programs.append(node.invoke if source is None else ("grad", source))
    return programs


def _hook_step(step: Step) -> Step:
    """The step that puts a gradient hook on the tensor of a Grad/SetGrad node.

    It runs where the node is written, in its invoke's program, so it comes
    before the ``backward()`` calls written after it and after those before.
    """
    return Step(step.index, HOOK, step.resolve, key=step.key, invoke=step.invoke)


def compile_plan(graph: Graph) -> Plan:
    """Compile ``graph`` into a `Plan` (pure; prefer the cached `plan_for`)."""
    check_graph(graph)
    saved = saved_refs(graph)
    uses = use_counts(graph)
    program_of = _programs_of(graph)
    steps: list[Step] = []
    readers: dict[EventKey, int] = {}
    sites: set[tuple[str, Site]] = set()
    writes = set()
    touches: set[tuple[EventKey, bool]] = set()
    dynamic: set[tuple[str, Site]] = set()
    programs: dict[ProgramKey, list[Step]] = {}
    stops: dict[EventKey, list[tuple[int, tuple[EventKey, ...]]]] = {}

    def uses_in(arguments: Sequence[object]) -> list[int]:
        return sorted({ref.index for arg in arguments for ref in refs_in(arg)})

    def place(step: Step, used: list[int]) -> None:
        step.release = tuple(index for index in used if index not in saved)
        step.foreign = tuple(index for index in used if program_of[index] != step.program)
        programs.setdefault(step.program, []).append(step)

    for node in graph.nodes:
        step = _step(graph, node)
        step.program = program_of[step.index]
        used = sorted({ref.index for ref in node_refs(node)})
        if step.code in (GRAD, SETGRAD):
            # The tensor is used where the hook is put; the new gradient (SetGrad)
            # where the hook fires.
            place(_hook_step(step), uses_in(node.args[:1]))
            used = uses_in(node.args[1:])
        step.unused = uses[step.index] == 0 and step.index not in saved
        if step.key is not None:
            readers[step.key] = readers.get(step.key, 0) + 1
            if step.key[1] != "grad":
                sites.add((step.key[0], step.key[1]))
        if step.body is not None:
            # A loop reads its body's module calls again at every iteration; a
            # loop over calls reads a different call of its scope's modules.
            again = step.code in (ITER, CALLS)
            scope = node.op.scope if isinstance(node.op, EachCall) else None
            for key, count in step.body.readers.items():
                if scope is not None and key[1] != "grad" and in_scope(key[0], scope):
                    dynamic.add((key[0], key[1]))
                    continue
                readers[key] = KEEP_UNTIL_THE_END if again else min(readers.get(key, 0) + count, KEEP_UNTIL_THE_END)
            sites.update(step.body.hook_sites)
            dynamic.update(step.body.dynamic_sites)
        if step.code == EXPORT:
            source = node.args[0]
            assert type(source) is Ref, "an export's argument is its context node"
            context = steps[source.index]
            context.exports = context.exports | {step.param}
        if step.code in (SET, SETGRAD) or step.guard is not None:
            writes.add(step.index)
        calls = _stop_calls(graph, node) if step.code == STOP else None
        if calls is not None:
            for key in calls:
                stops.setdefault(key, []).append((step.index, calls))
        touches.update(_accesses(step))
        steps.append(step)
        place(step, used)
    _order_accesses_across_invokes(steps)
    return Plan(
        steps=tuple(steps),
        # Programs resume in the order they began in the code (dicts keep insertion order).
        programs=tuple((key, tuple(program)) for key, program in programs.items()),
        program_of=tuple(program_of),
        uses=tuple(uses),
        saved=saved,
        event_keys=frozenset(readers),
        readers=readers,
        hook_sites=tuple(sorted(sites)),
        dynamic_sites=frozenset(dynamic),
        writes=frozenset(writes),
        touches=frozenset(touches),
        stops={key: tuple(found) for key, found in stops.items()},
    )


def plan_for(graph: Graph) -> Plan:
    """The plan of ``graph``, compiled once per graph structure.

    The plan is kept on the graph (replaying it finds it at once) and, when
    the graph holds no function that could keep large objects alive (a
    closure, a bound method), in a table keyed by the graph's structure,
    so that a fresh trace of the same code, with other tensor constants and
    on other lines, finds it too. A plan holds no graph object (see `Step`).
    """
    memo = graph._plan
    if isinstance(memo, Plan):
        return memo
    key = structure_key(graph)
    shared: Plan | None = None
    if key is not None:
        with _PLANS_LOCK:
            shared = _PLANS.get(key)
            if shared is not None:
                _PLANS.move_to_end(key)
    plan = shared if shared is not None else compile_plan(graph)
    if key is not None and shared is None:
        with _PLANS_LOCK:
            _PLANS[key] = plan
            while len(_PLANS) > _PLANS_KEPT:
                _PLANS.popitem(last=False)
    object.__setattr__(graph, "_plan", plan)
    return plan


_PLANS: OrderedDict[object, Plan] = OrderedDict()
_PLANS_LOCK = threading.Lock()
_PLANS_KEPT = 256


# --- the structure key -------------------------------------------------------------------

_NOT_SHARED: Any = object()


def structure_key(graph: Graph) -> object | None:
    """What a plan depends on: the graph with its tensor constants and other
    non-immutable constants replaced by markers (and source lines left out).

    ``None`` when the graph calls a function that could keep large objects
    alive in a table (a closure, a bound method, a function with defaults):
    its plan then stays with the graph alone.
    """
    key = _graph_key(graph)
    return None if key is _NOT_SHARED else _Key(key)


class _Key:
    """A structure key with its hash computed once (a table lookup hashes it
    and a hit compares it; both are C-level walks of plain tuples)."""

    __slots__ = ("items", "hash")

    def __init__(self, items: object) -> None:
        self.items = items
        self.hash = hash(items)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Key) and self.hash == other.hash and self.items == other.items)


def _graph_key(graph: Graph) -> object:
    keys = []
    for node in graph.nodes:
        key = node._key
        if key is None:
            key = _node_key(node)
            object.__setattr__(node, "_key", key)
        if key is _NOT_SHARED:
            return _NOT_SHARED
        keys.append(key)
    return (tuple(keys), _arg_key(graph.outputs))


_FIELDS: dict[type, tuple[str, ...]] = {}


def _op_key(op: Op) -> object:
    """An op as a plain tuple (hashed and compared in C, unlike attrs classes)."""
    kind = type(op)
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(field.name for field in attrs.fields(kind))
    if not names:
        return kind
    if kind is Call:
        return (kind, op.fn)  # type: ignore[union-attr]  # a Call
    return (kind,) + tuple(getattr(op, name) for name in names)


def _node_key(node: Node) -> object:
    op = node.op
    if untrusted(op):
        return _NOT_SHARED  # a loaded graph's plan runs under its guard: never shared
    if isinstance(op, (Cond, Iterate, EachCall, TraceRun)):
        body = _graph_key(op.body)
        if body is _NOT_SHARED:
            return _NOT_SHARED
        fields = tuple(getattr(op, field.name) for field in attrs.fields(type(op)) if field.name != "body")
        op_key: object = (type(op), body, fields)
    elif type(op) is Call:
        fn = op.fn
        if not shareable(fn):
            return _NOT_SHARED
        op_key = (Call, fn)
    else:
        op_key = _op_key(op)
    args = node.args
    if len(args) == 1:
        args_key: object = _arg_key(args[0])
    else:
        args_key = tuple([_arg_key(arg) for arg in args])
    kwargs = node.kwargs
    if kwargs is _NO_KWARGS:
        return (op_key, args_key, (), node.invoke)
    return (op_key, args_key, tuple([(name, _arg_key(kwargs[name])) for name in kwargs]), node.invoke)


def _arg_key(arg: object) -> object:
    kind = type(arg)
    if kind is Ref:
        return -1 - arg.index  # type: ignore[attr-defined]  # a Ref (negative: no atom key is an int)
    if kind is float:
        return (float, arg.hex())  # type: ignore[attr-defined]  # as structural_key, inlined: the usual constant
    if kind in ATOMS:
        return structural_key(arg)
    if kind is tuple:
        return ("tuple", tuple(_arg_key(item) for item in arg))  # type: ignore[attr-defined]  # a tuple
    if kind is TensorConst:
        return ("tensor",)  # (no atom's key is a 1-tuple: a string stays a string)
    if kind is ListConst:
        return ("list", tuple(_arg_key(item) for item in arg.items))  # type: ignore[attr-defined]
    if kind is DictConst:
        return ("dict", tuple((structural_key(k), _arg_key(v)) for k, v in arg.items))  # type: ignore[attr-defined]
    if kind is SliceConst:
        return ("slice", _arg_key(arg.start), _arg_key(arg.stop), _arg_key(arg.step))  # type: ignore[attr-defined]
    if kind is TupleOf:
        return ("tupleof", arg.cls, tuple(_arg_key(item) for item in arg.items))  # type: ignore[attr-defined]
    return ("constant",)  # read from the run's own graph, never held by a plan


