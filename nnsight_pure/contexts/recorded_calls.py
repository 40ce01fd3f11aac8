"""Calls recorded inside an open block even though no argument is a proxy.

nnsight 0.4 made ``torch.zeros(3)``, ``torch.nn.Parameter(...)``, optimizer
calls and ``zero_grad()`` written inside a trace or session into nodes, so
that they run at their place in the program (once per loop iteration, after
``backward()``) instead of once while tracing. It did so by patching torch
for the whole process. Here:

* **Factory functions** (`FACTORIES`) are caught by a
  ``torch.overrides.TorchFunctionMode`` that the first open block of a thread
  pushes and the last one pops. Torch keeps its mode stack per thread, so
  another thread never sees it; entering it costs about 0.3 µs, and a block
  that makes no torch call pays nothing else. ``torch.nn.Parameter(torch.zeros(n))``
  then records too: the factory's proxy goes through ``Parameter``'s path for
  tensor-like data (detach, ``requires_grad_``), and at run time makes a leaf
  tensor that torch treats as a parameter.
* **Optimizers and ``zero_grad``** are Python methods that no torch mechanism
  reports, so a *session* (where 0.4 scripts train: the LoRA tutorial) puts
  thin wrappers on ``torch.optim.Optimizer.__init__``/``zero_grad`` and
  ``torch.nn.Module.zero_grad`` while it is open, and registers an optimizer
  step pre-hook (torch's own global hook API). Each wrapper acts only in a
  thread whose innermost block is open and recording; anywhere else it calls
  the original at once, so a thread that is not tracing behaves exactly as
  before. The last session to close (in any thread) removes them.

  - an optimizer made of traced parameters is built at run time: its
    ``step()``/``zero_grad()`` inside the block are recorded;
  - ``zero_grad()`` of a real optimizer or module is recorded;
  - ``step()`` of a real optimizer cannot be deferred (torch runs it whatever
    a hook says), so it raises a `TraceError` naming the line and saying to
    write ``session.apply(optimizer.step)``: it never runs silently once.

Everything the library itself does while a block is open (preparing inputs,
fake-tensor scans, loading weights, running a graph) runs `suspended`.
``CONFIG.APP.GLOBAL_TRACING = False`` turns all of this off.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, cast

import attrs
import torch
import torch.optim.optimizer as _optimizer_module
from torch.overrides import TorchFunctionMode

from ..config import CONFIG
from ..errors import TraceError
from ..open_blocks import _OPEN, _SUSPENDED
from ..open_blocks import suspended as suspended  # (re-exported: its home is open_blocks.py)
from ..ops import Call
from ..source import short, user_location
from ..trees import NOT_FOUND, find_leaf

FACTORIES = frozenset(
    {
        torch.arange,
        torch.empty,
        torch.eye,
        torch.full,
        torch.linspace,
        torch.logspace,
        torch.ones,
        torch.rand,
        torch.randint,
        torch.randn,
        torch.randperm,
        torch.zeros,
        torch.cat,
    }
)
"""The torch functions nnsight 0.4 recorded inside a block without a proxy argument."""

def recording() -> bool:
    """Whether a call made now in this thread belongs in the innermost open block."""
    return bool(_OPEN.get()) and not _SUSPENDED.get() and CONFIG.APP.GLOBAL_TRACING


def _record(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from ..proxy import record  # (proxy imports the contexts)

    return record(Call(fn), args, kwargs)


class FactoryBlock(Protocol):
    """What recording a factory call asks of the innermost block
    (`base.GraphContext`, which imports this module): a snapshot of its
    recording, and a note of the call, to take it back later."""

    def _snapshot(self) -> Any: ...

    def _note_factory(self, record: FactoryRecord) -> None: ...


class _FactoryMode(TorchFunctionMode):
    """Records `FACTORIES` calls in the innermost open block; passes every other call on."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in FACTORIES and recording():
            context = cast(FactoryBlock, _OPEN.get()[-1])  # (every open block is a GraphContext)
            before = context._snapshot()
            proxy = _record(func, tuple(args), dict(kwargs or {}))
            # Remember how to take it back: it may turn out to be a trace's input.
            context._note_factory(FactoryRecord(before, proxy, func, tuple(args), dict(kwargs or {})))
            return proxy
        return func(*args, **(kwargs or {}))


