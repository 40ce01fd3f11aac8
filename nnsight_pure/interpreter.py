"""Running graphs: a trace over one model run (hook-driven), or a session.

A graph runs as a fold over its plan's steps in a *frame*: an environment
for one execution of one graph. Condition and loop bodies run in frames of
their own, folded inline (``yield from``), so a body inside a trace can wait
for module calls like any other node.

In a trace, each invoke is its own *program*: its nodes run in the order
they were written. A program is a generator that suspends whenever a node
needs a module value the model has not produced yet, and is resumed by the
hooks when it has. At every hook event the programs resume in the order
they began in the code (invoke 0, invoke 1, ...), so an invoke can use a
value another invoke computed at the same module call (activation patching).

A session has no hooks of its own: its graph is folded directly, and each
trace node in it runs a whole trace through the model wrapper's callback.

Semantics (docs/interpreter.md explains them with examples):

* A module access waits for its call; everything written after it in the
  same invoke waits too.
* Reading a call that already happened still gives its value (the run keeps
  it because the plan says a later node reads it).
* Writing to a call the model has moved past raises `OutOfOrderError`.
* A value from another invoke that is not computed yet is waited for, and
  accesses of one module call from different invokes keep their text order.
* Every value dies after its last use unless it is saved (or a later node
  outside its body reads it).
* A stop ends the innermost loop; outside loops it ends the trace's model
  run, or the session.
* Hooks exist only on the modules the plan needs, only during the run, and
  are removed whatever happens.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Generator, Sequence

import attrs
import torch
from torch.utils.hooks import RemovableHandle

from .batching import BatchGroups, merge_rows, narrow_rows
from .errors import MissedCallsWarning, OutOfOrderError, TraceError, UnexecutedInterventionWarning
from .graph import Graph, Node, SourceLoc
from .hooks import Installed, install_hooks, remove_hooks, submodule
from .ops import Cond, EachCall, Export, Iterate
from .plan import (
    BRIDGE,
    CALLS,
    COND,
    EXEC,
    EXPORT,
    GET,
    GRAD,
    HOOK,
    ITEM,
    ITER,
    SAVE,
    SET,
    SETGRAD,
    STOP,
    TRACE,
    EventKey,
    Plan,
    ProgramKey,
    Site,
    Step,
    grad_key,
    in_scope,
    plan_for,
)
from .printing import format_node, module_expr, program_label
from .results import Results
from .source import add_note, describe, short

if TYPE_CHECKING:
    from pyrsistent.typing import PVector

_UNSET: Any = object()
"""Marks an environment slot whose node has not run (or whose value died)."""

_NOT_RUN: dict[int, Any] = {}
"""The exports of a body that never ran (a false condition, an empty loop)."""

WAIT_EVENT, WAIT_VALUE, WAIT_STEP, WAIT_DONE = 0, 1, 2, 3

Request = tuple[int, Any, int, bool]
"""What a program waits for, at which step: ``(WAIT_EVENT, event key, step)``,
``(WAIT_VALUE, node, step)`` (another invoke's value) or ``(WAIT_STEP, node,
step)`` (another invoke's access of the same module call, written earlier),
or ``(WAIT_DONE, program, step)`` (a loop's later iterations, see
`_Run._each_call`); and whether the end of the run may end the wait (inside an open-ended loop
over calls, which ends when the model stops calling)."""

_END: Any = object()
"""Sent to a wait that the end of the run ends (see `Request`)."""

_NEVER: EventKey = ("", "grad", -1)
"""An event that never happens: what a stopped program waits for."""

Offsets = tuple[tuple[tuple[str, ...], int], ...]
"""The call shifts of the enclosing loops over calls: ``(scope, i)`` each."""


class _CallsEnded(Exception):
    """The model stopped calling while a loop over calls waited for a call."""

Program = Generator[Request, Any, None]
"""A generator folding steps. After ``WAIT_EVENT`` it receives ``(value,
is_current)``: the call's value and whether that hook runs now."""

TraceRunner = Callable[[Node, Any, dict[str, Any], tuple[Any, ...], frozenset[int]], tuple[Results, dict[int, Any]]]
"""Runs a trace node of a session: ``(node, invokes, method kwargs, bridges,
exported nodes) -> (results, exported values)``."""


class EarlyStop(BaseException):
    """Raised to end a loop, a model run or a session early; caught where it ends.

    A `BaseException`, so that model code catching ``Exception`` cannot
    swallow it.
    """


class _Frame:
    """One execution of one graph: its environment and bookkeeping."""

    __slots__ = ("plan", "nodes", "env", "uses", "ran", "captures", "item", "keep", "children", "offsets",
                 "open_ended", "marks", "in_loop")

    def __init__(
        self,
        plan: Plan,
        graph: Graph,
        captures: Sequence[Any] = (),
        item: Any = None,
        keep: frozenset[int] = frozenset(),
        offsets: Offsets = (),
        open_ended: bool = False,
        marks: tuple[list[bool], ...] = (),
        in_loop: bool = False,
    ) -> None:
        size = len(plan.steps)
        self.plan = plan
        self.nodes: PVector[Node] = graph.nodes  # this run's graph: its constants, source lines and bodies
        self.env: list[Any] = [_UNSET] * size
        self.uses = list(plan.uses)
        self.ran = [False] * size
        self.captures = tuple(captures)
        self.item = item
        self.keep = keep  # nodes a later node outside this graph reads (exports)
        self.children: dict[int, Results] = {}
        self.offsets = offsets  # the call shifts of enclosing loops over calls
        self.open_ended = open_ended  # inside a loop over calls that ends with the run
        # One cell per enclosing loop over calls (parallel to ``offsets``): set
        # when this iteration received a call of that loop's scope.
        self.marks = marks
        self.in_loop = in_loop  # a stop here ends a loop, not the run

    def inner(self, plan: Plan, graph: Graph, captures: Sequence[Any], item: Any, keep: frozenset[int]) -> _Frame:
        """A frame for a body run by this frame (a condition's, a loop's): it
        keeps this frame's call shifts."""
        return _Frame(plan, graph, captures, item, keep, self.offsets, self.open_ended, self.marks, self.in_loop)

    def mark(self, path: str) -> None:
        """This iteration received a call of ``path``: mark the loops it is in scope of."""
        for (scope, _), cell in zip(self.offsets, self.marks):
            if in_scope(path, scope):
                cell[0] = True

    def key_of(self, step: Step) -> EventKey:
        """The event a module access waits for: its call, shifted by the loops over calls."""
        assert step.key is not None
        return self.shifted(step.key)

    def shifted(self, key: EventKey) -> EventKey:
        """``key`` with its call shifted by the enclosing loops over calls."""
        if not self.offsets or key[1] == "grad":
            return key
        path, site, call = key
        return (path, site, call + sum(i for scope, i in self.offsets if in_scope(path, scope)))

    def node(self, step: Step) -> Node:
        """The node ``step`` runs, in this frame's graph."""
        return self.nodes[step.index]

    def body(self, step: Step) -> tuple[Plan, Graph]:
        """The plan and graph of a context step's body."""
        op = self.nodes[step.index].op
        assert step.body is not None and isinstance(op, (Cond, Iterate, EachCall))
        return step.body, op.body

    def results(
        self,
        stopped: bool = False,
        blocked: dict[ProgramKey, tuple[int, int]] | None = None,
        graph: Graph | None = None,
    ) -> Results:
        env = self.env
        values = {i: env[i] for i in self.plan.saved if env[i] is not _UNSET}
        return Results(values, stopped, blocked or {}, self.children, None, graph)

    def exports(self) -> dict[int, Any]:
        env = self.env
        return {i: env[i] for i in self.keep if env[i] is not _UNSET}


class _Program:
    """One program's generator (an invoke's, or a gradient's) and what it waits for."""

    __slots__ = ("key", "generator", "request", "started", "done", "running")

    def __init__(self, key: ProgramKey, generator: Program) -> None:
        self.key = key
        self.generator = generator
        self.request: Request | None = None
        self.started = False
        self.done = False
        self.running = False  # being resumed now (a generator cannot be re-entered)


class _Run:
    """The mutable state of one run of a graph (never shared between runs)."""

    # Defaults (reassigned, never mutated in place; a run is made per trace).
    current: EventKey | None = None  # the hook event being handled
    activation: Any = None
    swapped = False
    failed: BaseException | None = None
    ended = False  # the model's method has returned
    stopping = False  # a stop took effect: the run ends once the programs have moved

    def __init__(
        self,
        plan: Plan,
        graph: Graph,
        root: torch.nn.Module | None,
        groups: BatchGroups,
        captures: Sequence[Any] = (),
        keep: frozenset[int] = frozenset(),
        trace_runner: TraceRunner | None = None,
    ) -> None:
        self.plan = plan
        self.root = root
        self.groups = groups
        # One invoke over the whole batch (or none): no access ever needs narrowing.
        self.whole_batch = all(groups.rows(invoke) is None for invoke in range(len(groups.groups)))
        self.trace_runner = trace_runner
        self.frame = _Frame(plan, graph, captures, None, keep)
        self.kept: dict[EventKey, Any] = {}
        self.readers = dict(plan.readers)
        self.calls: dict[tuple[str, Site], int] = {}
        # Rows of invokes handed out as views: id(view) -> (view, base, start, size),
        # so that a gradient hook goes on the tensor the model actually uses.
        self.views: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], int, int]] = {}
        self.grad_hooks: list[RemovableHandle] = []
        self.latest: dict[tuple[str, Site], EventKey] = {}  # the kept call of each dynamic site
        self.missed: list[EventKey] = []  # calls a loop over calls waited for in vain
        self.thread = threading.get_ident()
        self._modules: dict[str, torch.nn.Module] = {}
        self.programs = [_Program(key, self._fold(self.frame, steps)) for key, steps in plan.programs]

    @property
    def done(self) -> bool:
        return all(program.done for program in self.programs)

    # --- folding a graph ------------------------------------------------------------

    def _fold(self, frame: _Frame, steps: Sequence[Step]) -> Program:
        env, uses, ran, keep, nodes = frame.env, frame.uses, frame.ran, frame.keep, frame.nodes
        step: Step | None = None
        try:
            for step in steps:
                for index in step.foreign:
                    if env[index] is _UNSET:
                        yield (WAIT_VALUE, index, step.index, False)
                for index in step.after:
                    if not ran[index]:
                        yield (WAIT_STEP, index, step.index, False)
                code = step.code
                if code == EXEC:
                    if step.guard is not None and frame.shifted(step.guard[0]) != self.current:
                        raise self._out_of_order(frame, step, step.guard[1])
                    direct = step.direct
                    if direct is not None:
                        env[step.index] = direct(env)
                    else:
                        args, kwargs = step.resolve(env, nodes)
                        assert step.run is not None
                        env[step.index] = step.run(self, args, kwargs)
                elif code == GET:
                    key = step.key if not frame.offsets else frame.key_of(step)
                    value, _ = yield (WAIT_EVENT, key, step.index, frame.open_ended)
                    if value is _END:
                        raise _CallsEnded()
                    if frame.marks and key is not None:
                        frame.mark(key[0])
                    if step.kind == "input":
                        value = _extract(value, step)
                    if not self.whole_batch:
                        value = narrow_rows(value, self.groups, step.invoke, self._remember_view)
                    env[step.index] = value
                elif code == HOOK:
                    # The node's own step (GRAD/SETGRAD) runs when the hook fires.
                    args, _ = step.resolve(env, nodes)
                    self._hook_gradient(step, args[0])
                elif code == GRAD:
                    assert step.key is not None
                    value, _ = yield (WAIT_EVENT, step.key, step.index, False)
                    env[step.index] = value
                elif code in (SET, SETGRAD):
                    value, is_current = yield (WAIT_EVENT, frame.key_of(step), step.index, frame.open_ended)
                    if value is _END:
                        raise _CallsEnded()
                    if frame.marks:
                        frame.mark(step.key[0] if step.key else "")
                    if not is_current:
                        raise self._out_of_order(frame, step, None)
                    args, _ = step.resolve(env, nodes)
                    if code == SET:
                        self._swap(step, args[0])
                    else:
                        self._swap_gradient(step, args[1])
                    env[step.index] = None
                elif code == SAVE:
                    env[step.index] = None
                elif code == BRIDGE:
                    env[step.index] = frame.captures[step.param]
                elif code == ITEM:
                    env[step.index] = frame.item
                elif code == EXPORT:
                    args, _ = step.resolve(env, nodes)
                    env[step.index] = _exported(args[0], frame.node(step))
                elif code == COND:
                    args, _ = step.resolve(env, nodes)
                    env[step.index] = _NOT_RUN
                    if args[0]:
                        child = frame.inner(*frame.body(step), args[1:], None, step.exports)
                        yield from self._fold(child, child.plan.steps)
                        frame.children[step.index] = child.results()
                        env[step.index] = child.exports()
                elif code == ITER:
                    yield from self._loop(frame, step)
                elif code == CALLS:
                    yield from self._each_call(frame, step)
                elif code == TRACE:
                    args, kwargs = step.resolve(env, nodes)
                    if self.trace_runner is None:
                        raise TraceError("a trace node can only run inside a session")
                    results, exported = self.trace_runner(frame.node(step), args[0], kwargs, args[1:], step.exports)
                    frame.children[step.index] = results
                    env[step.index] = exported
                elif code == STOP:
                    if frame.in_loop or self.root is None:
                        raise EarlyStop()  # ends the loop (or the session)
                    # The run ends once every program has gone as far as it can
                    # at this event (`advance_all`); this one goes no further.
                    self.stopping = True
                    yield (WAIT_EVENT, _NEVER, step.index, False)
                for index in step.release:
                    left = uses[index] - 1
                    uses[index] = left
                    if not left and index not in keep:
                        env[index] = _UNSET
                if code == HOOK:
                    continue  # not the node itself: it has not run yet
                if step.unused and step.index not in keep:
                    env[step.index] = _UNSET
                ran[step.index] = True
        except (EarlyStop, GeneratorExit, _CallsEnded):
            raise
        except BaseException as error:
            if error is not self.failed:  # not yet noted by a body's fold
                self.failed = error
                if step is not None and not isinstance(error, OutOfOrderError):
                    add_note(error, _node_note(frame.node(step)))
            raise

    def _loop(self, frame: _Frame, step: Step) -> Program:
        """Run a loop's body once per item; a stop inside it ends the loop."""
        args, _ = step.resolve(frame.env, frame.nodes)
        collection, captures = args[0], args[1:]
        try:
            items = iter(collection)
        except TypeError:
            raise TypeError(
                f"cannot loop over a {type(collection).__name__}: it is not iterable"
            ) from None
        frame.env[step.index] = _NOT_RUN
        body, body_graph = frame.body(step)
        for number, item in enumerate(items):
            child = frame.inner(body, body_graph, captures, item, step.exports)
            child.in_loop = True
            try:
                yield from self._fold(child, body.steps)
            except EarlyStop:
                self._finish_body(frame, step, child)
                return
            except BaseException as error:
                add_note(error, f"nnsight_pure: in iteration {number} of the loop at {short(frame.node(step).source)}")
                raise
            self._finish_body(frame, step, child)

    def _each_call(self, frame: _Frame, step: Step) -> Program:
        """Run a loop over calls: its body once per call index, accesses shifted.

        The first iteration runs the whole body; later ones run only the part
        that touches the scope's calls (`Step.again`), with the values of the
        rest kept from the first (nnsight 0.4: ``.all()`` applies to the
        module and those below it only). So a body that touches no call of
        its scope runs once. The rest of the first iteration, which no later
        one needs (say ``model.generator.output``, which comes last), runs
        beside the later iterations, as a program of its own, so that it
        cannot hold them up. An open-ended loop (``stop=None``) ends when the
        model stops calling (the last, unfinished iteration is dropped) or
        when an iteration received no call of its scope (it could follow no
        call; the next would do the same), and the program goes on.
        """
        op = frame.node(step).op
        assert isinstance(op, EachCall)
        args, _ = step.resolve(frame.env, frame.nodes)
        body, body_graph = frame.body(step)
        unbounded = op.stop is None and not op.calls
        calls: Any = op.calls or (itertools.count(op.start, op.step) if unbounded else range(op.start, op.stop or 0, op.step))
        frame.env[step.index] = _NOT_RUN
        open_ended = frame.open_ended or unbounded
        iterator = iter(calls)
        call = next(iterator, None)
        if call is None:
            return
        cell = [False]
        first = _Frame(body, body_graph, args, call, step.exports | step.carry, frame.offsets + ((op.scope, call),),
                       open_ended, frame.marks + (cell,), True)
        again = step.again
        # The first iteration up to the last step that later ones repeat; the rest beside them.
        cut = again[-1].index + 1 if again else 0
        head = tuple(each for each in body.steps if each.index < cut)
        tail = tuple(each for each in body.steps if each.index >= cut)
        try:
            yield from self._fold(first, head)
        except EarlyStop:
            self._finish_body(frame, step, first)
            return
        except _CallsEnded:
            if frame.open_ended and not unbounded:
                raise  # an enclosing open-ended loop ends too
            return
        if not again or (unbounded and not cell[0]):
            yield from self._fold_rest(frame, first, tail, unbounded)  # no call to follow
            self._finish_body(frame, step, first)
            return
        last: list[_Frame] = [first]
        later = self._later_calls(frame, step, first, iterator, unbounded, last)
        if not tail:
            yield from later  # nothing runs beside them: fold them inline
        elif frame.open_ended:
            # Inside another open-ended loop, whose end must reach them: in turn.
            if not (yield from self._fold_rest(frame, first, tail, unbounded)):
                yield from later
        else:
            program = _Program(("calls", step.index), later)
            self._spawn(program)
            if (yield from self._fold_rest(frame, first, tail, unbounded)):
                program.generator.close()  # a stop ends the loop
                program.done = True
            elif not program.done:
                yield (WAIT_DONE, program, step.index, False)
        final = last[0]
        if final is not first:
            # What the first iteration computed after the later ones began.
            env = first.env
            for index in step.carry | step.exports:
                if env[index] is not _UNSET and final.env[index] is _UNSET:
                    final.env[index] = env[index]
        self._finish_body(frame, step, final)

    def _fold_rest(
        self, frame: _Frame, first: _Frame, tail: Sequence[Step], unbounded: bool
    ) -> Generator[Request, Any, bool]:
        """The rest of a loop's first iteration (see `_each_call`); True if a
        stop in it ends the loop."""
        try:
            yield from self._fold(first, tail)
        except EarlyStop:
            return True
        except _CallsEnded:
            if frame.open_ended and not unbounded:
                raise  # an enclosing open-ended loop ends too
        return False

    def _later_calls(
        self, frame: _Frame, step: Step, first: _Frame, calls: Any, unbounded: bool, last: list[_Frame]
    ) -> Program:
        """A loop's iterations after the first (see `_each_call`); ``last[0]``
        is the latest one that finished."""
        op = frame.node(step).op
        assert isinstance(op, EachCall)
        args, _ = step.resolve(frame.env, frame.nodes)
        body, body_graph = frame.body(step)
        again = {each.index for each in step.again}
        kept = tuple(sorted(i for i in step.carry | step.exports if i not in again and first.env[i] is not _UNSET))
        open_ended = frame.open_ended or unbounded
        for call in calls:
            cell = [False]
            child = _Frame(body, body_graph, args, call, step.exports, frame.offsets + ((op.scope, call),),
                           open_ended, frame.marks + (cell,), True)
            env, ran = child.env, child.ran
            for index in kept:
                env[index] = first.env[index]
                ran[index] = True
            try:
                yield from self._fold(child, step.again)
            except EarlyStop:
                last[0] = child
                return
            except _CallsEnded:
                if frame.open_ended and not unbounded:
                    raise  # an enclosing open-ended loop ends too
                return
            last[0] = child
            if unbounded and not cell[0]:
                return

    def _spawn(self, program: _Program) -> None:
        """Add a program, resumed right after the one running now."""
        programs = self.programs
        for position, other in enumerate(programs):
            if other.running:
                programs.insert(position + 1, program)
                return
        programs.append(program)

    @staticmethod
    def _finish_body(frame: _Frame, step: Step, child: _Frame) -> None:
        frame.children[step.index] = child.results()
        frame.env[step.index] = child.exports()

    # --- gradients ------------------------------------------------------------------

    def _remember_view(self, view: torch.Tensor, base: torch.Tensor, start: int, size: int) -> None:
        self.views[id(view)] = (weakref.ref(view), weakref.ref(base), start, size)

    def _hook_gradient(self, step: Step, tensor: Any) -> None:
        """Put a one-shot hook on ``tensor`` (or, for an invoke's rows, on the
        batch tensor the model uses) for the gradient node ``step``."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f".grad needs a tensor; got a {type(tensor).__name__}")
        if not tensor.requires_grad:
            raise RuntimeError(
                "this value does not require grad, so no gradient flows into it (are the "
                "model's parameters frozen, or is the run under torch.no_grad()?)"
            )
        target, rows = tensor, None
        entry = self.views.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            base = entry[1]()
            if base is not None:
                target, rows = base, (entry[2], entry[3])
        handle: list[RemovableHandle] = []

        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            handle[0].remove()  # one-shot: the next backward needs a new .grad
            return self._on_gradient(step.index, rows, grad)

        handle.append(target.register_hook(hook))  # type: ignore[no-untyped-call]  # unannotated in torch
        self.grad_hooks.append(handle[0])

    def _on_gradient(self, index: int, rows: tuple[int, int] | None, grad: torch.Tensor) -> torch.Tensor | None:
        """A gradient hook fired: feed the programs waiting for it; return the
        replaced gradient, or ``None`` to leave it (edits in place included)."""
        key = grad_key(index)
        value = grad if rows is None else grad.narrow(0, rows[0], rows[1])
        outer = (self.current, self.activation, self.swapped)
        self.current, self.activation, self.swapped = key, value, False
        try:
            self.advance_all()
            if self.readers.get(key, 0) > 0:
                self.kept[key] = self.activation
            if not self.swapped:
                return None
            if rows is None:
                return self.activation  # type: ignore[no-any-return]  # checked by _swap_gradient
            start, size = rows
            return torch.cat([grad.narrow(0, 0, start), self.activation, grad.narrow(0, start + size, grad.shape[0] - start - size)])
        finally:
            self.current, self.activation, self.swapped = outer

    def _swap_gradient(self, step: Step, new: Any) -> None:
        old = self.activation
        if not isinstance(new, torch.Tensor) or new.shape != old.shape:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"a new gradient must be a tensor of shape {tuple(old.shape)}, like the old one; got {shape}")
        self.activation = new.to(dtype=old.dtype, device=old.device)
        self.swapped = True

    def _swap(self, step: Step, new: Any) -> None:
        """Make the running hook hand ``new`` back to the model (this invoke's rows)."""
        what = f"{module_expr(step.key[0] if step.key else '')}.{step.kind}"
        if step.kind == "output":
            self.activation = merge_rows(self.activation, new, self.groups, step.invoke, what)
        elif step.kind == "inputs":
            args, kwargs = _as_inputs(new, what)
            self.activation = merge_rows(self.activation, (args, kwargs), self.groups, step.invoke, what)
        else:
            args, kwargs = self.activation
            if not args:
                raise TypeError(f"{what}: the module was called without positional arguments")
            first = merge_rows(args[0], new, self.groups, step.invoke, what)
            self.activation = ((first,) + tuple(args[1:]), kwargs)
        self.swapped = True

    def _out_of_order(self, frame: _Frame, step: Step, access_index: int | None) -> OutOfOrderError:
        write = frame.node(step)
        access = None if access_index is None else frame.nodes[access_index]
        target_key = step.guard[0] if step.guard is not None else step.key
        where_now = f"it is now at {_event_text(self.current)}" if self.current else "it has not started or has returned"
        message = (
            f"this write runs too late: the model has already moved past "
            f"{_event_text(target_key)} ({where_now}), so the write would have no effect.\n"
            f"  the write: {describe(write.source)}\n"
            f"  node: {format_node(write)}"
        )
        if access is not None:
            message += (
                f"\n  it writes into {_event_text(target_key)}, read at {short(access.source)}: "
                f"{format_node(access)}"
            )
        message += (
            "\nAccess modules in the order the model calls them: make this write before any "
            "access to a later module (or .clone() the value to edit a copy)."
        )
        return OutOfOrderError(message)

    # --- the driver -----------------------------------------------------------------

    def _advance(self, program: _Program) -> bool:
        """Feed one program for as long as what it waits for exists; True if it moved."""
        moved = False
        while not program.done and not program.running:
            message: Any = None
            if program.started:
                assert program.request is not None
                wait, what, _, may_end = program.request
                if wait == WAIT_EVENT:
                    if what == self.current:
                        message = (self.activation, True)
                    elif what in self.kept:
                        message = (self.kept[what], False)
                    elif self.ended and may_end:
                        path, site, call = what
                        if self.calls.get((path, site), 0) > call:
                            self.missed.append(what)  # it happened, unseen: warn
                        message = (_END, False)
                    else:
                        break
                    if what in self.readers:
                        left = self.readers[what] - 1
                        self.readers[what] = left
                        if left <= 0:
                            self.kept.pop(what, None)
                elif wait == WAIT_VALUE and self.frame.env[what] is _UNSET:
                    break
                elif wait == WAIT_STEP and not self.frame.ran[what]:
                    break
                elif wait == WAIT_DONE and not what.done:
                    break
            program.started = True
            program.running = True
            try:
                program.request = program.generator.send(message)
            except StopIteration:
                program.done = True
            finally:
                program.running = False
            moved = True
        return moved

    def advance_all(self) -> None:
        """Resume the programs in order until none can move (a value one of them
        computes may let an earlier one go on)."""
        programs = self.programs
        if len(programs) == 1:
            self._advance(programs[0])  # alone, it goes as far as it can at once
        if len(programs) > 1:  # (a loop over calls may have added one)
            moved = True
            while moved:
                moved = False
                for program in self.programs:
                    if self._advance(program):
                        moved = True
        if self.stopping:
            raise EarlyStop()

    def on_event(self, path: str, site: Site, value: Any) -> Any:
        """A hook fired: count the call, feed the programs, return the (possibly
        replaced) value, or ``None`` to leave the model's value as it is."""
        if threading.get_ident() != self.thread:
            return None  # another thread's run of the same model
        site_key = (path, site)
        calls = self.calls
        call = calls.get(site_key, 0)
        calls[site_key] = call + 1
        key = (path, site, call)
        plan = self.plan
        dynamic = site_key in plan.dynamic_sites
        if not dynamic and key not in plan.event_keys:
            return None
        # (A hooked call made by a running program, say an ad-hoc call with
        # hook=True, resumes only the other programs; the running one finds the
        # value kept below.)
        outer = (self.current, self.activation, self.swapped)
        self.current, self.activation, self.swapped = key, value, False
        try:
            if plan.stops and key in plan.stops:
                self._arm_stops(key)
            self.advance_all()
            if self.readers.get(key, 0) > 0:
                # Later nodes read this call again: keep its final value for them.
                self.kept[key] = self.activation
            elif dynamic:
                # A loop over calls may still read this call (a look back within
                # its step): keep the latest call of the site only.
                previous = self.latest.get(site_key)
                if previous is not None and previous not in self.plan.event_keys:
                    self.kept.pop(previous, None)
                self.kept[key] = self.activation
                self.latest[site_key] = key
            return self.activation if self.swapped else None
        finally:
            self.current, self.activation, self.swapped = outer

    def _arm_stops(self, key: EventKey) -> None:
        """A stop computed from module calls takes effect at the last of them,
        whatever its program waits for (nnsight 0.4 fired it at that hook)."""
        calls = self.calls
        for _, needed in self.plan.stops[key]:
            if all(calls.get((path, site), 0) > call for path, site, call in needed):
                self.stopping = True

    def end_of_run(self) -> None:
        """The model's method returned: end the loops over calls still waiting
        for a call (the programs go on after them, with what was kept)."""
        self.ended = True
        self.advance_all()

    def module(self, path: str) -> torch.nn.Module:
        """The submodule at ``path`` (looked up once per run)."""
        module = self._modules.get(path)
        if module is None:
            if self.root is None:
                raise TraceError(f"{module_expr(path)} can only be used inside a trace")
            module = submodule(self.root, path)
            self._modules[path] = module
        return module

    def finish(self, stopped: bool, graph: Graph) -> tuple[Results, dict[int, Any]]:
        """Close the programs and collect the saved (and exported) values."""
        blocked: dict[ProgramKey, tuple[int, int]] = {}
        if not stopped:
            for program in self.programs:
                if not program.done and program.request is not None and not _is_loop_part(program.key):
                    wait, what, at, _ = program.request
                    waited = what if wait in (WAIT_VALUE, WAIT_STEP) else at
                    blocked[program.key] = (at, waited)
                    _warn_unexecuted_writes(self.plan, graph, program.key, at, waited)
        for path, site, call in self.missed:
            seen = self.calls.get((path, site), 0)
            warnings.warn(
                f"a loop over calls of {_event_text((path, site, 0)).removesuffix('.output').removesuffix('.input')} "
                f"missed calls {call} to {seen - 1}: they happened while its invoke was still waiting "
                "for an access written before the loop, or one outside the loop's scope that its "
                "steps use (a module the model calls later, such as model.generator). Write the "
                "loop before such accesses.",
                MissedCallsWarning,
                stacklevel=5,
            )
        self.close()
        return self.frame.results(stopped, blocked, graph), self.frame.exports()

    def close(self) -> None:
        """End every program (started or not) and remove the gradient hooks
        that never fired. Forgets the error the run failed with: its
        traceback holds the run's frames, and a run that kept it would be a
        cycle keeping every activation alive until the garbage collector runs."""
        self.failed = None
        for program in self.programs:
            program.generator.close()
        for handle in self.grad_hooks:
            handle.remove()
        self.grad_hooks.clear()
        self.views.clear()


def _is_loop_part(key: ProgramKey) -> bool:
    """Whether a program is the later iterations of a loop over calls (its
    steps are a body's; its invoke's program reports what is missing)."""
    return isinstance(key, tuple) and key[0] == "calls"


def _exported(source: Any, node: Node) -> Any:
    """A value out of a finished body, or an error saying why it has none."""
    assert isinstance(node.op, Export)
    try:
        return source[node.op.index]
    except KeyError:
        raise ValueError(
            f"this value was made inside a body that did not run, or not that far (a false "
            f"condition, an empty loop, a stopped trace): `{format_node(node)}`"
        ) from None


def _extract(value: Any, step: Step) -> Any:
    """The part of a hook's value that an access reads."""
    if step.kind == "input":
        args, kwargs = value
        if not args:
            raise TypeError(
                f"{module_expr(step.key[0] if step.key else '')}.input is the first positional "
                "argument, but the module was called with keyword arguments only; use .inputs"
            )
        return args[0]
    return value


def _as_inputs(value: Any, what: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], (tuple, list))
        and isinstance(value[1], dict)
    ):
        return tuple(value[0]), dict(value[1])
    raise TypeError(f"{what} must be set to (args, kwargs): a tuple of a tuple and a dict")


