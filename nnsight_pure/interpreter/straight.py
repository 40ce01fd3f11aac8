"""The straight run: the common plans run without generators or a scheduler.

Most traces are one invoke reading, saving and writing module values and
doing ordinary ops on them: one program, no loops, no conditions, no
gradients, no stops, no caches, no skips or operation sites. For such a
plan (`steps.straight_program` says which, once per plan) the general machinery
(a generator per program, the scheduler resuming it at every hook event,
the fold's dispatch over every kind of step) is more than the work: a
`StraightRun` holds the program as a position in its steps and, at each
hook event, runs the steps from there as far as the event lets them, in
a plain loop. What it does at each step is the fold's (fold.py) and the
scheduler's (scheduler.py) for those kinds, to the letter: the same
values kept for later readers, the same out-of-order errors and notes,
the same blocked programs and warnings for writes that never ran.

A `StraightRun` is its own `World` (the hook-event state), so the hooks,
`World.on_event` and `World.swap` are the general run's; only feeding the
programs differs. tests/test_fast_path.py runs a battery of graphs both
ways and compares everything a run leaves.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..batching import BatchGroups
from ..errors import OutOfOrderError
from ..events import END_KEY, END_PATH, Event, Site
from ..graph import Graph
from ..results import Results
from ..source import add_note
from ..steps import ComputeStep, ModuleGetStep, ModuleSetStep, Plan, SaveStep, Step
from .fold import _first_input
from .frame import UNSET
from .messages import node_note, out_of_order, warn_unexecuted_writes
from .world import World


def straight_steps(plan: Plan) -> tuple[Step, ...] | None:
    """The steps of ``plan``'s one program if a `StraightRun` can run it,
    else ``None`` (`steps.straight_program`, worked out with the plan)."""
    return plan.straight


class StraightRun(World):
    """One run of a straight plan (see module docstring): a `Run` and its
    `World` in one object, with the same methods `run_trace` uses."""

    def __init__(
        self,
        plan: Plan,
        steps: tuple[Step, ...],
        graph: Graph,
        root: torch.nn.Module | None,
        groups: BatchGroups,
        keep: frozenset[int] = frozenset(),
    ) -> None:
        # (World's state, less what no straight plan uses: skips, views, gradient hooks, loops)
        self.plan = plan
        self.root = root
        self.groups = groups
        self.whole_batch = True  # (checked by `straight_run`)
        self.current: Event | None = None
        self.activation: Any = None
        self.swapped = False
        self.ended = False
        self.stopping = False
        self.kept: dict[Event, Any] = {}
        self.readers = dict(plan.readers)
        self.calls: dict[tuple[str, Any], int] = {}
        self.thread = threading.get_ident()
        self._modules: dict[str, torch.nn.Module] = {}
        self._stops = None
        self.feeding = 0
        self.not_run: list[str] = []
        self.missed = []
        # The program: its steps, the position it waits at, the frame's state.
        self.steps = steps
        self.program_key = plan.programs[0][0]
        self.at = 0
        self.running = False
        self.failed: BaseException | None = None
        self.nodes = graph.nodes
        self.env: list[Any] = [UNSET] * len(plan.steps)
        self.uses = list(plan.uses)
        self.keep = keep

    @property
    def world(self) -> World:
        """The run's hook-event state: itself (a property, not an attribute:
        a run holding itself would be a cycle keeping its values alive until
        the garbage collector runs)."""
        return self

    def start(self) -> None:
        """Run the part of the program that needs no module value."""
        self._advance()

    def on_event(self, path: str, site: Site, value: Any) -> Any:
        """`World.on_event` for a plan with no stops and no loops over calls,
        with `World._feed` run in place."""
        if threading.get_ident() != self.thread:
            return None  # another thread's run of the same model
        site_key = (path, site)
        calls = self.calls
        call = calls.get(site_key, 0)
        calls[site_key] = call + 1
        key = (path, site, call)
        plan = self.plan
        if key not in plan.event_keys:
            return None
        swapped = False
        if not self.running:  # (else a hooked call the program itself made: it finds the kept value)
            outer = (self.current, self.activation, self.swapped)
            self.current, self.activation, self.swapped = key, value, False
            try:
                self._advance()
                value, swapped = self.activation, self.swapped
            finally:
                self.current, self.activation, self.swapped = outer
        if self.readers.get(key, 0) > 0 or key in plan.kept_to_end:
            self.kept[key] = value  # later nodes read this call again
        return value if swapped else None

    def on_end(self, returned: Any) -> None:
        """`World.on_end`: the end-of-run event, if the plan reads it (``tracer.result``)."""
        if END_KEY in self.plan.event_keys:
            self.on_event(END_PATH, "post", returned)
        self.ended = True

    def _advance(self) -> None:
        """Run the steps from the program's position for as long as what
        each needs exists (fold.py's cases for these kinds of step)."""
        steps, env, uses, keep, nodes = self.steps, self.env, self.uses, self.keep, self.nodes
        count = len(steps)
        at = self.at
        step: Step | None = None
        self.running = True
        try:
            while at < count:
                step = steps[at]
                index = step.index
                kind = type(step)
                if kind is ComputeStep:
                    guard = step.guard  # type: ignore[union-attr]
                    if guard is not None and guard.key != self.current:
                        raise out_of_order(self.current, nodes[index], guard.key, nodes[guard.access])
                    env[index] = step.compute(env, nodes, self)  # type: ignore[union-attr]
                elif kind is SaveStep:
                    env[index] = None
                else:
                    what = step.key  # type: ignore[union-attr]
                    if what == self.current:
                        value, is_current = self.activation, True
                    elif what in self.kept:
                        value, is_current = self.kept[what], False
                    else:
                        break
                    readers = self.readers
                    if what in readers:  # one reader fewer; the last one lets the value go
                        left = readers[what] - 1
                        readers[what] = left
                        if left <= 0:
                            self.kept.pop(what, None)
                    if kind is ModuleGetStep:
                        if step.kind == "input":  # type: ignore[union-attr]
                            value = _first_input(value, step)  # type: ignore[arg-type]
                        env[index] = value
                    else:
                        assert isinstance(step, ModuleSetStep)
                        if not is_current:
                            raise out_of_order(self.current, nodes[index], step.key, None)
                        args, _ = step.resolve(env, nodes)
                        self.swap(step, args[0])
                        env[index] = None
                for used in step.release:
                    left = uses[used] - 1
                    uses[used] = left
                    if not left and used not in keep:
                        env[used] = UNSET
                if step.unused and index not in keep:
                    env[index] = UNSET
                at += 1
        except BaseException as error:
            at = count  # the program ended with its error
            if error is not self.failed:
                self.failed = error
                if step is not None and not isinstance(error, OutOfOrderError):
                    add_note(error, node_note(nodes[step.index]))
            raise
        finally:
            self.at = at
            self.running = False

    def finish(self, stopped: bool, graph: Graph) -> tuple[Results, dict[int, Any]]:
        """`Run.finish`: warn about a write that never ran; the results."""
        blocked: dict[Any, tuple[int, int]] = {}
        if self.at < len(self.steps):
            waited = self.steps[self.at].index
            blocked[self.program_key] = (waited, waited)
            warn_unexecuted_writes(self.plan, graph, self.program_key, waited, waited)
        env = self.env
        values = {i: env[i] for i in self.plan.saved if env[i] is not UNSET}
        exports = {i: env[i] for i in self.keep if env[i] is not UNSET}
        self.close()
        return Results(values, stopped, blocked, {}, None, graph), exports

    def close(self) -> None:
        """`Run.close`: forget the error (its traceback holds the run's frames)."""
        self.failed = None


def straight_run(
    plan: Plan, graph: Graph, root: torch.nn.Module | None, groups: BatchGroups, keep: frozenset[int],
) -> StraightRun | None:
    """A `StraightRun` of ``graph`` if its plan is straight and one invoke
    covers the whole batch (no rows to narrow), else ``None``."""
    steps = plan.straight
    if steps is None:
        return None
    if len(groups.groups) > 1:  # (one invoke always covers the whole batch)
        for invoke in range(len(groups.groups)):
            if groups.rows(invoke) is not None:
                return None
    return StraightRun(plan, steps, graph, root, groups, keep)

