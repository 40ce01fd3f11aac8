"""Pictures: `to_dot` is pure and deterministic (goldens, hash seeds, structure),
`render` writes the files, `.vis` works on every context, inside or after it.

Regenerate the goldens with ``pytest tests/test_vis.py --update-golden``.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

import nnsight_pure as nnsight
from nnsight_pure.graph import Graph
from nnsight_pure.ops import Op
from nnsight_pure.vis import STYLES, render, to_dot
from tests.vis_examples import legend_examples

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden" / "vis"
SEED = ROOT / "examples" / "seed_vis.py"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot program")

NODE = re.compile(r'^\s*"([^"]+)" \[label=')
EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)"')


def _check_golden(name: str, text: str, update: bool) -> None:
    path = GOLDEN / f"{name}.dot"
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{name}.dot differs from its golden file"


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The seed example, run verbatim in a scratch folder; its globals."""
    folder = tmp_path_factory.mktemp("seed")
    here = os.getcwd()
    os.chdir(folder)
    try:
        if shutil.which("dot") is None:  # pragma: no cover - CI installs Graphviz
            pytest.skip("the seed example writes PNG pictures, which needs Graphviz's dot")
        namespace = runpy.run_path(str(SEED), run_name="__main__")
    finally:
        os.chdir(here)
    namespace["folder"] = folder
    return namespace


def _seed_graphs(seed: dict[str, Any]) -> dict[str, Graph]:
    return {name: seed[name].graph for name in ("sesh", "tracer_1", "tracer_2", "iterator")}


@needs_dot
def test_the_seed_example_runs_verbatim_and_writes_its_four_pictures(seed: dict[str, Any]) -> None:
    written = seed["folder"] / "intervention-graphs" / "visual-example"
    assert sorted(p.name for p in written.iterdir()) == ["iterator.png", "session.png", "tracer_1.png", "tracer_2.png"]
    for picture in written.iterdir():
        assert picture.read_bytes().startswith(b"\x89PNG")
    expected = seed["net"].layer1(seed["input"]).clone()
    expected[:, :3] += seed["net"].layer1(seed["input2"])[:, :3]
    assert torch.equal(seed["l1_out_t1_cp"].value, expected)


@needs_dot
@pytest.mark.parametrize("name", ["sesh", "tracer_1", "tracer_2", "iterator"])
def test_seed_pictures_match_their_goldens(seed: dict[str, Any], name: str, update_golden: bool) -> None:
    graph = _seed_graphs(seed)[name]
    _check_golden(f"seed_{name}", to_dot(graph, title=name), update_golden)


@needs_dot
def test_seed_session_recursive_and_grouped(seed: dict[str, Any], update_golden: bool) -> None:
    graph = seed["sesh"].graph
    _check_golden("seed_session_recursive", to_dot(graph, title="session", recursive=True), update_golden)
    _check_golden("seed_session_grouped", to_dot(graph, title="session", recursive=True, group=True), update_golden)


@pytest.mark.parametrize("kind", sorted(legend_examples()))
def test_each_node_kind_matches_its_golden(kind: str, update_golden: bool) -> None:
    _check_golden(f"kinds/{kind}", to_dot(legend_examples()[kind], title=kind, recursive=True), update_golden)


def test_every_op_kind_has_a_style_and_an_example() -> None:
    kinds = {kind.__name__ for kind in get_args(Op)}
    assert kinds == {kind.__name__ for kind in STYLES}
    assert kinds == set(legend_examples())


@pytest.mark.parametrize("recursive", [False, True])
def test_every_node_id_once_and_every_edge_end_exists(recursive: bool) -> None:
    for graph in legend_examples().values():
        text = to_dot(graph, recursive=recursive, group=recursive)
        ids = [m.group(1) for line in text.splitlines() if (m := NODE.match(line))]
        assert len(ids) == len(set(ids))
        for line in text.splitlines():
            edge = EDGE.match(line)
            if edge:
                assert edge.group(1) in ids and edge.group(2) in ids, line


def test_every_graph_node_is_drawn() -> None:
    graph = legend_examples()["Iterate"]
    flat = to_dot(graph)
    assert all(f'"n{i}" [' in flat for i in range(len(graph)))
    deep = to_dot(graph, recursive=True)
    body = graph.nodes[1].op.body  # type: ignore[union-attr]  # the Iterate node
    assert all(f'"n1_{i}" [' in deep for i in range(len(body)))


