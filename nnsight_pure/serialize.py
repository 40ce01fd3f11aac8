"""Graphs as JSON: a versioned format, a whitelist of callables, exact tensors.

``to_json(graph)`` writes a document ``{"format": "nnsight_pure.graph",
"version": 1, "graph": ...}``; ``from_json(text)`` reads it back, so that
``from_json(to_json(g)) == g``. Ops are written by kind and fields, bodies
nested (an op is ``{"type": "ModuleGet", <its fields>}``), arguments tagged
(``{"ref": 3}``, ``{"tuple": [...]}``, ...), tensor
constants exactly (``torch.save`` bytes, base64; read back with
``weights_only=True``, which runs no code).

Callables are written by qualified name and must be on a whitelist: torch's
tensor functions (``torch.sum``), ``torch.nn.functional``, ``torch.linalg``,
``torch.special`` and ``torch.fft`` functions, tensor methods, the
``operator`` and ``math`` modules, a few builtins, and ``nnsight_pure.print``
(what ``log`` nodes call: ``print`` as it is at run time). Attribute names
starting with ``_`` are refused too (``x.__class__.__base__`` is how a
sandbox is escaped), and methods must be those of tensors or of plain Python
values (no ``str.format``, which reads attributes). A graph holding anything else (a
lambda, an arbitrary object) cannot be written: the error names the node and
the line that made it. A document naming a callable off the list, or written
by a newer version, is refused before anything is built, let alone run.

Pure: text in, values out; ``digest`` hashes the canonical text.
"""

from __future__ import annotations

import base64
import builtins
import copyreg
import hashlib
import io
import json
import math
from typing import Any, Callable, Mapping, get_args

import attrs
import torch

from .arguments import DictConst, ListConst, Opaque, Ref, SliceConst, TensorConst, TupleOf, refs_in
from .effects import METHOD_NAMES, SAFE_DUNDERS, resolve_whitelisted, whitelisted_name
from .errors import SerializationError as SerializationError
from .graph import Graph, Node, check_graph
from .marks import graph_untrusted, mark
from .ops import Call, CallMethod, GetAttr, Op, SetAttr
from .printing import format_node
from .source import SourceLoc, short

FORMAT = "nnsight_pure.graph"
VERSION = 1
"""The format version this library writes, and the newest it reads."""


# --- the whitelist of callables (its tables live in effects.py) ----------------------

_KEY_TAKERS = frozenset({"sorted", "max", "min"})  # builtins whose ``key`` is called


def _name_refusal(op: Op) -> str | None:
    """Why an attribute or method name of ``op`` may not be written or read, if so."""
    if isinstance(op, (GetAttr, SetAttr)) and op.name.startswith("_"):
        return f"the private attribute {op.name!r} (only public names)"
    if isinstance(op, CallMethod) and op.name not in METHOD_NAMES and op.name not in SAFE_DUNDERS:
        return (
            f"the method {op.name!r} (only methods of tensors and of plain Python lists, dicts, "
            "sets, strings and numbers)"
        )
    return None


def _callback_refusal(node: Node) -> str | None:
    """Why ``node`` may not be written or read: a value of the run passed as a
    function to call (``sorted(xs, key=%3)``), if so."""
    op = node.op
    if not isinstance(op, Call):
        return None
    name = getattr(op.fn, "__name__", None)
    if name in _KEY_TAKERS and op.fn is getattr(builtins, name):
        if any(True for _ in refs_in(node.kwargs.get("key"))):
            return (
                f"a value of the run used as the key function of {name}() "
                "(only whitelisted functions can be called)"
            )
    return None


def _resolve(name: str) -> Callable[..., Any]:
    """The callable a whitelisted name stands for (refusing everything else)."""
    found = resolve_whitelisted(name)
    if found is None:
        raise SerializationError(
            f"refused: {name!r} is not on the whitelist of callables (torch tensor functions, "
            "torch.nn.functional/linalg/special/fft, tensor methods, operator, math, and safe builtins)"
        )
    return found


# --- writing --------------------------------------------------------------------------


