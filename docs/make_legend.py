"""Regenerate the pictures of docs/vis.md from the real `to_dot`.

Run from the repository root: ``.venv/bin/python docs/make_legend.py``
(needs Graphviz's ``dot``). Writes docs/legend/<Kind>.svg, one per node kind,
docs/legend/seed_session.svg, the seed example's session drawn recursively,
and docs/legend/seed_tracer_2.svg, its second trace (slots, tooltips).
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: tests.vis_examples, as the tests import it

from nnsight_pure.vis import render  # noqa: E402
from tests.vis_examples import legend_examples  # noqa: E402

LEGEND = HERE / "legend"


def main() -> None:
    for kind, graph in legend_examples().items():
        render(graph, title=kind, path=LEGEND, format="svg", recursive=True)
    seed = (HERE.parent / "examples" / "seed_vis.py").resolve()
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            namespace = runpy.run_path(str(seed), run_name="__main__")
        finally:
            os.chdir(here)
    session = namespace["sesh"].graph
    render(session, title="seed_session", path=LEGEND, format="svg", recursive=True, group=True)
    render(namespace["tracer_2"].graph, title="seed_tracer_2", path=LEGEND, format="svg")
    print(f"wrote {len(list(LEGEND.glob('*.svg')))} pictures into {LEGEND}")


if __name__ == "__main__":
    main()
