"""Graphs as data: `trace` builds without running, `run` replays, `compose`,
`edit` and `prune` transform, always matching hand-written torch hooks."""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nnsight_pure as nnsight
from nnsight_pure.errors import OutOfOrderError, TraceError
from nnsight_pure.graph import Graph, GraphError, check_graph
from nnsight_pure.ops import Call, CallMethod, ModuleGet, Op
from nnsight_pure.passes import as_edit, is_pure
from nnsight_pure.plan import plan_for
from nnsight_pure.serialize import digest
from tests.helpers import WithSpare, hook_counts, hooked_run, tiny_gpt2, tiny_net


def ablate_and_read(model: Any) -> Any:
    model.layer1.output[:, 0:3] = 0
    return {"hidden": model.layer1.output, "out": model.output}


def by_hand(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def ablate(output: torch.Tensor) -> torch.Tensor:
        output[:, 0:3] = 0
        return output

    out, seen = hooked_run(net, x, read=("layer1",), replace={"layer1": ablate})
    return seen["layer1"], out


# --- trace and run ----------------------------------------------------------------------


def test_trace_builds_a_graph_without_running_the_model() -> None:
    net = tiny_net()
    calls: list[int] = []
    net.register_forward_hook(lambda *args: calls.append(1))
    graph = nnsight.trace(nnsight.NNsight(net), ablate_and_read)
    assert not calls
    check_graph(graph)
    assert [type(node.op).__name__ for node in graph.nodes] == ["ModuleGet", "Call", "ModuleGet"]
    assert "outputs {'hidden': %0, 'out': %2}" in repr(graph)


def test_proxies_of_a_built_graph_explain_they_have_no_value() -> None:
    kept: list[Any] = []

    def fn(model: Any) -> Any:
        kept.append(model.layer1.output.save())
        return kept[0]

    nnsight.trace(nnsight.NNsight(tiny_net()), fn)
    with pytest.raises(ValueError, match=r"only builds a graph; run it with nnsight_pure.run"):
        kept[0].value


def test_run_matches_hand_written_hooks() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    graph = nnsight.trace(model, ablate_and_read)
    x = torch.rand(4, 5)
    results = nnsight.run(model, graph, x)
    hidden, out = by_hand(net, x)
    assert torch.equal(results["hidden"], hidden) and torch.equal(results["out"], out)
    assert set(results.outputs) == {"hidden", "out"}
    assert hook_counts(net) == {name: (0, 0) for name, _ in net.named_modules()}


def test_a_traced_function_may_return_a_value_made_in_a_block() -> None:
    # The value saved inside the loop's block is exported when it is returned
    # (the export must be part of the graph whose outputs name it).
    net = tiny_net()
    model = nnsight.NNsight(net)

    def inner(m: Any) -> Any:
        with m.layer1.iter[0:1]:
            out = (m.layer1.output * 2).save()
        return out

    graph = nnsight.trace(model, inner)
    x = torch.rand(3, 5)
    _, seen = hooked_run(net, x, read=("layer1",))
    assert torch.equal(nnsight.run(model, graph, x).outputs, seen["layer1"] * 2)


def test_replaying_equals_retracing_on_many_inputs() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    graph = nnsight.trace(model, ablate_and_read)
    for seed in range(25):
        x = torch.rand(1 + seed % 3, 5, generator=torch.Generator().manual_seed(seed))
        replayed = nnsight.run(model, graph, x)
        with model.trace(x):
            model.layer1.output[:, 0:3] = 0
            hidden = model.layer1.output.save()
            out = model.output.save()
        assert torch.equal(replayed["hidden"], hidden.value) and torch.equal(replayed["out"], out.value)
        assert torch.equal(replayed["out"], by_hand(net, x)[1])


def test_replaying_plans_once() -> None:
    model = nnsight.NNsight(tiny_net())
    graph = nnsight.trace(model, ablate_and_read)
    plan = plan_for(graph)
    for _ in range(3):
        nnsight.run(model, graph, torch.rand(2, 5))
    assert plan_for(graph) is plan  # the graph's plan, made once, is reused


def test_the_context_api_records_the_same_graph() -> None:
    model = nnsight.NNsight(tiny_net())
    x = torch.rand(2, 5)
    with model.trace(x) as tracer:
        model.layer1.output[:, 0:3] = 0
        model.layer1.output.save()
        model.output.save()

    def same(m: Any) -> None:
        m.layer1.output[:, 0:3] = 0
        m.layer1.output.save()
        m.output.save()

    built = nnsight.trace(model, same)
    assert built == tracer.graph and digest(built) == digest(tracer.graph)
    assert nnsight.trace(model, same, x) == built  # scanning examples changes nothing in the graph


def test_outputs_keep_any_nesting_and_constants() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)

    def fn(m: Any) -> Any:
        hidden = m.layer1.output
        return [hidden, {"sum": hidden.sum(), "pair": (m.output, 7)}, "label"]

    x = torch.rand(2, 5)
    results = nnsight.run(model, nnsight.trace(model, fn), x)
    hidden, rest, label = results.outputs
    assert torch.equal(hidden, net.layer1(x)) and label == "label"
    assert torch.allclose(rest["sum"], net.layer1(x).sum()) and rest["pair"][1] == 7
    assert torch.equal(results[0], hidden)
    single = nnsight.run(model, nnsight.trace(model, lambda m: m.output), x)
    assert torch.equal(single.outputs, net(x))
    with pytest.raises(TypeError, match="single value"):
        single["out"]


