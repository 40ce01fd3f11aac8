"""Fake-tensor scanning and validation: shapes at trace time, no real compute.

``scan`` runs the model's method once on fake copies of an invoke's inputs
under `FakeTensorMode`, on a *fake copy* of the module tree (its parameters
fake, its hooks stripped, so neither the user's model nor the user's hooks
ever see a fake tensor), with hooks recording the fake value of each module
call. ``fake_value`` then computes a node's fake
value from its arguments' fake values, so that ``proxy.shape`` is known while
tracing and, with ``validate=True``, a shape error is raised at the line that
causes it, before the real model runs.

Fake values live only on the shell's proxies, never in graphs or results;
the fake mode is entered only around each fake computation, and every hook
is removed before ``scan`` returns.

Two things make real models scan: tensors computed from the inputs alone
keep their real values (`_InputValuesMode`: Hugging Face code asks in Python
whether a mask is all ones, or whether generation has finished), and a
model whose weights are still on the meta device scans as on the CPU. The
user's global module hooks are skipped in the scanning thread
(`_hidden_from_global_hooks`), so no hook of the user's ever sees a fake.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import logging
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
    unset_fake_temporarily,
)
from torch.overrides import TorchFunctionMode
from torch.utils._mode_utils import no_dispatch

from .effects import safe_on_fakes
from .errors import add_note
from .evaluate import op_function
from .events import END_KEY, EventKey, site_of
from .ops import (
    ApplyModule,
    Grad,
    ModuleAttr,
    ModuleGet,
    ModuleSet,
    Op,
    Result,
    Save,
    SetGrad,
    Skip,
)
from .printing import module_expr


class _Unknown:
    """The fake value of a node whose shape is not known at trace time."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()

_UNKNOWABLE = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


# Tensors computed from the inputs alone (not from weights) keep their values
# in a scan, up to this many elements: enough for the ids, masks, positions
# and cache indices of a language model's batch.
_CONSTANT_LIMIT = 1 << 20


class _InputValuesMode(FakeTensorMode):  # type: ignore[no-untyped-call]  # torch's __init_subclass__
    """A fake mode that keeps the real values of tensors that do not depend
    on the weights: the inputs, what is computed from them alone, and
    tensors made from Python values (``torch.ones``, ``torch.full``, ...).

    Hugging Face models read such data in Python: the SDPA mask asks whether
    the attention mask is all ones (transformers 4.x), ``generate`` whether
    every row has finished. Plain fake tensors cannot answer
    (``DataDependentOutputException``); these can, because the answer is a
    real computation on the small real tensors that it depends on. Whatever
    depends on a weight stays fake, as in `FakeTensorMode`.
    """

    def may_turn_const(self, t: torch.Tensor) -> bool:
        return (
            t.numel() <= _CONSTANT_LIMIT
            and t.layout == torch.strided
            and not self.is_our_fake(t)
            and t.device.type != "meta"
        )

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _makes_tensor_from_python_values(func, args, kwargs):
            with no_dispatch():
                out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and type(out) is torch.Tensor and self.may_turn_const(out):
                return self.fake_tensor_converter.from_real_tensor(self, out, make_constant=True)
        return super().dispatch(func, types, args, kwargs)


_aten = torch.ops.aten
# Factories whose values are known from their arguments (not ``empty``: its
# values are whatever memory held, and fake kernels call it for their outputs).
_FACTORIES = frozenset({_aten.full, _aten.ones, _aten.zeros, _aten.arange, _aten.scalar_tensor, _aten.eye})


def _makes_tensor_from_python_values(func: Any, args: Any, kwargs: Mapping[str, Any]) -> bool:
    """A factory like ``torch.full`` or ``torch.arange`` (not on the meta device) called with
    Python values only."""
    if getattr(func, "overloadpacket", None) not in _FACTORIES:
        return False
    if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves((args, kwargs))):
        return False
    device = kwargs.get("device")
    return device is None or torch.device(str(device)).type != "meta"


