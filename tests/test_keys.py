"""keys.py and plan_cache.py: one encoding of a node as a key, for equality, interning and plan sharing.

keys.py encodes arguments; plan_cache.py builds a node's and a graph's keys
on them. The exact key decides equality (two nodes are equal exactly when
their exact keys are); the masked key is, node for node, the plan's
structure key.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnsight_pure import keys, plan_cache
from nnsight_pure.arguments import DictConst, ListConst, Opaque, Ref, SliceConst, TensorConst, TupleOf
from nnsight_pure.graph import Graph, Node
from nnsight_pure.ops import Call, CallMethod, Cond, EachCall, GetAttr, Iterate, ModuleGet, Save, TraceRun
from nnsight_pure.source import SourceLoc

CONSTANTS: list[object] = [
    1, 1.0, True, -0.0, 0.0, math.nan, 1j, "s", b"b", None, ..., torch.float32, torch.Size([2, 3]),
    (1, 2.0), ListConst((1, Ref(0))), DictConst((("a", Ref(0)),)), SliceConst(None, 2, None),
    TupleOf(torch.Size, (1, 2)), TensorConst(torch.ones(2)), TensorConst(torch.zeros(2)), Opaque([1]),
]


def _clear_memos(graph: Graph) -> None:
    for node in graph.nodes:
        object.__setattr__(node, "_key", None)
        body = getattr(node.op, "body", None)
        if body is not None:
            _clear_memos(body)


def _graphs() -> list[Graph]:
    def lam(x: Any) -> Any:
        return x + 1

    made = []
    for constant in CONSTANTS:
        graph, ref = Graph().add(ModuleGet("layer1", "output"))
        graph, out = graph.add(Call(operator.add), (ref, constant))
        graph, _ = graph.add(CallMethod("sum"), (out,), {"dim": constant})
        made.append(graph.with_outputs((out, DictConst((("k", ref),)))))
    body, item = Graph().add(GetAttr("shape"), (Ref(0),))
    body, _ = body.add(Save(), (item,))
    for op in (Cond(body), Iterate(body), EachCall(body, 1, None, 2, ("layer1",)), TraceRun(body, "generate")):
        graph, ref = Graph().add(ModuleGet("layer1", "output"))
        graph, _ = graph.add(op, (ref,), invoke=0)
        made.append(graph)
    graph, ref = Graph().add(ModuleGet("layer1", "output"))
    made.append(graph.add(Call(lam), (ref,))[0])  # a closure-free function: shared
    bound = torch.ones(1).add
    made.append(graph.add(Call(bound), (ref,))[0])  # a bound method: not shared
    made.append(graph.add(Cond(graph.add(Call(bound), (Ref(0),))[0]), (ref,))[0])  # in a body: not shared
    return made


def test_masked_keys_are_the_plans_structure_keys() -> None:
    from nnsight_pure.plan_cache import structure_key

    for graph in _graphs():
        _clear_memos(graph)
        ours = plan_cache.graph_key(graph)
        _clear_memos(graph)
        theirs = structure_key(graph)
        if ours is plan_cache.NOT_SHARED:
            assert theirs is None
            continue
        assert theirs is not None and theirs == structure_key(graph) and hash(theirs) == hash(ours)
        for node in graph.nodes:
            assert plan_cache.node_key(node, "masked") == node._key  # the memo the plan cache filled


def test_masked_keys_ignore_tensor_values_and_source_lines() -> None:
    a, ref = Graph().add(ModuleGet("layer1", "output"), source=SourceLoc("a.py", 1, "f"))
    a, _ = a.add(Call(operator.add), (ref, TensorConst(torch.ones(2))))
    b, ref = Graph().add(ModuleGet("layer1", "output"), source=SourceLoc("b.py", 9, "g"))
    b, _ = b.add(Call(operator.add), (ref, TensorConst(torch.zeros(3))))
    assert a != b
    assert plan_cache.graph_key(a) == plan_cache.graph_key(b)


def _node(op: Any, args: tuple[object, ...], kwargs: dict[str, object], invoke: int | None) -> Node:
    graph, ref = Graph().add(ModuleGet("layer1", "output"))
    graph, _ = graph.add(op, (ref,) + args, kwargs, invoke=invoke)
    return graph.nodes[1]


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(range(len(CONSTANTS))), st.sampled_from(range(len(CONSTANTS))),
    st.sampled_from([Call(operator.add), Call(operator.mul), CallMethod("sum")]),
    st.sampled_from([CallMethod("sum"), Call(operator.add)]),
    st.sampled_from([None, 0, 1]), st.sampled_from([None, 0]),
    st.booleans(),
)
def test_exact_keys_decide_equality(
    i: int, j: int, op_a: Any, op_b: Any, invoke_a: int | None, invoke_b: int | None, keyword: bool
) -> None:
    a_args, b_args = (CONSTANTS[i],), (CONSTANTS[j],)
    a = _node(op_a, () if keyword else a_args, {"k": CONSTANTS[i]} if keyword else {}, invoke_a)
    b = _node(op_b, () if keyword else b_args, {"k": CONSTANTS[j]} if keyword else {}, invoke_b)
    assert (a == b) is (plan_cache.node_key(a) == plan_cache.node_key(b))
    if a == b:
        assert hash(a) == hash(b) and hash(plan_cache.node_key(a)) == hash(plan_cache.node_key(b))


def test_exact_keys_keep_scalar_types_and_bits_apart() -> None:
    distinct = [1, 1.0, True, -0.0, 0.0, "1", (1,), ListConst((1,))]
    found = {keys.arg_key(value) for value in distinct}
    assert len(found) == len(distinct)
    assert keys.arg_key(math.nan) == keys.arg_key(math.nan)
    assert keys.arg_key(Ref(3)) == -4 and keys.arg_key(Ref(3), "masked") == -4
    assert keys.arg_key(TensorConst(torch.ones(2)), "masked") == ("tensor",)
    assert keys.arg_key(Opaque([]), "masked") == ("constant",)


def test_atoms_key_is_what_nodes_are_interned_by() -> None:
    assert keys.atoms_key((Ref(0), 1, 2.5, "x", None)) == (-1, (int, 1), (float, (2.5).hex()), "x", None)
    assert keys.atoms_key((Ref(0), 1j)) is None  # (-0.0j equals 0j)
    assert keys.atoms_key((TensorConst(torch.ones(1)),)) is None
