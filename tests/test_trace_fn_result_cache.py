"""`nnsight_pure.result()` and `nnsight_pure.cache()` in a function given to
`nnsight_pure.trace` (which sees no tracer): a graph built once, saved as
JSON and replayed gives the method's return and the cached values, as plain torch does."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.errors import TraceError


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def test_result_and_cache_in_a_built_graph_replayed_from_json() -> None:
    net = _net()
    model = nnsight.NNsight(net)

    def fn(m: Any) -> Any:
        m[1].output = m[1].output * 0.5
        return {"result": nnsight.result(), "cache": nnsight.cache([m[0], "model.2"])}

    graph = nnsight.from_json(nnsight.to_json(nnsight.trace(model, fn)))
    x = torch.rand(3, 4)
    out = nnsight.run(model, graph, x)

    first = net[0](x)
    halved = torch.relu(first) * 0.5
    expected = net[2](halved)
    assert torch.equal(out["result"], expected)
    assert torch.equal(out["cache"]["model.0"].output, first)
    assert torch.equal(out["cache"]["model.2"].output, expected)
    assert list(out["cache"]) == ["model.0", "model.2"]


def test_result_and_cache_need_an_open_trace() -> None:
    with pytest.raises(TraceError, match="needs an open trace"):
        nnsight.result()
    with pytest.raises(TraceError, match="needs an open trace"):
        nnsight.cache()
