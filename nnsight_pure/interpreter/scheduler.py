"""Scheduling a run's programs: who waits for what, and who goes on.

Each program (an invoke's steps, a gradient hook's, a loop over calls'
later iterations) is a generator that folds steps and yields a `Wait`
whenever it needs something that does not exist yet: a hook event
(`WaitEvent`), another program's value (`WaitValue`), another invoke's
access of the same module call, written earlier (`WaitStep`), or the end of
a program it started (`WaitDone`). `Scheduler.advance_all` resumes the
programs, in the order they began in the code, for as long as any of them
can move: a value one computes may let an earlier one go on.
"""

from __future__ import annotations

from typing import Any, Generator, NamedTuple, Protocol, Union

from ..events import Event, LoopPart, ProgramKey
from ..steps import WaitEvent, WaitStep, WaitValue
from .frame import UNSET, Frame, _Sentinel
from .signals import EarlyStop


class WaitDone(NamedTuple):
    """Step ``step`` waits for ``program`` (the later iterations of its loop over calls) to end."""

    program: ProgramState
    step: int


Wait = Union[WaitEvent, WaitValue, WaitStep, WaitDone]
"""What a program waits for (the first three are prebuilt by the plan)."""

Program = Generator[Wait, Any, None]
"""A generator folding steps. After a `WaitEvent` it receives ``(value,
is_current)``: the event's value and whether that hook runs now (or `END`)."""

END: Any = _Sentinel("END")
"""Sent to a wait that the end of the run ends (`WaitEvent.may_end`)."""


class ProgramState:
    """One program's generator and what it waits for."""

    __slots__ = ("key", "generator", "request", "started", "done", "running")

    def __init__(self, key: ProgramKey, generator: Program) -> None:
        self.key = key
        self.generator = generator
        self.request: Wait | None = None
        self.started = False
        self.done = False
        self.running = False  # being resumed now (a generator cannot be re-entered)


class EventState(Protocol):
    """What the scheduler reads of a run's hook-event state (world.py's
    `World`, which holds the scheduler): the event register, the values kept
    for later readers and their reader counts, and whether the run ended or
    a stop took effect. A protocol, so that the scheduler does not import
    the world that imports it."""

    current: Event | None
    activation: Any
    kept: dict[Event, Any]
    readers: dict[Event, int]
    ended: bool
    stopping: bool

    def note_missed(self, key: Event) -> None: ...


class Scheduler:
    """The programs of one run and the order they resume in.

    ``frame`` is the run's top frame (the values and the steps that ran,
    which `WaitValue` and `WaitStep` look at). The run's hook-event state
    (what event runs now, the values kept for later readers) comes with
    each call: it holds the scheduler, not the other way round.
    """

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.programs: list[ProgramState] = []

    def advance(self, program: ProgramState, world: EventState) -> bool:
        """Feed one program for as long as what it waits for exists; True if it moved."""
        moved = False
        while not program.done and not program.running:
            message: Any = None
            if program.started:
                request = program.request
                # (type tests, not `match`: this runs at every hook event of every program)
                if type(request) is WaitEvent:
                    what, _, may_end = request
                    if what == world.current:
                        message = (world.activation, True)
                    elif what in world.kept:
                        message = (world.kept[what], False)
                    elif world.ended and may_end:
                        world.note_missed(what)
                        message = (END, False)
                    else:
                        break
                    readers = world.readers
                    if what in readers:  # one reader fewer; the last one lets the value go
                        left = readers[what] - 1
                        readers[what] = left
                        if left <= 0:
                            world.kept.pop(what, None)
                elif type(request) is WaitValue:
                    if self.frame.env[request.node] is UNSET:
                        break
                elif type(request) is WaitStep:
                    if not self.frame.ran[request.node]:
                        break
                elif type(request) is WaitDone:
                    if not request.program.done:
                        break
                else:
                    raise AssertionError(f"a started program always waits for something, not {request!r}")
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

    def advance_all(self, world: EventState) -> None:
        """Resume the programs in order until none can move; then, if a stop
        took effect, end the run (`EarlyStop`)."""
        programs = self.programs
        if len(programs) == 1:
            self.advance(programs[0], world)  # alone, it goes as far as it can at once
        if len(programs) > 1:  # (a loop over calls may have added one)
            moved = True
            while moved:
                moved = False
                for program in self.programs:
                    if self.advance(program, world):
                        moved = True
        if world.stopping:
            raise EarlyStop()

    def spawn(self, program: ProgramState) -> None:
        """Add a program, resumed right after the one running now."""
        programs = self.programs
        for position, other in enumerate(programs):
            if other.running:
                programs.insert(position + 1, program)
                return
        programs.append(program)

    def blocked(self) -> list[tuple[ProgramKey, int, int]]:
        """The programs that did not finish: ``(program, step, waited)`` each,
        the step it stopped at and the node it waited for (the later
        iterations of a loop over calls are left out: their invoke's program
        reports what is missing)."""
        found = []
        for program in self.programs:
            request = program.request
            if program.done or request is None or type(program.key) is LoopPart:
                continue
            waited = request.node if isinstance(request, (WaitValue, WaitStep)) else request.step
            found.append((program.key, request.step, waited))
        return found

    def close(self) -> None:
        """End every program, started or not."""
        for program in self.programs:
            program.generator.close()
