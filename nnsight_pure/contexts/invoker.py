"""Invoker: ``with tracer.invoke(inputs):``, one slice of a trace's batch.

Entering prepares the inputs (the model's `_prepare_input`) and makes every
module access inside the block see only these inputs' rows. An invoke with
no inputs sees the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import recorded_calls

if TYPE_CHECKING:
    from .tracer import Tracer


class Invoker:
    """One invoke of a trace.

    ``given`` is ``(inputs, kwargs)`` as written; ``inputs`` is nnsight 0.4's
    view of them once prepared by the model (`NNsight`: ``(args, kwargs)``;
    `LanguageModel`: ``((encoding,), {})``, so ``invoker.inputs[0][0]["input_ids"]``
    are the token ids), and ``batch_size`` their rows.
    """

    def __init__(self, tracer: Tracer, inputs: tuple[Any, ...], kwargs: dict[str, Any], scan: bool = False) -> None:
        from ..proxy import settled

        if tracer._parent is None:
            recorded_calls.settle_inputs((inputs, kwargs))  # torch.rand(...) written as the input
        self.tracer = tracer
        # Saved values of traces that already ran are plain values here.
        self.given: tuple[tuple[Any, ...], dict[str, Any]] = (settled(inputs), settled(kwargs))
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
            from .tracer import _holds_proxies

            inputs, kwargs = self.given
            if _holds_proxies(inputs, kwargs):
                return None
            with recorded_calls.suspended():
                (args, prepared_kwargs), size = self.tracer._model._prepare_input(*inputs, **kwargs)
            self.batch_size = size
            self.prepared = (tuple(args), dict(prepared_kwargs))
        return self.prepared

    def __enter__(self) -> Invoker:
        self.index = self.tracer._enter_invoke(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.tracer._exit_invoke(self, exc_type is None)
