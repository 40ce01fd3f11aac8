"""Sweeps on the local engine, and the reducers (no Ray here: see test_sweeps_ray.py)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nnsight_pure as nnsight
from nnsight_pure import reducers as R
from nnsight_pure.serialize import digest
from nnsight_pure.sweeps import OrderedFold, reducer_tree
from tests.sweep_models import examples, mlp, probe_graph, reducers, reducers_of_sums


def by_hand(data: list[torch.Tensor], batch_size: int) -> dict[str, list[torch.Tensor]]:
    """The probe graph's outputs per batch, computed with the plain module."""
    net = mlp()
    out: dict[str, list[torch.Tensor]] = {"hidden": [], "score": [], "logits": [], "loss": []}
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = torch.stack(data[start : start + batch_size])
            hidden = net[0](batch)
            logits = net(batch)
            out["hidden"].append(hidden)
            out["score"].append(hidden.norm(dim=-1))
            out["logits"].append(logits)
            out["loss"].append(logits.pow(2).mean())
    return out


def test_each_reducer_matches_the_computation_by_hand() -> None:
    data = examples(37)
    swept = nnsight.sweep(mlp, probe_graph(), data, batch_size=8, reduce=reducers(), progress=False)
    hand = by_hand(data, 8)
    assert (swept.batches, swept.examples, swept.retried) == (5, 37, ())
    assert torch.equal(swept["hidden"], torch.cat(hand["hidden"]))
    scores = torch.cat(hand["score"])
    values, indices = swept["score"]
    assert torch.equal(indices, torch.sort(scores, descending=True, stable=True).indices[:5])
    assert torch.equal(values, scores[indices])
    torch.testing.assert_close(swept["logits"], torch.cat(hand["logits"]).mean(dim=0))
    assert torch.equal(swept["loss"], torch.stack(hand["loss"]))


def test_sums_and_histograms_match_by_hand() -> None:
    data = examples(20)
    swept = nnsight.sweep(mlp, probe_graph(), data, batch_size=6, reduce=reducers_of_sums(), progress=False)
    hand = by_hand(data, 6)
    hidden = torch.cat(hand["hidden"])
    counts, edges = swept["hidden"]
    assert torch.equal(counts, torch.histc(hidden.double(), bins=10, min=-2.0, max=2.0))
    assert counts.sum() == ((hidden >= -2) & (hidden <= 2)).sum()
    assert torch.equal(edges, torch.linspace(-2.0, 2.0, 11, dtype=torch.float64))
    torch.testing.assert_close(swept["score"], torch.cat(hand["score"]).sum())
    torch.testing.assert_close(swept["logits"], torch.cat(hand["logits"]).sum(dim=0))


def test_results_equal_runs_batch_by_batch() -> None:
    model = nnsight.NNsight(mlp())
    graph = nnsight.trace(model, lambda m: (m[0].output, [m[0].output.norm(dim=-1), m.output]))
    data = examples(10)
    swept = nnsight.sweep(mlp, graph, data, batch_size=4, progress=False)  # concat by default
    runs = [nnsight.run(model, graph, torch.stack(data[i : i + 4])).outputs for i in range(0, 10, 4)]
    hidden, (score, logits) = swept.outputs
    assert torch.equal(hidden, torch.cat([r[0] for r in runs]))
    assert torch.equal(score, torch.cat([r[1][0] for r in runs]))
    assert torch.equal(logits, torch.cat([r[1][1] for r in runs]))
    with pytest.raises(ValueError, match="scalar") as caught:
        nnsight.sweep(mlp, probe_graph(), data, batch_size=4, progress=False, reduce=R.concat())  # "loss" is one value
    assert "in batch 0 (examples 0 to 3)" in getattr(caught.value, "__notes__", [""])[-1]


def test_dataset_kinds_give_the_same_result() -> None:
    data = examples(12)
    stacked = torch.stack(data)
    graph = nnsight.trace(mlp(), lambda m: m[0].output)
    expected = nnsight.sweep(mlp, graph, data, batch_size=5, progress=False).outputs
    tensors = torch.utils.data.TensorDataset(stacked)
    loader = torch.utils.data.DataLoader(tensors, batch_size=5)
    ready = [stacked[i : i + 5] for i in range(0, 12, 5)]
    for dataset, size in ((tensors, 5), (loader, None), (ready, None), (iter(data), 5)):
        swept = nnsight.sweep(mlp, graph, dataset, batch_size=size, progress=False)
        assert torch.equal(swept.outputs, expected)
        assert (swept.batches, swept.examples) == (3, 12)
    keyword = nnsight.sweep(
        mlp, graph, [{"x": stacked[:5]}], progress=False, inputs=lambda batch: ((batch["x"],), {})
    )
    assert torch.equal(keyword.outputs, expected[:5])
    with pytest.raises(TypeError, match="DataLoader makes its own batches"):
        nnsight.sweep(mlp, graph, loader, batch_size=5, progress=False)


