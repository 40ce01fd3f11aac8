"""Concurrency and memory: traces in two threads at once; nothing saved outlives its proxy."""

from __future__ import annotations

import gc
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

import nnsight_pure as nnsight
from tests.helpers import TinyNet, hook_counts, tiny_net


class Rendezvous(torch.nn.Module):
    """Identity that waits until both threads' forwards are inside it: both runs
    (and both sets of hooks) are live on the same modules at the same time."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self.barrier = barrier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.barrier.wait(timeout=30)
        return x


class MeetingNet(torch.nn.Sequential):
    layer1: torch.nn.Linear
    meet: Rendezvous
    layer2: torch.nn.Linear


def _net_with_rendezvous(barrier: threading.Barrier) -> MeetingNet:
    base = tiny_net()
    return MeetingNet(OrderedDict([("layer1", base.layer1), ("meet", Rendezvous(barrier)), ("layer2", base.layer2)]))


def _threads(target: Any, count: int = 2) -> list[Any]:
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


def test_two_threads_trace_the_same_model_at_once() -> None:
    barrier = threading.Barrier(2)
    net = _net_with_rendezvous(barrier)
    model = nnsight.NNsight(net)
    inputs = [torch.rand(1, 5), torch.rand(1, 5)]
    before = hook_counts(net)

    def work(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with model.trace(inputs[i]):
            seen = model.layer1.output.save()
            model.layer2.input = model.layer2.input * (i + 2)
            out = model.output.save()
        return seen.value, out.value

    results = _threads(work)
    barrier.reset()
    for i, (seen, out) in enumerate(results):
        hidden = net.layer1(inputs[i])
        assert torch.equal(seen, hidden)
        assert torch.equal(out, net.layer2(hidden * (i + 2)))
    assert hook_counts(net) == before


def test_two_threads_trace_two_models_at_once() -> None:
    barrier = threading.Barrier(2)
    nets = [_net_with_rendezvous(barrier), _net_with_rendezvous(barrier)]
    models = [nnsight.NNsight(n) for n in nets]
    x = torch.rand(1, 5)

    def work(i: int) -> torch.Tensor:
        with models[i].trace(x):
            models[i].layer1.output[:] = float(i)
            out = models[i].output.save()
        return out.value  # type: ignore[no-any-return]  # a tensor

    results = _threads(work)
    for i, out in enumerate(results):
        assert torch.equal(out, nets[i].layer2(torch.full((1, 10), float(i))))


def test_fifty_traces_keep_no_saved_tensor_alive(net: TinyNet, x: torch.Tensor) -> None:
    model = nnsight.NNsight(net)
    gc.collect()
    gc.disable()  # everything below must be freed by reference counting alone (no cycles)
    try:
        refs = []
        for _ in range(50):
            with model.trace(x) as tracer:
                out = model.layer1.output.save()
                unsaved = model.layer2.output * 2
            refs.append(weakref.ref(out.value))
            del out, unsaved, tracer
            assert refs[-1]() is None  # gone as soon as its proxy (and tracer) are dropped
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


class Spy(torch.nn.Module):
    """Remembers (weakly) the tensors it is called on."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref[torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.refs.append(weakref.ref(x))
        return x.sum()


class Check(torch.nn.Module):
    """Records, when called, which of the spy's tensors are still alive."""

    def __init__(self, spy: Spy) -> None:
        super().__init__()
        self.spy = [spy]  # a list, so it is not registered as a submodule
        self.alive: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.alive = [ref() is not None for ref in self.spy[0].refs]
        return x


class WithTools(torch.nn.Module):
    """The tiny net plus two modules its forward never calls (for ad-hoc calls)."""

    def __init__(self, net: TinyNet) -> None:
        super().__init__()
        self.layer1, self.layer2 = net.layer1, net.layer2
        self.spy = Spy()
        self.check = Check(self.spy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer2(self.layer1(x))
        return out


def test_unsaved_values_die_after_their_last_use_during_the_run(net: TinyNet, x: torch.Tensor) -> None:
    tools = WithTools(net)
    check = tools.check
    model = nnsight.NNsight(tools)
    with model.trace(x):
        temp = model.layer1.output * 3
        kept = model.layer1.output * 4
        model.spy(temp)  # temp's last use: it dies right after this node
        model.spy(kept)
        kept.save()
        model.check(model.layer2.output)  # runs later, inside layer2's hook
    assert check.alive == [False, True]


def test_only_saved_values_are_in_the_results(net: TinyNet, x: torch.Tensor) -> None:
    model = nnsight.NNsight(net)
    with model.trace(x) as tracer:
        a = model.layer1.output * 2
        b = (a + 1).save()
        model.output.save()
    assert tracer._results is not None
    assert sorted(tracer._results.values) == sorted([b._ref.index, len(tracer.graph) - 2])
