"""Plans: what the interpreter needs, computed once per graph structure.

Caching and sharing by structure, hook sites and frees, in-place detection,
nodes shared between traces of the same code; and the plan as a value:
its steps are frozen and complete, it holds no mutable container, and its
waits are prebuilt. No test here needs a model run unless it says so.
"""

from __future__ import annotations

import operator
from typing import Any, Iterator

import attrs
import pytest
import torch
from pyrsistent.typing import PMap

import nnsight_pure as nnsight
from nnsight_pure import caches
from nnsight_pure.arguments import Ref, TensorConst
from nnsight_pure.batching import BatchGroups
from nnsight_pure.effects import is_inplace
from nnsight_pure.events import GradKey, GradProgram
from nnsight_pure.graph import Graph, Node
from nnsight_pure.interpreter import Run
from nnsight_pure.ops import Call, CallMethod, ModuleGet, ModuleSet, Op, Save
from nnsight_pure.plan import compile_plan, plan_for
from nnsight_pure.plan_cache import structure_key
from nnsight_pure.steps import (
    ComputeStep,
    CondStep,
    EachCallStep,
    GradHookStep,
    GradStep,
    IterateStep,
    ModuleGetStep,
    ModuleSetStep,
    Plan,
    SetGradStep,
    Step,
    StopStep,
    WaitEvent,
    WaitStep,
    WaitValue,
)
from tests.helpers import tiny_net
from tests.test_graph import build


def test_plans_are_cached_per_graph_value() -> None:
    g = build()
    assert plan_for(g) is plan_for(g)
    assert plan_for(build()) is plan_for(g)  # an equal graph built again shares it


def _scaled(constant: object, fn: Any = operator.mul) -> Graph:
    g, h = Graph().add(ModuleGet("layer1", "output"))
    g, r = g.add(Call(fn), (h, constant))
    return g.add(Save(), (r,))[0]


def test_plans_are_shared_by_structure_not_by_constants() -> None:
    ones, twos = TensorConst(torch.ones(3)), TensorConst(torch.full((3,), 2.0))
    assert plan_for(_scaled(ones)) is plan_for(_scaled(twos))  # tensors are read from each graph
    assert structure_key(_scaled(ones)) == structure_key(_scaled(twos))
    # Immutable constants are part of the structure (a plan may hold them).
    assert plan_for(_scaled(2)) is not plan_for(_scaled(3))
    assert plan_for(_scaled(2)) is not plan_for(_scaled(2.0))
    assert structure_key(_scaled("tensor")) != structure_key(_scaled(ones))  # no marker collides with a string
    assert plan_for(_scaled(2, operator.add)) is not plan_for(_scaled(2))
    # A closure could pin large objects in the table: such graphs keep their plan to themselves.
    big = torch.ones(1000)
    closure = lambda value, other: value * other + big  # noqa: E731
    assert structure_key(_scaled(2, closure)) is None
    assert plan_for(_scaled(2, closure)) is not plan_for(_scaled(2, closure))


def test_a_shared_plan_runs_each_graph_with_its_own_constants() -> None:
    from nnsight_pure.batching import BatchGroups
    from nnsight_pure.interpreter import run_trace

    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    x = torch.rand(1, 3)
    graphs = [_on_linear(value) for value in (1.0, 2.0, 3.0)]
    assert plan_for(graphs[0]) is plan_for(graphs[2])
    for value, graph in zip((1.0, 2.0, 3.0), graphs):
        results, _ = run_trace(graph, net, _interleave, net, (x,), {}, BatchGroups.from_sizes([1]))
        assert torch.equal(results.values[1], net(x) * value)


def _on_linear(value: float) -> Graph:
    g, h = Graph().add(ModuleGet("0", "output"))
    g, r = g.add(Call(operator.mul), (h, TensorConst(torch.full((3,), value))))
    return g.add(Save(), (r,))[0]


def _interleave(interleaver: Any, *args: Any, fn: Any, **kwargs: Any) -> Any:
    with interleaver:
        return fn(*args, **kwargs)


def test_plan_lists_hook_sites_and_frees() -> None:
    g = build()
    plan = compile_plan(g)
    assert plan.hook_sites == (("layer1", "post"),)
    assert plan.saved == frozenset({0})
    assert plan.uses == (4, 1, 0, 0, 0)
    assert [step.release for step in plan.steps] == [(), (), (1,), (), ()]
    assert [step.unused for step in plan.steps] == [False, False, True, True, True]
    assert [invoke for invoke, _ in plan.programs] == [None]


def test_inplace_detection() -> None:
    def node(op: Op) -> Node:
        from pyrsistent import pmap, pvector

        return Node(Ref(1), op, pvector([Ref(0)]), pmap())

    assert is_inplace(node(Call(operator.setitem)))
    assert is_inplace(node(Call(operator.iadd)))
    assert is_inplace(node(CallMethod("zero_")))
    assert is_inplace(node(Call(torch.Tensor.add_)))
    assert not is_inplace(node(CallMethod("requires_grad_")))
    assert not is_inplace(node(CallMethod("add")))
    assert not is_inplace(node(Call(operator.add)))


