"""scan and validate: shapes at trace time from fake tensors; no real compute, no leaks."""

from __future__ import annotations

import inspect
from typing import Any, cast

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers import GPT2LMHeadModel

import nnsight_pure as nnsight
from tests.helpers import TinyNet, hook_counts


def _line_of(text: str) -> int:
    source, start = inspect.getsourcelines(inspect.getmodule(_line_of))  # type: ignore[arg-type]  # this module exists
    for number, line in enumerate(source, start=start or 1):
        if text in line and "_line_of" not in line:
            return number
    raise AssertionError(text)


def test_scan_shapes_equal_real_shapes(gpt2: nnsight.NNsight, gpt2_module: GPT2LMHeadModel) -> None:
    ids = torch.randint(3, 100, (2, 7))
    paths = [
        name for name, module in gpt2_module.named_modules()
        if name and "drop" not in name and not isinstance(module, torch.nn.ModuleList)  # never called
    ]
    real: dict[str, Any] = {}
    handles = [
        gpt2_module.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: real.__setitem__(p, o))
        for p in paths
    ]
    gpt2_module(ids)
    for handle in handles:
        handle.remove()
    shapes = {}
    with gpt2.scan(ids):
        for path in paths:
            shapes[path] = gpt2.get(path).output.shape
    for path in paths:
        value = real[path]
        expected = value.shape if isinstance(value, torch.Tensor) else None
        if expected is not None:
            assert shapes[path] == expected, path


def test_a_scan_never_runs_the_model(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    calls: list[int] = []
    handle = net.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        with model.scan(x):
            width = model.layer1.output.shape[-1]
            kind = model.layer1.output.dtype
            where = model.layer1.output.device
            out = model.output.save()
    finally:
        handle.remove()
    assert (width, kind, where) == (10, torch.float32, torch.device("cpu"))
    assert calls == []
    with pytest.raises(ValueError, match="a scan never runs the model"):
        _ = out.value


def test_shapes_propagate_through_operations(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.scan(x):
        h = model.layer1.output
        assert (h * 2).sum(dim=-1).shape == (1,)
        assert h.T.shape == (10, 1)
        assert torch.cat([cast(torch.Tensor, h), cast(torch.Tensor, h)]).shape == (2, 10)
        assert model.layer2.inputs.shape == ((torch.Size([1, 10]),), {})


def test_validate_raises_at_the_users_line(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    calls: list[int] = []
    handle = net.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        with pytest.raises(IndexError, match="index 20 is out of bounds") as caught:
            with model.trace(x, scan=True, validate=True):
                model.layer1.output[:, 20] = 0  # the bad index
    finally:
        handle.remove()
    assert calls == []  # raised while tracing: the model never ran
    lines = [frame.lineno + 1 for frame in caught.traceback]  # pytest counts from 0
    assert _line_of("# the bad index") in lines
    assert "validate=True" in "\n".join(getattr(caught.value, "__notes__", []))


def test_validate_catches_a_set_of_the_wrong_shape(model: nnsight.NNsight, x: torch.Tensor) -> None:
    shapes = r"model.layer1.output has shape \(1, 10\), but the new value has shape \(1, 3\)"
    with pytest.raises(ValueError, match=shapes):
        with model.trace(x, scan=True, validate=True):
            model.layer1.output = torch.zeros(1, 3)


def test_without_validate_shape_errors_wait_for_the_run(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(IndexError) as caught:
        with model.trace(x, scan=True):
            assert model.layer1.output.shape == (1, 10)
            model.layer1.output[:, 20] = 0
    assert "raised while running the intervention" in "\n".join(getattr(caught.value, "__notes__", []))


def test_no_fake_tensor_leaks_and_no_mode_remains(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    hooks = hook_counts(net)
    with model.trace(x, scan=True, validate=True):
        shape = model.layer1.output.shape
        noise = (model.layer1.output + torch.zeros(shape)).save()  # shape is real: a constant
        doubled = (model.layer1.output * 2).save()
    assert _get_current_dispatch_mode() is None
    assert hook_counts(net) == hooks
    for value in (noise.value, doubled.value):
        assert not isinstance(value, FakeTensor)
    assert torch.allclose(doubled.value, net.layer1(x) * 2)


def test_scan_needs_known_inputs_in_a_session(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with pytest.raises(nnsight.TraceError, match="scan=True needs inputs known while tracing"):
        with model.session() as session:
            with session.iter([x]) as item:
                with model.trace(item, scan=True):
                    pass


def test_scan_in_a_session_with_known_inputs(model: nnsight.NNsight, net: TinyNet, x: torch.Tensor) -> None:
    with model.session():
        with model.trace(x, scan=True):
            width = model.layer1.output.shape[-1]
            out = model.output.save()
    assert width == 10 and torch.equal(out.value, net(x))


def test_apply_is_not_run_while_validating(model: nnsight.NNsight, x: torch.Tensor) -> None:
    calls: list[int] = []

    def effect(value: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return value

    with model.trace(x, scan=True, validate=True) as tracer:
        tracer.apply(effect, model.layer1.output)
        assert calls == []  # arbitrary functions are never run on fakes
    assert calls == [1]
