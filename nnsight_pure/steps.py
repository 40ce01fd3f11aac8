"""Steps: how the interpreter runs each node, one frozen class per kind.

A plan (plan.py) turns every node into a step, named after the op it runs
(`ModuleGetStep` for a `ModuleGet`, ...; `ComputeStep` for the ordinary
ops, `GradHookStep` for the hook a `Grad`/`SetGrad` node puts on its
tensor). `Step` is their closed union: the interpreter dispatches on it
with ``match``, so mypy's exhaustiveness check reaches from the ops into
the fold. Steps are built once every fact about them is known (plan.py
builds them in a second pass) and never change: a plan, and its steps, is
shared by every graph of the same structure and by every thread.

What every step has: ``index`` (its node), ``release`` (the unsaved values
it uses; each loses one use when it runs), ``foreign`` (waits for the values
it uses that another program computes), ``after`` (waits for the accesses
of other invokes to the same module call that are written before it) and
``unused`` (no one reads its value). The waits are prebuilt here, at plan
time, so the fold yields them as they are.

A step holds no graph object: the run reads what varies between graphs of
one structure (tensor constants, source lines, bodies) from its own graph.

`Plan`, the value that holds a graph's steps, lives here too (plan.py
compiles it): a loop step holds its body's plan, so the two are one value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple, Sequence, Union

import attrs
from pyrsistent import pmap
from pyrsistent.typing import PMap

from .events import Event, EventKey, GradKey, ProgramKey, Site
from .ops import AccessKind, Cache

if TYPE_CHECKING:
    from .graph import Node


# --- waits ------------------------------------------------------------------------------


class WaitEvent(NamedTuple):
    """Step ``step`` waits for hook event ``key``; ``may_end``: the end of the
    run ends the wait (inside an open-ended loop over calls)."""

    key: Event
    step: int
    may_end: bool = False


class WaitValue(NamedTuple):
    """Step ``step`` waits for the value of node ``node``, computed by another program."""

    node: int
    step: int


class WaitStep(NamedTuple):
    """Step ``step`` waits for node ``node`` (another invoke's access of the
    same module call, written before it) to run."""

    node: int
    step: int


# --- what steps run ---------------------------------------------------------------------

Resolver = Callable[[list[Any], "Sequence[Node]"], tuple[tuple[Any, ...], dict[str, Any]]]
"""``resolve(env, nodes)``: a node's (args, kwargs) from the run's environment
and the run's graph nodes (read only for constants a plan may not hold)."""

Compute = Callable[[list[Any], "Sequence[Node]", Any], Any]
"""``compute(env, nodes, modules)``: an ordinary node's value, from the run's
environment, its graph nodes and what looks up its modules (evaluate.py)."""


class Guard(NamedTuple):
    """A write in place must run inside hook event ``key``: it writes into the
    value of access node ``access`` (or a view of it)."""

    key: Event
    access: int


# --- the steps --------------------------------------------------------------------------


@attrs.frozen(eq=False, kw_only=True)
class _Step:
    index: int
    release: tuple[int, ...] = ()
    foreign: tuple[WaitValue, ...] = ()
    after: tuple[WaitStep, ...] = ()
    unused: bool = False


@attrs.frozen(eq=False, kw_only=True)
class ComputeStep(_Step):
    """An ordinary op (`Call`, `CallMethod`, `GetAttr`, `SetAttr`,
    `ModuleAttr`, `ApplyModule`). ``guard``: the event a write in place must
    happen in; ``reads``: the module calls whose values (or views of them) it uses."""

    compute: Compute
    guard: Guard | None = None
    reads: tuple[Event, ...] = ()


@attrs.frozen(eq=False, kw_only=True)
class ModuleGetStep(_Step):
    """A module access: wait for call ``key`` and take its ``kind`` of value (this invoke's rows)."""

    key: EventKey
    wait: WaitEvent
    kind: AccessKind
    invoke: int | None


WriteKind = Literal["output", "input", "inputs", "skip"]
"""What a module write replaces: a value of the call, or (``skip``) the call itself."""


