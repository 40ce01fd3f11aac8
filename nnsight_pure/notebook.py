"""Jupyter's display of graphs and contexts: a picture, or text without Graphviz.

IPython shows the last value of a cell through its ``_repr_mimebundle_`` or
``_repr_svg_`` method, as graphviz's own ``Source`` does. `Graph` and every
context (a trace, a session, a loop) define both by calling the functions
here, so a bare ``tracer.graph`` (or ``tracer``) at the end of a cell shows
the picture of `vis.to_dot`. A graph is a value below the picture, so it
does not import this module: this module registers its functions with
`graph.display_with` when it is imported (nnsight_pure/__init__.py imports
it); a context calls them itself. Without Graphviz's ``dot`` program the bundle
is the graph's printed form alone (``text/plain``) and nothing is raised: a
missing picture must not break a notebook.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

import graphviz

from .graph import Graph, display_with
from .vis import to_dot

SVG = "image/svg+xml"
TEXT = "text/plain"


def svg(graph: Graph) -> str | None:
    """The SVG picture of ``graph`` (``dot -Tsvg`` on `to_dot`), or ``None``
    when Graphviz's ``dot`` is not installed or fails."""
    try:
        return graphviz.Source(to_dot(graph)).pipe(format="svg", encoding="utf-8")
    except (graphviz.ExecutableNotFound, subprocess.CalledProcessError):  # graphviz's is a subclass
        return None


def mimebundle(graph: Graph, include: object = None, exclude: object = None) -> dict[str, str]:
    """IPython's display bundle of ``graph``: ``{"image/svg+xml": ..., "text/plain": ...}``.

    ``include`` and ``exclude`` are IPython's: when given, only the MIME
    types in ``include`` and none in ``exclude``. The picture is left out
    (and ``dot`` not run) when it is not wanted or cannot be drawn.
    """

    included, excluded = _kinds(include), _kinds(exclude)

    def wanted(kind: str) -> bool:
        return (included is None or kind in included) and (excluded is None or kind not in excluded)

    bundle: dict[str, str] = {}
    if wanted(SVG):
        picture = svg(graph)
        if picture is not None:
            bundle[SVG] = picture
    if wanted(TEXT):
        bundle[TEXT] = repr(graph)
    return bundle


def _kinds(value: object) -> frozenset[str] | None:
    """IPython's ``include``/``exclude`` (a collection of MIME types, or ``None``) as a set."""
    if value is None:
        return None
    return frozenset(str(kind) for kind in value) if isinstance(value, Iterable) else frozenset()


display_with(mimebundle, svg)
