"""Operations inside a module's forward (``envoy.source``), seen without touching its code.

While a watched module's forward runs (forwards.py wraps it for the run),
a `torch.overrides.TorchFunctionMode` sees every torch function and tensor
method its code calls. Each gets a stable name, the function's name and its
occurrence in this call of the forward (``split_0``, ``view_2``), and, when
the plan reads or writes it, it becomes an *operation site*
(`events.operation_site`) with the events of a module call: ``pre`` with
``(args, kwargs)`` (replaceable), ``post`` with its value (replaceable), and a
`Skip` taken at ``pre`` (the function is then not called).

What the mode cannot see: work done inside C++ kernels or fused paths
(one ``scaled_dot_product_attention`` is one operation), attribute reads
such as ``x.shape`` (left out by design), and plain Python arithmetic on
non-tensors. The programs' own torch calls, made while an event is fed,
are not the forward's and are not counted.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from torch.overrides import TorchFunctionMode

from .events import operation_site

if TYPE_CHECKING:
    from .interpreter.world import World


def operation_name(func: Callable[..., Any]) -> str | None:
    """The base name of a torch function or method (``"split"``, ``"matmul"``
    for ``__matmul__``), or ``None`` for what is not an operation (an
    attribute read such as ``Tensor.shape``)."""
    name = getattr(func, "__name__", None)
    if not isinstance(name, str) or name == "__get__":
        return None
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        return name[2:-2]
    return name


class OperationMode(TorchFunctionMode):
    """The mode of one call of a watched forward: names each operation,
    and feeds the ``watched`` ones to the run (``world``) as events."""

    def __init__(self, module: str, watched: frozenset[str], world: World) -> None:
        super().__init__()
        self.module = module
        self.watched = watched
        self.world = world
        self.counts: dict[str, int] = {}

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        world = self.world
        if world.feeding:
            return func(*args, **kwargs)  # a program's own operation, not the forward's
        base = operation_name(func)
        if base is None:
            return func(*args, **kwargs)
        occurrence = self.counts.get(base, 0)
        self.counts[base] = occurrence + 1
        name = f"{base}_{occurrence}"
        if name not in self.watched:
            return func(*args, **kwargs)
        site = operation_site(self.module, name)
        replaced = world.on_event(site, "pre", (args, kwargs))
        if replaced is not None:
            args, kwargs = replaced
        skips = world.take_skip(site) if site in world.plan.skipped else None
        if skips is None:
            value = func(*args, **kwargs)
        else:
            value = world.skipped_value(site, skips, lambda: func(*args, **kwargs))
        replaced = world.on_event(site, "post", value)
        return value if replaced is None else replaced


@contextmanager
def watching_operations(module: str, watched: frozenset[str], world: World) -> Iterator[None]:
    """Watch the operations of one call of ``module``'s forward (the block)."""
    with OperationMode(module, watched, world):
        yield