@attrs.frozen(eq=False, kw_only=True)
class ModuleSetStep(_Step):
    """A module write: wait for call ``key`` and hand the model a new value
    (this invoke's rows). A `Skip` is one too (``kind="skip"``, at the call's
    ``pre`` event): the value replaces the call's output and its forward."""

    key: EventKey
    wait: WaitEvent
    kind: WriteKind
    invoke: int | None
    resolve: Resolver


@attrs.frozen(eq=False, kw_only=True)
class CacheStep(_Step):
    """A `Cache`: wait for the end of the run (``wait``, the `END_KEY` event)
    and take what the run's cache hooks stored for ``op`` (node ``index``),
    this invoke's rows."""

    wait: WaitEvent
    op: Cache
    invoke: int | None


@attrs.frozen(eq=False, kw_only=True)
class GradHookStep(_Step):
    """Put a one-shot gradient hook (event ``key``) on the tensor of a
    `Grad`/`SetGrad` node, where the node is written; the node's own step
    runs when the hook fires."""

    key: GradKey
    resolve: Resolver


@attrs.frozen(eq=False, kw_only=True)
class GradStep(_Step):
    """Read a gradient: wait for its hook."""

    key: GradKey
    wait: WaitEvent


@attrs.frozen(eq=False, kw_only=True)
class SetGradStep(_Step):
    """Replace a gradient: wait for its hook and hand back a new one."""

    key: GradKey
    wait: WaitEvent
    resolve: Resolver


@attrs.frozen(eq=False, kw_only=True)
class SaveStep(_Step):
    """Mark a value saved (the plan keeps it; the step itself computes nothing)."""


@attrs.frozen(eq=False, kw_only=True)
class StopStep(_Step):
    """End the innermost loop, or else the model run (or the session)."""


@attrs.frozen(eq=False, kw_only=True)
class BridgeStep(_Step):
    """Take the value captured from the enclosing graph into ``slot``."""

    slot: int


@attrs.frozen(eq=False, kw_only=True)
class IterItemStep(_Step):
    """Take the loop's current item."""


@attrs.frozen(eq=False, kw_only=True)
class ExportStep(_Step):
    """Take value ``inner`` out of a finished body (its context node's value)."""

    inner: int
    resolve: Resolver


@attrs.frozen(eq=False, kw_only=True)
class CondStep(_Step):
    """Run ``body`` once if the condition holds; ``exports``: the body nodes
    later nodes read."""

    resolve: Resolver
    body: Plan
    exports: frozenset[int]


@attrs.frozen(eq=False, kw_only=True)
class IterateStep(_Step):
    """Run ``body`` once per item; a stop inside ends the loop."""

    resolve: Resolver
    body: Plan
    exports: frozenset[int]


@attrs.frozen(eq=False, kw_only=True)
class EachCallStep(_Step):
    """A loop over calls: ``body`` once per call index, its accesses shifted.

    ``again``: the body steps that run again at every call after the first
    (those that touch the scope's calls); ``carry``: the values of the others
    that they use (computed once, in the first iteration). ``head`` is the
    first iteration up to the last step the later ones repeat, ``tail`` the
    rest of it (which runs beside them), ``again_nodes`` the indexes of
    ``again``.
    """

    resolve: Resolver
    body: Plan
    exports: frozenset[int]
    again: tuple[Step, ...]
    again_nodes: frozenset[int]
    carry: frozenset[int]
    head: tuple[Step, ...]
    tail: tuple[Step, ...]


@attrs.frozen(eq=False, kw_only=True)
class TraceRunStep(_Step):
    """A trace of a session: a whole model run (its plan is made then)."""

    resolve: Resolver
    exports: frozenset[int]


Step = Union[
    ComputeStep, ModuleGetStep, ModuleSetStep, CacheStep, GradHookStep, GradStep, SetGradStep, SaveStep, StopStep,
    BridgeStep, IterItemStep, ExportStep, CondStep, IterateStep, EachCallStep, TraceRunStep,
]
"""Every kind of step (see the module docstring)."""

