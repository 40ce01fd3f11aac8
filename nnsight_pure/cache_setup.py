"""Reading ``tracer.cache(...)``'s arguments into a `Cache` op (the shell's part).

Modules may be given as envoys, as paths the way users write them
(``"model.transformer.h.0"``, ``"transformer.h.0"``, ``".transformer.h.0"``,
with aliases), or left out (every module of the model). The op stores the
real module paths (what the run hooks) and the names with aliases (what the
cache is read by); device and dtype by name, so the op is plain data.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .errors import TraceError
from .handle import ModelHandle
from .ops import Cache


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
                f"{'model.' + parent_path if parent_path else 'model'}; its submodules are: {children})"
            )
        real.append(name)
        module = module._modules[name]  # type: ignore[assignment]  # (found just above)
    return ".".join(real)


def _paths(handle: ModelHandle, modules: Any) -> list[str]:
    if modules is None:
        return [path for path, _ in handle.module.named_modules()]
    if isinstance(modules, (str,)) or hasattr(modules, "_path"):
        modules = [modules]
    paths = []
    for item in modules if isinstance(modules, Iterable) else [modules]:
        if isinstance(item, str):
            paths.append(_real_path(handle, item))
        elif hasattr(item, "_path") and getattr(item, "_handle", None) is handle:
            paths.append(item._path)
        else:
            raise TypeError(f"tracer.cache(modules=...) takes envoys of this model or paths; got {item!r}")
    return list(dict.fromkeys(paths))


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return dtype.removeprefix("torch.")
    raise TypeError(f"tracer.cache(dtype=...) takes a torch dtype; got {dtype!r}")


def cache_op(handle: ModelHandle, modules: Any, *, device: Any, dtype: Any, detach: bool,
             include_inputs: bool, include_output: bool) -> Cache:
    """The `Cache` op of ``tracer.cache(...)`` on the model of ``handle``."""
    if not include_inputs and not include_output:
        raise TraceError("tracer.cache: include_inputs and include_output are both False, so it would cache nothing")
    paths = _paths(handle, modules)
    names = tuple("model." + _alias_path(handle, path) if path else "model" for path in paths)
    return Cache(
        modules=tuple(paths), names=names, include_inputs=bool(include_inputs), include_output=bool(include_output),
        detach=bool(detach), device=None if device is None else str(torch.device(device)), dtype=_dtype_name(dtype),
    )
