"""Bad input: each error is clear, names the user's line, and leaves the model as it was."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from tests.helpers import TinyNet, WithSpare, hook_counts, parameters_snapshot, same_parameters


def _line_of(text: str) -> int:
    """The line number of ``text`` in this file (so tests survive edits)."""
    source, start = inspect.getsourcelines(inspect.getmodule(_line_of))  # type: ignore[arg-type]  # this module exists
    for number, line in enumerate(source, start=start or 1):
        if text in line and "_line_of" not in line:
            return number
    raise AssertionError(text)


def _notes(error: BaseException) -> str:
    return "\n".join(getattr(error, "__notes__", []))


def test_unknown_module_path_names_path_and_children(model: nnsight.NNsight) -> None:
    with pytest.raises(
        AttributeError,
        match=r"model \(TinyNet\) has no submodule or attribute 'layer3'; its submodules are: layer1, layer2",
    ):
        _ = model.layer3
    with pytest.raises(AttributeError, match=r"model\.layer1 \(Linear\) has no submodule or attribute 'lyr'"):
        with model.trace(torch.rand(1, 5)):
            _ = model.layer1.lyr.output


def test_index_out_of_range(gpt2: nnsight.NNsight) -> None:
    with pytest.raises(IndexError, match=r"model.transformer.h has 2 submodules; index 5 is out of range"):
        _ = gpt2.transformer.h[5]


def test_value_of_unsaved_proxy(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layer1.output * 2
        model.layer1.output.save()
    with pytest.raises(ValueError, match="not saved"):
        _ = h.value


def test_value_inside_the_trace(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layer1.output.save()
        with pytest.raises(ValueError, match="the trace has not run"):
            _ = h.value


def test_value_of_a_never_reached_access() -> None:
    model = nnsight.NNsight(WithSpare())
    with model.trace(torch.rand(1, 5)):
        used = model.used.output.save()
        spare = model.spare.output.save()
    assert used.value.shape == (1, 5)
    with pytest.raises(ValueError, match=r"never reached.*model\.spare\.output"):
        _ = spare.value


def test_a_write_that_never_runs_warns() -> None:
    model = nnsight.NNsight(WithSpare())
    with pytest.warns(nnsight.UnexecutedInterventionWarning, match="model.spare.output"):
        with model.trace(torch.rand(1, 5)):
            model.spare.output = torch.zeros(1, 5)


def test_exception_inside_the_intervention_names_the_line(net: TinyNet, x: torch.Tensor) -> None:
    model = nnsight.NNsight(net)
    hooks, weights = hook_counts(net), parameters_snapshot(net)
    with pytest.raises(IndexError) as caught:
        with model.trace(x):
            model.layer1.output[:, 20] = 0  # the failing line
    notes = _notes(caught.value)
    assert f"line {_line_of('# the failing line')}" in notes
    assert "model.layer1.output[:, 20] = 0" in notes
    assert "setitem(%0, (:, 20), 0)" in notes
    assert hook_counts(net) == hooks and same_parameters(net, weights)
    with model.trace(x):  # the next trace works
        out = model.output.save()
    assert torch.equal(out.value, net(x))


def test_exception_inside_the_model_names_the_trace(net: TinyNet, x: torch.Tensor) -> None:
    model = nnsight.NNsight(net)
    hooks = hook_counts(net)
    with pytest.raises(RuntimeError) as caught:
        with model.trace(x):  # the trace that fails
            model.layer1.output = torch.ones(1, 3)
    assert f"line {_line_of('# the trace that fails')}" in _notes(caught.value)
    assert hook_counts(net) == hooks


def test_exception_in_the_block_never_runs_the_model(net: TinyNet, x: torch.Tensor) -> None:
    model = nnsight.NNsight(net)
    calls: list[int] = []
    handle = net.register_forward_hook(lambda m, i, o: calls.append(1))
    with pytest.raises(KeyError):
        with model.trace(x):
            out = model.output.save()
            raise KeyError("user error")
    handle.remove()
    assert calls == []
    with pytest.raises(ValueError, match="never ran"):
        _ = out.value


def test_unsaved_proxy_after_its_trace_closed(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layer1.output
    with pytest.raises(nnsight.TraceError, match="belongs to a block that has closed, and it has no value there"):
        with model.trace(x):
            model.layer1.output = h


def test_proxy_in_the_trace_of_another_model(model: nnsight.NNsight, x: torch.Tensor) -> None:
    other = nnsight.NNsight(torch.nn.Sequential(torch.nn.Linear(10, 10)))
    other_input = torch.rand(1, 10)  # (made inside the block, torch.rand would be recorded)
    with pytest.raises(nnsight.TraceError, match="another open trace"):
        with model.trace(x):
            h = model.layer1.output
            with other.trace(other_input):
                other.output = h


def test_access_outside_any_trace(model: nnsight.NNsight) -> None:
    with pytest.raises(nnsight.TraceError, match=r"model\.layer1\.output exists only inside a trace"):
        _ = model.layer1.output


def test_out_of_order_write_is_an_error_naming_both_lines(net: TinyNet, x: torch.Tensor) -> None:
    model = nnsight.NNsight(net)
    hooks = hook_counts(net)
    with pytest.raises(nnsight.OutOfOrderError) as caught:
        with model.trace(x):
            h = model.layer1.output  # the read
            _ = model.layer2.output
            h[:] = 0  # the late write
    message = str(caught.value)
    assert "model.layer1.output" in message
    assert f"line {_line_of('# the late write')}" in message
    assert f"test_errors.py:{_line_of('# the read')}" in message
    assert hook_counts(net) == hooks


def test_out_of_order_setter_is_an_error(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(nnsight.OutOfOrderError, match="moved past model.layer1.output"):
        with model.trace(x):
            _ = model.layer2.output
            model.layer1.output = torch.zeros(1, 10)


def test_out_of_order_reads_still_work(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x):
        late = model.layer2.output.save()
        early = model.layer1.output.save()
        edited_copy = model.layer1.output.clone()
        edited_copy[:] = 0  # a write to a copy is fine at any time
        saved_copy = edited_copy.save()
    assert torch.equal(early.value, net.layer1(x))
    assert torch.equal(late.value, net(x))
    assert torch.equal(saved_copy.value, torch.zeros(1, 10))


def test_truth_value_and_len_while_tracing(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layer1.output
        # native `if` off: the error (tests/test_native_flow.py has it on)
        nnsight.CONFIG.APP.CONTROL_FLOW_HANDLING = False
        try:
            with pytest.raises(TypeError, match="truth value of a traced value is unknown while tracing"):
                if h.sum() > 0:
                    pass
        finally:
            nnsight.CONFIG.APP.CONTROL_FLOW_HANDLING = True
        with pytest.raises(TypeError, match="len"):
            len(h)
        with pytest.raises(TypeError, match="iterating"):
            list(h)


def test_unsupported_options_say_so(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(NotImplementedError, match="remote"):
        model.trace(x, backend="ndif")
    with pytest.raises(ValueError, match="needs inputs"):
        model.trace(trace=False)


def test_keyword_given_twice(gpt2: nnsight.NNsight, ids: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="given both to the invokes and to trace"):
        with gpt2.trace(input_ids=ids) as tracer:
            with tracer.invoke(input_ids=ids):
                pass


def test_nothing_is_lost_after_many_failures(net: TinyNet, x: torch.Tensor) -> None:
    model = nnsight.NNsight(net)
    hooks, weights = hook_counts(net), parameters_snapshot(net)
    failures: list[tuple[type[Exception], Any]] = [
        (IndexError, lambda: model.layer1.output.__setitem__((slice(None), 99), 0)),
        (RuntimeError, lambda: setattr(model.layer1, "output", torch.ones(1, 1))),
        (AttributeError, lambda: model.layer2.output.no_such_method()),
    ]
    for expected, fail in failures:
        with pytest.raises(expected):
            with model.trace(x):
                fail()
        assert hook_counts(net) == hooks and same_parameters(net, weights)
    with model.trace(x):
        out = model.output.save()
    assert torch.equal(out.value, net(x))