# --- nodes shared between traces of the same code ------------------------------------------


def _traced(model: Any, x: torch.Tensor, factor: Any) -> Graph:
    with model.trace(x) as tracer:
        (model.layer1.output * factor).save()
    graph: Graph = tracer.graph
    return graph


def test_running_the_same_code_again_shares_its_nodes() -> None:
    import nnsight_pure as nnsight
    from tests.helpers import tiny_net

    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    first, second = _traced(model, x, 2.0), _traced(model, x, 2.0)
    assert first == second
    assert all(a is b for a, b in zip(first.nodes, second.nodes))  # made (and keyed) once
    assert first.nodes[1]._key is not None  # the plan's key of the node is worked out once too


def test_shared_nodes_keep_constants_exact_and_tensors_apart() -> None:
    import nnsight_pure as nnsight
    from tests.helpers import tiny_net

    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    by_int, by_float = _traced(model, x, 1), _traced(model, x, 1.0)
    assert type(by_int.nodes[1].args[1]) is int and type(by_float.nodes[1].args[1]) is float
    zero, minus_zero = _traced(model, x, 0.0), _traced(model, x, -0.0)
    assert str(minus_zero.nodes[1].args[1]) == "-0.0" and str(zero.nodes[1].args[1]) == "0.0"
    one, other = _traced(model, x, torch.ones(1)), _traced(model, x, torch.ones(1))
    assert one.nodes[1] is not other.nodes[1]  # a tensor constant is never shared
    scale = 3.0
    closure, again = (
        nnsight.trace(model, lambda m: nnsight.apply(lambda v: v * scale, m.layer1.output)) for _ in range(2)
    )
    assert closure.nodes[1] is not again.nodes[1]  # a closure is never held by the table


def test_shared_nodes_keep_their_own_source_lines() -> None:
    import nnsight_pure as nnsight
    from tests.helpers import tiny_net

    model = nnsight.NNsight(tiny_net())
    with model.trace(torch.rand(1, 5)) as tracer:
        a = model.layer1.output * 2.0
        b = model.layer1.output * 2.0  # the same node value, another line
    nodes = tracer.graph.nodes
    assert nodes[1].source is not None and nodes[2].source is not None
    assert nodes[2].source.lineno == nodes[1].source.lineno + 1
    del a, b


# --- the plan as a value ---------------------------------------------------------------


def _plus_one(t: torch.Tensor) -> torch.Tensor:
    return t + 1


def _graphs_of_every_kind() -> list[Graph]:
    """Graphs recorded through the API whose plans hold every kind of step
    that a trace can have (read, write, compute, gradients, stop, bodies)."""
    model = nnsight.NNsight(tiny_net())

    def bodies(m: Any) -> Any:
        h = m.layer1.output
        with m.layer1.all():
            m.layer1.output[:] = m.layer1.output * 1
        rows = nnsight.list()
        with nnsight.iter([1, 2]) as value:
            rows.append(value)
        with nnsight.cond(h.sum() > -1e9):
            rows.append(h * 2)
        return rows

    def gradients(m: Any) -> Any:
        grad = m.layer1.output.grad * 1
        m.layer1.output.grad = m.layer1.output.grad * 2
        m.output.sum().backward()
        return grad

    def stopped(m: Any) -> Any:
        first = m.layer1.output * 2
        m.layer2.output.stop()
        return first

    def write(m: Any) -> Any:
        m.layer1.output = m.layer1.output + nnsight.apply(_plus_one, m.layer1.output)
        return m.layer2.output

    return [nnsight.trace(model, fn) for fn in (bodies, gradients, stopped, write)]


def _plans_in(plan: Plan) -> Iterator[Plan]:
    yield plan
    for step in plan.steps:
        if isinstance(step, (CondStep, IterateStep, EachCallStep)):
            yield from _plans_in(step.body)


def _all_steps(plan: Plan) -> list[Step]:
    return [step for each in _plans_in(plan) for step in each.steps + tuple(s for _, p in each.programs for s in p)]


def test_plans_of_the_api_hold_every_kind_of_step() -> None:
    kinds = {type(step) for graph in _graphs_of_every_kind() for step in _all_steps(plan_for(graph))}
    expected = {ComputeStep, ModuleGetStep, ModuleSetStep, GradHookStep, GradStep, SetGradStep, StopStep,
                CondStep, IterateStep, EachCallStep}
    assert expected <= kinds


