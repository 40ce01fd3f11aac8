"""Several invokes in one batch: concatenating inputs, and each invoke's rows.

Invokes are concatenated along dim 0 into one model run. An access inside
invoke *i* sees only that invoke's rows (`narrow` views, so in-place edits
touch only those rows); a write inside invoke *i* replaces only those rows
(`merge_rows`). A tensor counts as batched when its first dimension equals
the total batch size; everything else is passed whole.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import torch
import torch.utils._pytree as pytree

from .caches import GROUPS
from .trees import NOT_FOUND, find_leaf, map_leaves


@attrs.frozen
class BatchGroups:
    """Where each invoke's rows sit in the batch: ``(start, size)`` per invoke,
    or ``None`` for an invoke without inputs (it sees the whole batch)."""

    groups: tuple[tuple[int, int] | None, ...] = ()
    total: int = 0

    def rows(self, invoke: int | None) -> tuple[int, int] | None:
        """``invoke``'s ``(start, size)``, or ``None`` when it sees the whole batch."""
        if invoke is None or invoke >= len(self.groups):
            return None
        rows = self.groups[invoke]
        if rows is None or rows == (0, self.total):
            return None
        return rows

    @classmethod
    def from_sizes(cls, sizes: Sequence[int | None]) -> BatchGroups:
        """Groups for invokes of these batch sizes (``None``: an empty invoke)."""
        key = tuple(sizes)
        found = _KNOWN_GROUPS.get(key)  # (read directly: one dict lookup per run)
        if found is None:
            found = _groups(key)
            GROUPS.put(key, found)
        return found  # (a BatchGroups, kept in caches.GROUPS)


_KNOWN_GROUPS = GROUPS.table  # (the table clears in place)


def _groups(sizes: tuple[int | None, ...]) -> BatchGroups:
    """`BatchGroups.from_sizes`, worked out (every run makes one; few differ,
    so they are remembered in `caches.GROUPS`)."""
    groups: list[tuple[int, int] | None] = []
    start = 0
    for size in sizes:
        if size is None:
            groups.append(None)
        else:
            groups.append((start, size))
            start += size
    return BatchGroups(tuple(groups), start)


def _is_batched(value: object, total: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total


def narrow_rows(
    value: Any,
    groups: BatchGroups,
    invoke: int | None,
    remember: Callable[[torch.Tensor, torch.Tensor, int, int], None] | None = None,
) -> Any:
    """The rows of ``invoke`` in every batched tensor of ``value`` (as views);
    ``remember(view, base, start, size)`` is told about each view made."""
    rows = groups.rows(invoke)
    if rows is None:
        return value
    start, size = rows
    total = groups.total

    def narrow(leaf: Any) -> Any:
        if not _is_batched(leaf, total):
            return leaf
        view = leaf.narrow(0, start, size)
        if remember is not None:
            remember(view, leaf, start, size)
        return view

    if isinstance(value, torch.Tensor):
        return narrow(value)
    return map_leaves(narrow, value)


def merge_rows(full: Any, rows: Any, groups: BatchGroups, invoke: int | None, what: str) -> Any:
    """``full`` with ``invoke``'s rows replaced by ``rows``.

    Batched tensors are rebuilt with `torch.cat` (safe under autograd);
    other leaves are taken from ``rows``. ``what`` names the value in errors.
    """
    selected = groups.rows(invoke)
    if selected is None:
        return rows
    start, size = selected
    total = groups.total

    def merge(old: Any, new: Any) -> Any:
        if not _is_batched(old, total):
            return new
        if not isinstance(new, torch.Tensor):
            raise TypeError(
                f"{what}: invoke {invoke} sets a batched tensor of shape "
                f"{tuple(old.shape)} to a {type(new).__name__}"
            )
        expected = (size,) + tuple(old.shape[1:])
        if new.ndim != old.ndim or tuple(new.shape[1:]) != expected[1:] or new.shape[0] not in (1, size):
            raise ValueError(
                f"{what}: invoke {invoke} owns {size} row(s), so the new value must have "
                f"shape {expected}; got {tuple(new.shape)}"
            )
        new = new.to(dtype=old.dtype, device=old.device).expand(expected)
        return torch.cat([old.narrow(0, 0, start), new, old.narrow(0, start + size, total - start - size)])

    if isinstance(full, torch.Tensor):
        return merge(full, rows)
    try:
        return pytree.tree_map(merge, full, rows)
    except ValueError as error:
        if what in str(error):
            raise
        raise TypeError(
            f"{what}: the new value's structure does not match the old one "
            f"({type(full).__name__} vs {type(rows).__name__}): {error}"
        ) from error


def default_batch(
    batched: tuple[tuple[Any, ...], dict[str, Any]] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fold one invoke's prepared inputs into the batch so far.

    Tensors (positional or keyword) are concatenated along dim 0; any other
    value must be the same in every invoke, since one model run takes one.
    """
    if batched is None:
        return args, kwargs
    old_args, old_kwargs = batched
    if len(old_args) != len(args) or set(old_kwargs) != set(kwargs):
        raise ValueError(
            "every invoke must pass the same positional and keyword arguments to be "
            f"batched: got {len(old_args)} positional and {sorted(old_kwargs)} before, "
            f"{len(args)} positional and {sorted(kwargs)} now"
        )

    def join(name: str, old: Any, new: Any) -> Any:
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
            if old.ndim == 0 or new.ndim == 0 or old.shape[1:] != new.shape[1:]:
                raise ValueError(
                    f"cannot batch {name} of shapes {tuple(old.shape)} and {tuple(new.shape)} "
                    "along dim 0"
                )
            return torch.cat([old, new.to(device=old.device)])
        if old is new or old == new:
            return old
        raise ValueError(f"cannot batch {name}: it differs between invokes and is not a tensor")

    joined_args = tuple(join(f"argument {i}", a, b) for i, (a, b) in enumerate(zip(old_args, args)))
    joined_kwargs = {name: join(f"keyword {name!r}", old_kwargs[name], kwargs[name]) for name in kwargs}
    return joined_args, joined_kwargs


def _has_rows(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0


def batch_size_of(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """The number of rows an invoke contributes: dim 0 of its first tensor."""
    if args and type(args[0]) is torch.Tensor and args[0].ndim > 0:
        return int(args[0].shape[0])  # the usual case, without a walk
    found = find_leaf((args, kwargs), _has_rows)
    if found is not NOT_FOUND:
        return int(found.shape[0])
    if args and hasattr(args[0], "__len__"):
        return len(args[0])
    return 1
