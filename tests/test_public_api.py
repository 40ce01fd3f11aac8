"""A snapshot of the public API: every change to it shows up as a reviewable diff.

Regenerate with ``pytest tests/test_public_api.py --update-golden``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import nnsight_pure

GOLDEN = Path(__file__).parent / "golden" / "public_api.txt"


def _describe(name: str, obj: object) -> list[str]:
    if inspect.isclass(obj):
        lines = [f"class {name}"]
        members: dict[str, object] = {}
        for cls in reversed(obj.__mro__):
            if cls.__module__.startswith("nnsight_pure"):
                members.update(vars(cls))
        for member, value in sorted(members.items()):
            if member.startswith("_") and member not in ("__init__", "__call__"):
                continue
            if isinstance(value, property):
                lines.append(f"    {member}: property{' (settable)' if value.fset else ''}")
            elif callable(value):
                try:
                    lines.append(f"    def {member}{inspect.signature(value)}")
                except (TypeError, ValueError):
                    lines.append(f"    def {member}(...)")
        return lines
    if callable(obj):
        return [f"def {name}{inspect.signature(obj)}"]
    return [f"{name} = {obj!r}"]


def render_public_api() -> str:
    lines = []
    for name in sorted(nnsight_pure.__all__):
        lines.extend(_describe(name, getattr(nnsight_pure, name)))
    return "\n".join(lines) + "\n"


def test_public_api_matches_snapshot(update_golden: bool) -> None:
    text = render_public_api()
    if update_golden:
        GOLDEN.write_text(text)
    assert GOLDEN.read_text() == text


def test_all_is_complete() -> None:
    exported = {name for name in dir(nnsight_pure) if not name.startswith("_")}
    modules = {name for name in exported if inspect.ismodule(getattr(nnsight_pure, name))}
    assert exported - modules == set(nnsight_pure.__all__)