def _event_text(key: EventKey | None) -> str:
    if key is None:
        return "the start of the run"
    path, site, call = key
    which = "output" if site == "post" else "input"
    nth = f" (call {call})" if call else ""
    return f"{module_expr(path)}.{which}{nth}"


def _node_note(node: Node) -> str:
    return (
        "nnsight_pure: raised while running the intervention\n"
        f"  {describe(node.source)}\n"
        f"  node: {format_node(node)}"
    )


def _warn_unexecuted_writes(plan: Plan, graph: Graph, program: ProgramKey, at: int, waited: int) -> None:
    pending = sorted(i for i in plan.writes if i >= at and plan.program_of[i] == program)
    if not pending:
        return
    blocker = graph.nodes[waited]
    first = graph.nodes[pending[0]]
    warnings.warn(
        f"{len(pending)} write(s) of {program_label(program)} never ran, e.g. `{format_node(first)}` "
        f"at {short(first.source)}: it was still waiting for `{format_node(blocker)}` (made at "
        f"{short(blocker.source)}) when the model returned.",
        UnexecutedInterventionWarning,
        stacklevel=5,
    )


class Interleaver:
    """A context manager that installs the run's hooks on enter and removes them on exit.

    Handed to `NNsight.interleave`, the overridable point where a model class
    decides how its method runs with the hooks in place.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._installed: Installed = []  # filled in place: nothing to lose to an interrupt

    def __enter__(self) -> Interleaver:
        root = self._run.root
        assert root is not None
        install_hooks(root, self._run.plan.hook_sites, self._run.on_event, self._installed)
        return self

    def __exit__(self, *exc: object) -> None:
        remove_hooks(self._installed)


Interleave = Callable[..., Any]


def run_trace(
    graph: Graph,
    root: torch.nn.Module,
    interleave: Interleave,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    groups: BatchGroups,
    where: SourceLoc | None = None,
    captures: Sequence[Any] = (),
    keep: frozenset[int] = frozenset(),
    keep_result: bool = False,
) -> tuple[Results, dict[int, Any]]:
    """Run a trace's ``graph`` over one call of ``fn(*args, **kwargs)`` on ``root``.

    ``interleave(interleaver, *args, fn=fn, **kwargs)`` runs the model with the
    hooks in place (the model class's `interleave`). ``captures`` are the
    values of the graph's bridges; ``keep`` the nodes whose values to hand
    back (for later traces of a session); ``keep_result`` keeps what the
    method returns in the results. Returns the results and those values.
    Errors propagate with a note naming the user's line; no hook outlives
    the call.
    """
    run = _Run(plan_for(graph), graph, root, groups, captures, keep)
    interleaver = Interleaver(run)
    stopped = False
    returned = None
    try:
        run.advance_all()  # the part of each program that needs no module value
        # The model runs even when no node needs it: a trace promises one run
        # (the user's own hooks, train-mode statistics and other effects).
        returned = interleave(interleaver, *args, fn=fn, **kwargs)
        run.end_of_run()
    except EarlyStop:
        stopped = True
    except BaseException as error:
        if error is not run.failed and where is not None:
            add_note(error, f"nnsight_pure: raised by the model during the trace opened at\n  {describe(where)}")
        run.close()
        raise
    finally:
        # Again, in case an interrupt cut the interleaver's own removal short
        # (or landed between its enter and the model's ``with``): a no-op otherwise.
        remove_hooks(interleaver._installed)
    results, exported = run.finish(stopped, graph)
    if keep_result:
        results = attrs.evolve(results, returned=returned)
    return results, exported


def run_session(graph: Graph, trace_runner: TraceRunner) -> Results:
    """Run a session's ``graph``: its own nodes in order, each trace node
    through ``trace_runner`` (a whole model run). A stop outside loops ends it."""
    run = _Run(plan_for(graph), graph, None, BatchGroups(), trace_runner=trace_runner)
    program = run._fold(run.frame, run.frame.plan.steps)
    stopped = False
    try:
        for request in program:
            raise TraceError(f"a module access outside any trace cannot run: {request!r}")
    except EarlyStop:
        stopped = True
    finally:
        program.close()
        run.close()  # the per-invoke programs a session never starts (each holds the run)
    return run.frame.results(stopped, graph=graph)
