"""Proxy: what user code holds inside a trace, standing for a future value.

Every operation on a proxy (operators, indexing, attribute access, method
calls, torch functions through ``__torch_function__``) records a node in the
innermost open context and returns a new proxy. After the trace, a proxy that
has a value (it was saved) behaves like that value: operators, ``print`` and
torch functions run on the value at once. Nothing rewrites the caller's local
variables; ``.value`` gives the value itself.

Attribute access is recorded lazily: ``h.sum`` alone adds nothing, and
``h.sum(dim=0)`` becomes one method-call node instead of an attribute read
followed by a call.

A proxy knows its block only through the `Recorder` Protocol (the blocks of
`contexts` implement it), and the open blocks through `open_blocks`, the
piece of the shell below both.
"""

from __future__ import annotations

import copy
import operator
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import torch

from . import open_blocks as active
from .config import CONFIG
from .errors import TraceError
from .evaluate import op_function
from .open_blocks import _OPEN
from .ops import Call, CallMethod, GetAttr, Grad, Op, Save, SetAttr, SetGrad, Stop
from .printing import format_node
from .scan import UNKNOWN, shape_like

if TYPE_CHECKING:
    from types import FrameType

    from .arguments import Ref
    from .graph import Graph


_NO_NATIVE_FLOW = (
    "Compute it inside the graph (e.g. torch.where), use tracer.cond(...), or turn "
    "CONFIG.APP.CONTROL_FLOW_HANDLING on for native `if` on traced values."
)
_KNOWN_AT_TRACE_TIME = frozenset({"shape", "dtype", "device"})


def _fake_attribute(fake: Any, name: str) -> Any:
    """The fake value of an attribute of a fake value (methods stay unknown
    until called: the call's node computes its own)."""
    if fake is UNKNOWN:
        return UNKNOWN
    try:
        value = getattr(fake, name)
    except Exception:
        return UNKNOWN
    return UNKNOWN if callable(value) else value


