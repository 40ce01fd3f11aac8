"""Walking nested values (inputs, module outputs) fast.

torch's pytree handles every registered container (namedtuples, Hugging
Face `ModelOutput`s, ...) but costs microseconds even for ``((x,), {})``;
the walks here take the plain tuple/list/dict shapes directly and hand
anything else that pytree knows to pytree, so the result is the same.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree

_PLAIN = (tuple, list, dict)


def leaves(value: Any) -> Iterator[Any]:
    """Every leaf of ``value``, depth first (as ``pytree.tree_leaves``)."""
    kind = type(value)
    if kind is tuple or kind is list:
        for item in value:
            yield from leaves(item)
    elif kind is dict:
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, torch.Tensor) or not _is_container(value):
        yield value
    else:
        yield from pytree.tree_leaves(value)


def find_leaf(value: Any, test: Callable[[Any], bool]) -> Any:
    """The first leaf of ``value`` that passes ``test`` (depth first), or
    `NOT_FOUND`: `leaves` without a generator per level, for hot paths."""
    kind = type(value)
    if kind is tuple or kind is list:
        for item in value:
            found = find_leaf(item, test)
            if found is not NOT_FOUND:
                return found
        return NOT_FOUND
    if kind is dict:
        for item in value.values():
            found = find_leaf(item, test)
            if found is not NOT_FOUND:
                return found
        return NOT_FOUND
    if isinstance(value, torch.Tensor) or not _is_container(value):
        return value if test(value) else NOT_FOUND
    for leaf in pytree.tree_leaves(value):
        if test(leaf):
            return leaf
    return NOT_FOUND


NOT_FOUND: Any = object()
"""What `find_leaf` returns when no leaf passes."""


def map_leaves(fn: Callable[[Any], Any], value: Any) -> Any:
    """``value`` with every leaf replaced by ``fn(leaf)`` (as ``pytree.tree_map``)."""
    kind = type(value)
    if kind is tuple:
        return tuple(map_leaves(fn, item) for item in value)
    if kind is list:
        return [map_leaves(fn, item) for item in value]
    if kind is dict:
        return {key: map_leaves(fn, item) for key, item in value.items()}
    if isinstance(value, torch.Tensor) or not _is_container(value):
        return fn(value)
    return pytree.tree_map(fn, value)


def _is_container(value: Any) -> bool:
    """A container pytree would walk into (a namedtuple, a registered class)."""
    return isinstance(value, _PLAIN) or type(value) in pytree.SUPPORTED_NODES
