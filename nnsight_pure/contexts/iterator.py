"""IteratorContext: ``with session.iter(collection) as item:``, a loop as a sub-graph.

The block is recorded once, as the body of an `Iterate` node; at run time the
body runs once per item of the collection (a Python iterable, a DataLoader,
or a value made in the session). Both ``as item`` and ``as (item, iterator)``
work; ``iterator`` is this context.
"""

from __future__ import annotations

import dis
import sys
from typing import Any, Iterator

from ..arguments import Ref
from ..graph import SourceLoc
from ..ops import Iterate, IterItem
from ..proxy import Proxy
from ..source import short
from .base import BodyContext, GraphContext


class ItemProxy(Proxy):
    """The loop's current item. Unpacking it gives ``(item, iterator)``, so that
    ``with session.iter(xs) as (item, iterator):`` works too; a native ``for``
    over it is a nested loop (`native_flow`)."""

    __slots__ = ("_iterator",)

    @classmethod
    def of(cls, iterator: IteratorContext, ref: Ref | None) -> ItemProxy:
        """The item proxy of node ``ref`` of ``iterator``'s body, knowing its loop."""
        item = cls(iterator, ref)
        object.__setattr__(item, "_iterator", iterator)  # (the slot's own setter: Proxy records attribute writes)
        return item

    def __iter__(self) -> Iterator[Any]:
        frame = sys._getframe(1)
        if dis.opname[frame.f_code.co_code[frame.f_lasti]] == "UNPACK_SEQUENCE":
            return iter((self, object.__getattribute__(self, "_iterator")))
        return self._iterate(frame)  # type: ignore[no-any-return]  # a native `for` over the item


class IteratorContext(BodyContext):
    """A loop over ``collection`` whose body is this block."""

    _node_kind = Iterate

    def __init__(self, parent: GraphContext, collection: Any, where: SourceLoc | None) -> None:
        super().__init__(parent, collection, where)
        if not isinstance(collection, Proxy):
            try:
                iter(collection)
            except TypeError:
                raise TypeError(
                    f"iter(...) at {short(where)} needs an iterable; got a {type(collection).__name__}"
                ) from None

    def __enter__(self) -> ItemProxy:
        self._push()
        proxy = self.record(IterItem(), source=self._where)
        return ItemProxy.of(self, proxy._ref)


    def __repr__(self) -> str:
        return f"<loop opened at {short(self._where)}>"