@attrs.frozen
class FactoryRecord:
    """A factory call recorded in a block, and the block's graph before it."""

    before: Any  # the block's Recording before the call's node (restored to take it back)
    proxy: Any  # its Proxy
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def settle_inputs(value: Any) -> None:
    """Compute now the factory calls a standalone trace's inputs were made with.

    ``with tracer.invoke(torch.rand(1, 5)):`` records the ``rand`` in the open
    block before the invoke sees it, but a trace's inputs must exist before
    its model runs. When those calls are the last nodes of their block, and
    need nothing else, they are taken back (the block's graph becomes what it
    was before them: graphs are values) and run now, once; their proxies then
    hold the values, as saved values of a finished trace do. Anything else
    stays a proxy (the invoke then raises a clear error).
    """
    from ..proxy import Proxy, settle

    wanted: list[Any] = []

    def collect(leaf: Any) -> bool:
        if type(leaf) is Proxy and leaf._pending is None and not leaf._context._ran:
            wanted.append(leaf)
        return False

    find_leaf(value, collect)
    if not wanted:
        return
    context = wanted[0]._context
    made = context._snapshot().factory_records
    if not made or any(proxy._context is not context for proxy in wanted):
        return
    ids = {id(record.proxy): position for position, record in enumerate(made)}
    if any(id(proxy) not in ids for proxy in wanted):
        return
    start = min(ids[id(proxy)] for proxy in wanted)
    tail = made[start:]
    # The tail must be the block's last nodes, one per record, in order.
    first = len(tail[0].before.graph)
    if len(context.graph) != first + len(tail) or any(
        record.proxy._ref is None or record.proxy._ref.index != first + offset for offset, record in enumerate(tail)
    ):
        return
    values: dict[int, Any] = {}

    def value_of(leaf: Any) -> Any:
        if type(leaf) is Proxy:
            if id(leaf) not in values:
                raise LookupError
            return values[id(leaf)]
        return leaf

    from ..trees import map_leaves

    try:
        with suspended():
            for record in tail:
                args = map_leaves(value_of, record.args)
                kwargs = map_leaves(value_of, record.kwargs)
                values[id(record.proxy)] = record.func(*args, **kwargs)
    except LookupError:
        return  # a call of the tail uses a value that is not one of them
    context._restore(tail[0].before)  # (its factory records are those before the tail's)
    for record in tail:
        settle(record.proxy, values[id(record.proxy)])


_MODE = _FactoryMode()  # stateless: every thread pushes the same one on its own stack

# What ``TorchFunctionMode.__enter__``/``__exit__`` do, minus four Python
# calls (this is on every trace's path); the public methods where a torch
# build lacks the two functions.
_PUSH: Callable[[Any], None] = getattr(torch._C, "_push_on_torch_function_stack", None) or (
    lambda mode: mode.__enter__()
)
_POP: Callable[[], Any] = getattr(torch._C, "_pop_torch_function_stack", None) or (
    lambda: _MODE.__exit__(None, None, None)  # type: ignore[no-untyped-call]
)


def start_thread_recording() -> None:
    """The first open block of this thread: catch factory calls from now on."""
    _PUSH(_MODE)


_DEPTH: Callable[[], int] = getattr(torch._C, "_len_torch_function_stack", lambda: -1)
_MODE_AT: Callable[[int], Any] = getattr(torch._C, "_get_function_stack_at", lambda depth: _MODE)


def stop_thread_recording() -> None:
    """The first open block of this thread has closed: stop catching them.
    A no-op when the recording mode is not the innermost (already stopped:
    done again after an interrupt)."""
    depth = _DEPTH()
    if depth != 0 and _MODE_AT(depth - 1) is _MODE:
        _POP()


# --- optimizers and zero_grad, while a session is open -------------------------------

_ORIGINAL_INIT = torch.optim.Optimizer.__init__
_ORIGINAL_OPTIMIZER_ZERO_GRAD = torch.optim.Optimizer.zero_grad
_ORIGINAL_MODULE_ZERO_GRAD = torch.nn.Module.zero_grad