def test_missing_outputs_say_why_and_only_when_read() -> None:
    model = nnsight.NNsight(WithSpare())

    def fn(m: Any) -> Any:
        return {"used": m.used.output, "spare": m.spare.output}

    results = nnsight.run(model, nnsight.trace(model, fn), torch.rand(1, 5))
    assert results["used"].shape == (1, 5)
    with pytest.raises(ValueError, match=r"output `%1 = model.spare.output`.*never reached.*not called"):
        results["spare"]
    with pytest.raises(KeyError, match=r"no output named 'other'; the outputs are \['used', 'spare'\]"):
        results["other"]

    def stops(m: Any) -> Any:
        hidden = m.layer1.output
        nnsight.stop()
        return m.layer2.output, hidden

    stopped = nnsight.run(nnsight.NNsight(tiny_net()), nnsight.trace(tiny_net(), stops), torch.rand(1, 5))
    assert stopped.stopped and stopped[1].shape == (1, 10)
    with pytest.raises(ValueError, match="stopped early"):
        stopped[0]


def test_example_inputs_give_shapes_and_trace_time_errors() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(2, 5)

    def uses_shape(m: Any) -> Any:
        width = m.layer1.output.shape[-1]
        assert width == 10  # a real int while tracing
        return m.layer1.output + torch.ones(width)

    graph = nnsight.trace(model, uses_shape, x)
    assert torch.equal(nnsight.run(model, graph, x).outputs, net.layer1(x) + 1)

    def wrong(m: Any) -> Any:
        return m.layer1.output @ torch.ones(3, 3)  # the line named

    with pytest.raises(RuntimeError, match="same reduction dim") as caught:
        nnsight.trace(model, wrong, x)
    line = wrong.__code__.co_firstlineno + 1
    assert line in [frame.lineno + 1 for frame in caught.traceback]  # raised at the user's line


def test_several_invokes_take_invokes() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            model.layer1.output[:] = 0
        with tracer.invoke(b):
            model.output.save()
    graph = tracer.graph
    results = nnsight.run(model, graph, invokes=[((a,), {}), ((b,), {})])
    assert torch.allclose(next(iter(results.values.values())), net(b))
    with pytest.raises(TypeError, match="2 invokes"):
        nnsight.run(model, graph, a)
    with pytest.raises(TypeError, match="gives inputs for 1"):
        nnsight.run(model, graph, invokes=[((a,), {})])


def test_session_graphs_run_without_inputs() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(1, 5)
    with model.session() as session:
        with model.trace(x):
            hidden = model.layer1.output
        with model.trace(x):
            model.layer1.output = hidden * 2
            out = model.output.save()
    replayed = nnsight.run(model, session.graph)
    (inner,) = [child for child in replayed.children.values() if child.values]
    assert torch.equal(next(iter(inner.values.values())), out.value)
    with pytest.raises(TypeError, match="takes no inputs"):
        nnsight.run(model, session.graph, x)


