"""Every ```python block of the docs and the README runs, in order, per page."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_there_are_examples() -> None:
    assert sum(len(BLOCK.findall(page.read_text())) for page in PAGES) >= 10


def _marks(page: Path) -> list[pytest.MarkDecorator]:
    return [pytest.mark.ray] if 'engine="ray"' in page.read_text() else []


@pytest.mark.parametrize(
    "page", [pytest.param(page, marks=_marks(page), id=page.name) for page in PAGES]
)
def test_page_examples_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(BLOCK.findall(page.read_text())):
        name = f"{page.name}[block {number}]"
        # Kept where the source of code is looked up (as IPython keeps its cells),
        # so that native `if`/`for` on traced values (contexts.native_flow) work.
        linecache.cache[name] = (len(block), None, block.splitlines(True), name)
        code = compile(block, name, "exec")
        exec(code, namespace)  # the docs are ours: running them is the point
