"""patching_sweep against the same patching done by hand with torch hooks, one
run per patch; its statistics against hand formulas; the graph as data (JSON)
and on Ray; the heatmap."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.patching import PatchingResult, patching_graph, patching_inputs, result_of
from tests import helpers
from tests.helpers import tiny_gpt2

LAYERS = ["transformer.h.0", "transformer.h.1"]
HEAD_SITES = ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def logit_diff(out: Any) -> Any:
    """Works on a proxy (recorded) and on a real output alike."""
    return out.logits[:, -1, 3] - out.logits[:, -1, 5]


def prompts(n: int = 5, seq: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (n, seq), generator=generator), torch.randint(0, 100, (n, seq), generator=generator)


def module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


def hooked(
    model: torch.nn.Module,
    x: torch.Tensor,
    metric: Callable[[Any], torch.Tensor],
    paths: list[str],
    patch: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    on_input: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``model(x)`` with plain hooks: record each path's output (or input),
    and let ``patch(layer, value)`` return a replacement."""
    seen: list[torch.Tensor] = []
    handles = []
    for number, path in enumerate(paths):
        if on_input:
            def pre(mod: Any, args: Any, number: int = number) -> Any:
                seen.append(args[0].clone())
                new = patch(number, args[0]) if patch else None
                return None if new is None else (new,)
            handles.append(module(model, path).register_forward_pre_hook(pre))
        else:
            def post(mod: Any, args: Any, out: Any, number: int = number) -> Any:
                seen.append(out.clone())
                return patch(number, out) if patch else None
            handles.append(module(model, path).register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return metric(out), seen


def by_hand_positions(
    model: torch.nn.Module, clean: torch.Tensor, corrupted: torch.Tensor, paths: list[str], positions: list[int],
    metric: Callable[[Any], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One run per (layer, position): the corrupted run with that one slice replaced."""
    clean_metric, cache = hooked(model, clean, metric, paths)
    corrupted_metric, _ = hooked(model, corrupted, metric, paths)
    table = torch.zeros(len(clean), len(paths), len(positions))
    for layer in range(len(paths)):
        for i, position in enumerate(positions):
            def patch(number: int, out: torch.Tensor, layer: int = layer, position: int = position) -> Any:
                if number != layer:
                    return None
                new = out.clone()
                new[:, position] = cache[layer][:, position]
                return new
            table[:, layer, i] = hooked(model, corrupted, metric, paths, patch)[0]
    return table, clean_metric, corrupted_metric


def by_hand_heads(
    model: torch.nn.Module, clean: torch.Tensor, corrupted: torch.Tensor, paths: list[str], heads: int,
    metric: Callable[[Any], torch.Tensor],
) -> torch.Tensor:
    _, cache = hooked(model, clean, metric, paths, on_input=True)
    width = cache[0].shape[-1] // heads
    table = torch.zeros(len(clean), len(paths), heads)
    for layer in range(len(paths)):
        for head in range(heads):
            def patch(number: int, value: torch.Tensor, layer: int = layer, head: int = head) -> Any:
                if number != layer:
                    return None
                new = value.clone()
                cut = slice(head * width, (head + 1) * width)
                new[..., cut] = cache[layer][..., cut]
                return new
            table[:, layer, head] = hooked(model, corrupted, metric, paths, patch, on_input=True)[0]
    return table


# --- against hand patching --------------------------------------------------------------------


def test_positions_on_gpt2_equal_hand_patching() -> None:
    model = tiny_gpt2()
    clean, corrupted = prompts()
    result = nnsight.patching_sweep(
        model, clean, corrupted, layers=LAYERS, positions=range(4), metric=logit_diff, batch_size=2, progress=False
    )
    table, clean_metric, corrupted_metric = by_hand_positions(model, clean, corrupted, LAYERS, [0, 1, 2, 3], logit_diff)
    torch.testing.assert_close(result.patched, table)
    torch.testing.assert_close(result.clean, clean_metric)
    torch.testing.assert_close(result.corrupted, corrupted_metric)
    assert result.layers == tuple(LAYERS) and result.labels == (0, 1, 2, 3) and result.axis == "position"
    # Patching the last layer at the last position restores the clean metric exactly.
    torch.testing.assert_close(result.patched[:, 1, 3], clean_metric)
    assert result.effect.abs().max() > 0  # the patches do something on this model


def test_heads_on_gpt2_equal_hand_patching() -> None:
    model = tiny_gpt2()
    clean, corrupted = prompts(seed=2)
    result = nnsight.patching_sweep(
        model, clean, corrupted, layers=HEAD_SITES, heads=4, metric=logit_diff, batch_size=3, progress=False
    )
    torch.testing.assert_close(result.patched, by_hand_heads(model, clean, corrupted, HEAD_SITES, 4, logit_diff))
    assert result.axis == "head" and result.labels == (0, 1, 2, 3)


def tiny_net() -> torch.nn.Sequential:
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    )


def net_metric(out: Any) -> Any:
    return out.sum(dim=1)[:, 0] - out[:, -1, 1]  # mixes positions, so earlier patches matter


def test_a_tiny_torch_net_equals_hand_patching_with_negative_positions() -> None:
    model = tiny_net()
    generator = torch.Generator().manual_seed(6)
    clean, corrupted = torch.randn(7, 5, 3, generator=generator), torch.randn(7, 5, 3, generator=generator)
    paths = ["0", "2"]
    result = nnsight.patching_sweep(
        model, clean, corrupted, layers=paths, positions=[0, 2, -1], metric=net_metric, batch_size=3, progress=False
    )
    table, clean_metric, corrupted_metric = by_hand_positions(model, clean, corrupted, paths, [0, 2, -1], net_metric)
    torch.testing.assert_close(result.patched, table)
    torch.testing.assert_close(result.clean, clean_metric)
    torch.testing.assert_close(result.corrupted, corrupted_metric)


def test_results_do_not_depend_on_the_batch_size() -> None:
    model = tiny_gpt2()
    clean, corrupted = prompts(n=5)
    one = nnsight.patching_sweep(model, clean, corrupted, layers=LAYERS, positions=[1, 3], metric=logit_diff,
                                 batch_size=1, progress=False)
    all_at_once = nnsight.patching_sweep(model, clean, corrupted, layers=LAYERS, positions=[1, 3],
                                         metric=logit_diff, batch_size=5, progress=False)
    torch.testing.assert_close(one.patched, all_at_once.patched)


def test_a_factory_and_lists_of_tensors_work_too() -> None:
    clean, corrupted = prompts(n=3)
    from_factory = nnsight.patching_sweep(
        tiny_gpt2, list(clean), list(corrupted), layers=LAYERS, positions=[0], metric=logit_diff, batch_size=2,
        progress=False,
    )
    direct = nnsight.patching_sweep(
        nnsight.NNsight(tiny_gpt2()), clean, corrupted, layers=LAYERS, positions=[0], metric=logit_diff,
        batch_size=2, progress=False,
    )
    torch.testing.assert_close(from_factory.patched, direct.patched)


# --- the result's statistics ------------------------------------------------------------------


def made_up() -> PatchingResult:
    generator = torch.Generator().manual_seed(9)
    patched = torch.randn(12, 2, 3, dtype=torch.float64, generator=generator)
    clean = 2 + torch.rand(12, dtype=torch.float64, generator=generator)
    corrupted = -torch.rand(12, dtype=torch.float64, generator=generator)
    return PatchingResult(patched, clean, corrupted, ("a", "b"), (0, 1, 2), "position")


def test_effect_and_normalized_follow_their_formulas() -> None:
    result = made_up()
    e, layer, i = 4, 1, 2
    assert float(result.values[e, layer, i]) == pytest.approx(float(result.patched[e, layer, i] - result.corrupted[e]))
    share = (result.patched[e, layer, i] - result.corrupted[e]) / (result.clean[e] - result.corrupted[e])
    assert float(result.normalized().values[e, layer, i]) == pytest.approx(float(share))
    column = result.effect[:, layer, i]
    assert float(result.mean[layer, i]) == pytest.approx(float(column.sum() / 12))
    hand_se = (((column - column.mean()) ** 2).sum() / 11).sqrt() / 12**0.5
    assert float(result.stderr[layer, i]) == pytest.approx(float(hand_se))
    low, high = result.bootstrap_ci(n_resamples=400, seed=3)
    assert bool((low <= result.mean).all() and (result.mean <= high).all())
    assert result.permutation_pvalue(n_resamples=99).shape == (2, 3)


def test_rows_and_dataframe() -> None:
    result = made_up()
    rows = result.to_rows(n_resamples=200)
    assert len(rows) == 6
    assert rows[5]["layer"] == "b" and rows[5]["position"] == 2
    assert rows[5]["mean"] == pytest.approx(float(result.mean[1, 2]))
    low, high = result.bootstrap_ci(n_resamples=200)
    assert rows[5]["ci_low"] == pytest.approx(float(low[1, 2]))
    assert rows[5]["ci_high"] == pytest.approx(float(high[1, 2]))
    pandas = pytest.importorskip("pandas")
    frame = result.to_dataframe(n_resamples=200)
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame.columns) == ["layer", "position", "mean", "stderr", "ci_low", "ci_high"]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = made_up().plot(tmp_path / "patching.png", title="made up")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # an import of it now fails
    with pytest.raises(ImportError, match=r"nnsight_pure\[plot\]"):
        made_up().plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --- the graph as data ------------------------------------------------------------------------


def test_the_graph_round_trips_through_json_with_equal_results() -> None:
    model = tiny_gpt2()
    clean, corrupted = prompts()
    graph = patching_graph(model, layers=LAYERS, positions=[0, 3], metric=logit_diff)
    again = nnsight.from_json(nnsight.to_json(graph))
    pairs = list(zip(clean, corrupted))
    rows = 2 + 2 * 2
    outputs = [
        nnsight.sweep(model, g, pairs, batch_size=2, inputs=patching_inputs(rows), progress=False).outputs
        for g in (graph, again)
    ]
    assert torch.equal(outputs[0], outputs[1])
    direct = nnsight.patching_sweep(model, clean, corrupted, layers=LAYERS, positions=[0, 3], metric=logit_diff,
                                    batch_size=2, progress=False)
    assert torch.equal(result_of(outputs[1], LAYERS, [0, 3], "position").patched, direct.patched)


# --- errors -----------------------------------------------------------------------------------


def test_errors_say_what_is_wrong() -> None:
    model = tiny_gpt2()
    clean, corrupted = prompts(n=2)
    common: dict[str, Any] = {"metric": logit_diff, "progress": False}
    with pytest.raises(TypeError, match="exactly one of positions"):
        nnsight.patching_sweep(model, clean, corrupted, layers=LAYERS, positions=[0], heads=4, **common)
    with pytest.raises(TypeError, match="module paths"):
        nnsight.patching_sweep(model, clean, corrupted, layers="transformer.h.0", positions=[0], **common)
    with pytest.raises(ValueError, match="one shape"):
        nnsight.patching_sweep(model, clean, corrupted[:, :3], layers=LAYERS, positions=[0], **common)
    with pytest.raises(ValueError, match="as many examples"):
        nnsight.patching_sweep(model, clean, corrupted[:1], layers=LAYERS, positions=[0], **common)
    with pytest.raises(ValueError, match="one value per row"):
        nnsight.patching_sweep(model, clean, corrupted, layers=LAYERS, positions=[0], metric=lambda o: o.logits[:, -1],
                               progress=False)


# --- on Ray -----------------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import the tests package
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_ray_engine_equals_the_local_one(cluster: Any) -> None:
    clean, corrupted = prompts(n=6)
    kwargs: dict[str, Any] = {"layers": LAYERS, "positions": range(4), "metric": logit_diff, "batch_size": 2,
                              "progress": False}
    here = nnsight.patching_sweep(tiny_gpt2, clean, corrupted, **kwargs)
    there = nnsight.patching_sweep(tiny_gpt2, clean, corrupted, engine="ray", workers=2, **kwargs)
    assert torch.equal(here.patched, there.patched)
    assert torch.equal(here.clean, there.clean) and torch.equal(here.corrupted, there.corrupted)