class _DocumentWriter:
    """Writes a graph as the JSON-ready dicts of the format, one node at a
    time (the node being written names itself in errors)."""

    def __init__(self, sources: bool) -> None:
        self.sources = sources
        self.node: Node | None = None  # the node being written, for errors

    def fail(self, what: str) -> SerializationError:
        if self.node is None:
            return SerializationError(f"cannot serialize the graph's outputs: {what}")
        return SerializationError(
            f"cannot serialize `{format_node(self.node)}` (made at {short(self.node.source)}): {what}. "
            "Only whitelisted callables and plain constants (numbers, strings, tensors, tuples, "
            "lists, dicts, slices) can be written."
        )

    def graph(self, graph: Graph) -> dict[str, Any]:
        outer = self.node
        nodes = [self.one(node) for node in graph.nodes]
        self.node = outer
        return {"nodes": nodes, "outputs": None if graph.outputs is None else self.arg(graph.outputs)}

    def one(self, node: Node) -> dict[str, Any]:
        self.node = node
        refusal = _callback_refusal(node)
        if refusal is not None:
            raise self.fail(refusal)
        written: dict[str, Any] = {"op": self.op(node.op), "args": [self.arg(arg) for arg in node.args]}
        if node.kwargs:
            written["kwargs"] = {name: self.arg(node.kwargs[name]) for name in sorted(node.kwargs)}
        if node.invoke is not None:
            written["invoke"] = node.invoke
        if self.sources and node.source is not None:
            written["source"] = [node.source.filename, node.source.lineno, node.source.function]
        return written

    def op(self, op: Op) -> dict[str, Any]:
        refusal = _name_refusal(op)
        if refusal is not None:
            raise self.fail(refusal)
        written: dict[str, Any] = {"type": type(op).__name__}
        for field in attrs.fields(type(op)):
            value = getattr(op, field.name)
            if isinstance(value, Graph):
                written[field.name] = self.graph(value)
            elif isinstance(op, Call) and field.name == "fn":
                written["fn"] = self.callable(value)
            elif isinstance(value, tuple):
                written[field.name] = list(value)
            else:
                written[field.name] = value
        return written

    def callable(self, fn: Any) -> str:
        name = whitelisted_name(fn)
        if name is None:
            described = getattr(fn, "__qualname__", type(fn).__name__)
            raise self.fail(f"the callable {described!r} is not on the whitelist")
        return name

    def arg(self, arg: object) -> Any:
        kind = type(arg)
        if arg is None or kind is bool or kind is int or kind is str:
            return arg
        if kind is float:
            value = float(arg)  # type: ignore[arg-type]  # exactly a float
            return value if math.isfinite(value) else {"float": repr(value)}
        if type(arg) is Ref:
            return {"ref": arg.index}
        if type(arg) is tuple:
            return {"tuple": [self.arg(item) for item in arg]}
        if type(arg) is ListConst:
            return {"list": [self.arg(item) for item in arg.items]}
        if type(arg) is DictConst:
            return {"dict": [[self.arg(key), self.arg(value)] for key, value in arg.items]}
        if type(arg) is SliceConst:
            return {"slice": [self.arg(arg.start), self.arg(arg.stop), self.arg(arg.step)]}
        if type(arg) is TensorConst:
            buffer = io.BytesIO()
            torch.save(arg.tensor.detach().cpu().clone(), buffer)
            return {"tensor": base64.b64encode(buffer.getvalue()).decode("ascii")}
        if arg is Ellipsis:
            return {"ellipsis": True}
        if kind is complex:
            return {"complex": [self.arg(arg.real), self.arg(arg.imag)]}  # type: ignore[attr-defined]  # a complex
        if kind is bytes:
            return {"bytes": base64.b64encode(arg).decode("ascii")}  # type: ignore[arg-type]  # bytes
        if isinstance(arg, torch.Size):
            return {"size": list(arg)}
        if isinstance(arg, torch.dtype):
            return {"dtype": str(arg).removeprefix("torch.")}
        if isinstance(arg, torch.device):
            return {"device": str(arg)}
        if type(arg) is TupleOf:
            raise self.fail(f"a {arg.cls.__name__} (a tuple subclass) has no safe way back")
        if type(arg) is Opaque:
            raise self.fail(f"a {type(arg.value).__name__} constant")
        if callable(arg):
            return {"callable": self.callable(arg)}
        raise self.fail(f"a {kind.__name__} constant")


