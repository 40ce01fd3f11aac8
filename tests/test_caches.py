"""caches.py: every table kept across traces is bounded, listed, and can be emptied."""

from __future__ import annotations

import torch

import nnsight_pure as nnsight
from nnsight_pure import caches
from nnsight_pure.caches import BoundedCache, clear_caches
from tests.helpers import tiny_net

BOUNDS = {cache.name: cache.limit for cache in caches._ALL}


def _trace_fresh_lambdas(model: nnsight.NNsight, x: torch.Tensor, count: int) -> None:
    for _ in range(count):
        with model.trace(x):
            nnsight.apply(eval("lambda h: h * 2"), model[0].output).save()  # a fresh function each time


def test_two_thousand_traces_of_fresh_lambdas_leave_every_cache_bounded() -> None:
    model = nnsight.NNsight(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU()))
    x = torch.rand(2, 5)
    _trace_fresh_lambdas(model, x, 10)
    before = caches.caches()
    _trace_fresh_lambdas(model, x, 2_000)
    after = caches.caches()
    for name, size in after.items():
        if name in BOUNDS:
            assert size <= BOUNDS[name], name
    # A fresh lambda per trace: its node is not shared (its plan neither), so
    # no table grows with the number of traces.
    for name in ("nodes", "locations", "plans", "batch groups", "op fields"):
        assert after[name] - before[name] <= 8, (name, before[name], after[name])


def test_clear_caches_empties_every_table_and_the_next_trace_works() -> None:
    model = nnsight.NNsight(tiny_net())
    x = torch.rand(1, 5)
    with model.trace(x):
        first = model.layer1.output.sum().save()
    nnsight.to_json(nnsight.trace(model, lambda m: (m.layer1.output + 1).sum()))  # fills the whitelist
    assert caches.caches()["nodes"] > 0 and caches.caches()["whitelist"] > 0
    clear_caches()
    assert all(size == 0 for size in caches.caches().values()), caches.caches()
    with model.trace(x):
        again = model.layer1.output.sum().save()
    assert torch.equal(first, again)
    assert nnsight.from_json(nnsight.to_json(nnsight.trace(model, lambda m: m.layer1.output.sum())))


def test_bounded_caches() -> None:
    wholesale: BoundedCache[int, int] = BoundedCache("test wholesale", 3)
    lru: BoundedCache[int, int] = BoundedCache("test lru", 3, lru=True)
    try:
        for key in range(3):
            wholesale.put(key, key)
            lru.put(key, key)
        assert lru.get(0) == 0  # used: the oldest is now 1
        wholesale.put(3, 3)
        lru.put(3, 3)
        assert list(wholesale.table) == [3]
        assert list(lru.table) == [2, 0, 3]
        assert 0 in lru and 1 not in lru and len(lru) == 3 and lru.get(1) is None
        wholesale.put(3, 4)  # a key already there makes no room
        assert wholesale.table == {3: 4}
    finally:
        caches._ALL.remove(wholesale)
        caches._ALL.remove(lru)
