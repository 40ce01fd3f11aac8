"""The fold: running a graph's steps in a frame, one step at a time.

`Fold.fold` is a generator over steps: it runs each step in order and
yields a wait (scheduler.py) whenever one needs something that does not
exist yet, a hook event above all. Condition and loop bodies fold inline
(``yield from``) in frames of their own, so a body can wait for module
calls like any other node. It dispatches with ``match`` on the typed step
(steps.py): mypy checks that every kind of step has its case, and the hot
pair (an ordinary op, a module access) come first. The loops live in
loops.py.

After each step, the values it used lose one use and die at their last
(unless saved or exported), and its own value dies at once if no one reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from ..activation_cache import cache_value
from ..batching import narrow_rows
from ..errors import OutOfOrderError, TraceError
from ..events import GradKey
from ..graph import Node
from ..printing import module_expr
from ..results import Results
from ..source import add_note
from ..steps import (
    BridgeStep,
    CacheStep,
    ComputeStep,
    CondStep,
    EachCallStep,
    ExportStep,
    GradHookStep,
    GradStep,
    IterateStep,
    IterItemStep,
    ModuleGetStep,
    ModuleSetStep,
    SaveStep,
    SetGradStep,
    Step,
    StopStep,
    TraceRunStep,
    WaitEvent,
)
from . import loops
from .frame import NOT_RUN, UNSET, Frame
from .messages import exported, node_note, out_of_order
from .scheduler import END, Program
from .signals import CallsEnded, EarlyStop

if TYPE_CHECKING:
    from .scheduler import Scheduler
    from .world import World


TraceRunner = Callable[[Node, Any, dict[str, Any], tuple[Any, ...], frozenset[int]], tuple[Results, dict[int, Any]]]
"""Runs a trace node of a session: ``(node, invokes, method kwargs, bridges,
exported nodes) -> (results, exported values)``."""

NEVER = GradKey(-1)
"""An event that never happens: what a stopped program waits for."""


class Fold:
    """The step semantics of one run: folds frames over ``world`` (the hook
    state) and ``scheduler`` (to start programs of its own, for loops over
    calls). ``failed`` is the error the fold is raising (noted once)."""

    def __init__(self, world: World, scheduler: Scheduler, trace_runner: TraceRunner | None = None) -> None:
        self.world = world
        self.scheduler = scheduler
        self.trace_runner = trace_runner
        self.failed: BaseException | None = None

    def fold(self, frame: Frame, steps: Sequence[Step]) -> Program:
        """Run ``steps`` in ``frame``, yielding what each waits for."""
        world = self.world
        env, uses, ran, keep, nodes = frame.env, frame.uses, frame.ran, frame.keep, frame.nodes
        step: Step | None = None
        try:
            for step in steps:
                for value_wait in step.foreign:
                    if env[value_wait.node] is UNSET:
                        yield value_wait
                for step_wait in step.after:
                    if not ran[step_wait.node]:
                        yield step_wait
                index = step.index
                match step:
                    case ComputeStep(guard=guard):
                        if guard is not None and frame.shifted(guard.key) != world.current:
                            write, access = frame.node(step), frame.nodes[guard.access]
                            raise out_of_order(world.current, write, guard.key, access)
                        env[index] = step.compute(env, nodes, world)
                    case ModuleGetStep():
                        wait = step.wait
                        if frame.offsets or frame.open_ended:
                            wait = WaitEvent(frame.shifted(step.key), index, frame.open_ended)
                        value, _ = yield wait
                        if value is END:
                            raise CallsEnded()
                        if frame.marks:
                            frame.mark(step.key[0])
                        if step.kind == "input":
                            value = _first_input(value, step)
                        if not world.whole_batch:
                            value = narrow_rows(value, world.groups, step.invoke, world.remember_view)
                        env[index] = value
                    case ModuleSetStep() | SetGradStep():
                        wait = step.wait
                        if frame.offsets or frame.open_ended:
                            wait = WaitEvent(frame.shifted(step.key), index, frame.open_ended)
                        value, is_current = yield wait
                        if value is END:
                            raise CallsEnded()
                        if not is_current:
                            raise out_of_order(world.current, frame.node(step), step.key, None)
                        args, _ = step.resolve(env, nodes)
                        if isinstance(step, ModuleSetStep):
                            if frame.marks:
                                frame.mark(step.key[0])
                            world.swap(step, args[0])
                        else:
                            world.swap_gradient(args[1])
                        env[index] = None
                    case GradHookStep():
                        # Not the node itself: its GradStep/SetGradStep runs when the hook fires.
                        args, _ = step.resolve(env, nodes)
                        world.hook_gradient(step.key, args[0])
                        _release(frame, step.release)
                        continue
                    case GradStep():
                        value, _ = yield step.wait
                        env[index] = value
                    case CacheStep():
                        yield step.wait  # the end of the run (or of a stopped run)
                        env[index] = cache_value(world, step)
                    case SaveStep():
                        env[index] = None
                    case BridgeStep(slot=slot):
                        env[index] = frame.captures[slot]
                    case IterItemStep():
                        env[index] = frame.item
                    case ExportStep():
                        args, _ = step.resolve(env, nodes)
                        env[index] = exported(args[0], frame.node(step))
                    case CondStep():
                        args, _ = step.resolve(env, nodes)
                        env[index] = NOT_RUN
                        if args[0]:
                            child = frame.inner(step, args[1:], None, step.exports, in_loop=False)
                            yield from self.fold(child, step.body.steps)
                            frame.finish_body(step, child)
                    case IterateStep():
                        yield from loops.iterate(self, frame, step)
                    case EachCallStep():
                        yield from loops.each_call(self, frame, step)
                    case TraceRunStep():
                        args, kwargs = step.resolve(env, nodes)
                        if self.trace_runner is None:
                            raise TraceError("a trace node can only run inside a session")
                        results, values = self.trace_runner(frame.node(step), args[0], kwargs, args[1:], step.exports)
                        frame.children[index] = results
                        env[index] = values
                    case StopStep():
                        if frame.in_loop or world.root is None:
                            raise EarlyStop()  # ends the loop (or the session)
                        # The run ends once every program has gone as far as it can
                        # at this event (`Scheduler.advance_all`); this one goes no further.
                        world.stopping = True
                        yield WaitEvent(NEVER, index)
                    case _:
                        _unreachable(step)
                for used in step.release:
                    left = uses[used] - 1
                    uses[used] = left
                    if not left and used not in keep:
                        env[used] = UNSET
                if step.unused and index not in keep:
                    env[index] = UNSET
                ran[index] = True
        except (EarlyStop, GeneratorExit, CallsEnded):
            raise
        except BaseException as error:
            if error is not self.failed:  # not yet noted by a body's fold
                self.failed = error
                if step is not None and not isinstance(error, OutOfOrderError):
                    add_note(error, node_note(frame.node(step)))
            raise


def _release(frame: Frame, release: tuple[int, ...]) -> None:
    """The values a step used lose one use; those at their last die (unless exported)."""
    env, uses, keep = frame.env, frame.uses, frame.keep
    for used in release:
        left = uses[used] - 1
        uses[used] = left
        if not left and used not in keep:
            env[used] = UNSET


def _first_input(value: Any, step: ModuleGetStep) -> Any:
    """``.input``: the first positional argument of the call's (args, kwargs)."""
    args, kwargs = value
    if not args:
        raise TypeError(
            f"{module_expr(step.key[0])}.input is the first positional "
            "argument, but the module was called with keyword arguments only; use .inputs"
        )
    return args[0]


def _unreachable(step: NoReturn) -> NoReturn:
    """mypy's exhaustiveness check: every kind of step has its case above."""
    raise AssertionError(f"no case for {step!r}")
