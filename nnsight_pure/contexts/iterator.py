"""IteratorContext: ``with session.iter(collection) as item:``, a loop as a sub-graph.

The block is recorded once, as the body of an `Iterate` node; at run time the
body runs once per item of the collection (a Python iterable, a DataLoader,
or a value made in the session). Both ``as item`` and ``as (item, iterator)``
work; ``iterator`` is this context.
"""

from __future__ import annotations

from typing import Any, Iterator

from ..graph import SourceLoc
from ..ops import Iterate, IterItem
from ..proxy import Proxy
from ..source import short
from .base import GraphContext


class ItemProxy(Proxy):
    """The loop's current item. Unpacking it gives ``(item, iterator)``, so that
    ``with session.iter(xs) as (item, iterator):`` works too."""

    __slots__ = ("_iterator",)

    def __iter__(self) -> Iterator[Any]:
        return iter((self, object.__getattribute__(self, "_iterator")))


class IteratorContext(GraphContext):
    """A loop over ``collection`` whose body is this block."""

    def __init__(self, parent: GraphContext, collection: Any, where: SourceLoc | None) -> None:
        super().__init__(parent._handle, where, parent)
        if not isinstance(collection, Proxy):
            try:
                iter(collection)
            except TypeError:
                raise TypeError(
                    f"iter(...) at {short(where)} needs an iterable; got a {type(collection).__name__}"
                ) from None
        self._collection = collection

    def __enter__(self) -> ItemProxy:
        self._push()
        proxy = self.record(IterItem(), source=self._where)
        item = ItemProxy(self, proxy._ref)
        object.__setattr__(item, "_iterator", self)
        return item

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._pop()
        if exc_type is None:
            assert self._parent is not None
            self._parent._close_child(self, Iterate(self._graph), (self._collection,))

    def __repr__(self) -> str:
        return f"<loop opened at {short(self._where)}>"
