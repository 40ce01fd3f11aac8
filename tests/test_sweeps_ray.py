"""Sweeps on a local Ray cluster (two CPUs): the same results as the local
engine, a worker killed mid-sweep, a user error in batch k.

Marked ``ray``: each sweep starts actors (a few seconds); CI runs them,
``pytest -m 'not ray'`` skips them while iterating.
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any, Iterator

import pytest
import torch

import nnsight_pure as nnsight
from tests import sweep_models
from tests.sweep_models import doomed, every_reducer, examples, mlp, probe_graph, reducers, wide_graph

ray = pytest.importorskip("ray")  # the dev extra installs it; without it there is nothing to test
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    # The workers cannot import the tests package: send its models by value.
    ray.cloudpickle.register_pickle_by_value(sweep_models)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(torch.equal(a, b))


def test_every_reducer_gives_the_local_result_with_one_or_two_workers() -> None:
    graph, data = wide_graph(), examples(37)
    local = nnsight.sweep(mlp, graph, data, batch_size=8, reduce=every_reducer(), progress=False)
    for workers in (1, 2):
        remote = nnsight.sweep(
            mlp, graph, data, batch_size=8, reduce=every_reducer(), engine="ray", workers=workers, progress=False
        )
        for name in local.outputs:
            assert same(remote[name], local[name]), (name, workers)
        assert (remote.batches, remote.examples, remote.retried) == (5, 37, ())


def test_a_worker_killed_mid_sweep_changes_nothing(tmp_path: pathlib.Path) -> None:
    graph, data = probe_graph(), examples(64)
    local = nnsight.sweep(mlp, graph, data, batch_size=4, reduce=reducers(), progress=False)
    flag = str(tmp_path / "died")

    def dying() -> torch.nn.Module:
        return mlp(flag)  # the first worker to reach its second batch exits

    remote = nnsight.sweep(dying, graph, data, batch_size=4, reduce=reducers(), engine="ray", workers=2, progress=False)
    assert pathlib.Path(flag).exists()  # a worker did die
    assert remote.retried  # and its batches ran again
    assert (remote.batches, remote.examples) == (16, 64)
    assert same(remote.outputs, local.outputs)


def test_a_user_error_in_batch_k_stops_the_sweep_naming_k() -> None:
    graph = nnsight.trace(mlp(), lambda m: m.output)
    batches = [torch.randn(4, 4) for _ in range(6)]
    batches[3] = torch.randn(4, 5)  # the wrong feature size
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        nnsight.sweep(mlp, graph, batches, engine="ray", workers=2, progress=False)
    assert time.monotonic() - began < 60  # it stops; nothing waits for the other batches
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "in batch 3 (examples 12 to 15) of the sweep started at" in notes
    assert "test_sweeps_ray.py" in notes  # the user's line, from the driver
    assert "nnsight_pure.run" in notes  # the worker's own note survives the trip


def test_a_batch_that_keeps_killing_its_worker_ends_the_sweep() -> None:
    graph = nnsight.trace(mlp(), lambda m: m.output)
    began = time.monotonic()
    with pytest.raises(nnsight.SweepError, match="batch [01] .*its worker died 2 times") as caught:
        nnsight.sweep(doomed, graph, examples(8), batch_size=4, engine="ray", workers=1, retries=1, progress=False)
    assert caught.value.batch in (0, 1)  # both were in flight on the one worker
    assert time.monotonic() - began < 90


def test_a_ray_dataset_as_input() -> None:
    data = examples(20)
    dataset = ray.data.from_items([{"x": example.numpy()} for example in data])
    graph = nnsight.trace(mlp(), lambda m: m[0].output)
    local = nnsight.sweep(mlp, graph, data, batch_size=8, progress=False)
    remote = nnsight.sweep(
        mlp, graph, dataset, batch_size=8, engine="ray", workers=2, progress=False,
        inputs=lambda batch: ((batch["x"],), {}),
    )
    assert remote.examples == 20
    assert torch.equal(remote.outputs, local.outputs)


def test_more_workers_than_the_cluster_has_room_for() -> None:
    """Actors that cannot start (the cluster has 2 CPUs) get no batches: the
    sweep finishes on those that did, instead of waiting forever."""
    graph = nnsight.trace(mlp(), lambda m: m.output)
    local = nnsight.sweep(mlp, graph, examples(16), batch_size=4, progress=False)
    remote = nnsight.sweep(mlp, graph, examples(16), batch_size=4, engine="ray", workers=4, progress=False)
    assert torch.equal(remote.outputs, local.outputs)