BodyStep = Union[CondStep, IterateStep, EachCallStep]
"""The steps that run a body of their own (a trace's is a run of its own)."""


# --- the plan ----------------------------------------------------------------------------

StopsAt = tuple[tuple[int, tuple[EventKey, ...]], ...]
"""The stops that take effect at one module call: ``(stop node, every call it derives from)`` each."""


@attrs.frozen(eq=False)
class Plan:
    """Everything the interpreter needs to run one graph (see module docstring).

    ``steps`` has one step per node; ``programs`` the steps each program
    folds, in the order the programs began (a gradient node has two steps
    there: the hook, in its invoke's program, and the node, in the
    gradient's). ``readers`` counts, per event, the steps (here and in
    nested condition and loop bodies) that read or write it, so that the run
    forgets a kept value after its last reader; the events in
    ``kept_to_end`` are read inside a loop body (every iteration reads them
    again) and kept until the run ends. ``event_keys`` are all of them.
    ``dynamic_sites`` are the module hooks whose call index is only known at
    run time (accesses inside a loop over calls, `EachCall`); ``touches``
    lists the events the graph reads or writes, each with whether it writes.
    ``stops`` maps a module call to the stops that take effect there:
    ``.stop()`` of a value computed from module accesses fires once all of
    them have happened, whatever its program is waiting for.
    ``hook_sites`` are real module hooks only; ``operation_sites`` are the
    sites of operations inside forwards (``envoy.source``, events.py) the
    run must watch, ``skipped`` the module paths and operation sites a
    `Skip` may skip (their forwards are wrapped for the run, forwards.py),
    ``caches`` the `Cache` nodes of this graph (not of bodies) with their ops.
    """

    steps: tuple[Step, ...]
    programs: tuple[tuple[ProgramKey, tuple[Step, ...]], ...]
    program_of: tuple[ProgramKey, ...]
    uses: tuple[int, ...]
    saved: frozenset[int]
    event_keys: frozenset[Event]
    readers: tuple[tuple[Event, int], ...]
    kept_to_end: frozenset[Event]
    hook_sites: tuple[tuple[str, Site], ...]
    dynamic_sites: frozenset[tuple[str, Site]]
    writes: frozenset[int]
    touches: frozenset[tuple[Event, bool]]
    stops: PMap[EventKey, StopsAt] = attrs.field(factory=lambda: NO_STOPS)
    operation_sites: tuple[tuple[str, Site], ...] = ()
    skipped: frozenset[str] = frozenset()
    caches: tuple[tuple[int, Cache], ...] = ()

    straight: tuple[Step, ...] | None = attrs.field(init=False, repr=False)
    """The steps of the one program, when a straight run (interpreter/straight.py)
    can run this plan; else ``None``. Worked out once, with the plan."""

    @straight.default
    def _straight_default(self) -> tuple[Step, ...] | None:
        return straight_program(self)

    @property
    def overrides_forwards(self) -> bool:
        """Whether a run must wrap some module's forward (skips, operation sites)."""
        return bool(self.skipped or self.operation_sites)


NO_STOPS: PMap[EventKey, StopsAt] = pmap()
"""The ``stops`` of a plan without any (the run skips the lookup per event)."""


def straight_program(plan: Plan) -> tuple[Step, ...] | None:
    """The steps of ``plan``'s one program if it is *straight*: module reads,
    module writes (not skips), saves and ordinary ops, each waiting for
    nothing but its own module call; no stops, caches, loops over calls,
    wrapped forwards. Else ``None`` (the general fold runs it)."""
    if len(plan.programs) != 1 or plan.stops is not NO_STOPS or plan.caches or plan.overrides_forwards:
        return None
    if plan.dynamic_sites:
        return None
    steps = plan.programs[0][1]
    for step in steps:
        if step.foreign or step.after:
            return None
        if isinstance(step, (ModuleGetStep, ModuleSetStep)):
            if step.wait.may_end or step.wait.key != step.key or (isinstance(step, ModuleSetStep)
                                                                   and step.kind == "skip"):
                return None
        elif not isinstance(step, (ComputeStep, SaveStep)):
            return None
    return steps
