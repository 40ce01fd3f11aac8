"""The interpreter driven by hand, with synthetic hook events and no model.

Each test builds a graph, plans it, and plays the model's part itself:
``run.start()`` before the model would run, ``world.on_event(path, site,
value)`` for each hook the model would fire, ``world.end_of_run()`` when it
would return, and ``run.finish`` to collect the results. So the rules of
docs/interpreter.md are checked on the step semantics alone.
"""

from __future__ import annotations

import operator
import warnings

import pytest
import torch

from nnsight_pure.batching import BatchGroups
from nnsight_pure.errors import MissedCallsWarning, OutOfOrderError, UnexecutedInterventionWarning
from nnsight_pure.graph import Graph
from nnsight_pure.interpreter import EarlyStop, Run
from nnsight_pure.ops import Call, EachCall, ModuleGet, ModuleSet, Save, Stop
from nnsight_pure.plan import plan_for
from nnsight_pure.steps import WaitEvent, WaitValue

# A stand-in for the model: only module ops (weights, ad-hoc calls) would look into it.
_ROOT = torch.nn.Module()


def _run(graph: Graph, root: torch.nn.Module | None = _ROOT) -> Run:
    run = Run(plan_for(graph), graph, root, BatchGroups())
    run.start()
    return run


def test_a_read_waits_for_its_event_and_computes_after_it() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output"))
    g, doubled = g.add(Call(operator.mul), (h, 2))
    g, _ = g.add(Save(), (doubled,))
    run = _run(g)
    program = run.scheduler.programs[0]
    assert program.request == WaitEvent(("layer1", "post", 0), 0)
    assert run.world.on_event("layer2", "post", torch.zeros(1)) is None  # not an event of the plan
    assert not program.done
    assert run.world.on_event("layer1", "post", torch.ones(3)) is None  # read only: the model's value stays
    assert run.scheduler.blocked() == []
    run.world.end_of_run()
    results, _ = run.finish(False, g)
    assert torch.equal(results.values[1], torch.full((3,), 2.0))
    assert not results.stopped and not results.blocked


def test_a_write_hands_the_model_a_new_value() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output"))
    g, doubled = g.add(Call(operator.mul), (h, 2))
    g, _ = g.add(ModuleSet("layer1", "output"), (doubled,))
    run = _run(g)
    replaced = run.world.on_event("layer1", "post", torch.ones(2))
    assert torch.equal(replaced, torch.full((2,), 2.0))
    run.finish(False, g)


def test_the_nth_call_is_its_own_event() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output", 1))
    g, _ = g.add(Save(), (h,))
    run = _run(g)
    run.world.on_event("layer1", "post", torch.zeros(1))
    assert not run.scheduler.programs[0].done
    run.world.on_event("layer1", "post", torch.ones(1))
    results, _ = run.finish(False, g)
    assert torch.equal(results.values[0], torch.ones(1))


def test_a_read_may_look_back_at_a_call_that_already_happened() -> None:
    g, late = Graph().add(ModuleGet("layer2", "output"))
    g, early = g.add(ModuleGet("layer1", "output"))
    g, _ = g.add(Save(), (late,))
    g, _ = g.add(Save(), (early,))
    run = _run(g)
    run.world.on_event("layer1", "post", torch.ones(1))
    assert ("layer1", "post", 0) in run.world.kept  # a later node reads it: kept
    run.world.on_event("layer2", "post", torch.zeros(1))
    assert run.world.kept == {}  # its last reader ran: let go
    results, _ = run.finish(False, g)
    assert torch.equal(results.values[1], torch.ones(1)) and torch.equal(results.values[0], torch.zeros(1))


def test_a_write_after_the_model_moved_on_is_out_of_order() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output"))
    g, _ = g.add(ModuleGet("layer2", "output"))
    g, _ = g.add(Call(operator.setitem), (h, 0, 5.0))  # in place, into layer1's value
    run = _run(g)
    run.world.on_event("layer1", "post", torch.ones(2))
    with pytest.raises(OutOfOrderError, match="moved past model.layer1.output .it is now at model.layer2.output"):
        run.world.on_event("layer2", "post", torch.ones(2))
    run.close()


def test_a_write_in_place_at_its_own_event_is_in_order() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output"))
    g, _ = g.add(Call(operator.setitem), (h, 0, 5.0))
    value = torch.ones(2)
    run = _run(g)
    assert run.world.on_event("layer1", "post", value) is None  # edited in place, not replaced
    assert value.tolist() == [5.0, 1.0]
    run.finish(False, g)


