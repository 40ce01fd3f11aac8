"""Whole-program checks of a trace's graph against the model's call order,
before anything runs: what ``nnsight_pure.check(model, graph, *inputs)``
(functional.py) and ``validate=True`` (a trace's exit, ``run``) compute.

One fake-tensor scan per invoke with inputs, plus one of the batch when
there are several (for nodes outside invokes and invokes without inputs),
each `scan.scan` on a `scan.fake_copy` of the module tree (no real weights,
none loaded for a lazy model), records every
module call the method makes, in the order it makes them (the scan's record
is filled in call order). Each invoke's program is then walked in text
order, as the interpreter runs it, tracking how far the model has got:

- a write to a call the model has already passed is out of order (a read
  of one is fine: its value is kept);
- a write that needs a value another invoke computes only at a later call;
- an access of a module the method never calls, or of call k when it makes
  fewer; loops over calls reaching past the last call, or touching none;
- ``.grad`` read or set with no ``backward()`` written after it;
- a skip (``envoy.skip(value)``) is a write at the call's input (so it too
  can come too late), after which the modules inside the skipped call are
  never called: accessing one in the same invoke is a ``not_called``
  finding; ``tracer.result`` is the end of the run: a write after it in
  its invoke comes too late;
- shape errors, from the nodes' fake values (`scan.fake_value`).

What is found comes back as `Findings` (findings.py); nothing is raised and
the user's model never runs (errors of preparing, batching or scanning the
inputs propagate, as they would from the run). Not judged: reads of modules
called ad hoc with hooks (calls the scan never sees), operation sites
(``envoy.source.<name>``: their names are checked as the trace records
them, source_envoy.py), and the order after a
loop that follows the calls to the end of the run (``.all()``) or after a
value whose time is unknown.
"""

from __future__ import annotations

import difflib
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import attrs
from torch._subclasses.fake_tensor import FakeTensorMode

from .arguments import thaw
from .effects import is_inplace
from .events import END_KEY, EventKey, Site, in_scope, is_pseudo, operation_of, site_of
from .findings import Finding, FindingKind, Findings
from .graph import Graph, Node, node_refs
from .open_blocks import suspended
from .ops import (
    ApplyModule,
    CallMethod,
    Cond,
    EachCall,
    Grad,
    Iterate,
    ModuleGet,
    ModuleSet,
    Result,
    SetGrad,
    Skip,
    TraceRun,
)
from .plan import written_access
from .printing import format_node, module_expr
from .scan import UNKNOWN, fake_copy, fake_value, new_mode, scan
from .source import short

if TYPE_CHECKING:
    from .runner import ModelAdapter

Invokes = Sequence["tuple[tuple[Any, ...], dict[str, Any]] | None"]

@attrs.frozen(eq=False)
class _Record:
    """The module calls of one scanned run: each event's place in the order
    and its fake value (inputs as ``(args, kwargs)``, outputs)."""

    values: Mapping[EventKey, Any]
    position: Mapping[EventKey, int]
    counts: Mapping[tuple[str, str], int]
    method: str

    @classmethod
    def of(cls, seen: Mapping[EventKey, Any], method: str) -> _Record:
        counts: dict[tuple[str, str], int] = {}
        for path, site, _ in seen:
            counts[(path, site)] = counts.get((path, site), 0) + 1
        return cls(seen, {key: place for place, key in enumerate(seen)}, counts, method)

    def called(self) -> list[str]:
        """The paths of the modules the method calls, in first-call order (the root left out)."""
        return list(dict.fromkeys(path for path, _, _ in self.values if path and not is_pseudo(path)))


def _what(key: EventKey, kind: str) -> str:
    path, _, call = key
    return f"{module_expr(path)}.{kind}" + (f" [call {call}]" if call else "")


def _shown(node: Node) -> str:
    return f"`{format_node(node)}` (made at {short(node.source)})"


@attrs.define
class _Program:
    """How far one invoke's program has got the model while walking it."""

    position: int = -1
    mover: str = ""  # what made the model reach ``position`` (for messages)
    foreign: bool = False  # the position comes from waiting on another invoke's value
    stuck: bool = False  # an access that never happens: the program waits forever