def new_mode() -> FakeTensorMode:
    """A fake mode for one trace (all of a trace's fake values share it)."""
    return _InputValuesMode(allow_non_fake_inputs=True)


class _QuietFakeErrors(logging.Filter):
    """Drops the error log FakeTensorMode writes before raising a shape error
    that we raise ourselves, with the user's line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed while attempting to run meta" not in record.getMessage()


@contextlib.contextmanager
def _faking(mode: FakeTensorMode) -> Iterator[None]:
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    quiet = _QuietFakeErrors()
    logger.addFilter(quiet)
    try:
        with mode:
            yield
    finally:
        logger.removeFilter(quiet)


def _to_fake(mode: FakeTensorMode, value: Any) -> Any:
    def fake(leaf: Any) -> Any:
        if isinstance(leaf, FakeTensor) or not isinstance(leaf, torch.Tensor):
            return leaf
        if isinstance(mode, _InputValuesMode) and mode.may_turn_const(leaf):
            # An input keeps its values (see _InputValuesMode); a copy, in
            # case the model writes into it in place.
            with unset_fake_temporarily():
                copy = leaf.detach().clone()
            return mode.fake_tensor_converter.from_real_tensor(mode, copy, make_constant=True)
        return mode.from_tensor(leaf.detach())  # only the shape matters here

    return pytree.tree_map(fake, value)


# --- the user's global module hooks never see a fake tensor ------------------------

_GLOBAL_HOOK_DICTS = (
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
    "_global_backward_hooks", "_global_buffer_registration_hooks",
    "_global_module_registration_hooks", "_global_parameter_registration_hooks",
)
_in_scan = threading.local()  # .depth: how many fake runs this thread is inside
_shield_lock = threading.Lock()
_shielded_runs = 0  # fake runs under way in all threads


class _UnlessFake:
    """A global module hook of the user's, skipped in the threads that are
    running a model on fake tensors (and only there)."""

    def __init__(self, hook: Callable[..., Any]) -> None:
        self.hook = hook

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(_in_scan, "depth", 0):
            return None
        return self.hook(*args, **kwargs)


def _global_hook_dicts() -> list[dict[int, Any]]:
    return [getattr(torch.nn.modules.module, name) for name in _GLOBAL_HOOK_DICTS]


def scanning() -> bool:
    """Whether this thread is running a model (or a module) on fake tensors."""
    return bool(getattr(_in_scan, "depth", 0))


@contextlib.contextmanager
def _hidden_from_global_hooks() -> Iterator[None]:
    """Run a fake computation without the user's global module hooks
    (``register_module_forward_hook`` and the like) seeing it.

    torch calls those hooks for every module of every model, the fake copy
    included, so while any thread scans, each is wrapped in `_UnlessFake`
    (same key, same order: its handle still removes it), which skips it in
    the scanning thread only; the last scan to end unwraps them. Another
    thread's real runs still call every hook."""
    global _shielded_runs
    with _shield_lock:
        _shielded_runs += 1
        for hooks in _global_hook_dicts():
            for key, hook in list(hooks.items()):
                if not isinstance(hook, _UnlessFake):
                    hooks[key] = _UnlessFake(hook)
    _in_scan.depth = getattr(_in_scan, "depth", 0) + 1
    try:
        yield
    finally:
        _in_scan.depth -= 1
        with _shield_lock:
            _shielded_runs -= 1
            if _shielded_runs == 0:
                for hooks in _global_hook_dicts():
                    for key, hook in list(hooks.items()):
                        if isinstance(hook, _UnlessFake):
                            hooks[key] = hook.hook


_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)


