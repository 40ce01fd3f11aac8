"""What a run tells the user: errors and warnings, naming their line and module.

A write that runs too late (`out_of_order`), writes that never ran
(`warn_unexecuted_writes`), calls a loop over calls missed
(`warn_missed_calls`), the note added to an error raised while running a
node (`node_note`), and a value read out of a body that never made it
(`exported`). Pure text, apart from the warnings it issues.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from ..errors import MissedCallsWarning, OutOfOrderError, UnexecutedInterventionWarning
from ..events import END_PATH, Event, EventKey, GradKey, ProgramKey
from ..graph import Graph, Node
from ..ops import Export, Skip
from ..printing import format_node, module_expr, program_label
from ..source import describe, short
from ..steps import Plan
from .frame import NOT_RUN


def event_text(key: Event | None) -> str:
    """An event as the user wrote it: ``model.layer1.output (call 2)``."""
    if key is None:
        return "the start of the run"
    if isinstance(key, GradKey):
        return f"the gradient of %{key.node}"
    path, site, call = key
    if path == END_PATH:
        return "the end of the run (tracer.result)"
    which = "output" if site == "post" else "input"
    nth = f" (call {call})" if call else ""
    return f"{module_expr(path)}.{which}{nth}"


def out_of_order(current: Event | None, write: Node, target: Event, access: Node | None) -> OutOfOrderError:
    """The error for ``write`` (into ``target``, through ``access`` if any) running too late."""
    where_now = f"it is now at {event_text(current)}" if current else "it has not started or has returned"
    passed = event_text(target)
    if isinstance(write.op, Skip) and not isinstance(target, GradKey):
        passed = f"the start of {passed.rpartition('.input')[0]}'s call{passed.rpartition('.input')[2]}"
    message = (
        f"this write runs too late: the model has already moved past "
        f"{passed} ({where_now}), so the write would have no effect.\n"
        f"  the write: {describe(write.source)}\n"
        f"  node: {format_node(write)}"
    )
    if access is not None:
        message += (
            f"\n  it writes into {event_text(target)}, read at {short(access.source)}: "
            f"{format_node(access)}"
        )
    message += (
        "\nAccess modules in the order the model calls them: make this write before any "
        "access to a later module (or .clone() the value to edit a copy)."
    )
    return OutOfOrderError(message)


def node_note(node: Node) -> str:
    """The note added to an error raised while running ``node``."""
    return (
        "nnsight_pure: raised while running the intervention\n"
        f"  {describe(node.source)}\n"
        f"  node: {format_node(node)}"
    )


def exported(source: Any, node: Node) -> Any:
    """A value out of a finished body, or an error saying why it has none."""
    assert isinstance(node.op, Export)
    if source is not NOT_RUN and node.op.index in source:
        return source[node.op.index]
    raise ValueError(
        f"this value was made inside a body that did not run, or not that far (a false "
        f"condition, an empty loop, a stopped trace): `{format_node(node)}`"
    )


def warn_unexecuted_writes(plan: Plan, graph: Graph, program: ProgramKey, at: int, waited: int) -> None:
    """Warn that ``program``'s writes from step ``at`` on never ran (it waited for ``waited``)."""
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
        stacklevel=5,  # the user's line (under Run.finish, run_trace and the model wrapper)
    )


def warn_missed_calls(missed: Sequence[EventKey], calls: dict[tuple[str, Any], int]) -> None:
    """Warn about the calls loops over calls waited for in vain (they happened unseen)."""
    for path, site, call in missed:
        seen = calls.get((path, site), 0)
        warnings.warn(
            f"a loop over calls of {event_text((path, site, 0)).removesuffix('.output').removesuffix('.input')} "
            f"missed calls {call} to {seen - 1}: they happened while its invoke was still waiting "
            "for an access written before the loop, or one outside the loop's scope that its "
            "steps use (a module the model calls later, such as model.generator). Write the "
            "loop before such accesses.",
            MissedCallsWarning,
            stacklevel=6,  # the user's line (under this function, Run.finish, run_trace and the model wrapper)
        )