def to_json(graph: Graph, *, sources: bool = True, indent: int | None = None) -> str:
    """The graph as a versioned JSON document (``sources=False`` drops the
    user's line of each node). Raises `SerializationError` naming the node."""
    document = {"format": FORMAT, "version": VERSION, "graph": _DocumentWriter(sources).graph(graph)}
    return json.dumps(document, indent=indent, sort_keys=True, ensure_ascii=True)


def digest(graph: Graph) -> str:
    """SHA-256 of the canonical JSON of ``graph``, without source lines: equal
    graphs have equal digests, in any process."""
    return hashlib.sha256(to_json(graph, sources=False).encode("utf-8")).hexdigest()


# --- reading --------------------------------------------------------------------------

_OPS: Mapping[str, type] = {kind.__name__: kind for kind in get_args(Op)}


MAX_DEPTH = 200
"""The deepest nesting of JSON arrays and objects a document may have (a
graph's bodies nest about five levels each); deeper is refused before any
part of it is read, so reading never runs out of stack."""
_MAX_INT_DIGITS = 100  # a constant or an index longer than this is no graph's
_MAX_SOURCE_LINE = 10**9


def _int(value: Any, what: str, low: int = 0) -> int:
    if type(value) is not int or not low <= value:
        raise SerializationError(f"{what} must be an integer of at least {low}; got {value!r}")
    return value


def _device(body: Any) -> torch.device:
    if type(body) is not str or len(body) > 64:
        raise SerializationError(f"unreadable device {body!r}")
    try:
        return torch.device(body)
    except (RuntimeError, ValueError, TypeError):
        raise SerializationError(f"unknown device {body!r}") from None


def _arg(value: Any) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        raise SerializationError("a bare JSON list is not an argument (lists are tagged)")
    if not isinstance(value, dict) or len(value) != 1:
        raise SerializationError(f"unreadable argument {short_repr(value)}")
    ((tag, body),) = value.items()
    if tag == "ref":
        return Ref(_int(body, "a reference"))
    if tag in ("tuple", "list", "dict", "slice", "complex", "size") and not isinstance(body, list):
        raise SerializationError(f"a {tag} argument must hold a list; got {short_repr(body)}")
    if tag == "tuple":
        return tuple(_arg(item) for item in body)
    if tag == "list":
        return ListConst(tuple(_arg(item) for item in body))
    if tag == "dict":
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in body):
            raise SerializationError("a dict argument must hold [key, value] pairs")
        return DictConst(tuple((_arg(key), _arg(item)) for key, item in body))
    if tag == "slice":
        if len(body) != 3:
            raise SerializationError(f"a slice has three parts; got {len(body)}")
        return SliceConst(*(_arg(part) for part in body))
    if tag == "tensor":
        try:
            loaded = torch.load(io.BytesIO(base64.b64decode(body, validate=True)), weights_only=True)
        except Exception as error:  # torch raises many kinds for bad bytes; none must pass as a tensor
            raise SerializationError(f"unreadable tensor constant: {type(error).__name__}") from None
        if not isinstance(loaded, torch.Tensor):
            raise SerializationError("a tensor constant did not hold a tensor")
        return TensorConst(loaded)
    if tag == "float":
        if body not in ("inf", "-inf", "nan"):
            raise SerializationError(f"a float argument is 'inf', '-inf' or 'nan'; got {short_repr(body)}")
        return float(body)
    if tag == "ellipsis":
        return Ellipsis
    if tag == "complex":
        if len(body) != 2:
            raise SerializationError(f"unreadable complex constant {short_repr(body)}")
        real, imag = (_arg(part) for part in body)
        if not isinstance(real, float) or not isinstance(imag, float):
            raise SerializationError(f"unreadable complex constant {short_repr(body)}")
        return complex(real, imag)
    if tag == "bytes":
        if type(body) is not str:
            raise SerializationError("a bytes argument holds base64 text")
        try:
            return base64.b64decode(body, validate=True)
        except ValueError:
            raise SerializationError("unreadable bytes constant (not base64)") from None
    if tag == "size":
        return torch.Size([_int(item, "a size") for item in body])
    if tag == "dtype":
        dtype = getattr(torch, body, None) if type(body) is str else None
        if not isinstance(dtype, torch.dtype):
            raise SerializationError(f"unknown dtype {short_repr(body)}")
        return dtype
    if tag == "device":
        return _device(body)
    if tag == "callable":
        return _resolve(str(body))
    raise SerializationError(f"unknown argument tag {short_repr(tag)}")


