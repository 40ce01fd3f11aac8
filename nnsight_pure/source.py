"""Finding the user's own line of code, and attaching it to errors.

Nodes remember where the user made them (`SourceLoc`), so an error at run
time can name that line instead of a frame deep inside torch or this library.
Only reads frames and source files; changes nothing.
"""

from __future__ import annotations

import linecache
import os
import sys
from types import CodeType, FrameType

import torch

from .graph import SourceLoc

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
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        internal = _INTERNAL_CODE.get(code)
        if internal is None:
            if len(_INTERNAL_CODE) > 50_000:
                _INTERNAL_CODE.clear()
            internal = _INTERNAL_CODE[code] = _is_internal(code.co_filename)
        if not internal:
            key = (code, frame.f_lineno)
            location = _LOCATIONS.get(key)
            if location is None:
                if len(_LOCATIONS) > 50_000:
                    _LOCATIONS.clear()
                location = _LOCATIONS[key] = SourceLoc(code.co_filename, frame.f_lineno, code.co_name)
            return location
        frame = frame.f_back
    return None  # pragma: no cover - there is always a caller


# Every trace walks the stack for each node it records: remember which code
# is ours and the locations already made (a SourceLoc is an immutable value).
_INTERNAL_CODE: dict[CodeType, bool] = {}
_LOCATIONS: dict[tuple[CodeType, int], SourceLoc] = {}


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


def add_note(exc: BaseException, note: str) -> None:
    """Attach a note to an exception without changing its type (PEP 678).

    Python 3.10 has no ``add_note``; there the note is still recorded in
    ``__notes__`` for tools that read it.
    """
    adder = getattr(exc, "add_note", None)
    if adder is not None:
        adder(note)
    else:  # pragma: no cover - Python 3.10
        notes = list(getattr(exc, "__notes__", []))
        notes.append(note)
        setattr(exc, "__notes__", notes)