def test_the_same_text_in_another_process_and_hash_seed() -> None:
    script = textwrap.dedent(
        """
        import sys
        from nnsight_pure.vis import to_dot
        from tests.vis_examples import legend_examples
        sys.stdout.write("".join(to_dot(g, title=k, recursive=True, group=True) for k, g in legend_examples().items()))
        """
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs.pop() == "".join(
        to_dot(g, title=k, recursive=True, group=True) for k, g in legend_examples().items()
    )


def test_to_dot_neither_runs_the_model_nor_changes_the_graph(
    model: nnsight.NNsight, x: torch.Tensor, tmp_path: Path
) -> None:
    calls: list[int] = []
    handle = model._model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        with model.trace(x) as tracer:
            model.layer1.output.save()
            before = tracer.graph
            path = tracer.vis(title="inside", path=tmp_path, format="dot")
            assert tracer.graph == before and calls == []
        after = tracer.vis(title="after", path=tmp_path, format="dot")
    finally:
        handle.remove()
    assert calls == [1]
    assert path.read_text() == to_dot(before, title="inside")
    assert after.read_text() == to_dot(tracer.graph, title="after")


def test_vis_on_every_context(model: nnsight.NNsight, x: torch.Tensor, tmp_path: Path) -> None:
    with model.session() as session:
        with session.iter([1, 2]) as (item, loop):
            with session.cond(item > 1) as branch:
                with model.trace(x) as tracer:
                    model.output.save()
    written = [
        context.vis(title=name, path=tmp_path, format="dot")
        for name, context in (("session", session), ("loop", loop), ("branch", branch), ("tracer", tracer))
    ]
    assert [p.name for p in written] == ["session.dot", "loop.dot", "branch.dot", "tracer.dot"]
    assert "Iterate" in written[0].read_text() and "Cond" in written[1].read_text()


@needs_dot
@pytest.mark.parametrize("format", ["png", "svg", "pdf"])
def test_render_writes_pictures(format: str, tmp_path: Path) -> None:
    target = render(legend_examples()["Cond"], title="cond", path=tmp_path / "new" / "folder", format=format)
    assert target == tmp_path / "new" / "folder" / f"cond.{format}"
    data = target.read_bytes()
    magic = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}[format]
    assert data[: len(magic)] == magic


def test_render_without_dot_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(nnsight.GraphvizNotFoundError, match="apt-get install graphviz"):
        render(legend_examples()["Save"], path=tmp_path, format="png")
    assert render(legend_examples()["Save"], title="still", path=tmp_path, format="dot").exists()


def test_render_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        render(Graph(), path=tmp_path, format="jpeg")
    with pytest.raises(ValueError, match="path separator"):
        render(Graph(), title="a/b", path=tmp_path, format="dot")


def test_group_without_recursive_warns() -> None:
    with pytest.warns(UserWarning, match="recursive=True"):
        to_dot(legend_examples()["Cond"], group=True)


def test_quoting() -> None:
    text = to_dot(legend_examples()["GetAttr"], title='a "quoted" \\ title')
    assert 'digraph "a \\"quoted\\" \\\\ title" {' in text


# --- what the picture says: tooltips, saved values, slots ------------------------------------

