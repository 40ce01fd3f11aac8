"""The loops of the fold: a loop over items (`Iterate`) and a loop over calls (`EachCall`).

Both run their body in a fresh frame per iteration; a stop inside ends the
loop. A loop over calls runs its first iteration whole and the later ones
only in the part that touches its scope's calls (see `each_call`).
"""

from __future__ import annotations

import itertools
from typing import Any, Generator, Iterator, Protocol, Sequence

from ..events import LoopPart
from ..ops import EachCall
from ..source import add_note, short
from ..steps import EachCallStep, IterateStep, Step
from .frame import NOT_RUN, UNSET, Frame
from .scheduler import Program, ProgramState, Scheduler, Wait, WaitDone
from .signals import CallsEnded, EarlyStop


class BodyFold(Protocol):
    """What a loop needs of the fold that runs it (fold.py's `Fold`, which
    calls the loops): running a body's steps in a frame, and the scheduler
    that a loop over calls starts its later iterations on. A protocol, so
    that this module does not import the fold that imports it."""

    scheduler: Scheduler

    def fold(self, frame: Frame, steps: Sequence[Step]) -> Program: ...


def iterate(fold: BodyFold, frame: Frame, step: IterateStep) -> Program:
    """Run a loop's body once per item; a stop inside it ends the loop."""
    args, _ = step.resolve(frame.env, frame.nodes)
    collection, captures = args[0], args[1:]
    try:
        items = iter(collection)
    except TypeError:
        raise TypeError(f"cannot loop over a {type(collection).__name__}: it is not iterable") from None
    frame.env[step.index] = NOT_RUN
    for number, item in enumerate(items):
        child = frame.inner(step, captures, item, step.exports, in_loop=True)
        try:
            yield from fold.fold(child, step.body.steps)
        except EarlyStop:
            frame.finish_body(step, child)
            return
        except BaseException as error:
            add_note(error, f"nnsight_pure: in iteration {number} of the loop at {short(frame.node(step).source)}")
            raise
        frame.finish_body(step, child)


def each_call(fold: BodyFold, frame: Frame, step: EachCallStep) -> Program:
    """Run a loop over calls: its body once per call index, accesses shifted.

    The first iteration runs the whole body; later ones run only the part
    that touches the scope's calls (`EachCallStep.again`), with the values of
    the rest kept from the first (nnsight 0.4: ``.all()`` applies to the
    module and those below it only). So a body that touches no call of its
    scope runs once. The rest of the first iteration, which no later one
    needs (say ``model.generator.output``, which comes last), runs beside the
    later iterations, as a program of its own, so that it cannot hold them
    up. An open-ended loop (``stop=None``) ends when the model stops calling
    (the last, unfinished iteration is dropped) or when an iteration received
    no call of its scope (it could follow no call; the next would do the
    same), and the program goes on.
    """
    op = frame.node(step).op
    assert isinstance(op, EachCall)
    args, _ = step.resolve(frame.env, frame.nodes)
    unbounded = op.stop is None and not op.calls
    calls: Any = op.calls or (
        itertools.count(op.start, op.step) if unbounded else range(op.start, op.stop or 0, op.step)
    )
    frame.env[step.index] = NOT_RUN
    open_ended = frame.open_ended or unbounded
    iterator = iter(calls)
    call = next(iterator, None)
    if call is None:
        return
    cell = [False]
    first = Frame(step.body, frame.body_graph(step), args, call, step.exports | step.carry,
                  frame.offsets + ((op.scope, call),), open_ended, frame.marks + (cell,), True)
    try:
        yield from fold.fold(first, step.head)
    except EarlyStop:
        frame.finish_body(step, first)
        return
    except CallsEnded:
        if frame.open_ended and not unbounded:
            raise  # an enclosing open-ended loop ends too
        return
    if not step.again or (unbounded and not cell[0]):
        yield from _fold_rest(fold, frame, first, step.tail, unbounded)  # no call to follow
        frame.finish_body(step, first)
        return
    last: list[Frame] = [first]
    later = _later_calls(fold, frame, step, first, iterator, unbounded, last)
    if not step.tail:
        yield from later  # nothing runs beside them: fold them inline
    elif frame.open_ended:
        # Inside another open-ended loop, whose end must reach them: in turn.
        if not (yield from _fold_rest(fold, frame, first, step.tail, unbounded)):
            yield from later
    else:
        program = ProgramState(LoopPart(step.index), later)
        fold.scheduler.spawn(program)
        if (yield from _fold_rest(fold, frame, first, step.tail, unbounded)):
            program.generator.close()  # a stop ends the loop
            program.done = True
        elif not program.done:
            yield WaitDone(program, step.index)
    final = last[0]
    if final is not first:
        # What the first iteration computed after the later ones began.
        env = first.env
        for index in step.carry | step.exports:
            if env[index] is not UNSET and final.env[index] is UNSET:
                final.env[index] = env[index]
    frame.finish_body(step, final)


def _fold_rest(
    fold: BodyFold, frame: Frame, first: Frame, tail: Sequence[Step], unbounded: bool
) -> Generator[Wait, Any, bool]:
    """The rest of a loop's first iteration (see `each_call`); True if a
    stop in it ends the loop."""
    try:
        yield from fold.fold(first, tail)
    except EarlyStop:
        return True
    except CallsEnded:
        if frame.open_ended and not unbounded:
            raise  # an enclosing open-ended loop ends too
    return False


def _later_calls(
    fold: BodyFold, frame: Frame, step: EachCallStep, first: Frame, calls: Iterator[int], unbounded: bool,
    last: list[Frame],
) -> Program:
    """A loop's iterations after the first (see `each_call`); ``last[0]``
    is the latest one that finished."""
    op = frame.node(step).op
    assert isinstance(op, EachCall)
    args, _ = step.resolve(frame.env, frame.nodes)
    kept = tuple(sorted(
        i for i in step.carry | step.exports if i not in step.again_nodes and first.env[i] is not UNSET
    ))
    open_ended = frame.open_ended or unbounded
    body_graph = frame.body_graph(step)
    for call in calls:
        cell = [False]
        child = Frame(step.body, body_graph, args, call, step.exports, frame.offsets + ((op.scope, call),),
                      open_ended, frame.marks + (cell,), True)
        env, ran = child.env, child.ran
        for index in kept:
            env[index] = first.env[index]
            ran[index] = True
        try:
            yield from fold.fold(child, step.again)
        except EarlyStop:
            last[0] = child
            return
        except CallsEnded:
            if frame.open_ended and not unbounded:
                raise  # an enclosing open-ended loop ends too
            return
        last[0] = child
        if unbounded and not cell[0]:
            return