class _Checker:
    """Walks a trace's graph once, collecting findings (see module docstring)."""

    def __init__(self, records: Mapping[int | None, _Record], fake_root: Any, mode: FakeTensorMode) -> None:
        self.records = records
        self.fake_root = fake_root
        self.mode = mode
        self.found: list[Finding] = []
        self.programs: dict[int | None, _Program] = {}
        self.pending_grads: list[tuple[Node, tuple[int, ...]]] = []
        self.last_backward: Node | None = None
        self.adhoc: tuple[str, ...] = ()  # modules called ad hoc with hooks (their calls are not scanned)
        self.conditions = 0  # how many conditions the walk is inside
        # The calls a skip replaces, per invoke: (module path, first and last place inside, the skip's node).
        self.skipped: dict[int | None, list[tuple[str, int, int, Node]]] = {}

    def add(self, kind: FindingKind, message: str, node: Node, within: tuple[int, ...]) -> None:
        self.found.append(Finding(kind, message, node.ref.index, node.source, within))

    def record_of(self, invoke: int | None) -> _Record:
        return self.records.get(invoke, self.records[None])

    # --- the top-level graph ---------------------------------------------------------

    def run(self, graph: Graph) -> None:
        self.adhoc = tuple(sorted({op.path for op in _ops(graph) if isinstance(op, ApplyModule) and op.hook}))
        grad_derived: list[bool] = []
        time: list[int | None] = []  # when each value exists in its program (None: not known)
        env: list[Any] = []
        for node in graph.nodes:
            derived = isinstance(node.op, (Grad, SetGrad)) or any(grad_derived[r.index] for r in node_refs(node))
            grad_derived.append(derived)
            program = self.programs.setdefault(node.invoke, _Program())
            if not derived and not program.stuck:
                self.wait_for_foreign(graph, node, program, time)
            self.visit(graph, node, program, (), 0, ("",), derived)
            time.append(None if program.stuck else program.position)
            env.append(self.fake_of(node, env))
        self.end()

    def wait_for_foreign(self, graph: Graph, node: Node, program: _Program, time: list[int | None]) -> None:
        """A node using another invoke's value waits until that invoke computes it
        (for a value whose time is not known, the order after it is not judged)."""
        for ref in node_refs(node):
            source = graph.nodes[ref.index]
            if source.invoke == node.invoke:
                continue
            when = time[ref.index]
            if when is None:
                program.stuck = True
                return
            if when > program.position:
                program.position = when
                program.mover = f"{_shown(source)} of invoke {source.invoke}"
                program.foreign = True

    def fake_of(self, node: Node, env: list[Any]) -> Any:
        """The node's fake value from its arguments' (a failure is a shape finding)."""
        args = tuple(thaw(arg, env) for arg in node.args)
        kwargs = {name: thaw(value, env) for name, value in node.kwargs.items()}
        try:
            with suspended(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (the real run gives its warnings)
                return fake_value(node.op, args, kwargs, lambda value: value, self.record_of(node.invoke).values,
                                  self.fake_root, self.mode, True)
        except Exception as error:  # the error a run would raise, found on fake tensors
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.add("shape", f"{_shown(node)} fails on the scanned values: {type(error).__name__}: {first}",
                     node, ())
            return UNKNOWN

    # --- one node, in the order its program runs it -----------------------------------

    def visit(self, graph: Graph, node: Node, program: _Program, within: tuple[int, ...], shift: int,
              scope: tuple[str, ...], derived: bool) -> None:
        op = node.op
        if isinstance(op, (Grad, SetGrad)):
            self.pending_grads.append((node, within))
        elif isinstance(op, CallMethod) and op.name == "backward":
            self.pending_grads.clear()
            self.last_backward = node
        if derived:
            return  # runs when a gradient hook fires, not in the forward's order
        if isinstance(op, (ModuleGet, ModuleSet, Skip)) and in_scope(op.path, self.adhoc):
            return  # hooked ad-hoc calls make calls of it the scan did not see
        if isinstance(op, (ModuleGet, ModuleSet, Skip)):
            call = op.call + (shift if in_scope(op.path, scope) else 0)
            kind = "skip" if isinstance(op, Skip) else op.kind
            self.access(node, op.path, kind, call, not isinstance(op, ModuleGet), program, within,
                        in_loop=shift > 0 or scope != ("",))
            if isinstance(op, Skip):
                self.skip(node, op.path, call)
        elif isinstance(op, Result):
            self.result(node, program)
        elif is_inplace(node):
            self.inplace(graph, node, program, within, shift, scope)
        elif isinstance(op, Cond):
            self.conditions += 1
            self.body(op.body, program, within + (node.ref.index,), shift, scope)
            self.conditions -= 1
        elif isinstance(op, Iterate):
            self.body(op.body, program, within + (node.ref.index,), shift, scope)
        elif isinstance(op, EachCall):
            self.loop(node, op, program, within)
        elif isinstance(op, TraceRun):
            pass  # a session's trace: check its graph with its own inputs

    def access(self, node: Node, path: str, kind: str, call: int, writes: bool, program: _Program,
               within: tuple[int, ...], in_loop: bool = False) -> None:
        if operation_of(path) is not None:
            return  # an operation site (envoy.source): the trace checks its name against a listing (source_envoy)
        key: EventKey = (path, site_of(kind), call)  # type: ignore[arg-type]  # kind is an AccessKind
        record = self.record_of(node.invoke)
        place = record.position.get(key)
        if place is None:
            if not in_loop or not any(p == path for p, _, _ in record.values):
                self.missing(node, key, kind, record, within)
            program.stuck = True
            return
        if self.skipped and self.inside_skipped(node, key, kind, place, within):
            program.stuck = True
            return
        if program.stuck:
            return
        if writes and place < program.position:
            if program.foreign:
                self.add("cross_invoke", (
                    f"{_shown(node)} writes {_what(key, kind)} in invoke {node.invoke}{self.when()}, but it "
                    f"waits first for {program.mover}, which exists only after the model has moved past "
                    f"{_what(key, kind)}: the write would come too late "
                    "(an OutOfOrderError at run time, after the model ran)"
                ), node, within)
            else:
                self.add("out_of_order", (
                    f"{_shown(node)} writes too late{self.when()}: the model has already moved past {_what(key, kind)} "
                    f"(it is at {program.mover}), so the write would have no effect "
                    "(an OutOfOrderError at run time, after the model ran)"
                ), node, within)
            return
        if place >= program.position:
            program.position = place
            program.mover = f"{_what(key, kind)}, read by {_shown(node)}"
            program.foreign = False

    def skip(self, node: Node, path: str, call: int) -> None:
        """Remember the places of the calls made inside a skipped call (its own
        pre event to its post event): the model never makes them."""
        record = self.record_of(node.invoke)
        start = record.position.get((path, "pre", call))
        end = record.position.get((path, "post", call))
        if start is not None and end is not None:
            self.skipped.setdefault(node.invoke, []).append((path, start, end, node))

    def inside_skipped(self, node: Node, key: EventKey, kind: str, place: int, within: tuple[int, ...]) -> bool:
        """Whether ``key`` is a call inside a call this invoke skips (a finding then)."""
        for path, start, end, skip in self.skipped.get(node.invoke, ()):
            if start < place < end and key[0] != path:
                self.add("not_called", (
                    f"{_shown(node)} accesses {_what(key, kind)}, which is inside {module_expr(path)}: "
                    f"{_shown(skip)} skips that call, so its forward does not run and {module_expr(key[0])} "
                    "is never called (read the skipped module's .input or .output instead)"
                ), node, within)
                return True
        return False

    def result(self, node: Node, program: _Program) -> None:
        """``tracer.result`` exists when the method has returned: after every call."""
        if not program.stuck:
            program.position = max(program.position, self.record_of(node.invoke).position.get(END_KEY, 1 << 62))
            program.mover = f"the end of the run, read by {_shown(node)}"
            program.foreign = False

    def when(self) -> str:
        return " (when its condition holds)" if self.conditions else ""

    def missing(self, node: Node, key: EventKey, kind: str, record: _Record, within: tuple[int, ...]) -> None:
        path, site, call = key
        count = record.counts.get((path, site), 0)
        if count == 0:
            called = record.called()
            near = difflib.get_close_matches(path, called, n=1)
            hint = f"; did you mean {module_expr(near[0])}?" if near else ""
            self.add("not_called", (
                f"{_shown(node)} reads {module_expr(path)}, which {record.method} never calls, so it never "
                f"gets a value (it calls {_nearby(path, called)}){hint}"
            ), node, within)
        else:
            self.add("call_range", (
                f"{_shown(node)} reads {_what(key, kind)}, but {record.method} calls {module_expr(path)} "
                f"only {count} time{'s' if count != 1 else ''}, so it never gets a value"
            ), node, within)

    def inplace(self, graph: Graph, node: Node, program: _Program, within: tuple[int, ...], shift: int,
                scope: tuple[str, ...]) -> None:
        """An in-place write into (a view of) a module value is a write of that call
        (the access is found as the run's guard finds it: `plan.written_access`)."""
        access = written_access(graph, node)
        if access is None or not isinstance(access.op, ModuleGet):
            return
        op = access.op
        call = op.call + (shift if in_scope(op.path, scope) else 0)
        key: EventKey = (op.path, site_of(op.kind), call)
        place = self.record_of(node.invoke).position.get(key)
        if place is not None and not program.stuck and place < program.position:
            self.add("out_of_order", (
                f"{_shown(node)} writes in place into {_what(key, op.kind)} too late{self.when()}: the "
                f"model has already moved past it (it is at {program.mover}), so the write would have no "
                "effect (an OutOfOrderError at run time, after the model ran)"
            ), node, within)

    def body(self, body: Graph, program: _Program, within: tuple[int, ...], shift: int,
             scope: tuple[str, ...]) -> None:
        derived: list[bool] = []
        for node in body.nodes:
            flag = isinstance(node.op, (Grad, SetGrad)) or any(derived[r.index] for r in node_refs(node))
            derived.append(flag)
            self.visit(body, node, program, within, shift, scope, flag)

    # --- loops over calls -------------------------------------------------------------

    def loop(self, node: Node, op: EachCall, program: _Program, within: tuple[int, ...]) -> None:
        accesses = [(access, found) for access, found in _accesses(op.body) if in_scope(access.path, op.scope)]
        if not accesses:
            scope_text = " or ".join(module_expr(path) for path in op.scope)
            self.add("empty_loop", (
                f"the loop over calls made at {short(node.source)} reads no call of {scope_text} or of a module "
                "below it, so it has no call to follow: its block runs once (the MissedCallsWarning of tracing)"
            ), node, within)
        record = self.record_of(node.invoke)
        steps = list(op.calls) if op.calls else (
            list(range(op.start, op.stop, op.step)) if op.stop is not None else None
        )
        for access, found in accesses:
            count = record.counts.get((access.path, _site(access)), 0)
            beyond = [step for step in steps or () if access.call + step >= count]
            if count and steps is not None and beyond:
                self.add("loop_range", (
                    f"the loop over calls made at {short(node.source)} runs for calls {_calls_text(steps)}, but "
                    f"{record.method} calls {module_expr(access.path)} only {count} "
                    f"time{'s' if count != 1 else ''}: {_shown(found)} never gets a value from call "
                    f"{access.call + beyond[0]} on"
                ), node, within)
                break
        self.body(op.body, program, within + (node.ref.index,), steps[0] if steps else op.start, op.scope)
        if steps is None:
            program.stuck = True  # it follows the calls to the end of the run: no order to judge after it
        elif steps and not program.stuck:
            # Where the model is once the loop's last iteration that happens has run.
            reached = [
                record.position.get((access.path, _site(access), access.call + step), -1)
                for access, _ in accesses for step in steps
            ]
            program.position = max([program.position, *reached])

    def end(self) -> None:
        for node, within in self.pending_grads:
            after = (f" after the last one (made at {short(self.last_backward.source)})"
                     if self.last_backward is not None else "")
            what = "sets the gradient" if isinstance(node.op, SetGrad) else "reads .grad"
            self.add("no_backward", (
                f"{_shown(node)} {what}, but no backward() is written{after or ' after it'}: no backward pass "
                f"reaches it, so it never {'takes effect' if isinstance(node.op, SetGrad) else 'gets a value'}"
            ), node, within)


def _nearby(path: str, called: list[str], most: int = 12) -> str:
    """The called modules next to ``path`` (those under its nearest called ancestor), for a message."""
    parent = path
    while parent and not any(other.startswith(parent + ".") for other in called):
        parent = parent.rpartition(".")[0]
    shown = [other for other in called if not parent or other.startswith(parent + ".")] or called
    if not shown:
        return "no module"
    more = f" and {len(shown) - most} more" if len(shown) > most else ""
    under = f" under {module_expr(parent)}" if parent else ""
    return f"{', '.join(module_expr(other) for other in shown[:most])}{more}{under and ' (' + under.strip() + ')'}"


def _calls_text(steps: list[int]) -> str:
    return f"{steps[0]} to {steps[-1]}" if len(steps) > 2 else " and ".join(map(str, steps))


def _ops(graph: Graph) -> Iterator[Any]:
    """Every op of a graph and of the bodies nested in it."""
    for node in graph.nodes:
        yield node.op
        if isinstance(node.op, (Cond, Iterate, EachCall, TraceRun)):
            yield from _ops(node.op.body)


def _site(access: ModuleGet | ModuleSet | Skip) -> Site:
    """The hook site an access waits for (a skip: the call's input)."""
    return "pre" if isinstance(access, Skip) else site_of(access.kind)


def _accesses(body: Graph) -> Iterator[tuple[ModuleGet | ModuleSet | Skip, Node]]:
    """The module accesses (skips included) of a body and of the bodies nested in it, each with its node."""
    for node in body.nodes:
        op = node.op
        if isinstance(op, (ModuleGet, ModuleSet, Skip)):
            yield op, node
        elif isinstance(op, (Cond, Iterate, EachCall)):
            yield from _accesses(op.body)


# --- entry points -------------------------------------------------------------------------


def check_invokes(
    adapter: ModelAdapter,
    graph: Graph,
    method: str | None,
    invokes: Invokes,
    method_kwargs: Mapping[str, Any],
    shown: str | None = None,
) -> Findings:
    """`nnsight_pure.check` with the invokes as given and the wrapper's
    method name (``None``: the forward): each invoke's inputs are prepared
    as a run prepares them (by the model's `runner.ModelAdapter`), then
    `check_prepared`."""
    if not any(invoke is not None for invoke in invokes):
        raise ValueError("check needs inputs for the model: none were given")
    prepared: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = []
    for invoke in invokes:
        if invoke is None:
            prepared.append(None)
            continue
        (args, prepared_kwargs), _ = adapter.prepare_input(*invoke[0], **invoke[1])
        prepared.append((tuple(args), dict(prepared_kwargs)))
    return check_prepared(adapter, graph, method, prepared, method_kwargs, shown)


def check_prepared(
    adapter: ModelAdapter,
    graph: Graph,
    method: str | None,
    prepared: Sequence[tuple[tuple[Any, ...], dict[str, Any]] | None],
    method_kwargs: Mapping[str, Any],
    shown: str | None = None,
) -> Findings:
    """`check` on inputs already prepared (``None``: an invoke without
    inputs), as a tracer holds them at its exit: what ``validate=True``
    runs there before the real run."""
    given = {index: inputs for index, inputs in enumerate(prepared) if inputs is not None}
    if not given:
        raise ValueError("check needs inputs for the model: none were given")
    mode = new_mode()
    with suspended():
        faked = adapter.on_module(fake_copy(adapter.handle.module, mode))
        function = faked.method_fn(method)
        label = shown or (method.lstrip("_") if method else "forward")
        settings = ", ".join(f"{key}={value!r}" for key, value in sorted(method_kwargs.items())
                             if isinstance(value, (int, float, str, bool)))
        label = f"{label}({settings})" if settings else label

        def scanned(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> _Record:
            return _Record.of(scan(faked.handle.module, function, args, {**kwargs, **method_kwargs}, mode), label)

        records: dict[int | None, _Record] = {}
        if len(given) == 1 and len(prepared) == 1:
            records[None] = records[0] = scanned(*given[0])
        else:
            batched: tuple[tuple[Any, ...], dict[str, Any]] | None = None
            for args, kwargs in given.values():
                batched = adapter.batch(batched, *args, **kwargs)
            assert batched is not None
            records[None] = scanned(*batched)
            for index, (args, kwargs) in given.items():
                records[index] = scanned(args, kwargs)
        checker = _Checker(records, lambda: faked.handle.module, mode)
        checker.run(graph)
    return Findings(tuple(checker.found))
