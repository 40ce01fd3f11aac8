"""Jupyter's display: graphs and contexts format to SVG through IPython, and to
their printed text alone (without raising) when Graphviz's ``dot`` is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import graphviz
import pytest
import torch
from IPython.core.formatters import DisplayFormatter

import nnsight_pure as nnsight
from nnsight_pure import notebook
from nnsight_pure.graph import Graph
from nnsight_pure.vis import to_dot
from tests.vis_examples import legend_examples

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot program")
SVG, TEXT = "image/svg+xml", "text/plain"


@pytest.fixture()
def no_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphviz's ``dot`` is not on PATH."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def _format(shown: object, **options: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """What Jupyter does with a cell's last value."""
    data, metadata = DisplayFormatter().format(shown, **options)  # type: ignore[no-untyped-call]
    return data, metadata


def _traced(model: nnsight.NNsight, x: torch.Tensor) -> Any:
    with model.trace(x) as tracer:
        model.layer1.output.save()
    return tracer


@needs_dot
def test_a_graph_formats_to_svg_in_ipython(model: nnsight.NNsight, x: torch.Tensor) -> None:
    graph = _traced(model, x).graph
    data, metadata = _format(graph)
    assert set(data) == {SVG, TEXT} and metadata == {}
    assert "<svg" in data[SVG] and "</svg>" in data[SVG]
    assert data[SVG] == graphviz.Source(to_dot(graph)).pipe(format="svg", encoding="utf-8")
    assert data[TEXT] == repr(graph)
    assert graph._repr_svg_() == data[SVG]


@needs_dot
def test_contexts_display_their_graph(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.session() as session:
        with model.trace(x) as tracer:
            model.layer1.output.save()
            inside = _format(tracer)[0]
        with session.iter([0, 1]) as (_, loop):
            pass
    assert inside == notebook.mimebundle(tracer.graph)
    for context in (session, tracer, loop):
        data = _format(context)[0]
        assert data == notebook.mimebundle(context.graph) and set(data) == {SVG, TEXT}
        assert context._repr_svg_() == data[SVG]


@needs_dot
def test_include_and_exclude_follow_ipython(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = legend_examples()["Save"]
    assert set(graph._repr_mimebundle_(include=[SVG])) == {SVG}
    assert set(graph._repr_mimebundle_(include={SVG, TEXT}, exclude={TEXT})) == {SVG}

    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError("dot ran for a picture nobody asked for")

    monkeypatch.setattr(graphviz.Source, "pipe", refuse)
    assert graph._repr_mimebundle_(exclude=[SVG]) == {TEXT: repr(graph)}
    assert _format(graph, exclude={SVG})[0] == {TEXT: repr(graph)}


@pytest.mark.usefixtures("no_dot")
def test_without_dot_the_text_is_shown_and_nothing_raises(model: nnsight.NNsight, x: torch.Tensor) -> None:
    tracer = _traced(model, x)
    for shown in (tracer.graph, tracer, legend_examples()["Iterate"], Graph()):
        graph = shown if isinstance(shown, Graph) else shown.graph
        assert shown._repr_mimebundle_() == {TEXT: repr(graph)}
        assert shown._repr_svg_() is None
        assert _format(shown) == ({TEXT: repr(graph)}, {})


def test_a_failing_dot_falls_back_to_text(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> str:
        raise subprocess.CalledProcessError(1, ["dot", "-Tsvg"], output=b"", stderr=b"syntax error")

    monkeypatch.setattr(graphviz.Source, "pipe", fail)
    graph = legend_examples()["Cond"]
    assert notebook.mimebundle(graph) == {TEXT: repr(graph)}
    assert notebook.svg(graph) is None