def test_batch_sizes_come_from_the_inputs_the_model_gets() -> None:
    """With ``inputs=``, a batch's size (and so the dataset indexes top_k
    gives) is that of what the model gets, not of the first tensor in the batch."""
    data = torch.stack(examples(8))
    graph = nnsight.trace(mlp(), lambda m: m.output.norm(dim=-1))
    batches = [{"meta": torch.zeros(1), "x": data[i : i + 4]} for i in (0, 4)]
    swept = nnsight.sweep(mlp, graph, batches, progress=False, reduce=R.top_k(8),
                          inputs=lambda batch: ((batch["x"],), {}))
    assert swept.examples == 8
    with torch.no_grad():
        expected = torch.sort(mlp()(data).norm(dim=-1), descending=True, stable=True).indices
    assert torch.equal(swept.outputs[1], expected)


def test_a_user_error_in_batch_k_names_k_and_keeps_its_type() -> None:
    graph = nnsight.trace(mlp(), lambda m: m.output)
    batches = [torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 5), torch.randn(4, 4)]
    with pytest.raises(RuntimeError) as caught:
        nnsight.sweep(mlp, graph, batches, progress=False)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "in batch 2 (examples 8 to 11) of the sweep started at" in notes
    assert "test_sweeps.py" in notes and "nnsight.sweep(mlp, graph, batches" in notes  # the user's line
    assert "shapes cannot be multiplied" in str(caught.value)


def test_a_failing_model_factory_is_reported() -> None:
    def broken() -> torch.nn.Module:
        raise OSError("no weights here")

    graph = nnsight.trace(mlp(), lambda m: m.output)
    with pytest.raises(OSError, match="no weights here") as caught:
        nnsight.sweep(broken, graph, examples(4), batch_size=2, progress=False)
    assert any("model_factory()" in note for note in getattr(caught.value, "__notes__", []))


def test_bad_sweeps_fail_before_running() -> None:
    model = mlp()
    graph = probe_graph()
    with pytest.raises(KeyError, match=r"no reducer for \['loss'\]"):
        nnsight.sweep(mlp, graph, examples(4), batch_size=2, progress=False,
                      reduce={"hidden": R.concat(), "score": R.sum(), "logits": R.sum()})
    no_outputs = nnsight.trace(model, lambda m: None)
    with pytest.raises(nnsight.TraceError, match="has none"):
        nnsight.sweep(mlp, no_outputs, examples(4), batch_size=2, progress=False)
    with pytest.raises(ValueError, match="engine='ray'"):
        nnsight.sweep(mlp, graph, examples(4), batch_size=2, workers=2, progress=False)
    with pytest.raises(ValueError, match="engine must be"):
        nnsight.sweep(mlp, graph, examples(4), batch_size=2, engine="spark", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no batches"):
        nnsight.sweep(mlp, graph, [], batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        nnsight.sweep(mlp, nnsight.trace(model, lambda m: m.output), examples(4), batch_size=2,
                      progress=False, reduce=R.top_k(2))


def test_progress_bar_counts_batches(capsys: pytest.CaptureFixture[str]) -> None:
    graph = nnsight.trace(mlp(), lambda m: m.output)
    nnsight.sweep(mlp, graph, examples(9), batch_size=4, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_the_local_engine_works_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    graph = nnsight.trace(mlp(), lambda m: m.output)
    swept = nnsight.sweep(mlp, graph, examples(6), batch_size=4, progress=False)
    assert swept.outputs.shape == (6, 3)
    with pytest.raises(ImportError, match=r"nnsight_pure\[ray\]"):
        nnsight.sweep(mlp, graph, examples(6), batch_size=4, progress=False, engine="ray")


def test_importing_nnsight_pure_never_imports_ray() -> None:
    code = "import sys, nnsight_pure; nnsight_pure.sweeps; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# --- reducers as values, and the order of merging ------------------------------------------


def test_reducers_are_values() -> None:
    assert R.top_k(3) == R.TopK(3) and hash(R.mean()) == hash(R.Mean())
    assert R.histogram(4, 0.0, 1.0) != R.histogram(4, 0.0, 2.0)
    with pytest.raises(ValueError):
        R.top_k(0)
    with pytest.raises(ValueError):
        R.histogram(3, 1.0, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=80),
    seed=st.integers(0, 2**16),
    chunk=st.integers(1, 6),
)
def test_fold_is_independent_of_arrival_order_and_chunking(sizes: list[int], seed: int, chunk: int) -> None:
    """Partials arriving in any order merge to the same values as one
    in-order merge (what makes results independent of workers and retries)."""
    generator = torch.Generator().manual_seed(seed)
    outputs = [torch.randint(-50, 50, (size,), generator=generator) for size in sizes]
    graph = nnsight.trace(mlp(), lambda m: {"c": m.output, "t": m.output, "s": m.output, "h": m.output})
    every = {"c": R.concat(), "t": R.top_k(3), "s": R.sum(), "h": R.histogram(5, -50.0, 50.0)}
    spec = reducer_tree(every, graph.outputs)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    from nnsight_pure.sweeps import lift

    parts = [lift(spec, {"c": out, "t": out, "s": out, "h": out}, start) for out, start in zip(outputs, starts)]
    in_order = OrderedFold(spec)
    for index, part in enumerate(parts):
        in_order.add(index, part, sizes[index])
    shuffled = OrderedFold(spec)
    shuffled.CHUNK = chunk
    for index in torch.randperm(len(parts), generator=generator).tolist():
        shuffled.add(index, parts[index], sizes[index])
    a, b = in_order.result(), shuffled.result()
    everything = torch.cat(outputs)
    assert torch.equal(a["c"], everything) and torch.equal(b["c"], everything)
    assert torch.equal(a["s"], b["s"]) and a["s"] == everything.sum()
    assert torch.equal(a["h"], b["h"])
    expected = torch.sort(everything, descending=True, stable=True)
    for result in (a["t"], b["t"]):
        assert torch.equal(result[0], expected.values[:3]) and torch.equal(result[1], expected.indices[:3])
    assert in_order.examples == shuffled.examples == sum(sizes)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))
    return bool(torch.equal(a, b))