class _FakeCopyOnCPU(TorchFunctionMode):
    """Like torch's `FakeCopyMode` (``deepcopy`` makes fake tensors), except
    that a tensor on the meta device (a model whose weights are not loaded
    yet) becomes a fake CPU tensor: a scan then runs as the model will once
    loaded, and the values that `_InputValuesMode` keeps stay real (it keeps
    none on the meta device)."""

    def __init__(self, mode: FakeTensorMode) -> None:
        super().__init__()
        self.mode = mode

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            return self.mode.from_tensor(tensor, static_shapes=True)
        with unset_fake_temporarily():
            fresh = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
        return self.mode.fake_tensor_converter.from_meta_and_device(self.mode, fresh, torch.device("cpu"))

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch._C.TensorBase.clone:  # what Parameter.__deepcopy__ calls
            return func(self._fake(args[0]), **kwargs)
        if func is torch.Tensor.__deepcopy__:
            tensor, memo = args
            if id(tensor) not in memo:
                memo[id(tensor)] = self._fake(tensor)
            return memo[id(tensor)]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def fake_copy(root: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are fake (no
    memory for weights; meta ones become fake CPU tensors) and which has no
    hooks. The original is untouched."""
    with _FakeCopyOnCPU(mode):
        copy = copy_module.deepcopy(root)
    for module in copy.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks:
                hooks.clear()
    return copy


def scan(
    fake_root: torch.nn.Module,
    method: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    mode: FakeTensorMode,
) -> dict[EventKey, Any]:
    """Run ``method(*args, **kwargs)`` (a method working on ``fake_root``, see
    `fake_copy`) on fake copies of the inputs; return the fake value of every
    module call (inputs as ``(args, kwargs)``, outputs), and last, under
    `events.END_KEY`, what the method returned (``tracer.result``)."""
    seen: dict[EventKey, Any] = {}
    calls: dict[tuple[str, str], int] = {}

    def record(path: str, site: str, value: Any) -> None:
        call = calls.get((path, site), 0)
        calls[(path, site)] = call + 1
        seen[(path, site, call)] = value  # type: ignore[index]  # site is "pre" or "post"

    handles = []
    try:
        for path, module in fake_root.named_modules():
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, path=path: record(path, "pre", (a, k)), with_kwargs=True
            ))
            handles.append(module.register_forward_hook(lambda m, a, out, path=path: record(path, "post", out)))
        with _hidden_from_global_hooks(), _faking(mode):
            returned = method(*_to_fake(mode, tuple(args)), **_to_fake(mode, dict(kwargs)))
        seen[END_KEY] = returned
    except BaseException as error:
        add_note(error, "nnsight_pure: raised while scanning the model on fake tensors (scan=True)")
        raise
    finally:
        for handle in handles:
            handle.remove()
    return seen


def access_value(scanned: Mapping[EventKey, Any], op: ModuleGet) -> Any:
    """The fake value an access reads, from a scan (`UNKNOWN` if not scanned)."""
    value = scanned.get((op.path, site_of(op.kind), op.call), UNKNOWN)
    if value is UNKNOWN or op.kind != "input":
        return value
    args, _ = value
    return args[0] if args else UNKNOWN


class _FakeState:
    """What `op_function` needs from a run, for fake evaluation (modules only)."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.root = root

    def module(self, path: str) -> torch.nn.Module:
        return self.root.get_submodule(path)


def fake_value(
    op: Op,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    fakes: Callable[[Any], Any],
    scanned: Mapping[EventKey, Any],
    fake_root: Callable[[], torch.nn.Module],
    mode: FakeTensorMode,
    validate: bool,
) -> Any:
    """The fake value of a node ``op(*args, **kwargs)`` (`UNKNOWN` when it
    cannot be known). ``fakes(arg)`` maps a user argument (with proxies) to
    its fake value; ``scanned`` holds the invoke's scanned module calls;
    ``fake_root()`` gives the fake copy of the model (for weights and ad-hoc
    calls). With ``validate``, a failure is raised at once; without, the
    value is unknown.
    """
    if isinstance(op, ModuleGet):
        return access_value(scanned, op)
    if isinstance(op, Result):
        return scanned.get(END_KEY, UNKNOWN)
    if isinstance(op, Skip):
        return _skip_fake(op, fakes(args[0]) if args else UNKNOWN, scanned, validate)
    if isinstance(op, (Save, Grad)):
        return fakes(args[0]) if args else UNKNOWN
    if isinstance(op, (ModuleSet, SetGrad)):
        if validate:
            if isinstance(op, ModuleSet):
                old = access_value(scanned, ModuleGet(op.path, op.kind, op.call))
            else:
                old = fakes(args[0])
            _check_same_shape(op, old, fakes(args[-1]))
        return UNKNOWN
    if not safe_on_fakes(op):
        return UNKNOWN
    fake_args = tuple(fakes(arg) for arg in args)
    fake_kwargs = {name: fakes(value) for name, value in kwargs.items()}
    if any(leaf is UNKNOWN for leaf in pytree.tree_leaves((fake_args, fake_kwargs))):
        return UNKNOWN
    if isinstance(op, ApplyModule):
        op = ApplyModule(op.path, hook=False)  # never fire anyone's hooks with fakes
    try:
        state = _FakeState(fake_root()) if isinstance(op, (ModuleAttr, ApplyModule)) else None
        with _hidden_from_global_hooks(), _faking(mode):
            fake_args, fake_kwargs = _to_fake(mode, (fake_args, fake_kwargs))
            return op_function(op)(state, fake_args, fake_kwargs)
    except _UNKNOWABLE:
        return UNKNOWN
    except Exception as error:
        if not validate:
            return UNKNOWN
        add_note(error, "nnsight_pure: found by validate=True on fake tensors, before running the model")
        raise


def _skip_fake(op: Skip, new: Any, scanned: Mapping[EventKey, Any], validate: bool) -> Any:
    """A skip's value replaces the call's output: with validate it must have
    the output's structure and shapes; in a scan's own record (a dict, one per
    trace and invoke) it becomes what later reads of that output see. The
    `Skip` node itself has no value (`UNKNOWN`)."""
    key: EventKey = (op.path, "post", op.call)
    old = scanned.get(key, UNKNOWN)
    if validate and old is not UNKNOWN and new is not UNKNOWN:
        if isinstance(old, tuple) != isinstance(new, tuple):
            raise ValueError(
                f"{module_expr(op.path)}.skip(...): the module returns a {_kind(old)}, but the skip "
                f"value is a {_kind(new)}: it must have the output's structure "
                "(found by validate=True, before running the model)"
            )
        old_leaves, old_spec = pytree.tree_flatten(old)
        new_leaves, new_spec = pytree.tree_flatten(new)
        if old_spec == new_spec:
            for old_leaf, new_leaf in zip(old_leaves, new_leaves):
                _check_same_shape(op, old_leaf, new_leaf)
    if new is not UNKNOWN and old is not UNKNOWN and isinstance(scanned, dict):
        scanned[key] = new
    return UNKNOWN


def _kind(value: Any) -> str:
    """A value's type as the user knows it (a fake tensor is a ``Tensor``)."""
    return "Tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_same_shape(op: Op, old: Any, new: Any) -> None:
    """With validate: a new value must have the shape of the value it replaces."""
    if old is UNKNOWN or new is UNKNOWN:
        return
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old.shape != new.shape:
        if isinstance(op, ModuleSet):
            what = f"{module_expr(op.path)}.{op.kind}"
        elif isinstance(op, Skip):
            what = f"{module_expr(op.path)}.output (replaced by .skip(...))"
        else:
            what = "the gradient"
        raise ValueError(
            f"{what} has shape {tuple(old.shape)}, but the new value has shape "
            f"{tuple(new.shape)} (found by validate=True, before running the model)"
        )


def shape_like(fake: Any, attribute: str) -> Any:
    """``attribute`` (shape, dtype, device) of a fake value, leaf by leaf."""
    if isinstance(fake, torch.Tensor):
        return getattr(fake, attribute)
    return pytree.tree_map(lambda leaf: getattr(leaf, attribute) if isinstance(leaf, torch.Tensor) else leaf, fake)

