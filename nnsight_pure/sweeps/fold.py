"""The reducer tree of a sweep, and the fold that merges partials in batch order.

`reducer_tree` lays the user's ``reduce`` over the graph's outputs tree;
`lift`, `merge` and `finish` walk that tree (a batch's outputs become
partials, consecutive partials merge, the last partial becomes the result);
`OrderedFold` takes partials in any order and merges them in batch order, so
a sweep's result depends on the batches only, never on the engine, the
number of workers or the retries. Pure apart from `OrderedFold`'s own state.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import attrs

from ..arguments import DictConst, ListConst, Ref, TupleOf
from ..reducers import Reducer


@attrs.frozen
class _Constant:
    """The 'reducer' of an output that is a constant of the graph: kept as is."""

    def lift(self, value: Any, start: int) -> Any:
        return value

    def merge(self, parts: Sequence[Any]) -> Any:
        return parts[0]

    def finish(self, part: Any) -> Any:
        return part


Spec = Any  # a Reducer, or a dict / list / tuple of specs (the outputs' structure)


def reducer_tree(reduce: Any, outputs: object) -> Spec:
    """The reducer of every output: ``reduce`` (one reducer for all, or a
    dict/list/tuple matching the outputs, possibly with one reducer for a
    whole sub-tree) laid over the graph's frozen ``outputs`` tree."""
    return _lay(reduce, outputs, "outputs")


def _is_reducer(value: object) -> bool:
    return not isinstance(value, (Mapping, list, tuple)) and isinstance(value, Reducer)


def _items(outputs: object) -> list[tuple[Any, object]] | None:
    """The (key, child) pairs of a container of the frozen outputs tree."""
    if type(outputs) is DictConst:
        return list(outputs.items)
    if type(outputs) is ListConst or type(outputs) is TupleOf:
        return list(enumerate(outputs.items))
    if type(outputs) is tuple:
        return list(enumerate(outputs))
    return None


def _lay(reduce: Any, outputs: object, where: str) -> Spec:
    items = _items(outputs)
    if _is_reducer(reduce):
        if items is None:
            return reduce if type(outputs) is Ref else _Constant()
        laid = {key: _lay(reduce, child, f"{where}[{key!r}]") for key, child in items}
        return laid if type(outputs) is DictConst else [laid[key] for key, _ in items]
    if items is None:
        raise TypeError(f"reduce: {where} is one value and needs one reducer, got {reduce!r}")
    if type(outputs) is DictConst:
        if not isinstance(reduce, Mapping):
            raise TypeError(f"reduce: {where} is a dict {[k for k, _ in items]}: give a reducer or a dict of them")
        names = [key for key, _ in items]
        missing = [name for name in names if name not in reduce]
        extra = [name for name in reduce if name not in names]
        if missing or extra:
            raise KeyError(f"reduce: the outputs are {names}; no reducer for {missing}, unknown names {extra}")
        return {key: _lay(reduce[key], child, f"{where}[{key!r}]") for key, child in items}
    if not isinstance(reduce, (list, tuple)) or len(reduce) != len(items):
        raise TypeError(
            f"reduce: {where} is a sequence of {len(items)} outputs: give a reducer or {len(items)} of them"
        )
    return [_lay(part, child, f"{where}[{key}]") for (key, child), part in zip(items, reduce)]


def lift(spec: Spec, value: Any, start: int) -> Any:
    """One batch's outputs as partials (on the worker that ran the batch)."""
    if type(spec) is dict:
        return {key: lift(child, value[key], start) for key, child in spec.items()}
    if type(spec) is list:
        return [lift(child, item, start) for child, item in zip(spec, value)]
    return spec.lift(value, start)


def merge(spec: Spec, parts: Sequence[Any]) -> Any:
    """Partials of consecutive batches, in order, as one partial."""
    if type(spec) is dict:
        return {key: merge(child, [part[key] for part in parts]) for key, child in spec.items()}
    if type(spec) is list:
        return [merge(child, [part[i] for part in parts]) for i, child in enumerate(spec)]
    return spec.merge(parts)


def finish(spec: Spec, part: Any, outputs: object) -> Any:
    """The sweep's outputs, in the structure of the graph's outputs."""
    if type(spec) is dict:
        return {key: finish(child, part[key], _child(outputs, key)) for key, child in spec.items()}
    if type(spec) is list:
        done = [finish(child, part[i], _child(outputs, i)) for i, child in enumerate(spec)]
        return done if type(outputs) is ListConst else tuple(done)
    return spec.finish(part)


def shapes(spec: Spec, part: Any, where: str = "the output") -> list[tuple[str, Any, tuple[int | str, ...]]]:
    """``(which output, reducer, shape)`` for each reducer of ``spec`` that
    says what its partials must share (see reducers.py)."""
    if type(spec) is dict:
        return [found for key, child in spec.items() for found in shapes(child, part[key], f"output {key!r}")]
    if type(spec) is list:
        return [found for i, child in enumerate(spec) for found in shapes(child, part[i], f"output {i}")]
    shape = getattr(spec, "shape", None)
    return [] if shape is None else [(where, spec, shape(part))]


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _child(outputs: object, key: Any) -> object:
    for name, child in _items(outputs) or ():
        if name == key:
            return child
    raise KeyError(key)  # pragma: no cover - the spec was laid over these outputs


class OrderedFold:
    """Partials arriving in any order, merged in batch order.

    Consecutive partials are merged in chunks as soon as they are all here,
    so the fold holds few partials however long the sweep; the merge order
    is a function of the batch indexes only (not of arrival times).
    """

    CHUNK = 32

    def __init__(self, spec: Spec) -> None:
        self._spec = spec
        self._next = 0
        self._waiting: dict[int, Any] = {}
        self._merged: list[Any] = []  # in order: at most CHUNK partials and merged chunks
        self.examples = 0
        self._first: tuple[int, list[tuple[str, Any, tuple[int | str, ...]]]] | None = None

    def add(self, index: int, part: Any, size: int) -> None:
        """Batch ``index`` (of ``size`` examples) is done: its partial is ``part``.
        Raises `ValueError` naming both batches if its shapes differ from the
        first batch's."""
        self._check_shapes(index, part)
        self._waiting[index] = part
        self.examples += size
        while self._next in self._waiting:
            self._merged.append(self._waiting.pop(self._next))
            self._next += 1
            if self._next % self.CHUNK == 0:
                self._merged = [merge(self._spec, self._merged)]

    def _check_shapes(self, index: int, part: Any) -> None:
        found = shapes(self._spec, part)
        if self._first is None:
            self._first = (index, found)
            return
        first, expected = self._first
        for (where, reducer, shape), (_, _, wanted) in zip(found, expected):
            if shape != wanted:
                low, high = sorted(((first, wanted), (index, shape)))
                raise ValueError(
                    f"{reducer!r} cannot combine {where} of batch {low[0]} (shape {_shape_text(low[1])}) "
                    f"with that of batch {high[0]} (shape {_shape_text(high[1])}): the batches' "
                    "partials must have the same shape (pad the outputs to one shape, or "
                    "collect them with stack() per batch)"
                )

    @property
    def count(self) -> int:
        """How many batches have been merged (all of them, at the end)."""
        return self._next

    def result(self) -> Any:
        assert not self._waiting, "a batch is missing"
        if not self._merged:
            raise ValueError("the dataset gave no batches: there is nothing to reduce")
        return merge(self._spec, self._merged)