class Recorder(Protocol):
    """What a proxy needs of the block whose graph holds its node: a block of
    `contexts` (`GraphContext`), or `_Settled` for a value known while tracing.

    ``_open``: the block is open (it records); ``_ran``: its outermost block
    has run, so ``has_value``/``value_of`` answer; ``_trace``: the trace it
    records into (``None`` at session level).
    """

    @property
    def graph(self) -> Graph: ...

    @property
    def _open(self) -> bool: ...

    @property
    def _ran(self) -> bool: ...

    @property
    def _trace(self) -> Any: ...

    def record(self, op: Op, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Proxy: ...

    def has_value(self, ref: Ref) -> bool: ...

    def value_of(self, ref: Ref) -> Any: ...


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` on the arguments (the node for calling a traced value)."""
    return fn(*args, **kwargs)


def record(op: Op, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Any:
    """Add ``op`` to the innermost open context, or, outside any, compute it
    at once on the values of the (finished) proxies among the arguments."""
    stack = _OPEN.get()  # (active.innermost(), inlined: on every recorded operation)
    if not stack:
        return _compute_now(op, args, kwargs or {})
    return stack[-1].record(op, args, kwargs)


def _record_grad(op: Op, args: Sequence[Any]) -> Any:
    """Record a gradient read or write, which must be in a trace, not a body."""
    context = active.innermost()
    if context is None or context._trace is None:
        raise TraceError(".grad can only be read or set inside a trace")
    if not context._is_trace:
        raise TraceError(
            ".grad cannot be used inside a condition or loop: its value arrives during "
            "backward(), after the body has run. Read it directly in the trace."
        )
    return context.record(op, args)


def _compute_now(op: Op, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    values = tuple(to_values(arg) for arg in args)
    keywords = {name: to_values(value) for name, value in kwargs.items()}
    if isinstance(op, (Save, Stop)):
        return args[0] if args else None
    return op_function(op)(None, values, keywords)


def to_values(value: Any) -> Any:
    """``value`` with every proxy inside it replaced by that proxy's value."""
    kind = type(value)
    if isinstance(value, Proxy):
        return value.value
    if kind is tuple or kind is list:
        return kind(to_values(item) for item in value)
    if kind is dict:
        return {key: to_values(item) for key, item in value.items()}
    if kind is slice:
        return slice(to_values(value.start), to_values(value.stop), to_values(value.step))
    return value


class _Settled:
    """The context of a proxy whose value is known while tracing (`settle`):
    it behaves like a finished trace that saved that one value."""

    _ran = True
    _open = False
    _closed = True
    _trace = None
    _parent = None

    def __init__(self, graph: Any, index: int, value: Any) -> None:
        self.graph = graph
        self._index = index
        self._value = value

    def has_value(self, ref: Ref) -> bool:
        return ref.index == self._index

    def value_of(self, ref: Ref) -> Any:
        return self._value

    def _is_ancestor_of(self, other: Any) -> bool:
        return False


def settle(proxy: Proxy, value: Any) -> None:
    """Make ``proxy`` stand for ``value`` from now on (it is known already)."""
    assert proxy._ref is not None
    _SET_CONTEXT(proxy, _Settled(proxy._context.graph, proxy._ref.index, value))


def settled(value: Any) -> Any:
    """``value`` with each proxy whose trace already ran (and kept it) replaced
    by its value; other proxies stay (a session gives them values later)."""
    kind = type(value)
    if kind is Proxy:
        return value.value if value._context._ran and value._has_value() else value
    if kind is tuple or kind is list:
        return kind(settled(item) for item in value)
    if kind is dict:
        return {key: settled(item) for key, item in value.items()}
    return value


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[[Proxy, Any], Any]:
    op = Call(fn)  # one op value for every use (ops are immutable)

    def method(self: Proxy, other: Any) -> Any:
        stack = _OPEN.get()  # (record(), inlined: the hottest path of all)
        if stack:
            return stack[-1].record(op, (self, other))
        return _compute_now(op, (self, other), {})

    method.__name__ = f"__{fn.__name__.strip('_')}__"
    return method


def _reflected(fn: Callable[[Any, Any], Any]) -> Callable[[Proxy, Any], Any]:
    op = Call(fn)

    def method(self: Proxy, other: Any) -> Any:
        stack = _OPEN.get()  # (record(), inlined)
        if stack:
            return stack[-1].record(op, (other, self))
        return _compute_now(op, (other, self), {})

    method.__name__ = f"__r{fn.__name__.strip('_')}__"
    return method


def _unary(fn: Callable[[Any], Any]) -> Callable[[Proxy], Any]:
    op = Call(fn)

    def method(self: Proxy) -> Any:
        stack = _OPEN.get()  # (record(), inlined)
        if stack:
            return stack[-1].record(op, (self,))
        return _compute_now(op, (self,), {})

    method.__name__ = f"__{fn.__name__.strip('_')}__"
    return method


class Proxy:
    """A value of a trace: recorded operations now, the real value after the run.

    ``_context`` is the context whose graph holds the node; ``_ref`` is the
    node (``None`` for a pending attribute access, see `_pending`).
    """

    __slots__ = ("_context", "_ref", "_pending", "_fake", "__weakref__")

    _context: Recorder
    _ref: Ref | None
    _pending: tuple[Proxy, str] | None
    _fake: Any  # a fake tensor (scan/validate), or UNKNOWN

    def __init__(
        self,
        context: Recorder,
        ref: Ref | None,
        pending: tuple[Proxy, str] | None = None,
        fake: Any = UNKNOWN,
    ) -> None:
        # (The slots' own setters: this class's __setattr__ records a node.)
        _SET_CONTEXT(self, context)
        _SET_REF(self, ref)
        _SET_PENDING(self, pending)
        _SET_FAKE(self, fake)

    # --- nnsight's proxy API ---------------------------------------------------------

    def save(self) -> Proxy:
        """Keep this value after the trace; returns this same proxy.

        The value is kept by the block it was made in (even when ``save`` is
        called inside a nested condition or loop), so it must still be open.
        """
        if self._pending is not None:
            receiver, _ = self._pending
            if receiver._context._open:
                self._materialize(receiver._context)
        owner = self._context
        if owner._open:
            owner.record(Save(), (self,))
        elif not self._has_value() and active.innermost() is not None:
            raise TraceError(
                f"cannot save {self.node}: the block it was made in has closed. Call .save() "
                "inside that block."
            )
        return self

    def stop(self) -> None:
        """End the run as soon as this value has been computed (early stop)."""
        record(Stop(), (self,))

    @property
    def value(self) -> Any:
        """The value after the trace ran; a `ValueError` says why there is none."""
        if self._pending is not None:
            receiver, name = self._pending
            return getattr(receiver.value, name)
        assert self._ref is not None
        return self._context.value_of(self._ref)

    @property
    def grad(self) -> Any:
        """Inside a trace: the gradient flowing into this value during the next
        ``backward()`` written after this line (assign to replace it). After
        the trace: the value's ``.grad`` attribute (e.g. after ``retain_grad()``)."""
        if self._tracing():
            return _record_grad(Grad(), (self,))
        return self.value.grad

    def _tracing(self) -> bool:
        return active.innermost() is not None and not self._context._ran

    @property
    def node(self) -> str:
        """This proxy's node as text (for debugging)."""
        if self._pending is not None:
            receiver, name = self._pending
            return f"{receiver.node}.{name} (not recorded until used)"
        assert self._ref is not None
        return format_node(self._context.graph.nodes[self._ref.index])

    # --- attribute access and calls ---------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if active.innermost() is None or self._settled():
            return getattr(self.value, name)
        if name in _KNOWN_AT_TRACE_TIME and self._fake is not UNKNOWN:
            return shape_like(self._fake, name)  # known from a scan: a real value now
        return Proxy(self._context, None, (self, name), _fake_attribute(self._fake, name))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad":
            _record_grad(SetGrad(), (self, value))
        else:
            record(SetAttr(name), (self, value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._pending is not None:
            receiver, name = self._pending
            return record(CallMethod(name), (receiver,) + args, kwargs)
        return record(Call(call), (self,) + args, kwargs)

    def _materialize(self, context: Recorder) -> Ref:
        """Record a pending attribute read in ``context`` (once) and return its node."""
        assert self._pending is not None
        receiver, name = self._pending
        proxy = context.record(GetAttr(name), (receiver,))
        object.__setattr__(self, "_context", proxy._context)
        object.__setattr__(self, "_ref", proxy._ref)
        object.__setattr__(self, "_pending", None)
        object.__setattr__(self, "_fake", proxy._fake)
        assert self._ref is not None
        return self._ref

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        return record(Call(func), tuple(args), kwargs)

    # --- indexing ---------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        return record(Call(operator.getitem), (self, key))

    def __setitem__(self, key: Any, value: Any) -> None:
        record(Call(operator.setitem), (self, key, value))

    def __delitem__(self, key: Any) -> None:
        record(Call(operator.delitem), (self, key))

    # --- operators --------------------------------------------------------------------

    __add__ = _binary(operator.add)
    __sub__ = _binary(operator.sub)
    __mul__ = _binary(operator.mul)
    __truediv__ = _binary(operator.truediv)
    __floordiv__ = _binary(operator.floordiv)
    __mod__ = _binary(operator.mod)
    __pow__ = _binary(operator.pow)
    __matmul__ = _binary(operator.matmul)
    __and__ = _binary(operator.and_)
    __or__ = _binary(operator.or_)
    __xor__ = _binary(operator.xor)
    __lshift__ = _binary(operator.lshift)
    __rshift__ = _binary(operator.rshift)

    __radd__ = _reflected(operator.add)
    __rsub__ = _reflected(operator.sub)
    __rmul__ = _reflected(operator.mul)
    __rtruediv__ = _reflected(operator.truediv)
    __rfloordiv__ = _reflected(operator.floordiv)
    __rmod__ = _reflected(operator.mod)
    __rpow__ = _reflected(operator.pow)
    __rmatmul__ = _reflected(operator.matmul)
    __rand__ = _reflected(operator.and_)
    __ror__ = _reflected(operator.or_)
    __rxor__ = _reflected(operator.xor)
    __rlshift__ = _reflected(operator.lshift)
    __rrshift__ = _reflected(operator.rshift)

    # In-place operators act in place on the value, as they do on tensors:
    # ``h += 1`` changes the activation ``h`` stands for.
    __iadd__ = _binary(operator.iadd)
    __isub__ = _binary(operator.isub)
    __imul__ = _binary(operator.imul)
    __itruediv__ = _binary(operator.itruediv)
    __ifloordiv__ = _binary(operator.ifloordiv)
    __imod__ = _binary(operator.imod)
    __ipow__ = _binary(operator.ipow)
    __imatmul__ = _binary(operator.imatmul)
    __iand__ = _binary(operator.iand)
    __ior__ = _binary(operator.ior)
    __ixor__ = _binary(operator.ixor)

    # Comparisons return proxies, as they return tensors on tensors.
    __eq__ = _binary(operator.eq)
    __ne__ = _binary(operator.ne)
    __lt__ = _binary(operator.lt)
    __le__ = _binary(operator.le)
    __gt__ = _binary(operator.gt)
    __ge__ = _binary(operator.ge)

    __neg__ = _unary(operator.neg)
    __pos__ = _unary(operator.pos)
    __abs__ = _unary(operator.abs)
    __invert__ = _unary(operator.invert)

    # Proxies hash by identity (``==`` builds a node instead of comparing).
    __hash__ = object.__hash__

    # --- conversions that need a value now -------------------------------------------

    def _needs_value(self, what: str, advice: str) -> Any:
        if active.innermost() is not None and not self._context._ran:
            raise TypeError(
                f"{what} of a traced value is unknown while tracing (the model has not run "
                f"yet): {self.node}. {advice}"
            )
        return self.value

    def __bool__(self) -> bool:
        if CONFIG.APP.CONTROL_FLOW_HANDLING:
            block = active.innermost()
            if block is not None and not self._context._ran:
                # ``if proxy:`` / ``elif proxy:``: the innermost block records it as a
                # condition (contexts/native_flow.py, through open_blocks.OpenBlock).
                return block._native_branch(self, sys._getframe(1))
        return bool(self._needs_value("the truth value", _NO_NATIVE_FLOW))

    def __len__(self) -> int:
        return len(self._needs_value("len()", "Use .shape[0] (a traced value) instead."))

    def __iter__(self) -> Any:
        return self._iterate(sys._getframe(1))

    def _iterate(self, frame: FrameType) -> Any:
        """``iter(self)`` called from ``frame``: inside a block, a native
        ``for item in proxy:`` records a loop (contexts.native_flow)."""
        if CONFIG.APP.CONTROL_FLOW_HANDLING:
            block = active.innermost()
            if block is not None and not self._context._ran:
                return block._native_loop(self, frame)  # (as in __bool__)
        return iter(
            self._needs_value("iterating", "Index it instead (out[0], out[1]), or loop with session.iter(...).")
        )

    def __index__(self) -> int:
        hint = "Pass it to torch functions as a shape tuple, e.g. torch.zeros((n, 3))."
        return operator.index(self._needs_value("the integer value", hint))

    def __int__(self) -> int:
        return int(self._needs_value("int()", "Keep it a traced value."))

    def __float__(self) -> float:
        return float(self._needs_value("float()", "Keep it a traced value."))

    def __contains__(self, item: Any) -> bool:
        return item in self._needs_value("membership (in)", "Compute it inside the graph instead.")

    def __repr__(self) -> str:
        if self._has_value():
            return repr(self.value)
        if active.innermost() is None:
            # After the block: say why there is no value (and how to keep one).
            try:
                self.value
            except ValueError as error:
                return f"<Proxy {self.node}: {error}>"
        return f"<Proxy {self.node}>"

    def __str__(self) -> str:
        if self._has_value():
            return str(self.value)
        if active.innermost() is None:
            return str(self.value)  # raises the ValueError that says why there is none (as 0.4 did)
        return self.__repr__()

    def __format__(self, spec: str) -> str:
        if self._has_value():
            return format(self.value, spec)
        if active.innermost() is None:
            return format(self.value, spec)  # raises, as `str` does
        return format(self.__repr__(), spec)

    # --- a saved value where a tensor is expected (after the block) ------------------

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        """The value's class once the trace ran and kept the value (so that
        ``isinstance(saved, torch.Tensor)`` holds for tokenizers, numpy and
        plotting code), else `Proxy`. ``type(saved)`` is always `Proxy`.
        ``CONFIG.APP.FRAME_INJECTION = False`` keeps `Proxy`."""
        if self._settled() and CONFIG.APP.FRAME_INJECTION:
            return type(self.value)
        return Proxy

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        import numpy

        value = self.value
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return numpy.asarray(value, dtype=dtype)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickling (torch.save, copy, multiprocessing) stores the value itself.
        return self._needs_value("pickling", "Save it (.save()) and pickle it after the trace.").__reduce_ex__(protocol)

    def __copy__(self) -> Any:
        return copy.copy(self._needs_value("copying", "Copy it inside the graph (.clone()) instead."))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self._needs_value("copying", "Copy it inside the graph (.clone()) instead."), memo)

    def _settled(self) -> bool:
        """Whether this proxy's trace has run and kept its value (it is final now)."""
        if self._pending is not None:
            return self._pending[0]._settled()
        return self._context._ran and self._has_value()

    def _has_value(self) -> bool:
        if self._pending is not None:
            return self._pending[0]._has_value()
        assert self._ref is not None
        return self._context.has_value(self._ref)


def _slot_setter(name: str) -> Callable[[Proxy, Any], None]:
    setter: Callable[[Proxy, Any], None] = Proxy.__dict__[name].__set__  # the slot's descriptor
    return setter


_SET_CONTEXT = _slot_setter("_context")
_SET_REF = _slot_setter("_ref")
_SET_PENDING = _slot_setter("_pending")
_SET_FAKE = _slot_setter("_fake")
