# Stubs for graphviz 0.21, which ships no type information. Only what
# nnsight_pure uses is declared, each with its full runtime signature;
# `python -m mypy.stubtest graphviz` checks them against the package.
import os
from typing import overload

from graphviz.backend.execute import ExecutableNotFound as ExecutableNotFound

_Path = os.PathLike[str] | str

FORMATS: set[str]

def version() -> tuple[int, ...]: ...

class Source:
    def __init__(
        self,
        source: str,
        filename: _Path | None = None,
        directory: _Path | None = None,
        format: str | None = None,
        engine: str | None = None,
        encoding: str | None = "utf-8",
        *,
        renderer: str | None = None,
        formatter: str | None = None,
        loaded_from_path: os.PathLike[str] | None = None,
    ) -> None: ...
    @property
    def source(self) -> str: ...
    @overload
    def pipe(
        self,
        format: str | None = None,
        renderer: str | None = None,
        formatter: str | None = None,
        neato_no_op: bool | int | None = None,
        quiet: bool = False,
        *,
        engine: str | None = None,
        encoding: None = None,
    ) -> bytes: ...
    @overload
    def pipe(
        self,
        format: str | None = None,
        renderer: str | None = None,
        formatter: str | None = None,
        neato_no_op: bool | int | None = None,
        quiet: bool = False,
        *,
        engine: str | None = None,
        encoding: str,
    ) -> str: ...