def test_run_refuses_graphs_for_other_models_before_running() -> None:
    net = tiny_net()
    graph = nnsight.trace(tiny_gpt2(), lambda m: m.transformer.h[0].output)
    with pytest.raises(TraceError, match=r"names the module 'transformer.h.0'.*another model"):
        nnsight.run(net, graph, torch.rand(1, 5))
    assert hook_counts(net) == {name: (0, 0) for name, _ in net.named_modules()}


def test_a_plain_module_is_wrapped() -> None:
    net = tiny_net()
    x = torch.rand(1, 5)
    graph = nnsight.trace(net, lambda m: m.layer2.input)
    assert torch.equal(nnsight.run(net, graph, x).outputs, net.layer1(x))


def test_trace_as_a_decorator_records_one_node() -> None:
    @nnsight.trace
    def double(value: Any) -> Any:
        return value * 2

    assert double(3) == 6  # outside a trace it is the function
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(1, 5)
    with model.trace(x) as tracer:
        doubled = double(model.layer1.output).save()
    assert [node.op for node in tracer.graph.nodes][1] == Call(double.__wrapped__)  # type: ignore[attr-defined]
    assert torch.equal(doubled.value, net.layer1(x) * 2)


# --- composition and edits --------------------------------------------------------------


def measure(model: Any) -> Any:
    return {"logits": model.lm_head.output[:, -1], "mlp": model.transformer.h[1].mlp.output}


def zero_mlp0(model: Any) -> None:
    model.transformer.h[0].mlp.output[:] = 0


def test_compose_equals_both_in_one_trace_and_hooks() -> None:
    net = tiny_gpt2()
    model = nnsight.NNsight(net)
    tokens = torch.tensor([[3, 4, 5, 6]])
    composed = nnsight.compose(nnsight.trace(model, zero_mlp0), nnsight.trace(model, measure))

    def both(m: Any) -> Any:
        zero_mlp0(m)
        return measure(m)

    assert composed == nnsight.trace(model, both)
    results = nnsight.run(model, composed, tokens)
    out, seen = hooked_run(net, tokens, read=("transformer.h.1.mlp",),
                           replace={"transformer.h.0.mlp": torch.zeros_like})
    assert torch.equal(results["logits"], out.logits[:, -1])
    assert torch.equal(results["mlp"], seen["transformer.h.1.mlp"])


def test_compose_merges_outputs() -> None:
    model = nnsight.NNsight(tiny_net())
    a = nnsight.trace(model, lambda m: {"a": m.layer1.output})
    b = nnsight.trace(model, lambda m: {"b": m.layer2.output})
    single = nnsight.trace(model, lambda m: m.output)
    assert set(nnsight.run(model, nnsight.compose(a, b), torch.rand(1, 5)).outputs) == {"a", "b"}
    pair = nnsight.run(model, nnsight.compose(a, single), torch.rand(1, 5)).outputs
    assert set(pair[0]) == {"a"} and pair[1].shape == (1, 2)
    with pytest.raises(ValueError, match=r"both graphs name the output\(s\) \['a'\]"):
        nnsight.compose(a, a)
    assert nnsight.compose(Graph(), a) == a and nnsight.compose(a, Graph()) == a


def test_compose_refuses_mixing_sessions_and_traces() -> None:
    model = nnsight.NNsight(tiny_net())
    with model.session() as session:
        with model.trace(torch.rand(1, 5)):
            model.output.save()
    with pytest.raises(GraphError, match="cannot be composed"):
        nnsight.compose(session.graph, nnsight.trace(model, lambda m: m.output))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["l1", "l2", "out", "zero", "double"]), min_size=3, max_size=9), st.data())
def test_compose_is_associative(steps: list[str], data: st.DataObject) -> None:
    model = nnsight.NNsight(tiny_net())
    actions = {
        "l1": lambda m: {"l1": m.layer1.output},
        "l2": lambda m: {"l2": m.layer2.input},
        "out": lambda m: {"out": m.output},
        "zero": lambda m: m.layer1.output.__setitem__((slice(None), 0), 0),
        "double": lambda m: m.layer2.output.mul(2),
    }
    pieces = [nnsight.trace(model, actions[step]) for step in steps]
    pieces = [piece.with_outputs(None) for piece in pieces]  # names would clash
    first = data.draw(st.integers(1, len(pieces) - 2))
    second = data.draw(st.integers(first + 1, len(pieces) - 1))

    def fold(graphs: list[Graph]) -> Graph:
        result = Graph()
        for graph in graphs:
            result = nnsight.compose(result, graph)
        return result

    left = nnsight.compose(fold(pieces[:first]), fold(pieces[first:second]))
    grouped = nnsight.compose(left, fold(pieces[second:]))
    right = nnsight.compose(fold(pieces[:first]), nnsight.compose(fold(pieces[first:second]), fold(pieces[second:])))
    assert grouped == right == fold(pieces)


