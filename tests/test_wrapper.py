"""The NNsight wrapper's contract: subclass hooks, __methods__, envoy tree, graph snapshots."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.interpreter import Interleaver
from tests.helpers import TinyNet


class DictInputs(nnsight.NNsight):
    """A wrapper whose invokes take {"x": tensor} dicts (a custom batching contract)."""

    def _prepare_input(self, *inputs: Any, **kwargs: Any) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], int]:
        (batch,) = inputs
        return ((batch["x"],), {}), int(batch["x"].shape[0])

    def _batch(self, batched_inputs: Any, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if batched_inputs is None:
            return args, kwargs
        return (torch.cat([batched_inputs[0][0], args[0]]),), {}


def test_subclass_batching_contract(net: TinyNet) -> None:
    model = DictInputs(net)
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with model.trace() as tracer:
        with tracer.invoke({"x": a}):
            out_a = model.output.save()
        with tracer.invoke({"x": b}):
            out_b = model.output.save()
    assert torch.allclose(out_a.value, net(a)) and torch.allclose(out_b.value, net(b))


class Doubling(nnsight.NNsight):
    """Adds a traceable method through __methods__, and overrides interleave."""

    __methods__: ClassVar[dict[str, str]] = {"twice": "_twice"}
    interleaved = 0

    def _twice(self, x: torch.Tensor) -> Any:
        return self._model(self._model.get_submodule("layer1")(x).new_zeros(x.shape) + x) * 2

    def interleave(self, interleaver: Interleaver, *args: Any, fn: Any = None, **kwargs: Any) -> Any:
        type(self).interleaved += 1
        return super().interleave(interleaver, *args, fn=fn, **kwargs)


def test_methods_mapping_and_interleave_override(net: TinyNet, x: torch.Tensor) -> None:
    model = Doubling(net)
    with model.twice(x):
        out = model.output.save()
    assert torch.equal(out.value, net(x))  # the root's own output, inside _twice
    with model.trace(x, method="_twice"):
        again = model.layer2.output.save()
    assert torch.equal(again.value, net(x))
    assert Doubling.interleaved == 2


def test_execute_is_the_default_method(net: TinyNet, x: torch.Tensor) -> None:
    calls: list[tuple[Any, ...]] = []

    class Recording(nnsight.NNsight):
        def _execute(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return super()._execute(*args, **kwargs)

    with Recording(net).trace(x):
        pass
    assert len(calls) == 1 and torch.equal(calls[0][0], x)


def test_save_returns_the_same_proxy(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layer1.output
        assert h.save() is h


def test_tracer_graph_is_a_snapshot_value(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        model.layer1.output.save()
        early = tracer.graph
        model.layer2.output.save()
        late = tracer.graph
    assert len(early) == 2 and len(late) == 4
    assert late.nodes[:2] == early.nodes  # the earlier value is unchanged and shared
    assert tracer.graph == late


def test_hooks_only_on_the_modules_the_graph_needs(net: TinyNet, x: torch.Tensor) -> None:
    seen: dict[str, tuple[int, int]] = {}

    class Probe(torch.nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            seen.update({name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in net.named_modules()})
            return h

    net.add_module("probe", Probe())  # Sequential: runs after layer2, while our hooks are in place
    model = nnsight.NNsight(net)
    with model.trace(x):
        model.layer1.output.save()
        model.layer2.input.save()
    assert seen == {"": (0, 0), "layer1": (1, 0), "layer2": (0, 1), "probe": (0, 0)}


def test_child_named_like_an_access_wins_and_the_access_moves() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.output = torch.nn.Linear(3, 3)  # as in BERT's BertLayer.output

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.output(x)
            return out + 1

    with pytest.warns(UserWarning, match="nns_output"):
        model = nnsight.NNsight(Block())
    assert isinstance(model.output, nnsight.Envoy)  # the submodule
    x = torch.rand(1, 3)
    with model.trace(x):
        inner = model.output.output.save()  # the submodule's output
        outer = model.nns_output.save()  # the block's own output
    assert torch.equal(outer.value, inner.value + 1)


def test_tree_helpers(model: nnsight.NNsight) -> None:
    assert [path for path, _ in model.named_modules()] == ["", "layer1", "layer2"]
    assert [e.path for e in model.modules()] == ["", ".layer1", ".layer2"]
    assert [e.path for e in model.modules(lambda e: isinstance(e._module, torch.nn.Linear))] == [".layer1", ".layer2"]
    assert [e.path for e in model] == [".layer1", ".layer2"]
    assert len(model) == 2 and model[0] is model.layer1 and model[-1] is model.layer2
    assert "layer1" in dir(model._envoy)


def test_attaching_a_module_goes_to_the_torch_module(net: TinyNet, x: torch.Tensor) -> None:
    model = nnsight.NNsight(net)
    model.extra = torch.nn.Identity()
    assert isinstance(net.extra, torch.nn.Identity)
    with model.trace(x):
        via_extra = model.extra(model.layer1.output, hook=True).save()
        seen = model.extra.output.save()
    assert torch.equal(via_extra.value, seen.value)


def test_no_warnings_for_ordinary_models(net: TinyNet) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nnsight.NNsight(net)
