"""nnsight 0.4.11's tiny-model test scenarios, written for nnsight_pure.

Each test is one scenario of nnsight 0.4's ``tests/test_tiny.py`` (the same
behaviour, written here from its description, not its code), run the way a
0.4 script writes it and checked against the same computation in plain torch.
nnsight 0.4's tests count the values still held after a run (its
``AssertSavedLenBackend``); here the same promise is checked by reading each
value: what 0.4 kept has a value, what it dropped raises ``ValueError``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import nnsight_pure as nnsight
from tests.helpers import TinyNet

INPUT_SIZE, HIDDEN, OUTPUT = 5, 10, 2


def _no_value(proxy: object) -> bool:
    try:
        proxy.value  # type: ignore[attr-defined]
    except ValueError:
        return True
    return False


def test_save_under_no_grad(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with torch.no_grad():
        with model.trace(x):
            hs = model.layer2.output.save()
    taken_as_tensor = isinstance(hs, torch.Tensor)  # a saved value goes where a tensor is expected
    assert taken_as_tensor
    assert torch.equal(hs.value, net(x))


def test_grad_setting_with_scan_and_validate(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x, scan=True, validate=True):
        l1 = model.layer1.output
        grad = l1.grad.clone().save()
        l1.grad = l1.grad * 2
        doubled = model.layer1.output.grad.save()
        model.output.sum().backward()
    hidden = net.layer1(x)
    (by_hand,) = torch.autograd.grad(net.layer2(hidden).sum(), hidden)
    assert torch.allclose(grad.value, by_hand)
    assert torch.allclose(doubled.value, by_hand * 2)


def test_external_proxy_edited_in_a_later_trace(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.session():
        with model.trace(x):
            hidden = model.layer1.output.save()
        with model.trace(x):
            hidden[:] = 0  # a value of the first trace, edited in the second
            out = model.output.save()
    assert torch.equal(hidden.value, torch.zeros(1, HIDDEN))
    assert torch.allclose(out.value, net(x))  # the second run is not changed by it


def test_early_stop(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        l1 = model.layer1.output.save()
        tracer.stop()
        l2 = model.layer2.output.save()
    assert torch.equal(l1.value, net.layer1(x))
    assert _no_value(l2)


def test_true_conditional(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        with tracer.cond(True):
            model.layer1.output[:] = 1
            l1 = model.layer1.output.save()
    assert torch.equal(l1.value, torch.ones(1, HIDDEN))


def test_false_conditional_does_not_leak(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        with tracer.cond(False):
            model.layer1.output[:] = 1
            inside = model.layer1.output.save()
        after = model.layer1.output.save()
    assert _no_value(inside)
    assert torch.equal(after.value, net.layer1(x))


def test_traced_value_as_condition(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        out = model.layer2.output
        with tracer.cond(out[:, 0] != out[:, 0]):  # false at run time
            inside = model.layer2.output.save()
    assert _no_value(inside)


def test_conditions_on_values_set_in_earlier_conditions(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        num = model.layer2.output
        with tracer.cond(num[0, 0] > num[0, 0] - 1):  # true
            model.layer2.output[:] = 2
        with tracer.cond(model.layer2.output[0, 0] == 2):  # true, after the first write
            model.layer2.output[:] = 3
        with tracer.cond(model.layer2.output[0, 0] == 2):  # false now
            model.layer2.output[:] = 4
        final = model.layer2.output.save()
    assert torch.equal(final.value, torch.full((1, OUTPUT), 3.0))


def test_nested_conditionals(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        with tracer.cond(True):
            with tracer.cond(True):
                model.layer1.output[:, 0] = 5
            with tracer.cond(False):
                model.layer1.output[:, 1] = 6
        with tracer.cond(False):
            with tracer.cond(True):
                never = model.layer1.output.save()
        l1 = model.layer1.output.save()
    expected = net.layer1(x).clone()
    expected[:, 0] = 5
    assert torch.equal(l1.value, expected)
    assert _no_value(never)


def test_session_condition_around_a_trace(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.session() as session:
        with session.cond(True):
            with model.trace(x):
                ran = model.output.save()
        with session.cond(False):
            with model.trace(x):
                skipped = model.output.save()
    assert torch.equal(ran.value, net(x))
    assert _no_value(skipped)


def test_condition_per_item_of_a_loop(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.session() as session:
        seen = session.apply(list).save()
        with session.iter([0, 1, 2]) as item:
            with session.cond(item % 2 == 0):
                with model.trace(x):
                    seen.append(item)
    assert seen.value == [0, 2]


def test_session_value_sets_an_activation(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.session() as session:
        zero = session.apply(int, 0)
        with model.trace(x):
            model.layer1.output[:] = zero
            out = model.output.save()
    assert torch.allclose(out.value, net.layer2(torch.zeros(1, HIDDEN)))


def test_stops_in_a_loop_and_in_the_session(model: nnsight.NNsight) -> None:
    with model.session() as session:
        seen = session.apply(list).save()
        with session.iter([0, 1, 2, 3]) as item:
            with session.cond(item == 3):
                session.stop()  # breaks the loop
            seen.append(item)
        seen.append(5)
        session.stop()  # ends the session
        seen.append(6)
    assert seen.value == [0, 1, 2, 5]


def test_stop_before_a_dependent_value(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        tracer.stop()
        out = model.layer1.output.save()
    assert _no_value(out)


def test_module_stop_in_a_loop_over_a_dataloader(model: nnsight.NNsight, net: TinyNet) -> None:
    torch.manual_seed(3)
    data = torch.rand(6, INPUT_SIZE)
    with model.session() as session:
        hidden = session.apply(list).save()
        with session.iter(DataLoader(data, batch_size=2)) as batch:  # type: ignore[arg-type]
            with model.trace(batch):
                hidden.append(model.layer1.output)
                model.layer1.output.stop()
    assert len(hidden.value) == 3
    for index, value in enumerate(hidden.value):
        assert torch.allclose(value, net.layer1(data[2 * index : 2 * index + 2]))


def test_unsaved_session_list_after_a_stop(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.session() as session:
        kept = session.apply(list)
        with session.iter([0, 1, 2]) as item:
            kept.append(item)
            session.stop()
    assert _no_value(kept)


def test_nested_iterators(model: nnsight.NNsight) -> None:
    with model.session() as session:
        items = session.apply(list, [[0, 1], [2]])
        flat = session.apply(list).save()
        with session.iter(items) as inner:
            with session.iter(inner) as item:
                flat.append(item)
    assert flat.value == [0, 1, 2]


def test_traced_builtins(model: nnsight.NNsight) -> None:
    with model.session() as session:
        by_apply = session.apply(list).save()
        by_name = nnsight.list().save()
        by_builtin = session.apply(list).save()
        with session.iter([session.apply(int, 1), session.apply(str, "a"), session.apply(dict, a=1)]) as item:
            by_apply.append(item)
            by_name.append(item)
            by_builtin.append(item)
    assert by_apply.value == by_name.value == by_builtin.value == [1, "a", {"a": 1}]


@pytest.mark.parametrize(
    "make",
    [
        lambda shape: torch.arange(shape[1]),
        lambda shape: torch.empty(shape),
        lambda shape: torch.eye(shape[1]),
        lambda shape: torch.full(shape, 3.0),
        lambda shape: torch.linspace(0, 1, shape[1]),
        lambda shape: torch.logspace(0, 1, shape[1]),
        lambda shape: torch.ones(shape),
        lambda shape: torch.rand(shape),
        lambda shape: torch.randint(0, 10, shape),
        lambda shape: torch.randn(shape),
        lambda shape: torch.randperm(shape[1]),
        lambda shape: torch.zeros(shape),
    ],
)
def test_factories_on_traced_shapes(model: nnsight.NNsight, x: torch.Tensor, make: object) -> None:
    with model.trace(x):
        made = make(model.layer1.output.shape).save()  # type: ignore[operator]
    expected = make(torch.Size([1, HIDDEN]))  # type: ignore[operator]
    assert made.value.shape == expected.shape
    assert made.value.dtype == expected.dtype