def short_repr(value: object) -> str:
    """``repr(value)``, cut to a length an error message can hold."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_DTYPES = frozenset(
    name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)
)
"""The dtype names a `Cache` op may name (``"float16"``, ...): torch's own."""


def _is_int(value: object) -> bool:
    return type(value) is int


_FIELD_CHECKS: Mapping[str, Callable[[object], bool]] = {
    "path": lambda value: type(value) is str,
    "kind": lambda value: value in ("output", "input", "inputs"),
    "call": _is_int,
    "hook": lambda value: type(value) is bool,
    "name": lambda value: type(value) is str,
    "slot": _is_int,
    "index": _is_int,
    "start": _is_int,
    "stop": lambda value: value is None or type(value) is int,
    "step": _is_int,
    "scope": lambda value: type(value) is tuple and all(type(item) is str for item in value),
    "calls": lambda value: type(value) is tuple and all(type(item) is int for item in value),
    "method": lambda value: value is None or type(value) is str,
    "modules": lambda value: type(value) is tuple and all(type(item) is str for item in value),
    "names": lambda value: type(value) is tuple and all(type(item) is str for item in value),
    "include_inputs": lambda value: type(value) is bool,
    "include_output": lambda value: type(value) is bool,
    "detach": lambda value: type(value) is bool,
    "device": lambda value: value is None or type(value) is str and len(value) <= 64,
    "dtype": lambda value: value is None or value in _DTYPES,
}
"""What each op field may hold (a document is checked before any op is built)."""


def _op(value: Mapping[str, Any]) -> Op:
    kind = _OPS.get(str(value.get("type")))
    if kind is None:
        raise SerializationError(f"unknown op kind {value.get('type')!r}")
    names = {field.name for field in attrs.fields(kind)}
    unknown = sorted(set(value) - names - {"type"})
    if unknown:
        raise SerializationError(f"unknown field(s) {unknown} of a {kind.__name__} op")
    fields: dict[str, Any] = {}
    for name, item in value.items():
        if name == "type":
            continue
        if name == "body":
            fields["body"] = _graph(item)
        elif kind is Call and name == "fn":
            fields["fn"] = _resolve(str(item))
        else:
            item = tuple(item) if isinstance(item, list) else item
            if not _FIELD_CHECKS[name](item):
                raise SerializationError(f"the field {name!r} of a {kind.__name__} op cannot be {item!r}")
            fields[name] = item
    try:
        op: Op = kind(**fields)
    except TypeError as error:
        raise SerializationError(f"a {kind.__name__} op is missing a field: {error}") from None
    refusal = _name_refusal(op)
    if refusal is not None:
        raise SerializationError(f"refused: {refusal}")
    return mark(op)  # runs under the guard (guard.py)


def _target_refusal(node: Node) -> str | None:
    """Why a node may not run on its first argument: no attribute or method
    of a callable constant (a whitelisted function, or a class such as
    ``torch.nn.functional.Tensor``, which is ``torch.Tensor``) is read, called or set."""
    if isinstance(node.op, (GetAttr, SetAttr, CallMethod)) and node.args and callable(node.args[0]):
        return f"`.{node.op.name}` of the callable constant {node.args[0]!r} (only of values)"
    return None


def _source(value: Any) -> SourceLoc:
    if not isinstance(value, list) or len(value) != 3:
        raise SerializationError(f"a node's source is [file, line, function]; got {short_repr(value)}")
    filename, lineno, function = value
    if type(filename) is not str or type(function) is not str:
        raise SerializationError(f"a node's source is [file, line, function]; got {short_repr(value)}")
    if type(lineno) is not int or not 0 <= lineno <= _MAX_SOURCE_LINE:
        raise SerializationError(f"a node's source line cannot be {short_repr(lineno)}")
    return SourceLoc(filename, lineno, function)