def _is_proxy(value: Any) -> bool:
    from ..proxy import Proxy

    return type(value) is Proxy


def _build_optimizer(optimizer: torch.optim.Optimizer, params: Any, defaults: Any) -> None:
    """Run time: the deferred ``Optimizer.__init__`` of an optimizer made of traced
    parameters (now real tensors); its methods are its class's again."""
    for name in ("step", "zero_grad"):
        optimizer.__dict__.pop(name, None)
    _ORIGINAL_INIT(optimizer, params, defaults)


def _call_method(optimizer: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """Run time: ``optimizer.<name>(...)`` (recorded while the optimizer was not built yet)."""
    return getattr(optimizer, name)(*args, **kwargs)


def _optimizer_init(self: torch.optim.Optimizer, params: Any, defaults: Any) -> None:
    if recording():
        params = list(params) if not isinstance(params, torch.Tensor) else params
        if find_leaf(params, _is_proxy) is not NOT_FOUND:
            # Built at run time, when the traced parameters exist; until then
            # its methods record calls to themselves.
            _record(_build_optimizer, (self, params, defaults), {})
            for name in ("step", "zero_grad"):
                self.__dict__[name] = _deferred_method(self, name)
            return
    _ORIGINAL_INIT(self, params, defaults)


def _deferred_method(optimizer: Any, name: str) -> Callable[..., Any]:
    def method(*args: Any, **kwargs: Any) -> Any:
        if recording():
            return _record(_call_method, (optimizer, name) + args, kwargs)
        raise TraceError(
            f"optimizer.{name}() of an optimizer made inside a block can only be called "
            "inside that block (it is built when the block runs)"
        )

    return method


def _optimizer_zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    if recording():
        _record(_ORIGINAL_OPTIMIZER_ZERO_GRAD, (self, set_to_none), {})
        return
    _ORIGINAL_OPTIMIZER_ZERO_GRAD(self, set_to_none)


def _module_zero_grad(self: torch.nn.Module, set_to_none: bool = True) -> None:
    if recording():
        _record(_ORIGINAL_MODULE_ZERO_GRAD, (self, set_to_none), {})
        return
    _ORIGINAL_MODULE_ZERO_GRAD(self, set_to_none)


def _refuse_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if recording():
        raise TraceError(
            f"{type(optimizer).__name__}.step() called inside an open block "
            f"(at {short(user_location())}) would run now, once, while tracing, not at this "
            "point of the program: write session.apply(optimizer.step) (or tracer.apply), or "
            "make the optimizer inside the session from traced parameters"
        )


_LOCK = threading.Lock()
_SESSIONS = 0  # sessions open in any thread (the wrappers stay while one is)
_STEP_HOOK: Any = None


def session_started() -> None:
    """A session opened: put the optimizer and ``zero_grad`` wrappers in place (once)."""
    global _SESSIONS, _STEP_HOOK
    with _LOCK:
        if _SESSIONS == 0:
            torch.optim.Optimizer.__init__ = _optimizer_init  # type: ignore[method-assign]
            torch.optim.Optimizer.zero_grad = _optimizer_zero_grad  # type: ignore[method-assign]
            torch.nn.Module.zero_grad = _module_zero_grad  # type: ignore[method-assign]
            _STEP_HOOK = _optimizer_module.register_optimizer_step_pre_hook(_refuse_step)
        _SESSIONS += 1


def session_ended() -> None:
    """A session closed: the last one restores torch's own methods."""
    global _SESSIONS, _STEP_HOOK
    with _LOCK:
        _SESSIONS -= 1
        if _SESSIONS == 0:
            torch.optim.Optimizer.__init__ = _ORIGINAL_INIT  # type: ignore[method-assign]
            torch.optim.Optimizer.zero_grad = _ORIGINAL_OPTIMIZER_ZERO_GRAD  # type: ignore[method-assign]
            torch.nn.Module.zero_grad = _ORIGINAL_MODULE_ZERO_GRAD  # type: ignore[method-assign]
            if _STEP_HOOK is not None:
                _STEP_HOOK.remove()
                _STEP_HOOK = None
