"""Values die when the user drops the last proxy, without the garbage collector.

With ``gc.disable()``, weak references to a saved tensor and to an
intermediate tensor (one the intervention computed and did not save) must
be dead as soon as the user's proxies, tracers and errors are gone: no
reference cycle keeps a run's activations (a run and its generators, a
failed run and its traceback's frames). And the tables kept across traces
stay bounded however many fresh functions the traces call.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, Callable, Iterator

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure import caches, shareable
from tests.helpers import tiny_net


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _keeper(refs: list[weakref.ref[torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    def keep(tensor: torch.Tensor) -> torch.Tensor:
        refs.append(weakref.ref(tensor))
        return tensor

    return keep


def _all_dead(refs: list[weakref.ref[torch.Tensor]]) -> bool:
    return bool(refs) and all(ref() is None for ref in refs)


def test_a_trace(no_gc: None) -> None:
    model = nnsight.NNsight(tiny_net())
    refs: list[weakref.ref[torch.Tensor]] = []
    with model.trace(torch.rand(1, 5)):
        hidden = nnsight.apply(_keeper(refs), model.layer1.output * 2)
        saved = (hidden + 1).save()
    refs.append(weakref.ref(saved.value))
    del hidden, saved
    assert _all_dead(refs)


def test_a_session_and_its_loop(no_gc: None) -> None:
    model = nnsight.NNsight(tiny_net())
    refs: list[weakref.ref[torch.Tensor]] = []
    with model.session() as session:
        with model.trace(torch.rand(1, 5)):
            hidden = nnsight.apply(_keeper(refs), model.layer1.output * 2).save()
        with session.iter([1, 2, 3]) as item:
            nnsight.apply(_keeper(refs), hidden * item)
        total = (hidden.sum() + 1).save()
    refs += [weakref.ref(hidden.value), weakref.ref(total.value)]
    del hidden, total, session, item
    assert _all_dead(refs)


def test_a_failed_intervention(no_gc: None) -> None:
    model = nnsight.NNsight(tiny_net())
    refs: list[weakref.ref[torch.Tensor]] = []
    with pytest.raises(IndexError):
        with model.trace(torch.rand(1, 5)):
            hidden = nnsight.apply(_keeper(refs), model.layer1.output * 2)
            hidden[0, 100].save()
    del hidden
    assert _all_dead(refs)


def test_a_failed_model(no_gc: None) -> None:
    model = nnsight.NNsight(tiny_net())
    refs: list[weakref.ref[torch.Tensor]] = []
    with pytest.raises(RuntimeError):
        with model.trace(torch.rand(1, 5)):
            hidden = nnsight.apply(_keeper(refs), model.layer1.output * 2)
            model.layer1.output = hidden[:, :3]  # the next layer cannot take it
            model.layer2.output.save()
    del hidden
    assert _all_dead(refs)


def test_functional_runs_and_errors(no_gc: None) -> None:
    model = nnsight.NNsight(tiny_net())
    refs: list[weakref.ref[torch.Tensor]] = []
    keep = _keeper(refs)
    graph = nnsight.trace(model, lambda m: nnsight.apply(keep, m.layer1.output * 2))
    results: Any = nnsight.run(model, graph, torch.rand(1, 5))
    refs.append(weakref.ref(results.outputs))
    del results
    with pytest.raises(RuntimeError):
        nnsight.run(model, graph, torch.rand(1, 7))
    assert _all_dead(refs)


def test_tables_kept_across_traces_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bounds made small, so that a few hundred traces pass them.
    monkeypatch.setattr(caches.NODES, "limit", 120)
    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    for _ in range(300):
        with model.trace(x):
            nnsight.apply(eval("lambda t: t + 1"), model.layer1.output).save()  # a fresh function each time
    assert not hasattr(shareable, "_KNOWN")  # the callables that passed are not remembered
    assert len(caches.NODES) <= 120

    assert len(caches.PLANS) <= caches.PLANS.limit


def test_a_session_with_inputs_made_outside_it(no_gc: None) -> None:
    model, x = nnsight.NNsight(tiny_net()), torch.rand(1, 5)
    refs: list[weakref.ref[torch.Tensor]] = []
    with model.session():
        with model.trace(x):
            hidden = nnsight.apply(_keeper(refs), model.layer1.output * 2).save()
    refs.append(weakref.ref(hidden.value))
    del hidden
    assert _all_dead(refs)
