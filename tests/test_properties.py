"""Property tests (hypothesis) for the invariants graph values keep.

* Building never changes an earlier graph value (a state machine keeps every
  graph it made and re-checks all of them after every step).
* Equal programs give equal, equally hashed graphs.
* Running one graph twice gives the same results.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import nnsight_pure as nnsight
from nnsight_pure.arguments import Ref
from nnsight_pure.batching import BatchGroups
from nnsight_pure.graph import Graph, check_graph
from nnsight_pure.interpreter import run_trace
from nnsight_pure.ops import Call, CallMethod, ModuleGet, Op, Save
from nnsight_pure.printing import format_graph
from tests.helpers import tiny_net

PATHS = ["layer1", "layer2", ""]
BINARY = [operator.add, operator.mul, operator.sub]


class GraphBuilding(RuleBasedStateMachine):
    """Grow graphs by random steps; every graph ever made must stay as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.current = Graph()
        self.history: list[tuple[Graph, int, str, int]] = []
        self.reference: list[tuple[Op, tuple[Any, ...]]] = []  # a naive list of what was added

    def _remember(self) -> None:
        g = self.current
        self.history.append((g, len(g), format_graph(g), hash(g)))

    @rule(path=st.sampled_from(PATHS), kind=st.sampled_from(["output", "input", "inputs"]))
    def access(self, path: str, kind: Any) -> None:
        op = ModuleGet(path, kind)
        self.current, _ = self.current.add(op)
        self.reference.append((op, ()))
        self._remember()

    @rule(data=st.data(), fn=st.sampled_from(BINARY), constant=st.integers(-3, 3) | st.floats(-2, 2, allow_nan=False))
    def binary(self, data: st.DataObject, fn: Any, constant: Any) -> None:
        if not len(self.current):
            return
        target = data.draw(st.integers(0, len(self.current) - 1))
        op, args = Call(fn), (Ref(target), constant)
        self.current, _ = self.current.add(op, args)
        self.reference.append((op, args))
        self._remember()

    @rule(data=st.data())
    def save(self, data: st.DataObject) -> None:
        if not len(self.current):
            return
        target = data.draw(st.integers(0, len(self.current) - 1))
        self.current, _ = self.current.add(Save(), (Ref(target),))
        self.reference.append((Save(), (Ref(target),)))
        self._remember()

    @invariant()
    def earlier_graphs_are_unchanged(self) -> None:
        for graph, length, text, digest in self.history:
            assert len(graph) == length
            assert format_graph(graph) == text
            assert hash(graph) == digest
            check_graph(graph)

    @invariant()
    def current_agrees_with_the_naive_list(self) -> None:
        assert [(n.op, tuple(n.args)) for n in self.current] == self.reference


TestGraphBuilding = GraphBuilding.TestCase
TestGraphBuilding.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


programs = st.lists(
    st.tuples(st.sampled_from(["mul", "add", "neg", "sum", "setitem"]), st.integers(-3, 3)),
    min_size=0,
    max_size=8,
)


def _trace_program(
    model: nnsight.NNsight, x: torch.Tensor, program: list[tuple[str, int]]
) -> tuple[Graph, dict[int, Any]]:
    """Record a random but valid program: ops on layer1's output, then layer2's."""
    saved = []
    with model.trace(x) as tracer:
        for path in ("layer1", "layer2"):
            h = model.get(path).output
            for name, k in program:
                if name == "mul":
                    h = h * k
                elif name == "add":
                    h = h + k
                elif name == "neg":
                    h = -h
                elif name == "sum":
                    saved.append(h.sum(dim=-1).save())
                else:
                    h[:, abs(k) % 2] = k
            saved.append(h.save())
    return tracer.graph, {p._ref.index: p.value for p in saved if p._ref is not None}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs)
def test_equal_programs_give_equal_graphs(program: list[tuple[str, int]]) -> None:
    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    g1, _ = _trace_program(model, x, program)
    g2, _ = _trace_program(model, x, program)
    assert g1 == g2 and hash(g1) == hash(g2)
    changed, _ = g1.add(CallMethod("abs"), (Ref(0),))
    assert changed != g1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs)
def test_running_one_graph_twice_gives_the_same_results(program: list[tuple[str, int]]) -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(1, 5)
    graph, values = _trace_program(model, x, program)
    groups = BatchGroups.from_sizes([1])
    first, _ = run_trace(graph, net, model.interleave, model._execute, (x,), {}, groups)
    second, _ = run_trace(graph, net, model.interleave, model._execute, (x,), {}, groups)
    assert sorted(first.values) == sorted(second.values)
    for index, value in first.values.items():
        assert torch.equal(value, second.values[index])
    # ... and the same as the context manager's own run.
    assert sorted(values) == sorted(first.values)
    assert all(torch.equal(values[i], first.values[i]) for i in values)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["mul", "add", "sub_tensor", "getitem", "sum"]), st.sampled_from(["layer1", "layer2"])
        ),
        min_size=1, max_size=6,
    ),
    seeds=st.tuples(st.integers(0, 99), st.integers(0, 99)),
)
def test_graphs_sharing_a_plan_run_with_their_own_constants(
    steps: list[tuple[str, str]], seeds: tuple[int, int]
) -> None:
    """Two traces of one program with different tensor constants share a plan,
    and each gives exactly what a plan compiled for it alone gives."""
    import nnsight_pure.plan as plans

    model = nnsight.NNsight(tiny_net())
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(7))

    def program(seed: int) -> Any:
        constant = torch.rand(10, generator=torch.Generator().manual_seed(seed))

        def fn(m: Any) -> Any:
            outputs = []
            for kind, path in steps:
                value = getattr(m, path).output
                width = 10 if path == "layer1" else 2
                if kind == "mul":
                    value = value * constant[:width]
                elif kind == "add":
                    value = value + float(seed)
                elif kind == "sub_tensor":
                    value = torch.sub(value, constant[:width], alpha=2)
                elif kind == "getitem":
                    value = value[:, seed % width]
                else:
                    value = value.sum(-1)
                outputs.append(value)
            return outputs

        return nnsight.trace(model, fn)

    first, second = program(seeds[0]), program(seeds[1])
    shared = [nnsight.run(model, graph, x).outputs for graph in (first, second)]
    kinds = [kind for kind, _ in steps]
    if seeds[0] == seeds[1] or "add" not in kinds and "getitem" not in kinds:
        assert plans.plan_for(first) is plans.plan_for(second)
    for graph, got in zip((first, second), shared):
        alone = plans.compile_plan(graph)  # a private plan, shared with nothing
        object.__setattr__(graph, "_plan", alone)
        expected = nnsight.run(model, graph, x).outputs
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