def test_graphs_pickle_as_values() -> None:
    import pickle

    graph = probe_graph()
    model = nnsight.NNsight(mlp())
    x = torch.randn(3, 4)
    before = nnsight.run(model, graph, x)  # leaves a plan (closures) on the graph
    copy = pickle.loads(pickle.dumps(graph))
    assert copy == graph and digest(copy) == digest(graph)
    after = nnsight.run(model, copy, x)
    assert all(_same(before[name], after[name]) for name in ("hidden", "score", "logits", "loss"))


def test_the_local_engine_takes_the_model_itself() -> None:
    model = nnsight.NNsight(mlp())
    graph = nnsight.trace(model, lambda m: m.output)
    data = examples(6)
    swept = nnsight.sweep(model, graph, data, batch_size=3, progress=False)
    assert torch.equal(swept.outputs, nnsight.sweep(mlp, graph, data, batch_size=3, progress=False).outputs)
    with pytest.raises(TypeError, match="weights never travel"):
        nnsight.sweep(model, graph, data, batch_size=3, progress=False, engine="ray")


@pytest.mark.parametrize("reducer", [R.mean(), R.sum(), R.concat(), R.stack()])
def test_partials_of_different_shapes_are_refused_naming_both_batches(reducer: Any) -> None:
    graph = nnsight.trace(mlp(), lambda m: m.output)
    batches = [torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 4, 4)]  # outputs [2, 1, 3], [2, 4, 3]
    with pytest.raises(ValueError, match=r"batch 0 \(shape .*\) with that of batch 2 \(shape "):
        nnsight.sweep(mlp, graph, batches, progress=False, reduce=reducer)
    # Same shapes but for the dimension concatenated along: fine, as plain torch.
    uneven = [torch.randn(2, 4), torch.randn(3, 4)]
    swept = nnsight.sweep(mlp, graph, uneven, progress=False, reduce=R.concat())
    with torch.no_grad():
        assert torch.allclose(swept.outputs, mlp()(torch.cat(uneven)))


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_a_batch_size_below_one_is_refused_before_the_progress_bar(size: Any) -> None:
    graph = nnsight.trace(mlp(), lambda m: m.output)
    with pytest.raises(ValueError, match="batch_size must be an integer of at least 1"):
        nnsight.sweep(mlp, graph, examples(4), batch_size=size, progress=True)
