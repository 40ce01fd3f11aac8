"""The seams of the shell: the runner and its `ModelAdapter`, a block's one
recording cell, and an edit that hands its graph back instead of writing it.

A fake adapter (no `NNsight` wrapper at all) drives a `Tracer`, a `Session`
and `run_invokes`: the contexts need nothing of a model wrapper but the
Protocol.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

import nnsight_pure as nnsight
from nnsight_pure.batching import default_batch
from nnsight_pure.contexts.editing import EditingTracer
from nnsight_pure.contexts.session import Session
from nnsight_pure.contexts.tracer import Tracer
from nnsight_pure.graph import Graph
from nnsight_pure.handle import ModelHandle
from nnsight_pure.interpreter import Interleaver
from nnsight_pure.ops import Bridge
from nnsight_pure.runner import Inputs, ModelAdapter, Prepared, run_invokes
from tests.helpers import TinyNet, tiny_net


class FakeAdapter:
    """A `ModelAdapter` written from scratch: doubles every input, and counts what the runner asks."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._handle = ModelHandle(module)
        self.prepared = 0
        self.runs = 0

    @property
    def handle(self) -> ModelHandle:
        return self._handle

    def prepare_input(self, *inputs: Any, **kwargs: Any) -> tuple[Inputs, int]:
        self.prepared += 1
        (x,) = inputs
        return ((x * 2,), kwargs), int(x.shape[0])

    def invoker_inputs(self, prepared: Inputs) -> Any:
        return ("prepared", prepared)

    def batch(self, batched: Inputs | None, *args: Any, **kwargs: Any) -> Inputs:
        return default_batch(batched, args, kwargs)

    def before_run(self) -> None:
        self.runs += 1

    def interleave(self, interleaver: Interleaver, *args: Any, fn: Callable[..., Any] | str | None = None,
                   **kwargs: Any) -> Any:
        assert callable(fn)
        with interleaver:
            return fn(*args, **kwargs)

    def method_fn(self, method: str | None) -> Callable[..., Any]:
        assert method is None
        return self._handle.module

    def on_module(self, module: torch.nn.Module) -> ModelAdapter:
        return FakeAdapter(module)


def _envoy(adapter: FakeAdapter) -> Any:
    return nnsight.Envoy(adapter.handle, adapter.handle.module, "", "")


def test_a_fake_adapter_drives_a_tracer_without_a_model_wrapper() -> None:
    net: TinyNet = tiny_net()
    adapter = FakeAdapter(net)
    root = _envoy(adapter)
    x = torch.randn(3, 5)
    with Tracer(adapter, None, {}, None, inputs=((x,), {})) as tracer:
        hidden = root.layer1.output.save()
        assert tracer.invoker is not None
        label, ((doubled,), kwargs) = tracer.invoker.inputs
        assert label == "prepared" and kwargs == {} and torch.equal(doubled, x * 2)
    torch.testing.assert_close(hidden.value, net.layer1(x * 2))
    assert adapter.runs == 1
    assert adapter.prepared == 1  # once, as the invoke opened (the run reuses it)


def test_two_invokes_are_batched_by_the_adapter() -> None:
    net = tiny_net()
    adapter = FakeAdapter(net)
    root = _envoy(adapter)
    a, b = torch.randn(1, 5), torch.randn(2, 5)
    with Tracer(adapter, None, {}, None) as tracer:
        with tracer.invoke(a):
            first = root.layer2.output.save()
        with tracer.invoke(b):
            second = root.layer2.output.save()
    torch.testing.assert_close(first.value, net(a * 2))
    torch.testing.assert_close(second.value, net(b * 2))


def test_a_graph_runs_through_run_invokes_the_same_way() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    graph = nnsight.trace(model, lambda m: m.layer1.output)
    adapter = FakeAdapter(net)
    x = torch.randn(2, 5)
    prepared, _ = adapter.prepare_input(x)
    raw_results, _ = run_invokes(adapter, graph, [((x,), {})])
    ready_results, _ = run_invokes(adapter, graph, [Prepared(*prepared, size=2)])
    torch.testing.assert_close(raw_results.outputs, net.layer1(x * 2))
    torch.testing.assert_close(ready_results.outputs, net.layer1(x * 2))
    assert adapter.prepared == 2  # the prepared invoke was not prepared again
    assert adapter.runs == 2


def test_a_session_runs_its_traces_through_the_adapter() -> None:
    net = tiny_net()
    adapter = FakeAdapter(net)
    root = _envoy(adapter)
    x = torch.randn(2, 5)
    with Session(adapter, None) as session:
        with Tracer(adapter, None, {}, None, session, inputs=((x,), {})):
            hidden = root.layer1.output
        with Tracer(adapter, None, {}, None, session, inputs=((x,), {})):
            root.layer1.output = hidden * 0
            out = root.layer2.output.save()
    torch.testing.assert_close(out.value, net.layer2(torch.zeros(2, 10)))
    assert adapter.runs == 2  # one model run per trace, when the session ran


def test_a_snapshot_of_a_block_restores_its_whole_recording() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    x = torch.randn(2, 5)
    with model.trace(x) as tracer:
        hidden = model.layer1.output
        with tracer.cond(hidden.sum() > 0) as branch:
            before = branch._snapshot()
            (hidden * 2).save()  # brings `hidden` in through a bridge
            during = branch._snapshot()
            assert len(during.bridges) == 1 and during.captures == (hidden._ref,)
            assert any(isinstance(node.op, Bridge) for node in branch.graph.nodes)
            branch._restore(before)
            assert branch.graph == before.graph and branch._snapshot() == before
            assert not branch._snapshot().bridges
        saved = model.layer2.output.save()
    torch.testing.assert_close(saved.value, net(x))
    assert during.graph != before.graph  # the snapshot is a value: later records did not change it


def test_an_edit_hands_its_graph_back_and_writes_nothing_of_the_wrapper() -> None:
    net = tiny_net()
    model = nnsight.NNsight(net)
    stored: list[Graph] = []
    with EditingTracer(model._adapter(), None, entered=model, store=stored.append) as edited:
        assert edited is model
        model.layer1.output[:] = 0
        assert model.edits is None  # nothing is written while the edit records
    assert model.edits is None  # the edit wrote nothing of the wrapper's
    (graph,) = stored
    assert len(graph) > 0
    # The wrapper stores it only when `NNsight.edit` asks it to.
    with model.edit(inplace=True):
        model.layer1.output[:] = 0
    assert model.edits == graph


def test_an_edit_without_a_store_just_records() -> None:
    adapter = FakeAdapter(tiny_net())
    root = _envoy(adapter)
    with EditingTracer(adapter, None) as entered:
        root.layer1.output[:] = 0
        editing = nnsight.open_blocks.innermost()
    assert entered is None
    assert isinstance(editing, EditingTracer) and len(editing.edits) > 0