def test_edit_with_a_graph_equals_the_edit_block() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(2, 5)
    edited = nnsight.edit(model, nnsight.trace(model, lambda m: m.layer1.output.__setitem__(slice(None), 0)))
    with model.edit() as by_block:
        model.layer1.output[:] = 0
    assert edited.edits == by_block.edits
    assert model.edits is None  # the original is unchanged
    with edited.trace(x):
        out = edited.output.save()
    assert torch.equal(out.value, net.layer2(torch.zeros(2, 10)))
    # a graph traced on the edited model starts with its edits
    replayed = nnsight.run(model, nnsight.trace(edited, lambda m: m.output), x)
    assert torch.equal(replayed.outputs, out.value)
    more = nnsight.trace(model, lambda m: m.layer2.output.__setitem__(slice(None), 1))
    twice = nnsight.edit(edited, more)
    assert edited.edits is not None and twice.edits is not None
    assert twice.edits == nnsight.compose(edited.edits, as_edit(more))  # edits add up
    assert all(node.invoke is None for node in twice.edits.nodes)
    nnsight.edit(model, nnsight.trace(model, lambda m: m.layer1.output.__setitem__(slice(None), 0)), inplace=True)
    assert model.edits == edited.edits


# --- pruning ----------------------------------------------------------------------------


def test_prune_drops_what_reaches_nothing() -> None:
    model = nnsight.NNsight(tiny_net())

    def fn(m: Any) -> Any:
        unused = m.layer1.output * 3  # noqa: F841  (reaches nothing)
        kept = nnsight.list()
        kept.append(m.layer1.output.mean())  # an effect on a list that is saved
        kept.save()
        torch.randn_like(m.layer1.output)  # unused, but it draws random numbers: kept
        m.layer1.output[:, 0] = 0  # a write
        m.layer2.input.sum()  # reaches nothing
        return m.output

    graph = nnsight.trace(model, fn)
    pruned = nnsight.prune(graph)
    check_graph(pruned)
    texts = repr(pruned)
    assert "mul" not in texts and "model.layer2.input" not in texts
    assert "append" in texts and "randn" in texts and "setitem" in texts
    assert len(pruned) == len(graph) - 3
    x = torch.rand(2, 5)
    assert torch.equal(nnsight.run(model, pruned, x).outputs, nnsight.run(model, graph, x).outputs)
    assert nnsight.prune(pruned) == pruned


def test_prune_reaches_into_bodies_and_keeps_exports() -> None:
    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    with model.session() as session:
        with model.trace(x):
            hidden = model.layer1.output
            model.layer2.output * 2  # unused
        with session.cond(hidden.sum() > -1e9):
            nnsight.apply(torch.zeros, 3)  # unused, pure
        with model.trace(x):
            model.layer1.output = hidden + 1
            out = model.output.save()
    pruned = nnsight.prune(session.graph)
    check_graph(pruned)
    assert "layer2.output" not in repr(pruned) and "zeros" not in repr(pruned) and "cond" not in repr(pruned)
    replayed = nnsight.run(model, pruned)
    inner = [child for child in replayed.children.values() if child.values]
    assert len(inner) == 1 and torch.equal(next(iter(inner[0].values.values())), out.value)


