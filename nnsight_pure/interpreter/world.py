"""The hook-event state of one run: what the model is doing, as the programs see it.

The *event register* (``current``, ``activation``, ``swapped``) is the hook
event being handled, its value, and whether a write replaced that value; a
hook event sets it for as long as it feeds the programs and restores the
outer one after (`World._feed`: a hooked call made by a running program
fires an event inside an event). Around it: the values kept for later
readers, the call counts per hook site, the rows of each invoke handed out
as views (so that a gradient hook goes on the tensor the model uses), and
the gradient hooks of the run.

A `World` belongs to one run, in one thread; it is never shared.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from torch.utils.hooks import RemovableHandle

from ..batching import BatchGroups, merge_rows
from ..errors import TraceError
from ..events import END_PATH, Event, EventKey, GradKey, Site
from ..hooks import submodule
from ..printing import module_expr
from ..steps import NO_STOPS, ModuleSetStep, Plan
from .signals import EarlyStop

if TYPE_CHECKING:
    from .scheduler import Scheduler



class World:
    """The hook-event state of one run (see module docstring).

    ``scheduler`` has the programs each event feeds; ``stopping``: a stop
    took effect, the run ends once the programs have moved; ``ended``: the
    model's method has returned.
    """

    def __init__(self, plan: Plan, root: torch.nn.Module | None, groups: BatchGroups, scheduler: Scheduler) -> None:
        self.plan = plan
        self.scheduler = scheduler
        self.root = root
        self.groups = groups
        # One invoke over the whole batch (or none): no access ever needs narrowing.
        self.whole_batch = all(groups.rows(invoke) is None for invoke in range(len(groups.groups)))
        self.current: Event | None = None  # the event register (see `_feed`)
        self.activation: Any = None
        self.swapped = False
        self.ended = False
        self.stopping = False
        self.kept: dict[Event, Any] = {}
        self.readers = dict(plan.readers)
        self.calls: dict[tuple[str, Site], int] = {}
        # Rows of invokes handed out as views: id(view) -> (view, base, start, size).
        self.views: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], int, int]] = {}
        self.grad_hooks: list[RemovableHandle] = []
        self.latest: dict[tuple[str, Site], EventKey] = {}  # the kept call of each dynamic site
        self.missed: list[EventKey] = []  # calls a loop over calls waited for in vain
        self.thread = threading.get_ident()
        self._modules: dict[str, torch.nn.Module] = {}
        self._stops = None if plan.stops is NO_STOPS else plan.stops  # (most plans have none: no lookup then)
        self.feeding = 0  # how many events are being fed now (operations.py ignores the programs' own ops)
        self.skips: dict[EventKey, list[tuple[int | None, Any]]] = {}  # skip values by the call's pre event
        self.stored: dict[int, Any] = {}  # what the cache hooks store, per `Cache` node (cache.py)
        self.not_run: list[str] = []  # the modules whose forward a skip replaced entirely, in call order

    # --- the event register -----------------------------------------------------------

    def _feed(self, key: Event, value: Any) -> tuple[Any, bool]:
        """Feed the programs event ``key``: the register holds it (value
        ``value``, not swapped) for as long as they run, and the outer event
        again after, whatever happens. Returns the event's final value and
        whether a write replaced it."""
        outer = (self.current, self.activation, self.swapped)
        self.current, self.activation, self.swapped = key, value, False
        self.feeding += 1
        try:
            self.scheduler.advance_all(self)
            return self.activation, self.swapped
        finally:
            self.feeding -= 1
            self.current, self.activation, self.swapped = outer

    def _keep(self, key: Event) -> bool:
        """Whether a later step still reads ``key``'s value (kept for it)."""
        return self.readers.get(key, 0) > 0 or key in self.plan.kept_to_end

    # --- module hooks -------------------------------------------------------------------

    def on_event(self, path: str, site: Site, value: Any) -> Any:
        """A module hook fired: count the call, feed the programs, return the
        (possibly replaced) value, or ``None`` to leave the model's value as it is."""
        if threading.get_ident() != self.thread:
            return None  # another thread's run of the same model
        site_key = (path, site)
        calls = self.calls
        call = calls.get(site_key, 0)
        calls[site_key] = call + 1
        key = (path, site, call)
        plan = self.plan
        if key not in plan.event_keys and site_key not in plan.dynamic_sites:
            return None
        if self._stops is not None and key in self._stops:
            self._arm_stops(key)
        # (A hooked call made by a running program, say an ad-hoc call with
        # hook=True, resumes only the other programs; the running one finds the
        # value kept below.)
        value, swapped = self._feed(key, value)
        if self.readers.get(key, 0) > 0 or key in plan.kept_to_end:
            # Later nodes read this call again: keep its final value for them.
            self.kept[key] = value
        elif site_key in plan.dynamic_sites:
            # A loop over calls may still read this call (a look back within
            # its step): keep the latest call of the site only.
            previous = self.latest.get(site_key)
            if previous is not None and previous not in plan.event_keys:
                self.kept.pop(previous, None)
            self.kept[key] = value
            self.latest[site_key] = key
        return value if swapped else None

    def _arm_stops(self, key: EventKey) -> None:
        """A stop computed from module calls takes effect at the last of them,
        whatever its program waits for (nnsight 0.4 fired it at that hook)."""
        calls = self.calls
        for _, needed in self.plan.stops[key]:
            if all(calls.get((path, site), 0) > call for path, site, call in needed):
                self.stopping = True

    def on_end(self, returned: Any) -> None:
        """The traced method returned ``returned``: feed the end-of-run event
        (``tracer.result``, caches), then end the loops still waiting."""
        self.on_event(END_PATH, "post", returned)
        self.end_of_run()

    def end_after_stop(self) -> None:
        """A stop ended the run early: let the caches take what was stored
        (they wait for the end with ``may_end``); ``tracer.result`` has no value."""
        self.stopping = False
        self.ended = True
        try:
            self.scheduler.advance_all(self)
        except EarlyStop:
            pass

    def end_of_run(self) -> None:
        """The model's method returned: end the loops over calls still waiting
        for a call (the programs go on after them, with what was kept)."""
        self.ended = True
        self.scheduler.advance_all(self)

    def note_missed(self, key: Event) -> None:
        """A loop over calls waited for ``key`` until the run ended: if the
        call happened (unseen, while the loop's invoke waited elsewhere), warn."""
        if not isinstance(key, GradKey):
            path, site, call = key
            if self.calls.get((path, site), 0) > call:
                self.missed.append(key)

    def module(self, path: str) -> torch.nn.Module:
        """The submodule at ``path`` (looked up once per run)."""
        module = self._modules.get(path)
        if module is None:
            if self.root is None:
                raise TraceError(f"{module_expr(path)} can only be used inside a trace")
            module = submodule(self.root, path)
            self._modules[path] = module
        return module

    def swap(self, step: ModuleSetStep, new: Any) -> None:
        """Make the running hook hand ``new`` back to the model (this invoke's rows)."""
        what = f"{module_expr(step.key[0])}.{step.kind}"
        if step.kind == "skip":
            # Handed to the module's wrapped forward (forwards.py), which runs next.
            key = self.current
            assert key is not None and not isinstance(key, GradKey)
            self.skips.setdefault(key, []).append((step.invoke, new))
            return
        if step.kind == "output":
            self.activation = merge_rows(self.activation, new, self.groups, step.invoke, what)
        elif step.kind == "inputs":
            args, kwargs = _as_inputs(new, what)
            self.activation = merge_rows(self.activation, (args, kwargs), self.groups, step.invoke, what)
        else:
            args, kwargs = self.activation
            if not args:
                raise TypeError(f"{what}: the module was called without positional arguments")
            first = merge_rows(args[0], new, self.groups, step.invoke, what)
            self.activation = ((first,) + tuple(args[1:]), kwargs)
        self.swapped = True

    def take_skip(self, path: str) -> list[tuple[int | None, Any]] | None:
        """The skips of the call of ``path`` that is starting now (its pre
        event just ran), as ``(invoke, value)`` pairs; ``None`` when none."""
        call = self.calls.get((path, "pre"), 0) - 1
        return self.skips.pop((path, "pre", call), None)

    def skipped_value(self, path: str, skips: list[tuple[int | None, Any]], run: Any) -> Any:
        """The output of a skipped call. When the skips cover the whole batch
        (one over all of it, or one per invoke covering every row once), the
        forward does not run: the output is that value, or the invokes' values
        joined in row order. Otherwise ``run()`` (the forward, on the whole
        batch) gives the output, and each skipping invoke's rows are replaced
        by its value."""
        joined = _joined(skips, self.groups)
        if joined is not _PARTIAL:
            self.not_run.append(path)
            return joined
        output = run()
        for invoke, value in skips:
            output = merge_rows(output, value, self.groups, invoke, f"{module_expr(path)}.skip(...)")
        return output

    # --- gradients ----------------------------------------------------------------------

    def remember_view(self, view: torch.Tensor, base: torch.Tensor, start: int, size: int) -> None:
        """An invoke's rows were handed out as ``view`` of ``base`` (see `hook_gradient`)."""
        self.views[id(view)] = (weakref.ref(view), weakref.ref(base), start, size)

    def hook_gradient(self, key: GradKey, tensor: Any) -> None:
        """Put a one-shot hook on ``tensor`` (or, for an invoke's rows, on the
        batch tensor the model uses) for the gradient event ``key``."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f".grad needs a tensor; got a {type(tensor).__name__}")
        if not tensor.requires_grad:
            raise RuntimeError(
                "this value does not require grad, so no gradient flows into it (are the "
                "model's parameters frozen, or is the run under torch.no_grad()?)"
            )
        target, rows = tensor, None
        entry = self.views.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            base = entry[1]()
            if base is not None:
                target, rows = base, (entry[2], entry[3])
        handle: list[RemovableHandle] = []

        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            handle[0].remove()  # one-shot: the next backward needs a new .grad
            return self.on_gradient(key, rows, grad)

        handle.append(target.register_hook(hook))  # type: ignore[no-untyped-call]  # unannotated in torch
        self.grad_hooks.append(handle[0])

    def on_gradient(self, key: GradKey, rows: tuple[int, int] | None, grad: torch.Tensor) -> torch.Tensor | None:
        """A gradient hook fired: feed the programs waiting for it; return the
        replaced gradient, or ``None`` to leave it (edits in place included)."""
        value, swapped = self._feed(key, grad if rows is None else grad.narrow(0, rows[0], rows[1]))
        if self._keep(key):
            self.kept[key] = value
        if not swapped:
            return None
        if rows is None:
            return value  # type: ignore[no-any-return]  # checked by swap_gradient
        start, size = rows
        rest = grad.shape[0] - start - size
        return torch.cat([grad.narrow(0, 0, start), value, grad.narrow(0, start + size, rest)])

    def swap_gradient(self, new: Any) -> None:
        """Make the running gradient hook hand back ``new`` (same shape as the old one)."""
        old = self.activation
        if not isinstance(new, torch.Tensor) or new.shape != old.shape:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"a new gradient must be a tensor of shape {tuple(old.shape)}, like the old one; got {shape}"
            )
        self.activation = new.to(dtype=old.dtype, device=old.device)
        self.swapped = True

    def close(self) -> None:
        """Remove the gradient hooks that never fired; forget the views."""
        for handle in self.grad_hooks:
            handle.remove()
        self.grad_hooks.clear()
        self.views.clear()


_PARTIAL: Any = object()
"""What `_joined` returns when the skips leave some rows to the forward."""


def _joined(skips: list[tuple[int | None, Any]], groups: BatchGroups) -> Any:
    """The whole batch's output made of the skip values alone, or `_PARTIAL`.

    One skip over the whole batch (an invoke without inputs, or the only
    invoke) is the output as it is (a later one over the whole batch wins).
    Skips of invokes whose rows tile the batch exactly are joined in row
    order: their batched tensors (first dimension the invoke's size, or 1,
    expanded) concatenated, other leaves taken from the last invoke. Values
    of different structures or shapes are `_PARTIAL` too: the forward runs
    and merging the rows raises the error that names the invoke.
    """
    whole = [value for invoke, value in skips if groups.rows(invoke) is None]
    if whole:
        return whole[-1]
    placed = sorted(((groups.rows(invoke), value) for invoke, value in skips), key=lambda item: item[0] or (0, 0))
    start = 0
    for rows, _ in placed:
        assert rows is not None
        if rows[0] != start:
            return _PARTIAL  # a gap, or two skips of the same rows
        start += rows[1]
    if start != groups.total:
        return _PARTIAL
    sizes = [rows[1] for rows, _ in placed if rows is not None]
    values = [value for _, value in placed]
    try:
        flat = [pytree.tree_flatten(value) for value in values]
    except Exception:  # pragma: no cover  (pytree flattens any value)
        return _PARTIAL
    spec = flat[0][1]
    if any(each[1] != spec for each in flat[1:]):
        return _PARTIAL
    joined: list[Any] = []
    for leaves in zip(*(each[0] for each in flat)):
        if not all(isinstance(leaf, torch.Tensor) and leaf.ndim > 0 for leaf in leaves):
            joined.append(leaves[-1])
            continue
        if any(leaf.shape[0] not in (1, size) or leaf.shape[1:] != leaves[0].shape[1:]
               for leaf, size in zip(leaves, sizes)):
            return _PARTIAL
        parts = [leaf.expand((size,) + tuple(leaf.shape[1:])) for leaf, size in zip(leaves, sizes)]
        joined.append(torch.cat(parts))
    return pytree.tree_unflatten(joined, spec)


def _as_inputs(value: Any, what: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], (tuple, list))
        and isinstance(value[1], dict)
    ):
        return tuple(value[0]), dict(value[1])
    raise TypeError(f"{what} must be set to (args, kwargs): a tuple of a tuple and a dict")
