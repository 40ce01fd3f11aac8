"""What users see: `render(..., format="svg")` opened in headless Chromium.

One browser start loads a page holding the SVG inline (as Jupyter shows it)
and a little script that lists every drawn node (its ``<title>``, its text,
its tooltip and its laid-out size) into the page; the test reads the page
back with ``--dump-dom`` and checks that every node of the graph is there.
Skipped without Debian's ``chromium`` (CI installs it).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.vis import node_label, render, tooltip

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
    pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot program"),
]

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

SCRIPT = """
const nodes = [...document.querySelectorAll("svg g.node")].map((g) => {
  const box = g.getBBox();
  const link = g.querySelector("a");
  return {
    id: g.querySelector("title").textContent,
    text: [...g.querySelectorAll("text")].map((t) => t.textContent).join(" "),
    tooltip: link ? link.getAttributeNS("http://www.w3.org/1999/xlink", "title") : null,
    width: box.width,
    height: box.height,
  };
});
document.getElementById("out").textContent = JSON.stringify(nodes);
"""


def _shown(svg: Path, scratch: Path) -> list[dict[str, object]]:
    """The nodes Chromium draws for ``svg``, read back from the page."""
    picture = re.sub(r"^.*?(?=<svg)", "", svg.read_text(encoding="utf-8"), flags=re.DOTALL)
    page = scratch / "page.html"
    page.write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{picture}'
        f'<pre id="out"></pre><script>{SCRIPT}</script></body></html>',
        encoding="utf-8",
    )
    profile = scratch / "profile"
    done = subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90, check=True,
    )
    found = re.search(r'<pre id="out">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    return list(json.loads(html.unescape(found.group(1))))


def test_chromium_shows_every_node_with_its_label_and_tooltip(
    model: nnsight.NNsight, x: torch.Tensor, tmp_path: Path
) -> None:
    with model.trace(x) as tracer:
        hidden = model.layer1.output
        model.layer2.output[:, 0] = hidden.sum()
        model.output.save()
    graph = tracer.graph
    svg = render(graph, title="picture", path=tmp_path, format="svg")
    shown = {str(node["id"]): node for node in _shown(svg, tmp_path)}
    for node in graph.nodes:
        drawn = shown[f"n{node.ref.index}"]
        assert drawn["text"] == node_label(node.op)
        assert str(drawn["tooltip"]).replace("\xa0", " ") == tooltip(node.source)
        assert node.source is not None and f"test_browser.py:{node.source.lineno}" in str(drawn["tooltip"])
        assert float(str(drawn["width"])) > 0 and float(str(drawn["height"])) > 0
    boxes = [name for name in shown if "_" in name]  # constants: module paths, the index (:, 0)
    assert boxes and all(float(str(shown[name]["width"])) > 0 for name in boxes)
    assert len(shown) == len(graph) + len(boxes)
