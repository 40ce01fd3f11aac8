"""The pure core: graph values, arguments and printing, with no model at all (plans: test_plan.py)."""

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
from nnsight_pure.graph import Graph, GraphError, add, check_graph, saved_refs, use_counts, users
from nnsight_pure.ops import Call, CallMethod, ModuleGet, ModuleSet, Save, Stop
from nnsight_pure.plan import compile_plan
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
