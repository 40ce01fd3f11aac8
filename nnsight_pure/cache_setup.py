"""Reading ``tracer.cache(...)``'s arguments into a `Cache` op (the shell's part).

Modules may be given as envoys, as paths the way users write them
(``"model.transformer.h.0"``, ``"transformer.h.0"``, ``".transformer.h.0"``,
by alias or by real name), one of them alone, or left out (every module of
the model, the root ``model`` included, and, for a language model, its
``generator``, whose one call in ``generate`` is the generated ids). The op
stores the real module paths (what the run hooks) and the names with
aliases (what the cache is read by); device and dtype by name, so the op is
plain data that JSON documents carry.
"""

from __future__ import annotations

from typing import Any

import torch

from .activation_cache import named_modules
from .errors import TraceError
from .events import is_pseudo
from .handle import ModelHandle
from .ops import Cache
from .proxy import Proxy


def _alias_path(handle: ModelHandle, path: str) -> str:
    """The aliased path of real path ``path`` (``"transformer.h.0"``)."""
    parts: list[str] = []
    parent = ""
    for name in path.split(".") if path else ():
        parts.append(handle.alias(parent, name))
        parent = f"{parent}.{name}" if parent else name
    return ".".join(parts)


def _real_path(handle: ModelHandle, written: str) -> str:
    """The real module path of a path as written (aliases allowed)."""
    text = written.strip()
    if text == "model":
        return ""
    for prefix in ("model.", "."):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    module = handle.module
    real: list[str] = []
    for attribute in text.split(".") if text else ():
        parent_path = ".".join(real)
        name = handle.real_name(module, parent_path, attribute)
        if name is None:
            children = ", ".join(handle.alias(parent_path, child) for child in module._modules) or "none"
            raise TraceError(
                f"tracer.cache: {written!r} names no module ({attribute!r} is not a submodule of "
                f"{'model.' + _alias_path(handle, parent_path) if parent_path else 'model'}; "
                f"its submodules are: {children})"
            )
        real.append(name)
        module = module._modules[name]  # type: ignore[assignment]  # (found just above)
    return ".".join(real)


def _is_envoy(item: Any) -> bool:
    if isinstance(item, Proxy):
        return False  # (a traced value: reading an attribute would record it)
    return isinstance(getattr(item, "_path", None), str) and hasattr(item, "_handle")


def _paths(handle: ModelHandle, modules: Any) -> list[str]:
    """The real paths of ``modules`` (every module's when ``None``), each once, in the order given."""
    if modules is None:
        return list(named_modules(handle.module))
    if isinstance(modules, str) or _is_envoy(modules):
        modules = [modules]
    try:
        items = list(modules)
    except TypeError:
        raise TypeError(
            f"tracer.cache(modules=...) takes envoys of this model or module paths (one, or a list); got {modules!r}"
        ) from None
    paths = []
    for item in items:
        if isinstance(item, str):
            paths.append(_real_path(handle, item))
        elif _is_envoy(item) and item._handle is handle and not is_pseudo(item._path):
            paths.append(item._path)
        elif _is_envoy(item):
            raise TypeError(f"tracer.cache(modules=...): {item!r} is an envoy of another model")
        else:
            raise TypeError(
                f"tracer.cache(modules=...) takes envoys of this model or module paths; got {item!r} "
                "(an operation inside a forward, envoy.source.<name>, cannot be cached)"
            )
    return list(dict.fromkeys(paths))


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return dtype.removeprefix("torch.")
    raise TypeError(f"tracer.cache(dtype=...) takes a torch dtype, such as torch.float16; got {dtype!r}")


def _device_name(device: Any) -> str | None:
    if device is None:
        return None
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError):
        raise TypeError(f"tracer.cache(device=...) takes a torch device, such as 'cpu'; got {device!r}") from None


def cache_op(handle: ModelHandle, modules: Any, *, device: Any, dtype: Any, detach: bool,
             include_inputs: bool, include_output: bool) -> Cache:
    """The `Cache` op of ``tracer.cache(...)`` on the model of ``handle``."""
    if not include_inputs and not include_output:
        raise TraceError("tracer.cache: include_inputs and include_output are both False, so it would cache nothing")
    paths = _paths(handle, modules)
    if handle.renames:
        names = tuple("model." + _alias_path(handle, path) if path else "model" for path in paths)
    else:
        names = tuple("model." + path if path else "model" for path in paths)
    return Cache(
        modules=tuple(paths), names=names, include_inputs=bool(include_inputs), include_output=bool(include_output),
        detach=bool(detach), device=_device_name(device), dtype=_dtype_name(dtype),
    )
