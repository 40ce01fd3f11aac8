"""The pure core: graph values, arguments, printing and plans, with no model at all."""

from __future__ import annotations

import operator
import subprocess
import sys
import textwrap
from collections import namedtuple
from typing import Any

import pytest
import torch

from nnsight_pure.arguments import (
    DictConst,
    ListConst,
    Opaque,
    Ref,
    SliceConst,
    TensorConst,
    TupleOf,
    freeze,
    is_plain_constant,
    thaw,
)
from nnsight_pure.graph import Graph, GraphError, Node, add, check_graph, saved_refs, use_counts, users
from nnsight_pure.ops import Call, CallMethod, ModuleGet, ModuleSet, Op, Save, Stop
from nnsight_pure.plan import compile_plan, is_inplace, plan_for, structure_key
from nnsight_pure.printing import format_graph


def build() -> Graph:
    g = Graph()
    g, h = g.add(ModuleGet("layer1", "output"))
    g, doubled = g.add(Call(operator.mul), (h, 2))
    g, _ = g.add(Call(operator.setitem), (h, (SliceConst(None, None, None), 0), doubled))
    g, _ = g.add(Save(), (h,))
    g, _ = g.add(CallMethod("sum"), (h,), {"dim": 0})
    return g


def test_add_returns_a_new_graph_and_leaves_the_old_one() -> None:
    empty = Graph()
    one, ref = add(empty, ModuleGet("layer1", "output"))
    assert len(empty) == 0 and len(one) == 1 and ref == Ref(0)
    two, ref2 = one.add(Save(), (ref,))
    assert len(one) == 1 and len(two) == 2 and ref2 == Ref(1)
    assert two.nodes[0] is one.nodes[0]  # structure is shared, not copied


def test_structural_equality_and_hash() -> None:
    assert build() == build() and hash(build()) == hash(build())
    assert build() != build().add(Stop())[0]


def test_int_float_and_bool_constants_are_distinct() -> None:
    def with_constant(value: object) -> Graph:
        g, h = Graph().add(ModuleGet("a", "output"))
        return g.add(Call(operator.mul), (h, value))[0]

    graphs = [with_constant(1), with_constant(1.0), with_constant(True)]
    assert len({*graphs}) == 3
    assert graphs[0] == with_constant(1)


def test_tensor_constants_compare_by_value() -> None:
    a = TensorConst(torch.ones(2, 3))
    assert a == TensorConst(torch.ones(2, 3)) and hash(a) == hash(TensorConst(torch.ones(2, 3)))
    assert a != TensorConst(torch.zeros(2, 3))
    assert a != TensorConst(torch.ones(2, 3, dtype=torch.float64))
    assert a != TensorConst(torch.ones(3, 2))
    assert repr(a) == "Tensor[float32](2x3)"


def test_source_locations_are_not_part_of_identity() -> None:
    from nnsight_pure.source import SourceLoc

    g1 = Graph().add(ModuleGet("a", "output"), source=SourceLoc("x.py", 1, "f"))[0]
    g2 = Graph().add(ModuleGet("a", "output"), source=SourceLoc("y.py", 9, "g"))[0]
    assert g1 == g2 and hash(g1) == hash(g2)


def test_freeze_and_thaw_round_trip() -> None:
    class P:
        pass

    proxy = P()
    Point = namedtuple("Point", "x y")
    value = [1, (2.5, proxy), {"k": slice(1, None)}, Point(1, proxy), torch.ones(2), "s", None, ...]
    frozen = freeze(value, P, lambda p: Ref(0))
    assert isinstance(frozen, ListConst)
    hash(frozen)  # frozen arguments are hashable
    thawed: Any = thaw(frozen, ["seven"])
    assert thawed[:2] == [1, (2.5, "seven")]
    assert thawed[2] == {"k": slice(1, None)}
    assert thawed[3] == Point(1, "seven") and type(thawed[3]) is Point
    assert torch.equal(thawed[4], torch.ones(2)) and thawed[5:] == ["s", None, ...]


def test_unhashable_constants_become_opaque() -> None:
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]  # that is the point

    obj = Unhashable()
    frozen = freeze(obj, int, lambda p: p)
    assert isinstance(frozen, Opaque) and thaw(frozen, []) is obj
    assert frozen == freeze(obj, int, lambda p: p) and frozen != freeze(Unhashable(), int, lambda p: p)


