"""Invoker: ``with tracer.invoke(inputs):``, one slice of a trace's batch.

Entering prepares the inputs (the model's `_prepare_input`) and makes every
module access inside the block see only these inputs' rows. An invoke with
no inputs sees the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tracer import Tracer


class Invoker:
    """One invoke of a trace; ``batch_size`` and ``prepared`` are set on enter."""

    def __init__(self, tracer: Tracer, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.tracer = tracer
        self.inputs = inputs
        self.kwargs = kwargs
        self.index: int | None = None
        self.batch_size = 0
        self.prepared: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def __enter__(self) -> Invoker:
        self.index = self.tracer._enter_invoke(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.tracer._exit_invoke(self, exc_type is None)
