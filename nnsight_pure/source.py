"""Finding the user's own line of code: `SourceLoc`, and the stack walk that makes one.

Nodes remember where the user made them (`SourceLoc`), so an error at run
time can name that line instead of a frame deep inside torch or this library.
Only reads frames and source files; changes nothing (what it remembers lives
in `caches`). A leaf of the package: it imports nothing of the library but
`caches` and `errors`.
"""

from __future__ import annotations

import linecache
import os
import sys
from types import FrameType

import attrs
import torch

from .caches import INTERNAL_CODE, LOCATIONS
from .errors import add_note as add_note  # (re-exported for older imports: its home is errors.py)


@attrs.frozen(cache_hash=True)
class SourceLoc:
    """Where in the user's code a node was made (for error messages)."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f'File "{self.filename}", line {self.lineno}, in {self.function}'


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


_INTERNAL = (_PACKAGE_DIR, _TORCH_DIR, "<frozen ")


def _is_internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL)


def user_location() -> SourceLoc | None:
    """The innermost frame of the call stack that is the user's code.

    Frames of this package and of torch (whose Python wrappers dispatch
    ``torch.sum(proxy)`` back to us) are skipped.
    """
    return location_from(sys._getframe(1))


def location_from(frame: FrameType | None) -> SourceLoc | None:
    """`user_location`, walking out from ``frame`` (filling the tables)."""
    while frame is not None:
        code = frame.f_code
        entry = INTERNAL_CODE.table.get(id(code))
        if entry is None or entry[0] is not code:
            entry = (code, _is_internal(code.co_filename))
            INTERNAL_CODE.put(id(code), entry)
        if not entry[1]:
            key = (id(code), frame.f_lineno)
            found = LOCATIONS.table.get(key)
            if found is None or found[0] is not code:
                found = (code, SourceLoc(code.co_filename, frame.f_lineno, code.co_name))
                LOCATIONS.put(key, found)
            return found[1]  # (a SourceLoc, kept in caches.LOCATIONS)
        frame = frame.f_back
    return None  # pragma: no cover - there is always a caller


# Every trace walks the stack for each node it records: `caches.INTERNAL_CODE`
# remembers which code is ours, `caches.LOCATIONS` the locations already made
# (a SourceLoc is an immutable value). Both are keyed by the code object's
# ``id``, and each entry holds the code itself (so the id cannot be reused
# while the entry lives; a lookup checks it is the same object): hashing a
# code object hashes its constants, names and bytecode every time (over a
# microsecond for a function of a few lines), an ``id`` costs nothing. The
# recording fast path (contexts/base.py) reads both tables the same way.


def describe(loc: SourceLoc | None) -> str:
    """A traceback-style description of a location, with its line of code."""
    if loc is None:
        return "(unknown location)"
    line = linecache.getline(loc.filename, loc.lineno).strip()
    return f"{loc}\n    {line}" if line else str(loc)


def short(loc: SourceLoc | None) -> str:
    """``file.py:12`` for a location."""
    if loc is None:
        return "<unknown>"
    return f"{os.path.basename(loc.filename)}:{loc.lineno}"