def test_static_arguments() -> None:
    assert is_plain_constant((1, SliceConst(None, 2, None)))
    assert not is_plain_constant((1, Ref(0)))
    assert not is_plain_constant(ListConst((1,)))  # a fresh list per run
    assert not is_plain_constant(DictConst((("a", 1),)))
    assert is_plain_constant(TupleOf(tuple, (1,)))
    assert not is_plain_constant(TensorConst(torch.ones(1)))  # each graph's own tensor, never shared


def test_check_graph_rejects_forward_references() -> None:
    check_graph(build())
    bad, _ = Graph().add(Call(operator.neg), (Ref(3),))
    with pytest.raises(GraphError, match="refers to %3"):
        check_graph(bad)
    with pytest.raises(GraphError):
        compile_plan(bad)


def test_dependency_functions() -> None:
    g = build()
    assert users(g) == [[1, 2, 3, 4], [2], [], [], []]
    assert use_counts(g) == [4, 1, 0, 0, 0]
    assert saved_refs(g) == frozenset({0})


def test_format_graph_golden() -> None:
    g = build().add(ModuleSet("layer2", "input", call=1), (Ref(4),))[0]
    expected = textwrap.dedent(
        """\
        graph {
          %0 = model.layer1.output
          %1 = mul(%0, 2)
          %2 = setitem(%0, (:, 0), %1)
          %3 = save %0
          %4 = %0.sum(dim=0)
          %5 = set model.layer2.input [call 1] = %4
        }"""
    )
    assert format_graph(g) == expected == repr(g)
    assert format_graph(Graph()) == "graph {}"


def test_format_graph_names_invokes_when_there_are_several() -> None:
    g, a = Graph().add(ModuleGet("layer1", "output"), invoke=0)
    g, _ = g.add(ModuleSet("layer1", "output"), (a,), invoke=1)
    g, b = g.add(ModuleGet("", "output"))
    g, _ = g.add(Save(), (b,))
    expected = textwrap.dedent(
        """\
        graph {
          invoke 0:
            %0 = model.layer1.output
          invoke 1:
            %1 = set model.layer1.output = %0
          outside invokes:
            %2 = model.output
            %3 = save %2
        }"""
    )
    assert format_graph(g) == expected


def test_the_invoke_is_part_of_a_nodes_identity() -> None:
    assert Graph().add(ModuleGet("a", "output"), invoke=0)[0] != Graph().add(ModuleGet("a", "output"), invoke=1)[0]


def test_format_graph_is_the_same_in_another_process_and_hash_seed() -> None:
    script = textwrap.dedent(
        """
        import operator
        from nnsight_pure.graph import Graph
        from nnsight_pure.ops import Call, CallMethod, ModuleGet
        g, h = Graph().add(ModuleGet("a", "output"))
        g, _ = g.add(CallMethod("view"), (h,), {"b": 1, "a": 2, "c": 3, "dim": 4})
        print(repr(g))
        """
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert "%0.view(a=2, b=1, c=3, dim=4)" in outputs.pop()


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


def _module_level_double(h: Any) -> Any:
    return h * 2


def test_only_functions_a_module_names_are_shared() -> None:
    import nnsight_pure as nnsight
    from nnsight_pure.shareable import shareable
    from tests.helpers import tiny_net

    model = nnsight.NNsight(tiny_net())
    named = [nnsight.trace(model, lambda m: nnsight.apply(_module_level_double, m.layer1.output)) for _ in range(2)]
    assert named[0].nodes[1] is named[1].nodes[1]
    fresh = [nnsight.trace(model, lambda m: nnsight.apply(lambda h: h * 2, m.layer1.output)) for _ in range(2)]
    assert fresh[0].nodes[1] is not fresh[1].nodes[1]  # a new lambda each time: not kept in the table
    assert shareable(_module_level_double) and shareable(torch.relu) and shareable(operator.add)
    assert not shareable(lambda h: h) and not shareable(torch.ones(1).add)


def test_call_range_text() -> None:
    from nnsight_pure.ops import EachCall
    from nnsight_pure.printing import call_range

    body = Graph()
    assert call_range(EachCall(body)) == "0:"
    assert call_range(EachCall(body, 1, 5, 2)) == "1:5:2"
    assert call_range(EachCall(body, 0, 3)) == "0:3"
    assert call_range(EachCall(body, calls=(0, 2, 5))) == "0, 2, 5"