def test_an_invoke_waits_for_another_invokes_value() -> None:
    g, h = Graph().add(ModuleGet("layer2", "output"), invoke=0)
    g, _ = g.add(Save(), (h,), invoke=0)
    g, total = g.add(Call(operator.add), (h, 1), invoke=1)  # invoke 1 needs invoke 0's value
    g, _ = g.add(Save(), (total,), invoke=1)
    run = _run(g)
    first, second = run.scheduler.programs
    assert second.request == WaitValue(0, 2)
    run.world.on_event("layer2", "post", torch.ones(1))
    assert first.done and second.done
    results, _ = run.finish(False, g)
    assert torch.equal(results.values[2], torch.full((1,), 2.0))


def test_a_stop_ends_the_run_once_the_programs_have_moved() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output"))
    g, _ = g.add(Save(), (h,))
    g, _ = g.add(Stop(), ())
    g, later = g.add(ModuleGet("layer2", "output"))
    g, _ = g.add(Save(), (later,))
    run = _run(g)
    with pytest.raises(EarlyStop):
        run.world.on_event("layer1", "post", torch.ones(1))
    results, _ = run.finish(True, g)
    assert results.stopped and 0 in results.values and 3 not in results.values


def test_a_stop_of_a_module_value_fires_at_that_call_whatever_its_program_waits_for() -> None:
    g, late = Graph().add(ModuleGet("layer2", "output"))
    g, early = g.add(ModuleGet("layer1", "output"))
    g, _ = g.add(Stop(), (early,))
    run = _run(g)
    with pytest.raises(EarlyStop):
        run.world.on_event("layer1", "post", torch.ones(1))  # the program still waits for layer2
    run.close()


def test_a_call_that_never_comes_leaves_its_program_blocked() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output", 3))
    g, doubled = g.add(Call(operator.mul), (h, 2))
    g, _ = g.add(ModuleSet("layer2", "output"), (doubled,))
    run = _run(g)
    run.world.on_event("layer1", "post", torch.ones(1))
    run.world.end_of_run()
    with pytest.warns(UnexecutedInterventionWarning, match="1 write.s. of outside invokes never ran"):
        results, _ = run.finish(False, g)
    assert results.blocked == {None: (0, 0)}


def _saving_layer1() -> Graph:
    body, h = Graph().add(ModuleGet("layer1", "output"))
    return body.add(Save(), (h,))[0]


def test_a_loop_over_calls_reads_each_call_in_turn() -> None:
    g, _ = Graph().add(EachCall(_saving_layer1(), 0, 2, 1, ("layer1",)), ())
    run = _run(g)
    run.world.on_event("layer1", "post", torch.zeros(1))
    run.world.on_event("layer1", "post", torch.ones(1))
    run.world.end_of_run()
    results, _ = run.finish(False, g)
    assert torch.equal(results.children[0].values[0], torch.ones(1))  # the last iteration's results


def test_calls_a_loop_over_calls_waited_for_in_vain_are_reported() -> None:
    g, _ = Graph().add(ModuleGet("layer2", "output"))  # written before the loop: the loop waits for it
    g, _ = g.add(EachCall(_saving_layer1(), 0, None, 1, ("layer1",)), ())
    run = _run(g)
    for value in range(3):
        run.world.on_event("layer1", "post", torch.full((1,), float(value)))
    run.world.on_event("layer2", "post", torch.zeros(1))  # now the loop starts: its calls are gone
    run.world.end_of_run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.finish(False, g)
    messages = [str(warning.message) for warning in caught if warning.category is MissedCallsWarning]
    assert messages and "missed calls 0 to 2" in messages[0]


def test_a_session_graph_folds_without_events() -> None:
    from nnsight_pure.interpreter import run_session

    g, total = Graph().add(Call(operator.add), (1, 2))
    g, _ = g.add(Save(), (total,))
    results = run_session(g, trace_runner=lambda *args: (None, {}))  # type: ignore[arg-type]
    assert results.values == {0: 3}


def test_programs_are_named_from_their_typed_keys() -> None:
    from nnsight_pure.events import GradProgram, LoopPart
    from nnsight_pure.printing import program_label

    assert program_label(None) == "outside invokes"
    assert program_label(2) == "invoke 2"
    assert program_label(GradProgram(3)) == "the gradient of %3"
    assert program_label(LoopPart(5)) == "the later iterations of the loop over calls %5"
