"""Several invokes in one trace: batching, per-invoke rows, cross-invoke patching."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from tests.helpers import TinyNet, WithSpare, hooked_run


@pytest.fixture
def a() -> torch.Tensor:
    torch.manual_seed(10)
    return torch.rand(1, 5)


@pytest.fixture
def b() -> torch.Tensor:
    torch.manual_seed(11)
    return torch.rand(2, 5)


def test_each_invoke_sees_only_its_rows(model: nnsight.NNsight, net: TinyNet, a: torch.Tensor, b: torch.Tensor) -> None:
    with model.trace() as tracer:
        with tracer.invoke(a) as first:
            out_a = model.layer1.output.save()
        with tracer.invoke(b) as second:
            out_b = model.layer1.output.save()
        whole = model.layer1.output.save()  # outside any invoke: the whole batch
    assert (first.batch_size, second.batch_size) == (1, 2)
    assert torch.allclose(out_a.value, net.layer1(a))
    assert torch.allclose(out_b.value, net.layer1(b))
    assert torch.allclose(whole.value, net.layer1(torch.cat([a, b])))


def test_three_tensor_invokes_batch(model: nnsight.NNsight, net: TinyNet) -> None:
    # nnsight 0.4.11's default _batch failed for two or more invokes.
    inputs = [torch.rand(1, 5), torch.rand(3, 5), torch.rand(2, 5)]
    with model.trace() as tracer:
        outs = []
        for inp in inputs:
            with tracer.invoke(inp):
                outs.append(model.output.save())
    for inp, out in zip(inputs, outs):
        assert torch.allclose(out.value, net(inp))


def test_write_in_one_invoke_touches_only_its_rows(
    model: nnsight.NNsight, net: TinyNet, a: torch.Tensor, b: torch.Tensor
) -> None:
    with model.trace() as tracer:
        with tracer.invoke(a):
            model.layer1.output[:] = 0
            out_a = model.output.save()
        with tracer.invoke(b):
            out_b = model.output.save()
    assert torch.allclose(out_a.value, net.layer2(torch.zeros(1, 10)))
    assert torch.allclose(out_b.value, net(b))


def test_setter_in_one_invoke_replaces_only_its_rows(
    model: nnsight.NNsight, net: TinyNet, a: torch.Tensor, b: torch.Tensor
) -> None:
    with model.trace() as tracer:
        with tracer.invoke(b):
            model.layer1.output = torch.ones(2, 10)
            out_b = model.output.save()
        with tracer.invoke(a):
            out_a = model.output.save()
    assert torch.allclose(out_b.value, net.layer2(torch.ones(2, 10)))
    assert torch.allclose(out_a.value, net(a))


def test_cross_invoke_patching(model: nnsight.NNsight, net: TinyNet, a: torch.Tensor) -> None:
    # nnsight 0.4 README "Cross Prompt Intervention", on the two-layer net.
    other = torch.rand(1, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            donor = model.layer1.output
        with tracer.invoke(other):
            model.layer1.output = donor
            patched = model.output.save()
    ref, _ = hooked_run(net, a, read=())
    assert torch.allclose(patched.value, ref)


def test_wrong_shape_for_an_invoke_is_a_clear_error(model: nnsight.NNsight, a: torch.Tensor, b: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"invoke 1 owns 2 row\(s\)"):
        with model.trace() as tracer:
            with tracer.invoke(a):
                pass
            with tracer.invoke(b):
                model.layer1.output = torch.ones(3, 10)


def test_empty_invoke_sees_the_whole_batch(
    model: nnsight.NNsight, net: TinyNet, a: torch.Tensor, b: torch.Tensor
) -> None:
    with model.trace() as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            pass
        with tracer.invoke():
            everything = model.output.save()
    assert torch.allclose(everything.value, net(torch.cat([a, b])))


def test_invoke_inside_an_open_invoke_is_an_error(model: nnsight.NNsight, a: torch.Tensor) -> None:
    with pytest.raises(nnsight.TraceError, match="already open"):
        with model.trace(a) as tracer:
            with tracer.invoke(a):
                pass


def test_keyword_inputs_are_batched(gpt2: nnsight.NNsight, gpt2_module: Any) -> None:
    first = torch.randint(3, 100, (1, 6))
    second = torch.randint(3, 100, (2, 6))
    with gpt2.trace() as tracer:
        with tracer.invoke(input_ids=first):
            one = gpt2.output.logits.save()
        with tracer.invoke(input_ids=second):
            two = gpt2.output.logits.save()
    assert torch.allclose(one.value, gpt2_module(first).logits, atol=1e-5)
    assert torch.allclose(two.value, gpt2_module(second).logits, atol=1e-5)


def test_invokes_with_different_arguments_cannot_batch(model: nnsight.NNsight, a: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="same positional and keyword"):
        with model.trace() as tracer:
            with tracer.invoke(a):
                pass
            with tracer.invoke(a, a):
                pass


def test_the_patching_tutorial_pattern_works(model: nnsight.NNsight, net: TinyNet) -> None:
    # nnsight #502: in 0.4 this batched patching silently did nothing, because
    # invoke 0's read of model.output delayed invoke 1's write past layer1.
    # Here each invoke is its own program, so the write lands in time.
    clean, corrupt = torch.rand(1, 5), torch.rand(1, 5)
    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_hidden = model.layer1.output
            clean_logits = model.output.save()
        with tracer.invoke(corrupt):
            model.layer1.output = clean_hidden
            patched_logits = model.output.save()
    donor = net.layer1(clean)
    ref, _ = hooked_run(net, corrupt, replace={"layer1": lambda o: donor})
    assert torch.allclose(patched_logits.value, ref)
    assert torch.allclose(patched_logits.value, clean_logits.value)


def test_an_outside_write_into_an_invoke_with_a_later_invokes_value(model: nnsight.NNsight) -> None:
    # Code in invoke 0's block cannot name invoke 1's values, but code after
    # both can: this outside write into invoke 0's rows needs invoke 1's layer1
    # value at layer1's call, where invoke 1 computes it: it waits, then writes.
    first, second = torch.rand(1, 5), torch.rand(1, 5)
    net = model._model
    with model.trace() as tracer:
        with tracer.invoke(first):
            target = model.layer1.output
            out = model.output.save()
        with tracer.invoke(second):
            donor = model.layer1.output.clone()
        target[:] = donor
    assert torch.allclose(out.value, net(second))


def test_the_outside_program_waits_for_an_invokes_value(model: nnsight.NNsight, net: TinyNet, a: torch.Tensor) -> None:
    with model.trace() as tracer:
        model.layer1.output[:] = 1  # outside any invoke, written first: runs first
        with tracer.invoke(a):
            hidden = model.layer1.output.clone()
        doubled = (hidden * 2).save()  # the outside program waits for invoke 0's value
    assert torch.equal(doubled.value, torch.full((1, 10), 2.0))


def test_a_never_computed_value_of_another_invoke() -> None:
    spare_model = nnsight.NNsight(WithSpare())
    first, second = torch.rand(1, 5), torch.rand(1, 5)
    with spare_model.trace() as tracer:
        with tracer.invoke(first):
            never = spare_model.spare.output * 2
        with tracer.invoke(second):
            waits = (spare_model.used.output + never).save()
    with pytest.raises(ValueError, match="that node of invoke 0 never ran"):
        _ = waits.value


def test_outside_code_written_first_runs_first(
    model: nnsight.NNsight, net: TinyNet, a: torch.Tensor, b: torch.Tensor
) -> None:
    with model.trace() as tracer:
        model.layer1.output[:] = 0  # outside any invoke: the whole batch, written first
        with tracer.invoke(a):
            seen = model.layer1.output.clone().save()
        with tracer.invoke(b):
            pass
    assert torch.equal(seen.value, torch.zeros(1, 10))


def test_a_write_in_one_invoke_is_seen_by_a_later_read_outside(
    model: nnsight.NNsight, net: TinyNet, a: torch.Tensor
) -> None:
    with model.trace() as tracer:
        before = model.layer1.output.clone().save()  # outside any invoke: cached access
        with tracer.invoke(a):
            model.layer1.output = torch.zeros(1, 10)
        after = model.layer1.output.clone().save()  # must be a new read, after the write
    assert torch.allclose(before.value, net.layer1(a))
    assert torch.equal(after.value, torch.zeros(1, 10))


def test_accesses_of_one_call_keep_their_order_across_invokes(
    model: nnsight.NNsight, net: TinyNet, a: torch.Tensor
) -> None:
    # The outside program began first, but its second read is written after
    # invoke 1's in-place write, and invoke 1's write after the outside read.
    with model.trace() as tracer:
        before = model.layer1.output.clone().save()
        with tracer.invoke(a):
            model.layer1.output[:] = 3
        after = model.layer1.output.clone().save()
    assert torch.allclose(before.value, net.layer1(a))
    assert torch.equal(after.value, torch.full((1, 10), 3.0))


def test_a_write_waits_for_an_earlier_read_of_another_invoke(
    model: nnsight.NNsight, net: TinyNet, a: torch.Tensor
) -> None:
    with model.trace() as tracer:
        weight = model.layer1.weight  # the outside program begins here, before invoke 0
        with tracer.invoke(a):
            seen = model.layer1.output.clone().save()
        model.layer1.output[:] = 5  # written after invoke 0's read: runs after it
        out = model.output.save()
        weight.save()
    assert torch.allclose(seen.value, net.layer1(a))
    assert torch.allclose(out.value, net.layer2(torch.full((1, 10), 5.0)))
