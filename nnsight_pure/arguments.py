"""What a node's arguments can hold, and the conversions to and from user values.

A node argument is a `Ref` to an earlier node, a hashable constant, or a tree
of those built from tuples and the frozen wrappers below (for the Python
values that are mutable or unhashable: tensors, lists, dicts, slices). The
wrappers give arguments value semantics, so graphs compare and hash by
structure: two tensors are equal constants when their dtype, shape, device
and values are equal.

`freeze` turns a user value into an argument (proxies become `Ref`s through
a callback the shell supplies); `thaw` turns an argument back into a Python
value at run time. This module is pure.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import attrs
import torch


@attrs.frozen(repr=False)
class Ref:
    """A handle to a node of a graph: its position in that graph."""

    index: int

    def __repr__(self) -> str:
        return f"%{self.index}"


def structural_key(value: object) -> object:
    """The equality key of an argument: the value, with scalar types made explicit.

    ``1``, ``1.0`` and ``True`` compare equal in Python but do different things
    to a tensor (integer vs float arithmetic, masks), so two graphs that differ
    only there must not be equal. Floats compare by their exact bits, so a NaN
    constant equals itself (and a graph read back from JSON equals the one
    written).
    """
    kind = type(value)
    if kind is float:
        return (kind, value.hex())  # type: ignore[attr-defined]  # exactly a float: NaN equals NaN, -0.0 is not 0.0
    if kind is bool or kind is int or kind is complex:
        return (kind, value)
    if isinstance(value, tuple):
        return (kind, tuple(structural_key(item) for item in value))
    return value


def _items_key(items: tuple[object, ...]) -> object:
    return tuple(structural_key(item) for item in items)


@attrs.frozen(eq=False, repr=False)
class TensorConst:
    """A tensor constant, compared by dtype, shape, device and values.

    It holds the tensor itself, not a copy, exactly as a Python closure would:
    a parameter used in an intervention still receives its gradient.
    """

    tensor: torch.Tensor

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorConst):
            return NotImplemented
        a, b = self.tensor, other.tensor
        if a is b:
            return True
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())  # NaN constants equal themselves
        return bool(torch.equal(a, b))

    def __hash__(self) -> int:
        return hash((TensorConst, self.tensor.dtype, tuple(self.tensor.shape)))

    def __repr__(self) -> str:
        shape = "x".join(str(size) for size in self.tensor.shape)
        dtype = str(self.tensor.dtype).removeprefix("torch.")
        return f"Tensor[{dtype}]({shape})" if shape else f"Tensor[{dtype}]()"


@attrs.frozen(repr=False)
class ListConst:
    """A list argument (a fresh list is built at every run)."""

    items: tuple[object, ...] = attrs.field(eq=_items_key)

    def __repr__(self) -> str:
        return "[" + ", ".join(repr(item) for item in self.items) + "]"


@attrs.frozen(repr=False)
class DictConst:
    """A dict argument, its items in insertion order (a fresh dict at every run)."""

    items: tuple[tuple[object, object], ...] = attrs.field(eq=_items_key)

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self.items) + "}"


@attrs.frozen(repr=False)
class SliceConst:
    """A slice argument (Python slices are unhashable before 3.12)."""

    start: object = attrs.field(eq=structural_key)
    stop: object = attrs.field(eq=structural_key)
    step: object = attrs.field(eq=structural_key)

    def __repr__(self) -> str:
        def part(value: object) -> str:
            return "" if value is None else repr(value)

        text = f"{part(self.start)}:{part(self.stop)}"
        return text if self.step is None else f"{text}:{part(self.step)}"


@attrs.frozen(repr=False)
class TupleOf:
    """A tuple of a tuple subclass (a namedtuple, say), rebuilt with its class."""

    cls: type
    items: tuple[object, ...] = attrs.field(eq=_items_key)

    def __repr__(self) -> str:
        return f"{self.cls.__name__}{self.items!r}"


@attrs.frozen(eq=False, repr=False)
class Opaque:
    """An unhashable constant that no wrapper describes, compared by identity."""

    value: object

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)

    def __repr__(self) -> str:
        return f"<{type(self.value).__name__}>"


ATOMS: frozenset[type] = frozenset(
    {int, float, bool, complex, str, bytes, type(None), type(Ellipsis), torch.dtype,
     torch.device, torch.Size, torch.layout, torch.memory_format}
)


def refs_in(value: object) -> Iterator[Ref]:
    """Every `Ref` inside an argument, depth first, left to right."""
    if type(value) is Ref:
        yield value
    elif type(value) is tuple:
        for item in value:
            yield from refs_in(item)
    elif type(value) is ListConst or type(value) is TupleOf:
        for item in value.items:
            yield from refs_in(item)
    elif type(value) is DictConst:
        for _, item in value.items:
            yield from refs_in(item)
    elif type(value) is SliceConst:
        yield from refs_in(value.start)
        yield from refs_in(value.stop)
        yield from refs_in(value.step)


def map_refs(arg: object, fn: Callable[[Ref], object]) -> object:
    """``arg`` with every `Ref` inside it replaced by ``fn(ref)`` (constants kept as they are)."""
    if type(arg) is Ref:
        return fn(arg)
    if type(arg) is tuple:
        return tuple(map_refs(item, fn) for item in arg)
    if type(arg) is ListConst:
        return ListConst(tuple(map_refs(item, fn) for item in arg.items))
    if type(arg) is TupleOf:
        return TupleOf(arg.cls, tuple(map_refs(item, fn) for item in arg.items))
    if type(arg) is DictConst:
        return DictConst(tuple((key, map_refs(item, fn)) for key, item in arg.items))
    if type(arg) is SliceConst:
        return SliceConst(map_refs(arg.start, fn), map_refs(arg.stop, fn), map_refs(arg.step, fn))
    return arg


def freeze(value: object, proxy_type: type, to_ref: Callable[[Any], object]) -> object:
    """Turn a user value into a node argument.

    Instances of ``proxy_type`` are handed to ``to_ref``, which returns the
    `Ref` (or constant) that stands for them; containers are walked; tensors,
    lists, dicts and slices get their frozen wrappers.
    """
    kind = type(value)
    if kind in ATOMS:
        return value
    if isinstance(value, proxy_type):
        return to_ref(value)
    if isinstance(value, torch.Tensor):
        return TensorConst(value)
    if type(value) is tuple:
        return tuple(freeze(item, proxy_type, to_ref) for item in value)
    if type(value) is list:
        return ListConst(tuple(freeze(item, proxy_type, to_ref) for item in value))
    if type(value) is dict:
        return DictConst(
            tuple((key, freeze(item, proxy_type, to_ref)) for key, item in value.items())
        )
    if type(value) is slice:
        return SliceConst(
            freeze(value.start, proxy_type, to_ref),
            freeze(value.stop, proxy_type, to_ref),
            freeze(value.step, proxy_type, to_ref),
        )
    if isinstance(value, tuple):
        return TupleOf(kind, tuple(freeze(item, proxy_type, to_ref) for item in value))
    try:
        hash(value)
    except TypeError:
        return Opaque(value)
    return value


def is_plain_constant(arg: object) -> bool:
    """True for an immutable constant made of atoms only (numbers, strings,
    dtypes, ..., in tuples and slices): equal ones are interchangeable, so
    it can be thawed once and shared by every graph of the same structure.
    Tensors, lists, dicts and other objects are not: each run thaws its
    graph's own."""
    kind = type(arg)
    if kind in ATOMS:
        return True
    if kind is tuple:
        return all(is_plain_constant(item) for item in arg)  # type: ignore[attr-defined]  # a tuple
    if kind is SliceConst:
        return is_plain_constant(arg.start) and is_plain_constant(arg.stop) and is_plain_constant(arg.step)  # type: ignore[attr-defined]
    if kind is TupleOf:
        return all(is_plain_constant(item) for item in arg.items)  # type: ignore[attr-defined]
    return False


def _rebuild_tuple(cls: type, items: tuple[object, ...]) -> object:
    make = getattr(cls, "_make", None)  # namedtuples take their fields one by one
    return make(items) if make is not None else cls(items)


def thaw(arg: object, env: Sequence[object]) -> object:
    """Turn a node argument back into a Python value, reading `Ref`s from ``env``."""
    if type(arg) is Ref:
        return env[arg.index]
    if type(arg) is TensorConst:
        return arg.tensor
    if type(arg) is tuple:
        return tuple(thaw(item, env) for item in arg)
    if type(arg) is ListConst:
        return [thaw(item, env) for item in arg.items]
    if type(arg) is DictConst:
        return {key: thaw(item, env) for key, item in arg.items}
    if type(arg) is SliceConst:
        return slice(thaw(arg.start, env), thaw(arg.stop, env), thaw(arg.step, env))
    if type(arg) is TupleOf:
        return _rebuild_tuple(arg.cls, tuple(thaw(item, env) for item in arg.items))
    if type(arg) is Opaque:
        return arg.value
    return arg