def test_steps_are_frozen_and_never_change_when_run() -> None:
    model = nnsight.NNsight(tiny_net())
    graphs = _graphs_of_every_kind()
    steps = [step for graph in graphs for step in _all_steps(plan_for(graph))]
    before = [(step, tuple(getattr(step, field.name) for field in attrs.fields(type(step)))) for step in steps]
    for step in steps:
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            step.index = 99  # type: ignore[misc]  # frozen: this must fail
    for graph in graphs:
        nnsight.run(model, graph, torch.rand(2, 5))
        nnsight.run(model, graph, torch.rand(2, 5))
    for step, fields in before:
        now = tuple(getattr(step, field.name) for field in attrs.fields(type(step)))
        assert all(a is b for a, b in zip(fields, now)), step


_MUTABLE = (list, dict, set, bytearray)


def _mutable_parts(value: object, path: str, seen: set[int]) -> Iterator[str]:
    if id(value) in seen or callable(value) and not attrs.has(type(value)):
        return  # (a step's functions are code: they hold constants, not plan state)
    seen.add(id(value))
    if isinstance(value, _MUTABLE):
        yield f"{path}: {type(value).__name__}"
    elif attrs.has(type(value)):
        for field in attrs.fields(type(value)):  # type: ignore[arg-type]  # an attrs class (checked above)
            yield from _mutable_parts(getattr(value, field.name), f"{path}.{field.name}", seen)
    elif isinstance(value, PMap):
        for key, item in value.items():
            yield from _mutable_parts(key, f"{path}[key]", seen)
            yield from _mutable_parts(item, f"{path}[{key!r}]", seen)
    elif isinstance(value, (tuple, frozenset)):
        for number, item in enumerate(value):
            yield from _mutable_parts(item, f"{path}[{number}]", seen)


def test_a_plan_holds_no_mutable_container() -> None:
    for graph in _graphs_of_every_kind() + [build()]:
        plan = plan_for(graph)
        assert list(_mutable_parts(plan, "plan", set())) == []


def test_the_mutable_container_check_can_fail() -> None:
    @attrs.frozen
    class Holder:
        items: tuple[object, ...]

    assert list(_mutable_parts(Holder(((1, [2]),)), "h", set())) == ["h.items[0][1]: list"]


def test_waits_are_prebuilt_in_the_plan() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output"))
    g, _ = g.add(Save(), (h,))
    plan = compile_plan(g)
    read = plan.steps[0]
    assert isinstance(read, ModuleGetStep)
    assert read.wait == WaitEvent(("layer1", "post", 0), 0, False)
    run = Run(plan, g, None, BatchGroups())
    run.start()
    assert run.scheduler.programs[0].request is read.wait  # yielded as it is, not made at run time
    run.close()


def test_cross_invoke_waits_are_prebuilt_too() -> None:
    g, h = Graph().add(ModuleGet("layer1", "output"), invoke=0)
    g, doubled = g.add(Call(operator.mul), (h, 2), invoke=0)
    g, write = g.add(ModuleSet("layer1", "output"), (doubled,), invoke=1)
    g, _ = g.add(Call(operator.add), (doubled, 1), invoke=1)
    plan = compile_plan(g)
    assert plan.steps[3].foreign == (WaitValue(1, 3),)
    assert plan.steps[2].after == (WaitStep(0, 2), WaitStep(1, 2))  # a write waits for the earlier reads of that call
    assert plan.steps[2].foreign == (WaitValue(1, 2),)


def test_gradient_events_and_programs_are_their_own_types() -> None:
    graph = _graphs_of_every_kind()[1]
    plan = plan_for(graph)
    grads = [step for step in plan.steps if isinstance(step, (GradStep, SetGradStep))]
    assert grads and all(step.key == GradKey(step.index) for step in grads)
    assert all(plan.program_of[step.index] == GradProgram(step.index) for step in grads)
    hooks = [step for _, steps in plan.programs for step in steps if isinstance(step, GradHookStep)]
    assert sorted(step.index for step in hooks) == sorted(step.index for step in grads)
    assert all(len(key) == 3 for key in plan.event_keys if not isinstance(key, GradKey))  # no fake module path


def test_equal_structures_share_a_plan_and_so_does_a_module_level_function() -> None:
    model = nnsight.NNsight(tiny_net())
    first, second = (nnsight.trace(model, lambda m: nnsight.apply(_plus_one, m.layer1.output)) for _ in range(2))
    assert plan_for(first) is plan_for(second)
    assert structure_key(first) is not None


def test_a_fresh_function_per_trace_neither_grows_nor_churns_the_table() -> None:
    """A ``lambda`` (or a ``def``) made anew at each trace is a new object each
    time: keyed on it, every trace would add a plan and push the others out."""
    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    kept = plan_for(_scaled(2))
    before = set(caches.PLANS.table)
    for number in range(300):
        def plus(t: torch.Tensor) -> torch.Tensor:
            return t + 1

        fresh = eval("lambda t: t + 1") if number % 2 else plus
        with model.trace(x):
            nnsight.apply(fresh, model.layer1.output).save()
    assert set(caches.PLANS.table) == before
    assert plan_for(_scaled(2)) is kept
    assert structure_key(nnsight.trace(model, lambda m: nnsight.apply(eval("lambda t: t"), m.layer1.output))) is None