LABEL = re.compile(r'^\s*"([^"]+)" \[label="((?:[^"\\]|\\.)*)"')
SLOT_EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)" \[label="(#\d+)"')


def _attributes(text: str, node_id: str) -> str:
    line = next(line for line in text.splitlines() if line.strip().startswith(f'"{node_id}" ['))
    return line


def test_every_traced_node_has_its_user_line_as_tooltip(model: nnsight.NNsight, x: torch.Tensor) -> None:
    with model.trace(x) as tracer:
        hidden = model.layer1.output
        doubled = (hidden * 2).save()  # the line a tooltip shows
    del doubled
    text = to_dot(tracer.graph)
    for node in tracer.graph.nodes:
        assert node.source is not None
        line = _attributes(text, f"n{node.ref.index}")
        assert f'tooltip="test_vis.py:{node.source.lineno}  ' in line
    assert "doubled = (hidden * 2).save()  # the line a tooltip shows" in _attributes(text, "n1")
    assert all("tooltip=" not in line for line in text.splitlines() if '_f' in line.split("[")[0])


def test_a_node_without_a_source_has_no_tooltip() -> None:
    text = to_dot(legend_examples()["Save"])
    assert "tooltip" not in text


def test_tooltips_are_escaped(tmp_path: Path) -> None:
    from nnsight_pure.graph import SourceLoc
    from nnsight_pure.ops import ModuleGet

    code = tmp_path / "odd.py"
    code.write_text('x = "a\\b"  # quoted\n')  # one backslash
    graph, _ = Graph().add(ModuleGet("layer1", "output"), source=SourceLoc(str(code), 1, "f"))
    graph, _ = graph.add(ModuleGet("layer2", "output"), source=SourceLoc('we"ird\nname.py', 3, "f"))
    text = to_dot(graph)
    # Graphviz unescapes tooltips twice: the backslash is written four times.
    assert r'tooltip="odd.py:1  x = \"a\\\\b\"  # quoted"' in _attributes(text, "n0")
    assert 'tooltip="we\\"ird\\nname.py:3"' in _attributes(text, "n1")


def test_saved_values_have_a_double_border() -> None:
    text = to_dot(legend_examples()["Save"])
    assert "peripheries=2" in _attributes(text, "n0")  # the value saved
    assert "peripheries" not in _attributes(text, "n1")  # the save itself
    as_output = legend_examples()["ModuleGet"]
    assert "peripheries" not in to_dot(as_output)
    from nnsight_pure.arguments import Ref

    assert "peripheries=2" in _attributes(to_dot(as_output.with_outputs(Ref(0))), "n0")


def _check_slots(text: str) -> None:
    """No box names a node by its id; each ``#k`` in a box is the label of an edge into it."""
    labels = {m.group(1): m.group(2) for line in text.splitlines() if (m := LABEL.match(line))}
    into: dict[str, set[str]] = {}
    for line in text.splitlines():
        if edge := SLOT_EDGE.match(line):
            into.setdefault(edge.group(2), set()).add(edge.group(3))
    for node_id, label in labels.items():
        assert not re.search(r"%\d", label), (node_id, label)
        assert set(re.findall(r"#\d+", label)) == into.get(node_id, set()), (node_id, label)


@needs_dot
@pytest.mark.parametrize("recursive", [False, True])
def test_boxes_name_only_visible_nodes(seed: dict[str, Any], recursive: bool) -> None:
    for graph in [*_seed_graphs(seed).values(), *legend_examples().values()]:
        _check_slots(to_dot(graph, recursive=recursive))
    tracer_2 = to_dot(seed["tracer_2"].graph)
    assert '"n3_a1" [label="(:, #0)"' in tracer_2 and '"n2" -> "n3_a1" [label="#0"' in tracer_2


def test_a_node_twice_in_one_box_is_one_slot() -> None:
    import operator

    from nnsight_pure.arguments import ListConst, Ref
    from nnsight_pure.ops import Call, ModuleGet

    graph, _ = Graph().add(ModuleGet("layer1", "output"))
    graph, _ = graph.add(ModuleGet("layer2", "output"))
    graph, _ = graph.add(Call(operator.add), (ListConst((Ref(1), Ref(0), Ref(1))), 1), {"other": (Ref(0),)})
    text = to_dot(graph)
    _check_slots(text)
    assert '"n2_a0" [label="[#0, #1, #0]"' in text
    assert '"n1" -> "n2_a0" [label="#0"' in text and '"n0" -> "n2_a0" [label="#1"' in text
    assert '"n2_k_other" [label="other=(#0,)"' in text


@needs_dot
def test_an_escaped_tooltip_reads_back_as_written_in_svg(tmp_path: Path) -> None:
    import html

    from nnsight_pure.graph import SourceLoc
    from nnsight_pure.ops import ModuleGet

    code = tmp_path / "odd.py"
    code.write_text('x = "a\\\\N<b>" & 1\n')
    graph, _ = Graph().add(ModuleGet("layer1", "output"), source=SourceLoc(str(code), 1, "f"))
    graph, _ = graph.add(ModuleGet("layer2", "output"), source=SourceLoc('we"ird\n\\name.py', 3, "f"))
    svg = render(graph, title="odd", path=tmp_path, format="svg").read_text()
    titles = [html.unescape(t).replace("\xa0", " ") for t in re.findall(r'xlink:title="([^"]*)"', svg)]
    assert titles == ['odd.py:1  x = "a\\\\N<b>" & 1', 'we"ird\n\\name.py:3']


def test_the_legend_page_lists_every_kind_with_its_real_style() -> None:
    """docs/vis.md's legend table has a row per op kind whose shape, colour and
    nnsight name are the ones `to_dot` draws (STYLES), and a picture that exists."""
    page = (ROOT / "docs" / "vis.md").read_text()
    rows = {}
    for line in page.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`") and cells[1].startswith("!["):
            rows[cells[0].strip("`")] = cells
    for kind, style in STYLES.items():
        name = kind.__name__
        assert name in rows, f"docs/vis.md's legend has no row for {name}"
        _, picture, shape, colour, legend, _ = rows[name]
        assert (shape, colour, legend) == (style.shape, style.color, style.legend), name
        assert (ROOT / "docs" / "legend" / f"{name}.svg").exists(), picture
