"""Activation patching over a dataset: one graph, every example's effect, statistics.

``patching_sweep(model, clean, corrupted, layers=..., positions=... | heads=..., metric=...)``
asks, for each layer and position (or head), how much patching the clean
prompt's activation into the corrupted prompt's run moves ``metric``, on
every pair of prompts, and returns a `PatchingResult`: the per-example
effects and their mean, standard error, bootstrap interval and permutation
p-value (`nnsight_pure.statistics`).

How it is one graph. ``sweep`` runs one invoke per batch, so every patch of
an example runs in the same forward pass, as rows of one batch: each pair
becomes ``2 + patches`` rows, ``[clean, corrupted, corrupted, ...]``, and at
each layer the graph copies the clean row's activation into the rows that
layer patches (row ``2 + k`` is patch ``k``: one layer, one position or
head). A row is patched at one place only, and the clean row never, so every
row is exactly one patched run; rows of one example never mix with another's.
The graph is built once (`nnsight_pure.trace`), independent of the batch size
(rows are found by ``unflatten(0, (-1, rows))``), written only in recorded
tensor operations (so it goes to JSON and to Ray workers as data), and
swept with ``concat()`` on either engine.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import attrs
import torch

from . import statistics as stats
from .functional import trace
from .graph import Graph
from .models.nnsight import NNsight
from .reducers import Concat
from .sweeps import sweep

Axis = Literal["position", "head"]
Measure = Literal["effect", "normalized"]
Activation = Callable[[Any], Any]

# --- the result ---------------------------------------------------------------------------


@attrs.frozen(eq=False)
class PatchingResult:
    """What `patching_sweep` returns: the metric on every example's runs.

    ``patched[e, l, i]`` is the metric of example ``e``'s corrupted run with
    layer ``layers[l]`` patched from its clean run at ``labels[i]`` (a
    position or a head, as ``axis`` says); ``clean[e]`` and ``corrupted[e]``
    are the metric of the unpatched runs. ``values`` are what the statistics
    describe: the effect ``patched - corrupted`` (``measure="effect"``) or,
    after `normalized`, ``(patched - corrupted) / (clean - corrupted)``, the
    share of the way from the corrupted run to the clean one (1: the patch
    restores the clean metric; an example whose clean and corrupted metrics
    are equal gives ``inf`` or ``nan`` there).
    """

    patched: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    layers: tuple[str, ...]
    labels: tuple[int, ...]
    axis: Axis
    measure: Measure = "effect"

    @property
    def examples(self) -> int:
        return int(self.patched.shape[0])

    @property
    def effect(self) -> torch.Tensor:
        """Every example's ``patched - corrupted``: ``[examples, layers, labels]``."""
        return self.patched - self.corrupted[:, None, None]

    @property
    def values(self) -> torch.Tensor:
        """Every example's value of the measure: ``[examples, layers, labels]``."""
        if self.measure == "normalized":
            return self.effect / (self.clean - self.corrupted)[:, None, None]
        return self.effect

    def normalized(self) -> PatchingResult:
        """The same runs, measured as the share of the clean-corrupted gap restored."""
        return attrs.evolve(self, measure="normalized")

    @property
    def mean(self) -> torch.Tensor:
        """The mean over examples: ``[layers, labels]``."""
        return stats.mean(self.values)

    @property
    def stderr(self) -> torch.Tensor:
        """The standard error of the mean (``ddof=1``; needs two examples)."""
        return stats.stderr(self.values)

    def bootstrap_ci(
        self, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The percentile bootstrap interval of the mean, ``(low, high)``,
        examples resampled together for every cell (seeded: reproducible)."""
        return stats.bootstrap_ci(self.values, n_resamples=n_resamples, confidence=confidence, seed=seed)

    def permutation_pvalue(self, *, n_resamples: int = 1000, seed: int = 0) -> torch.Tensor:
        """Per cell, the p-value of a paired sign-flip test that the mean
        effect is zero (always of the effect: normalizing by a positive
        gap per example would not change the signs, but dividing can)."""
        return stats.permutation_pvalue(self.effect, n_resamples=n_resamples, seed=seed)

    def to_rows(
        self, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> list[dict[str, Any]]:
        """One dict per (layer, position or head): its ``mean``, ``stderr``
        (``nan`` for a single example) and bootstrap ``ci_low``/``ci_high``."""
        mean = self.mean
        error = self.stderr if self.examples > 1 else torch.full_like(mean, math.nan)
        low, high = self.bootstrap_ci(n_resamples=n_resamples, confidence=confidence, seed=seed)
        return [
            {
                "layer": layer,
                self.axis: label,
                "mean": float(mean[i, j]),
                "stderr": float(error[i, j]),
                "ci_low": float(low[i, j]),
                "ci_high": float(high[i, j]),
            }
            for i, layer in enumerate(self.layers)
            for j, label in enumerate(self.labels)
        ]

    def to_dataframe(self, **bootstrap: Any) -> Any:
        """`to_rows` as a pandas DataFrame (pandas must be installed)."""
        try:
            pandas = importlib.import_module("pandas")  # (by name: pandas ships no type stubs)
        except ImportError as error:
            raise ImportError("PatchingResult.to_dataframe needs pandas: pip install pandas") from error
        return pandas.DataFrame(self.to_rows(**bootstrap))

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Write a heatmap of the mean (layers by positions or heads) to
        ``path`` (a PNG, or any format matplotlib knows by the suffix);
        returns the path. Needs the ``plot`` extra (matplotlib); draws with
        the Agg canvas, so no display and no global backend change."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "PatchingResult.plot needs matplotlib: pip install nnsight_pure[plot]"
            ) from error
        mean = self.mean.detach().to("cpu", torch.float64)
        finite = mean[torch.isfinite(mean)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        figure = Figure(figsize=(max(4.0, 0.5 * len(self.labels) + 2), max(3.0, 0.4 * len(self.layers) + 1.5)))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        image = axes.imshow(mean.tolist(), cmap="RdBu", vmin=-scale or -1.0, vmax=scale or 1.0, aspect="auto")
        axes.set_xticks(range(len(self.labels)), [str(label) for label in self.labels])
        axes.set_yticks(range(len(self.layers)), list(self.layers))
        axes.set_xlabel(self.axis)
        axes.set_ylabel("layer")
        axes.set_title(title or f"mean {self.measure} over {self.examples} examples")
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        target = Path(path)
        figure.savefig(target)
        return target


# --- building the graph -------------------------------------------------------------------


def _module(model: Any, path: str) -> Any:
    """The envoy at a dotted module path (``"transformer.h.0"``)."""
    envoy = model
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _output(module: Any) -> Any:
    return module.output


def _input(module: Any) -> Any:
    return module.input


@attrs.frozen
class _Patches:
    """The static description of a sweep's patches (what `_record` reads)."""

    layers: tuple[str, ...]
    labels: tuple[int, ...]
    axis: Axis
    heads: int
    activation: Activation
    metric: Callable[[Any], Any]

    @property
    def rows(self) -> int:
        """Rows per example: clean, corrupted, then one per patch."""
        return 2 + len(self.layers) * len(self.labels)

    def record(self, model: Any) -> Any:
        """Record the patches on ``model`` (inside `nnsight_pure.trace`)."""
        rows, per_layer = self.rows, len(self.labels)
        targets = list(self.labels)
        for number, path in enumerate(self.layers):
            # [batch * rows, ...] -> [batch, rows, ...]: a view, so writes reach the model.
            grouped = self.activation(_module(model, path)).unflatten(0, (-1, rows))
            patched = [2 + number * per_layer + k for k in range(per_layer)]
            if self.axis == "head":
                # [batch, rows, seq, heads * d] -> [batch, rows, heads, seq, d]
                grouped = grouped.unflatten(-1, (self.heads, -1)).transpose(2, 3)
            grouped[:, patched, targets] = grouped[:, 0, targets]
        return self.metric(model.output).unflatten(0, (-1, rows))


@attrs.frozen
class _RowInputs:
    """A batch of ``[clean, corrupted]`` pairs as the model's one input: each
    pair becomes rows ``[clean, corrupted, corrupted * patches]``."""

    rows: int

    def __call__(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        clean, corrupted = batch
        stacked = torch.stack([clean, corrupted] + [corrupted] * (self.rows - 2), dim=1)
        return (stacked.flatten(0, 1),), {}


def _patches(
    layers: Sequence[str],
    positions: Sequence[int] | None,
    heads: int | None,
    activation: Activation | None,
    metric: Callable[[Any], Any],
) -> _Patches:
    if isinstance(layers, str) or not layers or not all(isinstance(layer, str) for layer in layers):
        raise TypeError("layers must be a non-empty sequence of module paths, e.g. ['transformer.h.0', ...]")
    if (positions is None) == (heads is None):
        raise TypeError("give exactly one of positions= (patch each position) or heads= (patch each head)")
    if not callable(metric):
        raise TypeError("metric must be a function of the model's output (a proxy) giving one value per row")
    if heads is not None:
        if type(heads) is not int or heads < 1:
            raise ValueError(f"heads must be the number of attention heads (an integer >= 1), got {heads!r}")
        return _Patches(tuple(layers), tuple(range(heads)), "head", heads, activation or _input, metric)
    assert positions is not None
    labels = tuple(positions)
    if not labels or not all(type(position) is int for position in labels):
        raise TypeError(f"positions must be a non-empty sequence of integers, got {positions!r}")
    return _Patches(tuple(layers), labels, "position", 0, activation or _output, metric)


def patching_graph(
    model: NNsight | torch.nn.Module,
    *,
    layers: Sequence[str],
    metric: Callable[[Any], Any],
    positions: Sequence[int] | None = None,
    heads: int | None = None,
    activation: Activation | None = None,
) -> Graph:
    """The graph `patching_sweep` sweeps (its arguments): a value, for
    ``to_json`` or for `sweep` with `patching_inputs` directly."""
    return trace(model, _patches(layers, positions, heads, activation, metric).record)


def patching_inputs(graph_rows: int) -> Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]:
    """The ``inputs=`` of `sweep` for a patching graph of ``graph_rows`` rows
    per example (``2 + layers * (positions or heads)``)."""
    return _RowInputs(graph_rows)


# --- the entry point ----------------------------------------------------------------------


def patching_sweep(
    model: NNsight | torch.nn.Module | Callable[[], NNsight | torch.nn.Module],
    clean: torch.Tensor | Sequence[torch.Tensor],
    corrupted: torch.Tensor | Sequence[torch.Tensor],
    *,
    layers: Sequence[str],
    metric: Callable[[Any], Any],
    positions: Sequence[int] | None = None,
    heads: int | None = None,
    activation: Activation | None = None,
    batch_size: int = 8,
    engine: Literal["local", "ray"] = "local",
    workers: int | None = None,
    progress: bool = True,
    worker_options: dict[str, Any] | None = None,
) -> PatchingResult:
    """Patch clean activations into corrupted runs, layer by layer and
    position by position (or head by head), on every pair of prompts.

    ``model``: the model (local engine) or a function building it (either
    engine; Ray workers each build their own). ``clean[e]`` and
    ``corrupted[e]`` are example ``e``'s two inputs, of the same shape
    (token ids, say): a tensor with examples along dim 0, or a sequence.

    ``layers``: module paths in the order the model runs them
    (``["transformer.h.0", "transformer.h.1"]``). With ``positions``, each
    layer's ``activation(module)`` (default: its output, a tensor
    ``[batch, seq, ...]``) is patched at each position; with ``heads``, the
    activation (default: the module's input, ``[batch, seq, heads * d]``, as
    that of GPT-2's ``attn.c_proj``, where the heads are concatenated) is
    patched one head at a time, at every position. A model whose layers
    return tuples takes ``activation=lambda m: m.output[0]``.

    ``metric(output)`` maps the model's output (a proxy: ``output.logits``
    for a Hugging Face model) to one value per row, ``[rows]``, in recorded
    operations (``out.logits[:, -1, 7] - out.logits[:, -1, 3]``).

    Each batch of ``batch_size`` pairs runs as one forward pass of
    ``batch_size * (2 + layers * positions)`` rows. Returns a `PatchingResult`.
    """
    built = model if isinstance(model, (NNsight, torch.nn.Module)) else None
    if built is None:
        if not callable(model):
            raise TypeError(f"model must be a model or a function building one, got {type(model).__name__}")
        built = model()
    patches = _patches(layers, positions, heads, activation, metric)
    graph = trace(built, patches.record)
    pairs = _pairs(clean, corrupted)
    # The local engine runs on the model already built; Ray workers build their own.
    factory: Any = built if engine == "local" else model
    results = sweep(
        factory, graph, pairs, batch_size=batch_size, reduce=Concat(), engine=engine, workers=workers,
        progress=progress, inputs=_RowInputs(patches.rows), worker_options=worker_options,
    )
    return result_of(results.outputs, patches.layers, patches.labels, patches.axis)


def result_of(rows: Any, layers: Sequence[str], labels: Sequence[int], axis: Axis) -> PatchingResult:
    """A `PatchingResult` from the swept metric, ``[examples, 2 + layers * labels]``."""
    expected = 2 + len(layers) * len(labels)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != expected:
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(
            f"metric must give one value per row ([rows]); the sweep gave {shape}, expected [examples, {expected}]"
        )
    rows = rows.detach()  # (a sweep of a graph needs no autograd history)
    patched = rows[:, 2:].reshape(rows.shape[0], len(layers), len(labels))
    return PatchingResult(patched, rows[:, 0], rows[:, 1], tuple(layers), tuple(labels), axis)


def _pairs(
    clean: torch.Tensor | Sequence[torch.Tensor], corrupted: torch.Tensor | Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if len(clean) != len(corrupted):
        raise ValueError(f"clean and corrupted need as many examples: {len(clean)} and {len(corrupted)}")
    if len(clean) == 0:
        raise ValueError("patching needs at least one pair of clean and corrupted inputs")
    pairs: list[tuple[Any, Any]] = list(zip(clean, corrupted))
    for index, (a, b) in enumerate(pairs):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
            raise ValueError(
                f"example {index}: clean and corrupted must be tensors of one shape (patching matches "
                f"positions), got {getattr(a, 'shape', type(a).__name__)} and {getattr(b, 'shape', type(b).__name__)}"
            )
    return pairs
