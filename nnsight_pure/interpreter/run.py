"""Running a graph: a trace over one model run (hook-driven), or a session.

`Run` puts one run's parts together: its top frame, the hook-event state
(`World`), the scheduler of its programs and the fold. `run_trace` runs a
trace's graph with the hooks in place (`Interleaver`), `run_session` folds
a session's graph directly (each trace node in it runs a whole trace
through the model wrapper's callback).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import attrs
import torch

from ..activation_cache import install_cache_hooks
from ..batching import BatchGroups
from ..errors import TraceError, UnexecutedInterventionWarning
from ..events import ProgramKey
from ..forwards import Wrapped, unwrap_forwards, wrap_forwards
from ..graph import Graph, Node, SourceLoc
from ..hooks import Installed, install_hooks, remove_hooks
from ..ops import ModuleGet, ModuleSet, Skip
from ..plan import plan_for
from ..printing import format_node, module_expr
from ..results import Results
from ..source import add_note, describe, short
from ..steps import Plan
from .fold import Fold, TraceRunner
from .frame import Frame
from .messages import warn_missed_calls, warn_unexecuted_writes
from .scheduler import Program, ProgramState, Scheduler
from .signals import EarlyStop
from .straight import StraightRun, straight_run
from .world import World


class Run:
    """The mutable state of one run of a graph (never shared between runs).

    It can be driven by hand, with no model: `start` runs what needs no
    module value, ``world.on_event(path, site, value)`` feeds a hook event,
    ``world.end_of_run()`` says the model returned, `finish` collects the
    results (tests/test_interpreter.py does exactly that).
    """

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
        self.frame = Frame(plan, graph, captures, None, keep)
        self.scheduler = Scheduler(self.frame)
        self.world = World(plan, root, groups, self.scheduler)
        self.fold = Fold(self.world, self.scheduler, trace_runner)

    @property
    def failed(self) -> BaseException | None:
        """The error the fold is raising (already noted with its node)."""
        return self.fold.failed

    def start(self) -> None:
        """Make the programs (one per invoke, one per gradient hook) and run
        the part of each that needs no module value."""
        self.scheduler.programs = [
            ProgramState(key, self.fold.fold(self.frame, steps)) for key, steps in self.plan.programs
        ]
        self.scheduler.advance_all(self.world)

    def fold_all(self) -> Program:
        """The whole graph as one program, in node order (a session's: no
        invoke waits for another)."""
        return self.fold.fold(self.frame, self.plan.steps)

    def finish(self, stopped: bool, graph: Graph) -> tuple[Results, dict[int, Any]]:
        """Close the programs and collect the saved (and exported) values,
        warning about writes that never ran and calls loops missed."""
        blocked: dict[ProgramKey, tuple[int, int]] = {}
        if not stopped:
            for program, at, waited in self.scheduler.blocked():
                blocked[program] = (at, waited)
                warn_unexecuted_writes(self.plan, graph, program, at, waited)
                if self.world.not_run:
                    _warn_inside_skipped(graph.nodes[waited], self.world.not_run)
        if self.world.missed:
            warn_missed_calls(self.world.missed, self.world.calls)
        self.close()
        return self.frame.results(stopped, blocked, graph), self.frame.exports()

    def close(self) -> None:
        """End every program (started or not) and remove the gradient hooks
        that never fired. Forgets the error the run failed with: its
        traceback holds the run's frames, and a run that kept it would be a
        cycle keeping every activation alive until the garbage collector runs."""
        self.fold.failed = None
        self.scheduler.close()
        self.world.close()


def _warn_inside_skipped(waited: Node, not_run: Sequence[str]) -> None:
    """Warn when a program waited in vain for a call of a module inside one
    whose forward a skip replaced: that module was never called, so the
    access gets no value (and its program's later nodes none either)."""
    op = waited.op
    if not isinstance(op, (ModuleGet, ModuleSet, Skip)):
        return
    outer = next((path for path in not_run if op.path.startswith(path + ".") or not path), None)
    if outer is None or op.path == outer:
        return
    warnings.warn(
        f"`{format_node(waited)}` (made at {short(waited.source)}) gets no value: {module_expr(op.path)} is "
        f"inside {module_expr(outer)}, which was skipped (.skip(...)): its forward did not run, so the modules "
        "inside it were not called. Read the skipped module's .input/.output instead.",
        UnexecutedInterventionWarning,
        stacklevel=5,  # the user's line (under Run.finish, run_trace and the model wrapper)
    )


class Interleaver:
    """A context manager that installs the run's hooks on enter and removes them on exit.

    Handed to `NNsight.interleave`, the overridable point where a model class
    decides how its method runs with the hooks in place.
    """

    def __init__(self, run: Run | StraightRun) -> None:
        self._run = run
        self._installed: Installed = []  # filled in place: nothing to lose to an interrupt
        self._wrapped: Wrapped = []  # (the same)

    def __enter__(self) -> Interleaver:
        world = self._run.world
        plan = self._run.plan
        assert world.root is not None
        try:
            install_hooks(world.root, plan.hook_sites, world.on_event, self._installed)
            if plan.caches:
                install_cache_hooks(world.root, plan.caches, world, self._installed)
            if plan.overrides_forwards:
                wrap_forwards(world.root, plan, world, self._wrapped)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._wrapped:
                unwrap_forwards(self._wrapped)
        finally:
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
    plan = plan_for(graph)
    run: Run | StraightRun | None = straight_run(plan, graph, root, groups, keep)
    if run is None:
        run = Run(plan, graph, root, groups, captures, keep)
    interleaver = Interleaver(run)
    stopped = False
    returned = None
    try:
        run.start()  # the part of each program that needs no module value
        # The model runs even when no node needs it: a trace promises one run
        # (the user's own hooks, train-mode statistics and other effects).
        returned = interleave(interleaver, *args, fn=fn, **kwargs)
        run.world.on_end(returned)
    except EarlyStop:
        stopped = True
        if run.plan.caches:
            run.world.end_after_stop()  # a cache keeps what the calls before the stop stored
    except BaseException as error:
        if error is not run.failed and where is not None:
            add_note(error, f"nnsight_pure: raised by the model during the trace opened at\n  {describe(where)}")
        run.close()
        raise
    finally:
        # Again, in case an interrupt cut the interleaver's own removal short
        # (or landed between its enter and the model's ``with``): a no-op otherwise.
        try:
            if interleaver._wrapped:
                unwrap_forwards(interleaver._wrapped)
        finally:
            if interleaver._installed:
                remove_hooks(interleaver._installed)
    results, exported = run.finish(stopped, graph)
    if keep_result:
        results = attrs.evolve(results, returned=returned)
    return results, exported


def run_session(graph: Graph, trace_runner: TraceRunner) -> Results:
    """Run a session's ``graph``: its own nodes in order, each trace node
    through ``trace_runner`` (a whole model run). A stop outside loops ends it."""
    run = Run(plan_for(graph), graph, None, BatchGroups(), trace_runner=trace_runner)
    program = run.fold_all()
    stopped = False
    try:
        for request in program:
            raise TraceError(f"a module access outside any trace cannot run: {request!r}")
    except EarlyStop:
        stopped = True
    finally:
        program.close()
        run.close()
    return run.frame.results(stopped, graph=graph)
