"""Invoker: ``with tracer.invoke(inputs):``, one slice of a trace's batch.

Entering prepares the inputs (the model's `_prepare_input`) and makes every
module access inside the block see only these inputs' rows. An invoke with
no inputs sees the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..proxy import Proxy, settled
from ..trees import NOT_FOUND, find_leaf
from . import recorded_calls
from .recorded_calls import _SUSPENDED

if TYPE_CHECKING:
    from .tracer import Tracer


def _holds_proxies(inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether inputs hold traced values (proxies) anywhere."""
    if not kwargs and all(type(item) is torch.Tensor for item in inputs):
        return False  # the usual inputs, at a glance (this is on every trace's path)
    return find_leaf((inputs, kwargs), _is_proxy) is not NOT_FOUND


def _is_proxy(value: Any) -> bool:
    return isinstance(value, Proxy)


class Invoker:
    """One invoke of a trace.

    ``given`` is ``(inputs, kwargs)`` as written; ``inputs`` is nnsight 0.4's
    view of them once prepared by the model (`NNsight`: ``(args, kwargs)``;
    `LanguageModel`: ``((encoding,), {})``, so ``invoker.inputs[0][0]["input_ids"]``
    are the token ids), and ``batch_size`` their rows.
    """

    def __init__(self, tracer: Tracer, inputs: tuple[Any, ...], kwargs: dict[str, Any], scan: bool = False) -> None:
        self.tracer = tracer
        self._concrete = not _holds_proxies(inputs, kwargs)
        if not self._concrete:
            if tracer._parent is None:
                recorded_calls.settle_inputs((inputs, kwargs))  # torch.rand(...) written as the input
            # Saved values of traces that already ran are plain values here.
            inputs, kwargs = settled(inputs), settled(kwargs)
            self._concrete = not _holds_proxies(inputs, kwargs)
        self.given: tuple[tuple[Any, ...], dict[str, Any]] = (inputs, kwargs)
        self.scan = scan
        self.index: int | None = None
        self.batch_size = 0
        self.prepared: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    @property
    def inputs(self) -> Any:
        """The prepared inputs, in nnsight 0.4's shape (prepared now if they were
        not yet: inputs of a trace in a session are prepared when it runs)."""
        prepared = self._prepare()
        if prepared is None:
            return self.given  # values of the session, known only when it runs
        return self.tracer._model._invoker_inputs(prepared)

    def _prepare(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Prepare the given inputs (once); ``None`` when they hold values of the session."""
        if self.prepared is None:
            if not self._concrete:
                return None
            inputs, kwargs = self.given
            token = _SUSPENDED.set(True)  # (the model's own work records nothing)
            try:
                (args, prepared_kwargs), size = self.tracer._model._prepare_input(*inputs, **kwargs)
            finally:
                _SUSPENDED.reset(token)
            self.batch_size = size
            self.prepared = (tuple(args), dict(prepared_kwargs))
        return self.prepared

    def __enter__(self) -> Invoker:
        self.index = self.tracer._enter_invoke(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.tracer._exit_invoke(self, exc_type is None)