def test_pure_calls_are_known_ones_only() -> None:
    graph, ref = Graph().add(ModuleGet("layer1", "output"))
    cases: list[tuple[Op, bool]] = [
        (Call(torch.sum), True), (Call(operator.add), True), (Call(torch.nn.functional.relu), True),
        (Call(operator.setitem), False), (Call(operator.iadd), False), (Call(torch.rand), False),
        (Call(torch.nn.functional.dropout), False), (Call(print), False), (Call(lambda v: v), False),
        (CallMethod("sum"), True), (CallMethod("add_"), False), (CallMethod("append"), False),
        (CallMethod("sort"), False), (CallMethod("__getitem__"), True), (CallMethod("__setitem__"), False),
        (CallMethod("backward"), False), (CallMethod("custom"), False), (CallMethod("bernoulli"), False),
    ]
    for op, pure in cases:
        node = graph.add(op, (ref,))[0].nodes[-1]
        assert is_pure(node) is pure, op
    with_out = graph.add(Call(torch.add), (ref, 1), {"out": ref})[0].nodes[-1]
    assert not is_pure(with_out)


EXPRESSIONS = ["mul", "add", "relu", "sum", "save", "set", "unused_read"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(EXPRESSIONS), st.sampled_from(["layer1", "layer2"]),
                          st.floats(-2, 2, allow_nan=False)), min_size=1, max_size=8),
       st.integers(0, 3))
def test_prune_never_changes_results(steps: list[tuple[str, str, float]], outputs: int) -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(len(steps)))

    def fn(m: Any) -> Any:
        made: list[Any] = []
        for kind, path, constant in steps:
            value = getattr(m, path).output
            if kind == "mul":
                made.append(value * constant)
            elif kind == "add":
                made.append(value + (made[-1].mean() if made else constant))
            elif kind == "relu":
                made.append(torch.relu(value - constant))
            elif kind == "sum":
                made.append(value.sum(-1))
            elif kind == "save":
                (made[-1] if made else value).save()
            elif kind == "set":
                getattr(m, path).output = value * constant
            else:
                getattr(m, path).input  # read and dropped
        return {f"o{i}": item for i, item in enumerate(made[-outputs:] if outputs else [])} | {"out": m.output}

    graph = nnsight.trace(model, fn)
    pruned = nnsight.prune(graph)
    check_graph(pruned)
    assert len(pruned) <= len(graph)
    try:
        before = nnsight.run(model, graph, x)
    except OutOfOrderError:
        assume(False)  # a write after a later module's read fails in both: nothing to compare
    after = nnsight.run(model, pruned, x)
    assert before.outputs.keys() == after.outputs.keys()
    for name in before.outputs:
        assert torch.equal(before[name], after[name]), name
    saved_before = sorted((tuple(v.shape), v.sum().item()) for v in before.values.values())
    saved_after = sorted((tuple(v.shape), v.sum().item()) for v in after.values.values())
    assert saved_before == saved_after


def test_errors_while_building_leave_nothing_behind() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)

    def broken(m: Any) -> Any:
        m.layer1.output.save()
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        nnsight.trace(model, broken)
    with pytest.raises(AttributeError):
        nnsight.trace(model, lambda m: m.layer9.output)
    x = torch.rand(1, 5)
    with model.trace(x) as outer:
        foreign = model.layer1.output
        outer.stop()
    with pytest.raises(TraceError, match="has no value"):
        nnsight.trace(model, lambda m: foreign)  # a value of a finished trace that was not saved
    with pytest.raises(TypeError, match="needs fn"):
        nnsight.trace(model, 3)  # type: ignore[call-overload]
    assert hook_counts(net) == {name: (0, 0) for name, _ in net.named_modules()}
    assert torch.equal(nnsight.run(model, nnsight.trace(model, lambda m: m.output), x).outputs, net(x))


def test_a_session_whose_traces_are_all_in_a_loop_runs_as_a_session() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.rand(1, 5)
    with model.session() as session:
        with session.iter([1.0, 2.0]) as scale:
            with model.trace(x):
                model.layer1.output = model.layer1.output * scale
                model.output.save()
    replayed = nnsight.run(model, session.graph)  # the only trace is inside the loop

    def saved(results: nnsight.Results) -> list[Any]:
        found = [value for value in results.values.values() if isinstance(value, torch.Tensor)]
        return found + [value for child in results.children.values() for value in saved(child)]

    (last,) = saved(replayed)  # the loop's last run
    assert torch.equal(last, net.layer2(net.layer1(x) * 2.0))
    with pytest.raises(GraphError, match="cannot be composed"):
        nnsight.compose(session.graph, nnsight.trace(model, lambda m: m.output))
