"""Every table this library keeps across traces, bounded, and `clear_caches`.

All of it is memory kept for speed: clearing any of it changes no result,
only how long the next trace takes. Nothing else process-wide is kept
between traces (open blocks live in a `ContextVar`, see open_blocks.py).

=================  =========  ==================================================
table              at most    what it remembers
=================  =========  ==================================================
``NODES``          50,000     recorded nodes shared by equal traces (graph.py)
``INTERNAL_CODE``  50,000     which code objects are this library's or torch's
                              (source.py)
``LOCATIONS``      50,000     the `SourceLoc` of a line of user code (source.py)
``PLANS``          256        compiled plans by graph structure, least recently
                              used dropped first (the plan cache)
``FIELDS``         64         each op kind's field names (plan_cache.py, the plan)
``GROUPS``         1,024      batch groups by invoke sizes (batching.py)
``LISTINGS``       128        the operations of a module's forward by model,
                              module and input shapes, least recently used
                              dropped first (operation_listing.py)
``WHITELIST``      (fixed)    every whitelisted callable by identity (effects.py)
per-graph memos    (weak)     work done once per graph object, gone with the
                              graph (memo.PerGraph)
=================  =========  ==================================================

``SHAREABLE_BUILTINS`` (4,096) remembers the builtins found to hold
nothing large (shareable.py; module-level objects, alive anyway).

A table of the first kind empties itself when full; ``PLANS`` drops its
least recently used entry. This module imports nothing
of the library: every layer may keep its table here.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Generic, Hashable, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A dict of at most ``limit`` entries, safe across threads.

    ``lru=False``: emptied at once when full (the cheapest bound, for tables
    read on every node recorded; read those through ``table`` directly).
    ``lru=True``: the least recently used entry goes first; `get` marks an
    entry as used.
    """

    def __init__(self, name: str, limit: int, *, lru: bool = False) -> None:
        self.name = name
        self.limit = limit
        self.lru = lru
        self.table: dict[K, V] = OrderedDict() if lru else {}
        self._lock = threading.Lock()
        _ALL.append(self)

    def get(self, key: K) -> V | None:
        """The value kept for ``key``, or ``None``."""
        if not self.lru:
            return self.table.get(key)
        with self._lock:
            found = self.table.get(key)
            if found is not None:
                self.table.move_to_end(key)  # type: ignore[attr-defined]  # an OrderedDict
            return found

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` for ``key``, making room first if the table is full."""
        with self._lock:
            table = self.table
            if key not in table and len(table) >= self.limit:
                if self.lru:
                    table.popitem(last=False)  # type: ignore[call-arg]  # an OrderedDict
                else:
                    table.clear()
            table[key] = value

    def clear(self) -> None:
        with self._lock:
            self.table.clear()

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, key: object) -> bool:
        return key in self.table

    def __repr__(self) -> str:
        return f"<cache {self.name}: {len(self.table)} of {self.limit}>"


class _Clearable(Protocol):
    def clear(self) -> None: ...

    def __len__(self) -> int: ...


_ALL: list[BoundedCache[Any, Any]] = []  # every table, for clear_caches
_PER_GRAPH: weakref.WeakSet[_Clearable] = weakref.WeakSet()

NODES: BoundedCache[tuple[object, ...], Any] = BoundedCache("nodes", 50_000)  # of graph.Node
# (keyed by id(code); each entry holds its code object: see source.py)
INTERNAL_CODE: BoundedCache[int, tuple[object, bool]] = BoundedCache("internal code", 50_000)
LOCATIONS: BoundedCache[tuple[int, int], tuple[object, Any]] = BoundedCache("locations", 50_000)  # source.SourceLoc
PLANS: BoundedCache[object, Any] = BoundedCache("plans", 256, lru=True)  # of plan.Plan
FIELDS: BoundedCache[type, tuple[str, ...]] = BoundedCache("op fields", 64)
GROUPS: BoundedCache[tuple[int | None, ...], Any] = BoundedCache("batch groups", 1024)  # of BatchGroups
WHITELIST: BoundedCache[int, tuple[str, object]] = BoundedCache("whitelist", 1 << 20)
LISTINGS: BoundedCache[tuple[object, ...], Any] = BoundedCache("source listings", 128, lru=True)  # envoy.source
SHAREABLE_BUILTINS: BoundedCache[object, bool] = BoundedCache("shareable builtins", 4096)  # shareable.py


def keep_per_graph(table: _Clearable) -> None:
    """Have `clear_caches` empty ``table`` too (held weakly: a per-graph memo)."""
    _PER_GRAPH.add(table)


def caches() -> dict[str, int]:
    """How many entries each table holds now, by name (per-graph memos summed)."""
    sizes = {cache.name: len(cache) for cache in _ALL}
    sizes["per-graph memos"] = sum(len(table) for table in list(_PER_GRAPH))
    return sizes


def clear_caches() -> None:
    """Empty every table above. Results do not change; the next trace
    records, locates and plans anew."""
    for cache in _ALL:
        cache.clear()
    for table in list(_PER_GRAPH):
        table.clear()
