"""``envoy.source``: the operations inside a module's forward, as envoys.

``model.transformer.h[0].attn.source.split_0.output`` reads the value of
the first ``split`` the attention's forward performs; ``.input``,
``.inputs`` and ``.skip(value)`` work as on a module. Each operation is an
*operation site* (events.py); the run watches it with a torch function mode
while the module's forward runs (operations.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .events import operation_site
from .proxy import Proxy

if TYPE_CHECKING:
    from .envoy import Envoy


class SourceEnvoy:
    """The operations of one module's forward (``envoy.source``)."""

    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy

    def __getattr__(self, name: str) -> OperationEnvoy:
        if name.startswith("_"):
            raise AttributeError(name)
        return OperationEnvoy(self._envoy, name)


class OperationEnvoy:
    """One operation inside a module's forward: ``.output``, ``.input``, ``.inputs``, ``.skip``."""

    def __init__(self, envoy: Envoy, name: str) -> None:
        self._envoy = envoy
        self._name = name
        self._site = operation_site(envoy._path, name)

    @property
    def output(self) -> Proxy:
        return self._envoy._require_tracer("source").\
            _access(self._site, "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._envoy._require_tracer("source")._write_access(self._site, "output", value)

    @property
    def inputs(self) -> Proxy:
        return self._envoy._require_tracer("source")._access(self._site, "inputs")

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._envoy._require_tracer("source")._write_access(self._site, "inputs", value)

    @property
    def input(self) -> Proxy:
        return self._envoy._require_tracer("source")._access(self._site, "input")

    @input.setter
    def input(self, value: Any) -> None:
        self._envoy._require_tracer("source")._write_access(self._site, "input", value)

    def skip(self, value: Any) -> None:
        """Do not call this operation; ``value`` is its result."""
        self._envoy._require_tracer("source")._write_skip(self._site, value)
