"""Sessions, loops, conditions, apply/builtins, bridges and stops, against plain torch.

Each nnsight 0.4 scenario of its test inventory (section 18 of the reference)
is rewritten here: conditional trace, conditional iteration, bridge,
sequential context exit, tracer stop, stop in a loop over a DataLoader,
bridged node cleanup, nested iterator, builtins.
"""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict
from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.ops import Cond, Iterate, TraceRun
from tests.helpers import TinyNet, hook_counts, hooked_run

# --- sessions and bridges --------------------------------------------------------------


def test_conditional_trace(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.session() as session:
        with session.cond(5 > 0):
            with model.trace(x):
                output = model.output.save()
    assert torch.equal(output.value, net(x))


def test_conditional_iteration(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.session() as session:
        result = nnsight.list().save()
        with session.iter([0, 1, 2]) as item:
            with session.cond(item % 2 == 0):
                with model.trace(x):
                    result.append(item)
    assert result.value == [0, 2]


def test_bridge_from_the_session_into_a_trace(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.session() as session:
        zero = session.apply(int, 0)
        with model.trace(x):
            model.layer1.output[:] = zero  # a session value, bridged into the trace
            after = model.layer1.output.save()
    assert torch.all(after.value == 0)


def test_an_unsaved_value_of_one_trace_in_a_later_trace(model: nnsight.NNsight, net: TinyNet) -> None:
    first, second = torch.rand(1, 5), torch.rand(1, 5)
    with model.session():
        with model.trace(first):
            donor = model.layer1.output  # not saved
        with model.trace(second):
            model.layer1.output = donor * 2
            patched = model.output.save()
    assert torch.allclose(patched.value, net.layer2(net.layer1(first) * 2))


def test_an_in_place_edit_of_an_earlier_traces_saved_value(model: nnsight.NNsight, net: TinyNet) -> None:
    first, second = torch.rand(1, 5), torch.rand(1, 5)
    with model.session():
        with model.trace(first):
            kept = model.layer1.output.clone().save()
        with model.trace(second):
            kept[:, 0] = model.layer1.output[:, 0]
    expected = net.layer1(first).clone()
    expected[:, 0] = net.layer1(second)[:, 0]
    assert torch.allclose(kept.value, expected)


def test_inputs_of_one_trace_set_in_another(model: nnsight.NNsight, net: TinyNet) -> None:
    first, second = torch.rand(1, 5), torch.rand(1, 5)
    with model.session():
        with model.trace(first):
            inputs = model.layer2.inputs
        with model.trace(second):
            model.layer2.inputs = inputs
            out = model.output.save()
    assert torch.allclose(out.value, net(first))


def test_session_values_used_after_the_traces(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.session():
        with model.trace(x):
            hidden = model.layer1.output
        total = (hidden.sum() + 1).save()  # a session-level node on a trace's value
    assert torch.allclose(total.value, net.layer1(x).sum() + 1)


def test_sequential_context_exit(model: nnsight.NNsight) -> None:
    with model.session() as session:
        values = nnsight.list().save()
        values.append(0)
        with session.iter([1, 2, 3, 4]) as item:
            with session.cond(item == 3):
                session.stop()  # inside a loop: ends the loop
            values.append(item)
        values.append(5)
        session.stop()  # at session level: ends the session
        values.append(6)
    assert values.value == [0, 1, 2, 5]


def test_tracer_stop_in_a_session_stops_that_trace_only(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.session():
        with model.trace(x) as tracer:
            early = model.layer1.output.save()
            tracer.stop()
            late = model.layer2.output.save()
        with model.trace(x):
            after = model.output.save()
    assert torch.equal(early.value, net.layer1(x))
    with pytest.raises(ValueError, match="stopped early"):
        _ = late.value
    assert torch.equal(after.value, net(x))


def test_stop_forward_pass_in_a_loop_over_a_dataloader(model: nnsight.NNsight, net: TinyNet) -> None:
    inputs = [torch.rand(1, 5) for _ in range(3)]
    loader: torch.utils.data.DataLoader[tuple[torch.Tensor, ...]] = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat(inputs)), batch_size=1
    )
    with model.session() as session:
        collected = nnsight.list().save()
        with session.iter(loader) as batch:
            with model.trace(batch[0]):
                hidden = model.layer1.output
                model.layer1.output.stop()  # this trace only
            collected.append(hidden)
    assert len(collected.value) == 3
    for got, inp in zip(collected.value, inputs):
        assert torch.allclose(got, net.layer1(inp))


def test_bridged_node_cleanup(model: nnsight.NNsight) -> None:
    with model.session() as session:
        values = session.apply(list)  # not saved
        with session.iter([0, 1, 2]) as item:
            with session.cond(item == 2):
                session.stop()
            values.append(item)
    with pytest.raises(ValueError, match="not saved"):
        _ = values.value


def test_nested_iterator(model: nnsight.NNsight) -> None:
    with model.session() as session:
        rows = session.apply(list)
        rows.append([0])
        rows.append([1])
        rows.append([2])
        flat = session.apply(list).save()
        with session.iter(rows) as row:
            with session.iter(row) as value:
                flat.append(value)
    assert flat.value == [0, 1, 2]


def test_builtins(model: nnsight.NNsight) -> None:
    with model.session() as session:
        lists = [nnsight.list().save(), session.apply(list).save(), nnsight.apply(list).save()]
        with session.iter(lists) as target:
            target.append(nnsight.int(3))
            target.append(nnsight.str("Hello World"))
            target.append(nnsight.dict({"a": "1"}))
            target.append(nnsight.float(2))
            target.append(nnsight.bool(0))
            target.append(nnsight.tuple([1, 2]))
            target.append(nnsight.set([1, 1]))
    expected = [3, "Hello World", {"a": "1"}, 2.0, False, (1, 2), {1}]
    assert [p.value for p in lists] == [expected] * 3


def test_log_prints_at_run_time(model: nnsight.NNsight, x: torch.Tensor, capsys: pytest.CaptureFixture[str]) -> None:
    with model.trace(x) as tracer:
        nnsight.log("sum:", model.layer1.output.sum() > -1000)
        tracer.log("again")
        assert capsys.readouterr().out == ""  # nothing while recording
    assert capsys.readouterr().out == "sum: tensor(True)\nagain\n"


def test_iterator_item_and_context_form(model: nnsight.NNsight) -> None:
    with model.session() as session:
        seen = nnsight.list().save()
        with session.iter([4, 5]) as (item, iterator):
            assert isinstance(iterator, nnsight.IteratorContext)
            seen.append(item)
        with nnsight.iter([6]) as item:  # the module-level form: the innermost context
            seen.append(item)
    assert seen.value == [4, 5, 6]


def test_a_loop_over_a_value_made_in_the_session(model: nnsight.NNsight, net: TinyNet) -> None:
    inputs = [torch.rand(1, 5), torch.rand(1, 5)]
    with model.session() as session:
        batches = nnsight.list()
        for inp in inputs:
            batches.append(inp)
        outs = nnsight.list().save()
        with session.iter(batches) as batch:
            with model.trace(batch):
                outs.append(model.output)
    assert all(torch.allclose(o, net(i)) for o, i in zip(outs.value, inputs))


def test_the_session_graph_is_a_value(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.session() as session:
        with session.iter([0, 1]):
            with model.trace(x):
                model.output.save()
        during = session.graph
    kinds = [type(node.op).__name__ for node in session.graph]
    assert "Iterate" in kinds
    loop = next(node for node in session.graph if isinstance(node.op, Iterate))
    assert isinstance(loop.op, Iterate)
    assert any(isinstance(node.op, TraceRun) for node in loop.op.body)
    assert during == session.graph
    assert "trace(" in repr(session.graph)


def test_only_one_session_per_model(model: nnsight.NNsight) -> None:
    with model.session():
        with pytest.raises(ValueError, match="a session of this model is already open"):
            with model.session():
                pass


def test_a_session_keeps_only_what_is_saved(net: TinyNet) -> None:
    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[weakref.ref[torch.Tensor]] = []

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            self.seen.append(weakref.ref(h))
            return h

    recorder = Recorder()
    wrapped = torch.nn.Sequential(OrderedDict([("layer1", net.layer1), ("rec", recorder), ("layer2", net.layer2)]))
    wrapped.requires_grad_(False)  # else autograd keeps each saved output's inputs alive
    model = nnsight.NNsight(wrapped)
    gc.collect()
    with model.session() as session:
        with session.iter(range(100)):
            with model.trace(torch.rand(1, 5)):
                hidden = model.rec.output * 2  # unsaved: dies in its run
                model.layer2.output.save()  # saved: the last run's stays
    assert len(recorder.seen) == 100
    assert sum(ref() is not None for ref in recorder.seen) == 0
    del hidden


# --- conditions and loops inside a trace -------------------------------------------------


def test_a_proxy_condition_that_is_false(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        out = model.layer1.output
        out[:, 0] = 1
        with tracer.cond(out[:, 0] != 1):
            model.layer1.output[:] = 5
            inside = model.layer1.output.save()
        after = model.layer1.output.save()
    with pytest.raises(ValueError, match="never ran"):
        _ = inside.value
    assert torch.all(after.value[:, 0] == 1) and not torch.all(after.value == 5)


def test_dependent_conditions(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        hidden = model.layer1.output
        with tracer.cond(5 > 0):
            hidden[:] = 1
        with tracer.cond(hidden[:, 0] != 1):
            model.layer2.output[:] = 2
        with tracer.cond(hidden[:, 0] == 1):
            model.layer2.output[:] = 3
        out = model.layer2.output.save()
    assert torch.all(out.value == 3)


def test_nested_conditions(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        with tracer.cond(True):
            first = model.layer1.output.save()
            with tracer.cond(True):
                model.layer1.output[:] = 1
            with tracer.cond(False):
                model.layer1.output[:] = 2
        with tracer.cond(False):
            model.layer2.output[:] = 0
            with tracer.cond(True):
                never = model.layer2.output.save()
        out = model.output.save()
    assert torch.all(first.value == 1)
    with pytest.raises(ValueError):
        _ = never.value
    assert torch.allclose(out.value, net.layer2(torch.ones(1, 10)))


def test_a_loop_inside_a_trace_edits_within_the_hook(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        with tracer.iter([0, 2, 4]) as column:
            model.layer1.output[:, column] = column * 10
        out = model.output.save()

    def edit(o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        for column in (0, 2, 4):
            o[:, column] = column * 10
        return o

    ref, _ = hooked_run(net, x, replace={"layer1": edit})
    assert torch.equal(out.value, ref)


def test_a_loop_body_reading_two_modules(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    # Each iteration reads layer1 (already passed after the first) and layer2.
    with model.trace(x) as tracer:
        sums = nnsight.list().save()
        with tracer.iter(range(3)) as k:
            sums.append(model.layer1.output.sum() + model.layer2.output.sum() * k)
    h1, h2 = net.layer1(x).sum(), net(x).sum()
    assert all(torch.allclose(got, h1 + h2 * k) for k, got in enumerate(sums.value))


def test_a_condition_inside_an_invoke_sees_its_rows(model: nnsight.NNsight, net: TinyNet) -> None:
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            with tracer.cond(True):
                model.layer1.output[:] = 0
            out_a = model.output.save()
        with tracer.invoke(b):
            out_b = model.output.save()
    assert torch.allclose(out_a.value, net.layer2(torch.zeros(1, 10)))
    assert torch.allclose(out_b.value, net(b))


def test_stop_inside_a_trace_level_loop_ends_the_loop(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        seen = nnsight.list().save()
        with tracer.iter([1, 2, 3]) as k:
            with tracer.cond(k == 2):
                tracer.stop()
            seen.append(k)
        out = model.output.save()  # the model run goes on
    assert seen.value == [1]
    assert torch.equal(out.value, net(x))


def test_a_branch_value_used_after_the_branch(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        with tracer.cond(True):
            doubled = model.layer1.output * 2
        result = (doubled + 1).save()  # exported out of the branch
    assert torch.allclose(result.value, net.layer1(x) * 2 + 1)


# --- the seed's .vis example (its pictures are the vis issue's job) --------------------


def test_the_seed_session_example_matches_plain_torch() -> None:
    input_size, hidden_dims, output_size = 5, 10, 2
    torch.manual_seed(423)
    net = TinyNet(
        OrderedDict(
            [
                ("layer1", torch.nn.Linear(input_size, hidden_dims)),
                ("layer2", torch.nn.Linear(hidden_dims, output_size)),
            ]
        )
    )
    net.requires_grad_(False)
    input, input2 = torch.rand((1, input_size)), torch.rand((1, input_size))
    model = nnsight.NNsight(net)
    with model.session() as sesh:
        with model.trace(input) as tracer_1:
            l1_out_t1 = model.layer1.output.save()
            l1_out_t1_cp = model.layer1.output.clone().save()
            model.layer1.output.stop()
        with sesh.iter([0, 1, 2]) as (item, iterator):
            with model.trace(input2) as tracer_2:
                l1_out_t2 = model.layer1.output.save()
                l1_out_t1_cp[:, item] = l1_out_t2[:, item] + l1_out_t1[:, item]
    expected_t1 = net.layer1(input)
    expected_t2 = net.layer1(input2)
    expected_cp = expected_t1.clone()
    expected_cp[:, :3] = expected_t2[:, :3] + expected_t1[:, :3]
    assert torch.equal(l1_out_t1.value, expected_t1)
    assert torch.equal(l1_out_t2.value, expected_t2)
    assert torch.equal(l1_out_t1_cp.value, expected_cp)
    assert str(l1_out_t1_cp) == str(expected_cp)  # prints like its value
    assert isinstance(iterator, nnsight.IteratorContext)
    assert tracer_1.graph is not None and tracer_2.graph is not None


# --- bad input ------------------------------------------------------------------------


def test_iter_over_something_not_iterable(model: nnsight.NNsight) -> None:
    with model.session() as session:
        with pytest.raises(TypeError, match=r"iter\(...\) at test_sessions.py:\d+ needs an iterable; got a int"):
            session.iter(5)


def test_iter_over_a_proxy_that_is_not_iterable_names_the_line(model: nnsight.NNsight) -> None:
    with pytest.raises(TypeError, match="cannot loop over a int") as caught:
        with model.session() as session:
            number = session.apply(int, 3)
            with session.iter(number):  # the bad loop
                pass
    assert "test_sessions.py" in "\n".join(getattr(caught.value, "__notes__", []))


def test_cond_on_a_value_without_a_truth_value(model: nnsight.NNsight, x: torch.Tensor) -> None:
    several = torch.ones(3)  # (inside the block torch.ones is recorded, as in nnsight 0.4)
    with model.trace(x) as tracer:
        with pytest.raises(TypeError, match="needs a value with a truth value"):
            tracer.cond(several)
    with pytest.raises(RuntimeError, match="ambiguous") as caught:
        with model.trace(x) as tracer:
            with tracer.cond(model.layer1.output > 0):  # several elements
                pass
    assert "with tracer.cond(model.layer1.output > 0)" in "\n".join(getattr(caught.value, "__notes__", []))


def test_stop_outside_any_context() -> None:
    with pytest.raises(nnsight.TraceError, match=r"nnsight_pure.stop\(...\) needs an open trace or session"):
        nnsight.stop()
    with pytest.raises(nnsight.TraceError, match="needs an open trace or session"):
        nnsight.apply(len, [1])


def test_an_error_in_iteration_k_names_k(model: nnsight.NNsight, net: TinyNet) -> None:
    hooks = hook_counts(net)
    with pytest.raises(ZeroDivisionError) as caught:
        with model.session() as session:
            with session.iter([2, 1, 0]) as k:
                session.apply(lambda v: 1 // v, k)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "in iteration 2 of the loop" in notes
    assert hook_counts(net) == hooks


def test_a_value_from_a_finished_loop_cannot_be_used_later(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(nnsight.TraceError, match="belongs to a block that has closed"):
        with model.session() as session:
            with session.iter([0, 1]):
                with model.trace(x):
                    hidden = model.layer1.output
            (hidden * 2).save()


def test_saving_a_value_of_a_closed_block_is_an_error(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(nnsight.TraceError, match="Call .save\\(\\) inside that block"):
        with model.trace(x) as tracer:
            with tracer.cond(True):
                inside = model.layer1.output * 2
            inside.save()


def test_traces_of_a_session_run_only_when_it_exits(model: nnsight.NNsight, x: torch.Tensor) -> None:
    runs: list[int] = []
    handle = model._model.register_forward_hook(lambda m, i, o: runs.append(1))
    try:
        with model.session():
            with model.trace(x):
                out = model.output.save()
            assert runs == []
            with pytest.raises(ValueError, match="has not run"):
                _ = out.value
        assert runs == [1]
    finally:
        handle.remove()


def test_a_session_that_raises_runs_nothing(model: nnsight.NNsight, x: torch.Tensor) -> None:
    runs: list[Any] = []
    handle = model._model.register_forward_hook(lambda m, i, o: runs.append(1))
    try:
        with pytest.raises(KeyError):
            with model.session():
                with model.trace(x):
                    out = model.output.save()
                raise KeyError("user error")
    finally:
        handle.remove()
    assert runs == []
    with pytest.raises(ValueError, match="never ran"):
        _ = out.value
    with model.trace(x):  # and the next trace works
        again = model.output.save()
    assert again.value.shape == (1, 2)


def test_conditions_are_graph_values(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > 0) as branch:
            model.layer1.output[:] = 0
    node = next(n for n in tracer.graph if isinstance(n.op, Cond))
    assert isinstance(node.op, Cond) and node.op.body == branch.graph
    assert "cond %" in repr(tracer.graph)


def test_module_level_cond_and_stop_use_the_innermost_block(
    model: nnsight.NNsight, net: TinyNet, x: torch.Tensor
) -> None:
    with model.trace(x):
        with nnsight.cond(model.layer1.output.sum() > -1000):
            model.layer1.output[:] = 0
        with nnsight.cond(False):
            nnsight.stop()
        out = model.output.save()
    assert torch.allclose(out.value, net.layer2(torch.zeros(1, 10)))