def _graph(value: Any) -> Graph:
    if not isinstance(value, dict) or not isinstance(value.get("nodes"), list):
        raise SerializationError("a graph is {\"nodes\": [...], \"outputs\": ...}")
    graph = Graph()
    for node in value["nodes"]:
        if not isinstance(node, dict) or not isinstance(node.get("op"), dict):
            raise SerializationError(f"a node is {{\"op\": ..., \"args\": [...]}}; got {short_repr(node)}")
        invoke = node.get("invoke")
        if invoke is not None and (type(invoke) is not int or invoke < 0):
            raise SerializationError(f"a node's invoke cannot be {short_repr(invoke)}")
        source = None
        if node.get("source") is not None:
            source = _source(node["source"])
        args, kwargs = node.get("args", []), node.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise SerializationError("a node's args are a list and its kwargs an object")
        graph, _ = graph.add(
            _op(node["op"]),
            tuple(_arg(arg) for arg in args),
            {name: _arg(arg) for name, arg in kwargs.items()} or None,
            source,
            invoke,
        )
        refusal = _callback_refusal(graph.nodes[-1]) or _target_refusal(graph.nodes[-1])
        if refusal is not None:
            raise SerializationError(f"refused: {refusal}")
    outputs = value.get("outputs")
    return graph.with_outputs(None if outputs is None else _arg(outputs))


def _depth_refusal(document: Any) -> str | None:
    """Why ``document`` nests too deeply to read, if it does (walked without recursion)."""
    pending: list[tuple[Any, int]] = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            return f"the document nests deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
    return None


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise SerializationError(f"an integer of {len(text)} digits (at most {_MAX_INT_DIGITS})")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise SerializationError(f"the number {short_repr(text)} is out of range")
    return value


def _json_constant(text: str) -> float:
    raise SerializationError(f"{text} is not JSON (infinite floats are written {{\"float\": \"inf\"}})")


def from_json(text: str) -> Graph:
    """Read a graph written by `to_json`. Refuses (with `SerializationError`,
    the only exception it raises) other formats, newer or impossible versions,
    callables off the list, malformed or too deeply nested documents. The
    graph's ops are marked: it runs under the guard of guard.py."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise SerializationError(f"a document is text; got a {type(text).__name__}")
    try:
        document = json.loads(
            text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant
        )
    except SerializationError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SerializationError(f"not JSON: {error}") from None
    except RecursionError:
        raise SerializationError(f"the document nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SerializationError(f"not an nnsight_pure graph (format {FORMAT!r} expected)")
    version = document.get("version")
    if type(version) is not int or version < 1:
        raise SerializationError(f"unreadable format version {short_repr(version)} (versions start at 1)")
    if version > VERSION:
        raise SerializationError(
            f"this graph was written in format version {version!r}; this nnsight_pure reads "
            f"versions up to {VERSION}: upgrade nnsight_pure to read it"
        )
    refusal = _depth_refusal(document)
    if refusal is not None:
        raise SerializationError(refusal)
    try:
        graph = _graph(document.get("graph"))
        check_graph(graph)
    except SerializationError:
        raise
    except Exception as error:  # whatever else a malformed document trips, it comes out as one kind
        raise SerializationError(
            f"malformed graph document: {type(error).__name__}: {short_repr(str(error))}"
        ) from None
    return graph


def reduce_graph(graph: Graph) -> tuple[Any, tuple[object, ...]]:
    """How pickle (and `copy`) send a graph: as its value, or, when it holds
    ops read from a document, as JSON, so that it is read back under the
    guard (guard.py) where it runs. Registered with `copyreg` below: only this
    module makes such ops, so a graph holding one exists only once it is
    imported, and graph.py need not know about documents."""
    if graph_untrusted(graph):
        return (from_json, (to_json(graph),))
    return (Graph, (graph.nodes, graph.outputs))


copyreg.pickle(Graph, reduce_graph)
