"""Memo tables keyed by graph object: work done once per graph while it lives.

Keyed by identity, not equality: what is remembered may hold a graph's own
objects (its tensor constants, by reference; its source lines, for errors),
which an equal graph built elsewhere does not share. An entry goes when its
graph does, so a table never keeps tensors alive. Safe across threads.
Every table is listed in `caches` (`caches.clear_caches` empties it).
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Generic, TypeVar

from .caches import keep_per_graph
from .graph import Graph

T = TypeVar("T")


class PerGraph(Generic[T]):
    """``make(graph)``, computed once per graph object."""

    def __init__(self, make: Callable[[Graph], T]) -> None:
        self._make = make
        self._table: dict[int, T] = {}
        self._lock = threading.Lock()
        keep_per_graph(self)

    def __call__(self, graph: Graph) -> T:
        key = id(graph)
        with self._lock:
            found = self._table.get(key)
        if found is not None:
            return found
        made = self._make(graph)
        with self._lock:
            if key not in self._table:
                self._table[key] = made
                weakref.finalize(graph, self._forget, key)
            return self._table[key]

    def _forget(self, key: int) -> None:
        with self._lock:
            self._table.pop(key, None)

    def clear(self) -> None:
        """Forget every graph (each is worked out anew when next asked)."""
        with self._lock:
            self._table.clear()

    def __len__(self) -> int:
        return len(self._table)
