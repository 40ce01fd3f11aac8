"""Running a graph over one model run: the hook-driven fold.

Each invoke of a trace is its own *program*: its nodes run in the order they
were written. A program is folded by a generator that suspends whenever a
node needs a module value the model has not produced yet, and is resumed by
the hooks when it has. At every hook event the programs resume in the order
they began in the code (invoke 0, invoke 1, ...), so an invoke can use a
value another invoke computed at the same module call (activation patching).
All programs share one environment; everything mutable lives in one `_Run`
made for one run.

Semantics (docs/interpreter.md explains them with examples):

* A module access waits for its call; everything written after it in the
  same invoke waits too.
* Reading a call that already happened still gives its value (the run keeps
  it because the plan says a later node reads it).
* Writing to a call the model has moved past raises `OutOfOrderError`.
* A value from another invoke that is not computed yet is waited for, and
  accesses of one module call from different invokes keep their text order.
* Every value dies after its last use unless it is saved.
* Hooks exist only on the modules the plan needs, only during the run, and
  are removed whatever happens.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import ExitStack
from typing import Any, Callable, Generator, Sequence

import torch

from .batching import BatchGroups, merge_rows, narrow_rows
from .errors import OutOfOrderError, UnexecutedInterventionWarning
from .graph import Graph, SourceLoc
from .hooks import install_hooks
from .plan import EXEC, GET, SAVE, SET, STOP, EventKey, Plan, Site, Step, plan_for
from .printing import format_node, invoke_label, module_expr
from .results import Results
from .source import add_note, describe, short

_UNSET: Any = object()
"""Marks an environment slot whose node has not run (or whose value died)."""

WAIT_EVENT, WAIT_VALUE, WAIT_STEP = 0, 1, 2

Request = tuple[int, Any, int]
"""What a program waits for, at which step: ``(WAIT_EVENT, event key, step)``,
``(WAIT_VALUE, node, step)`` (another invoke's value) or ``(WAIT_STEP, node,
step)`` (another invoke's access of the same module call, written earlier)."""

Program = Generator[Request, Any, None]
"""A generator folding one invoke's steps. After ``WAIT_EVENT`` it receives
``(value, is_current)``: the call's value and whether that hook runs now."""


class EarlyStop(BaseException):
    """Raised through the model to end a run early; caught by `run_graph`.

    A `BaseException`, so that model code catching ``Exception`` cannot
    swallow it.
    """


class _Program:
    """One invoke's generator and what it waits for."""

    __slots__ = ("invoke", "generator", "request", "started", "done")

    def __init__(self, invoke: int | None, generator: Program) -> None:
        self.invoke = invoke
        self.generator = generator
        self.request: Request | None = None
        self.started = False
        self.done = False


class _Run:
    """The mutable state of one run (never shared between runs)."""

    def __init__(self, plan: Plan, root: torch.nn.Module, groups: BatchGroups) -> None:
        self.plan = plan
        self.root = root
        self.groups = groups
        self.env: list[Any] = [_UNSET] * len(plan.steps)
        self.ran = [False] * len(plan.steps)
        self.uses = list(plan.uses)
        self.current: EventKey | None = None
        self.activation: Any = None
        self.swapped = False
        self.kept: dict[EventKey, Any] = {}
        self.readers = dict(plan.readers)
        self.calls: dict[tuple[str, Site], int] = {}
        self.running = False
        self.failed: BaseException | None = None
        self.thread = threading.get_ident()
        self._modules: dict[str, torch.nn.Module] = {}
        self.programs = [_Program(invoke, self._fold(steps)) for invoke, steps in plan.programs]

    @property
    def done(self) -> bool:
        return all(program.done for program in self.programs)

    # --- a program ------------------------------------------------------------------

    def _fold(self, steps: Sequence[Step]) -> Program:
        env, uses, ran = self.env, self.uses, self.ran
        step: Step | None = None
        try:
            for step in steps:
                for index in step.foreign:
                    if env[index] is _UNSET:
                        yield (WAIT_VALUE, index, step.index)
                for index in step.after:
                    if not ran[index]:
                        yield (WAIT_STEP, index, step.index)
                code = step.code
                if code == EXEC:
                    if step.guard is not None and step.guard[0] != self.current:
                        raise self._out_of_order(step, step.guard[1])
                    args, kwargs = step.resolve(env)
                    assert step.run is not None
                    env[step.index] = step.run(self, args, kwargs)
                elif code == GET:
                    value, _ = yield (WAIT_EVENT, step.key, step.index)
                    env[step.index] = narrow_rows(_extract(value, step), self.groups, step.invoke)
                elif code == SET:
                    _, is_current = yield (WAIT_EVENT, step.key, step.index)
                    if not is_current:
                        raise self._out_of_order(step, None)
                    args, _ = step.resolve(env)
                    self._swap(step, args[0])
                    env[step.index] = None
                elif code == SAVE:
                    env[step.index] = None
                elif code == STOP:
                    raise EarlyStop()
                for index in step.release:
                    left = uses[index] - 1
                    uses[index] = left
                    if not left:
                        env[index] = _UNSET
                if step.unused:
                    env[step.index] = _UNSET
                ran[step.index] = True
        except (EarlyStop, GeneratorExit):
            raise
        except BaseException as error:
            self.failed = error
            if step is not None and not isinstance(error, OutOfOrderError):
                add_note(error, _node_note(step))
            raise

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

    def _out_of_order(self, step: Step, access_index: int | None) -> OutOfOrderError:
        write = step.node
        target = self.plan.steps[access_index] if access_index is not None else step
        where_now = f"it is now at {_event_text(self.current)}" if self.current else "it has not started or has returned"
        message = (
            f"this write runs too late: the model has already moved past "
            f"{_event_text(target.key)} ({where_now}), so the write would have no effect.\n"
            f"  the write: {describe(write.source)}\n"
            f"  node: {format_node(write)}"
        )
        if access_index is not None:
            message += (
                f"\n  it writes into {_event_text(target.key)}, read at {short(target.node.source)}: "
                f"{format_node(target.node)}"
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
        while not program.done:
            message: Any = None
            if program.started:
                assert program.request is not None
                wait, what, _ = program.request
                if wait == WAIT_EVENT:
                    if what == self.current:
                        message = (self.activation, True)
                    elif what in self.kept:
                        message = (self.kept[what], False)
                    else:
                        break
                    left = self.readers[what] - 1
                    self.readers[what] = left
                    if left <= 0:
                        self.kept.pop(what, None)
                elif wait == WAIT_VALUE and self.env[what] is _UNSET:
                    break
                elif wait == WAIT_STEP and not self.ran[what]:
                    break
            program.started = True
            self.running = True
            try:
                program.request = program.generator.send(message)
            except StopIteration:
                program.done = True
            finally:
                self.running = False
            moved = True
        return moved

    def advance_all(self) -> None:
        """Resume the programs in order until none can move (a value one of them
        computes may let an earlier one go on)."""
        moved = True
        while moved:
            moved = False
            for program in self.programs:
                if self._advance(program):
                    moved = True

    def on_event(self, path: str, site: Site, value: Any) -> Any:
        """A hook fired: count the call, feed the programs, return the (possibly
        replaced) value, or ``None`` to leave the model's value as it is."""
        if threading.get_ident() != self.thread:
            return None  # another thread's run of the same model
        site_key = (path, site)
        call = self.calls.get(site_key, 0)
        self.calls[site_key] = call + 1
        key = (path, site, call)
        if key not in self.plan.event_keys:
            return None
        if self.running:
            # A hooked module call made by a program itself: keep its value
            # for a later read; programs cannot be resumed re-entrantly.
            self.kept[key] = value
            return None
        outer = (self.current, self.activation, self.swapped)
        self.current, self.activation, self.swapped = key, value, False
        try:
            self.advance_all()
            if self.readers.get(key, 0) > 0:
                # Later nodes read this call again: keep its final value for them.
                self.kept[key] = self.activation
            return self.activation if self.swapped else None
        finally:
            self.current, self.activation, self.swapped = outer

    def module(self, path: str) -> torch.nn.Module:
        """The submodule at ``path`` (looked up once per run)."""
        module = self._modules.get(path)
        if module is None:
            module = self.root.get_submodule(path)
            self._modules[path] = module
        return module

    def finish(self, stopped: bool, graph: Graph) -> Results:
        """Close the programs and collect the saved values."""
        blocked: dict[int | None, tuple[int, int]] = {}
        if not stopped:
            for program in self.programs:
                if not program.done and program.request is not None:
                    wait, what, at = program.request
                    waited = at if wait == WAIT_EVENT else what
                    blocked[program.invoke] = (at, waited)
                    _warn_unexecuted_writes(self.plan, graph, program.invoke, at, waited)
        self.close()
        values = {i: self.env[i] for i in self.plan.saved if self.env[i] is not _UNSET}
        return Results(values=values, stopped=stopped, blocked=blocked)

    def close(self) -> None:
        for program in self.programs:
            program.generator.close()


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


def _node_note(step: Step) -> str:
    return (
        "nnsight_pure: raised while running the intervention\n"
        f"  {describe(step.node.source)}\n"
        f"  node: {format_node(step.node)}"
    )


def _warn_unexecuted_writes(plan: Plan, graph: Graph, invoke: int | None, at: int, waited: int) -> None:
    pending = sorted(i for i in plan.writes if i >= at and graph.nodes[i].invoke == invoke)
    if not pending:
        return
    blocker = graph.nodes[waited]
    first = graph.nodes[pending[0]]
    warnings.warn(
        f"{len(pending)} write(s) of {invoke_label(invoke)} never ran, e.g. `{format_node(first)}` "
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
        self._stack = ExitStack()

    def __enter__(self) -> Interleaver:
        with ExitStack() as stack:
            install_hooks(self._run.root, self._run.plan.hook_sites, self._run.on_event, stack)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


Interleave = Callable[..., Any]


def run_graph(
    graph: Graph,
    root: torch.nn.Module,
    interleave: Interleave,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    groups: BatchGroups,
    where: SourceLoc | None = None,
) -> Results:
    """Run ``graph`` over one call of ``fn(*args, **kwargs)`` on ``root``.

    ``interleave(interleaver, *args, fn=fn, **kwargs)`` runs the model with the
    hooks in place (the model class's `interleave`). Returns the saved values.
    Errors propagate with a note naming the user's line; no hook outlives the call.
    """
    run = _Run(plan_for(graph), root, groups)
    stopped = False
    try:
        run.advance_all()  # the part of each program that needs no module value
        # The model runs even when no node needs it: a trace promises one run
        # (the user's own hooks, train-mode statistics and other effects).
        interleave(Interleaver(run), *args, fn=fn, **kwargs)
    except EarlyStop:
        stopped = True
    except BaseException as error:
        if error is not run.failed:
            add_note(error, f"nnsight_pure: raised by the model during the trace opened at\n  {describe(where)}")
        run.close()
        raise
    return run.finish(stopped, graph)
