"""Pictures of graphs: `to_dot` (a pure function to DOT text) and `render` (the one writer).

`to_dot` walks a graph in node order and emits DOT text: the same graph
gives byte-identical text in any process (nothing is ordered by memory
address or hash; keyword arguments are sorted by name). How each op kind is
drawn is data, the `STYLES` table, following the legend of nnsight's `.vis()`:

* boxes get data: module access (green), gradient (green), a bridged value
  (brown), a loop's item (blue), constant arguments (grey);
* ellipses operate on data: set (green), save (brown), any other operation
  (black, labelled with the function's name);
* hexagons do things independent of data: ad-hoc module call (blue), running
  a trace (purple), stop (red), loop (blue) and condition (orange) contexts.

A saved value (one a `Save` reads, or an output of the graph) has a double
border. Every node made by user code carries that line as its tooltip
(``file.py:12  code``; SVG shows it on hover). Every name in a box is
visible: a constant holding nodes (an index ``(:, %2)``) is drawn with
numbered slots, ``(:, #0)``, each the label of the dashed edge from its node.

`render` hands the text to the graphviz package and writes the file; it is
the only function here that writes (`to_dot` only reads the user's source
lines for the tooltips, as tracebacks do). Jupyter's display of graphs and
contexts is in `notebook`.
"""

from __future__ import annotations

import linecache
import os
import pathlib
import warnings
from typing import Mapping

import attrs
import graphviz

from .arguments import Ref, map_refs
from .errors import GraphvizNotFoundError
from .events import OPERATION_MARK
from .graph import Graph, Node, SourceLoc, node_refs, saved_refs
from .ops import (
    ApplyModule,
    Bridge,
    Cache,
    Call,
    CallMethod,
    Cond,
    EachCall,
    Export,
    GetAttr,
    Grad,
    Iterate,
    IterItem,
    ModuleAttr,
    ModuleGet,
    ModuleSet,
    Op,
    Result,
    Save,
    SetAttr,
    SetGrad,
    Skip,
    Stop,
    TraceRun,
    first_bridge,
)
from .printing import _invoke_inputs, body_of
from .source import short


@attrs.frozen
class Style:
    """How one kind of node is drawn, and what the legend calls it."""

    shape: str
    color: str
    legend: str
    meaning: str


STYLES: Mapping[type, Style] = {
    ModuleGet: Style("box", "green4", "InterventionProtocol", "a module's input or output"),
    ModuleAttr: Style("box", "green4", "ParameterProtocol", "a clone of a module's weight or buffer"),
    Grad: Style("box", "green4", "GradProtocol", "the gradient flowing into a value (.grad)"),
    Bridge: Style("box", "brown", "BridgeProtocol", "a value from outside the block (another trace, the session)"),
    Export: Style("box", "brown", "BridgeProtocol", "a value from inside a finished block"),
    IterItem: Style("box", "blue", "ValueProtocol", "the current item of a loop"),
    ModuleSet: Style("ellipse", "green4", "SwapProtocol", "setting a module's input or output"),
    Skip: Style("ellipse", "green4", "SkipProtocol", "skipping a module call (or an operation): its output given"),
    Result: Style("box", "green4", "ResultProtocol", "what the traced method returned (tracer.result)"),
    Cache: Style("box", "green4", "CacheProtocol", "every call's values of many modules (tracer.cache)"),
    SetGrad: Style("ellipse", "green4", "SwapProtocol", "setting the gradient flowing into a value"),
    Save: Style("ellipse", "brown", "LockProtocol", ".save(): the value outlives the run"),
    Call: Style("ellipse", "black", "Operation", "a function call, labelled with the function's name"),
    CallMethod: Style("ellipse", "black", "Operation", "a method call, labelled with the method's name"),
    GetAttr: Style("ellipse", "black", "Operation", "reading an attribute"),
    SetAttr: Style("ellipse", "black", "Operation", "setting an attribute"),
    ApplyModule: Style("hexagon", "blue", "ApplyModuleProtocol", "an ad-hoc call of a module"),
    TraceRun: Style("hexagon", "purple", "LocalBackendExecuteProtocol", "running a trace of the session"),
    Stop: Style("hexagon", "red", "EarlyStopProtocol", "an early stop"),
    Iterate: Style("hexagon", "blue", "Iterator", "a loop whose body is a sub-graph"),
    EachCall: Style("hexagon", "blue", "Iterator", "a body run once per call of modules (.all(), .iter[a:b])"),
    Cond: Style("hexagon", "#FF8C00", "Condition", "a condition whose body is a sub-graph"),
}
"""The style of each op kind (every kind of `Op` has one)."""

CONSTANT = Style("box", "gray", "Value", "a constant argument, labelled name=value where the op names it")
BODY = Style("box", "purple", "Subgraph", "the body of a loop, condition or trace (drawn with recursive=True)")

_MAX_LABEL = 48


def _quote(text: str) -> str:
    """A double-quoted DOT string (backslashes, quotes and newlines escaped).

    >>> _quote('say "hi"')
    '"say \\\\"hi\\\\""'
    """
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _short(text: str) -> str:
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…"


def _path_text(path: str) -> str:
    return f".{path.replace(OPERATION_MARK, 'source')}" if path else ""


def node_label(op: Op) -> str:
    """The text inside a node: its kind, or the function it calls."""
    match op:
        case Call():
            return op.name
        case CallMethod(name):
            return name
        case GetAttr():
            return "getattr"
        case SetAttr():
            return "setattr"
        case Save():
            return "save"
        case Stop():
            return "stop"
        case IterItem():
            return "item"
        case (
            ModuleGet() | ModuleSet() | Skip() | Result() | Cache() | ModuleAttr() | ApplyModule() | Bridge() | Export()
            | Cond() | Iterate() | EachCall() | TraceRun() | Grad() | SetGrad()
        ):
            return type(op).__name__


def op_fields(node: Node) -> list[tuple[str, str]]:
    """The op's own constants, drawn as grey boxes labelled ``name=value``."""
    op = node.op
    invoke = [("invoke", str(node.invoke))] if node.invoke is not None else []
    match op:
        case ModuleGet(path, kind, call) | ModuleSet(path, kind, call):
            fields = [("module_path", repr(f"{_path_text(path)}.{kind}"))]
            if call:
                fields.append(("call", str(call)))
            return fields + invoke
        case Skip(path, call):
            fields = [("module_path", repr(_path_text(path)))]
            return fields + ([("call", str(call))] if call else []) + invoke
        case Result():
            return invoke
        case Cache(modules, include_inputs=inputs, include_output=outputs, detach=detach, device=device,
                   dtype=dtype):
            shown = ", ".join(repr(_path_text(path)) for path in modules[:3])
            fields = [("modules", shown + (f" +{len(modules) - 3} more" if len(modules) > 3 else ""))]
            fields += [(name, "True" if value is True else repr(value)) for name, value in (
                ("include_inputs", inputs), ("include_output", outputs), ("detach", detach),
                ("device", device), ("dtype", dtype)) if value != attrs.fields_dict(Cache)[name].default]
            return fields + invoke
        case ModuleAttr(path, name):
            return [("module_path", repr(_path_text(path))), ("key", repr(name))]
        case ApplyModule(path, hook):
            return [("module_path", repr(_path_text(path)))] + ([("hook", "True")] if hook else [])
        case GetAttr(name) | SetAttr(name):
            return [("name", repr(name))]
        case Bridge(slot):
            return [("slot", str(slot))]
        case Export(index):
            return [("node", f"{index} of the body")]
        case TraceRun(_, method):
            fields = [("inputs", _invoke_inputs(with_slots(node.args[0])[0]) or "()")]
            return fields + ([("method", repr(method))] if method else [])
        case EachCall(_, start, stop, step, scope, listed):
            if listed:
                calls = ", ".join(map(str, listed))
            else:
                calls = f"{start}:{'' if stop is None else stop}" + (f":{step}" if step != 1 else "")
            return [("calls", calls), ("scope", ", ".join(repr(_path_text(p)) for p in scope))]
        case Call() | CallMethod() | Save() | Stop() | IterItem() | Cond() | Iterate() | Grad() | SetGrad():
            return []


@attrs.frozen(repr=False)
class _Slot:
    """Where a container argument holds a node: drawn ``#0``, ``#1``..., the
    label of the dashed edge from that node (so every name in a box is visible)."""

    number: int

    def __repr__(self) -> str:
        return f"#{self.number}"


def with_slots(arg: object) -> tuple[object, list[Ref]]:
    """``arg`` with each distinct node it holds replaced by a numbered slot, and
    those nodes in slot order (first appearance, depth first).

    >>> from nnsight_pure.arguments import SliceConst
    >>> with_slots((SliceConst(None, None, None), Ref(2), Ref(2)))
    ((:, #0, #0), [%2])
    """
    refs: list[Ref] = []
    numbers: dict[int, _Slot] = {}

    def slot(ref: Ref) -> _Slot:
        if ref.index not in numbers:
            numbers[ref.index] = _Slot(len(refs))
            refs.append(ref)
        return numbers[ref.index]

    return map_refs(arg, slot), refs


def tooltip(source: SourceLoc | None) -> str:
    """A node's tooltip: the user's line that made it, ``file.py:12  code``
    (the file's short name, as messages print it); empty without a location.

    It reads the line through `linecache`, as tracebacks do; the same files
    give the same text.
    """
    if source is None:
        return ""
    code = linecache.getline(source.filename, source.lineno).strip()
    return f"{short(source)}  {code}" if code else short(source)


class _Writer:
    """Accumulates DOT lines for one picture (local to one `to_dot` call)."""

    def __init__(self, recursive: bool, group: bool) -> None:
        self.lines: list[str] = []
        self.recursive = recursive
        self.group = group
        self.clusters: dict[str, int] = {}

    def node(self, node_id: str, label: str, style: Style, indent: str, *, saved: bool = False, hint: str = "") -> None:
        attributes = [f"label={_quote(_short(label))}", f"shape={style.shape}", f"color={_quote(style.color)}"]
        if style is CONSTANT or style is BODY:
            attributes.append(f"fontcolor={_quote(style.color)}")
        if saved:
            attributes.append("peripheries=2")
        if hint:
            # Graphviz unescapes a tooltip's backslashes twice (its DOT string,
            # then its SVG link title; 2.43), so each is doubled before quoting.
            attributes.append(f"tooltip={_quote(hint.replace(chr(92), chr(92) * 2))}")
        self.lines.append(f"{indent}{_quote(node_id)} [{', '.join(attributes)}];")

    def edge(self, source: str, target: str, indent: str, label: str = "", style: str = "", color: str = "") -> None:
        attributes = []
        if label:
            attributes.append(f"label={_quote(label)}")
        if style:
            attributes.append(f"style={style}")
        if color:
            attributes.append(f"color={_quote(color)}")
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        self.lines.append(f"{indent}{_quote(source)} -> {_quote(target)}{suffix};")

    def slot_edges(self, refs: list[Ref], box: str, prefix: str, indent: str) -> None:
        """A dashed grey edge from each node a constant box holds, labelled with its slot."""
        for number, ref in enumerate(refs):
            self.edge(f"{prefix}{ref.index}", box, indent, label=f"#{number}", style="dashed", color="gray")

    def graph(self, graph: Graph, prefix: str, indent: str) -> None:
        saved = saved_refs(graph)
        for node in graph.nodes:
            self.one_node(node, prefix, indent, node.ref.index in saved)

    def one_node(self, node: Node, prefix: str, indent: str, saved: bool) -> None:
        node_id = f"{prefix}{node.ref.index}"
        style = STYLES[type(node.op)]
        self.node(node_id, node_label(node.op), style, indent, saved=saved, hint=tooltip(node.source))
        for number, (name, value) in enumerate(op_fields(node)):
            box = f"{node_id}_f{number}"
            self.node(box, f"{name}={value}", CONSTANT, indent)
            if isinstance(node.op, TraceRun) and name == "inputs":
                # The invokes' inputs may hold values of the session (a loop's item).
                self.slot_edges(with_slots(node.args[0])[1], box, prefix, indent)
            self.edge(box, node_id, indent)
        body = body_of(node)
        self.arguments(node, node_id, prefix, indent, context=body is not None)
        if isinstance(node.op, Export) and self.recursive and type(node.args[0]) is Ref:
            # From the exported node inside the (drawn) body to its export.
            inner = f"{prefix}{node.args[0].index}_{node.op.index}"
            self.edge(inner, node_id, indent, style="dotted", color="brown")
        if body is None:
            return
        if not self.recursive:
            box = f"{node_id}_body"
            self.node(box, f"body: {len(body)} nodes", BODY, indent)
            self.edge(box, node_id, indent, style="dashed", color=style.color)
            return
        self.body(node, node_id, prefix, body, style, indent)

    def arguments(self, node: Node, node_id: str, prefix: str, indent: str, context: bool) -> None:
        args = list(node.args)
        for position, arg in enumerate(args):
            if position == 0 and isinstance(node.op, TraceRun):
                continue  # drawn as its inputs= box
            bridges = first_bridge(node.op)
            label = f"bridge {position - bridges}" if context and position >= bridges else ""
            self.argument(arg, node_id, f"{node_id}_a{position}", prefix, indent, label)
        for name in sorted(node.kwargs):
            self.argument(node.kwargs[name], node_id, f"{node_id}_k_{name}", prefix, indent, name, keyword=True)

    def argument(
        self, arg: object, node_id: str, box: str, prefix: str, indent: str, label: str, keyword: bool = False
    ) -> None:
        if type(arg) is Ref:
            self.edge(f"{prefix}{arg.index}", node_id, indent, label=label)
            return
        shown, refs = with_slots(arg)
        self.node(box, f"{label}={shown!r}" if keyword else repr(shown), CONSTANT, indent)
        self.slot_edges(refs, box, prefix, indent)
        self.edge(box, node_id, indent, label="" if keyword else label)

    def body(self, node: Node, node_id: str, prefix: str, body: Graph, style: Style, indent: str) -> None:
        inner_prefix = f"{node_id}_"
        inner_indent = indent
        if self.group:
            kind = type(node.op).__name__
            number = self.clusters.get(kind, 0)
            self.clusters[kind] = number + 1
            self.lines.append(f"{indent}subgraph {_quote('cluster_' + node_id)} {{")
            inner_indent = indent + "  "
            self.lines.append(f"{inner_indent}label={_quote(f'{kind}_{number}')}; penwidth=0.25;")
        self.graph(body, inner_prefix, inner_indent)
        if self.group:
            self.lines.append(f"{indent}}}")
        for inner in body.nodes:
            inner_id = f"{inner_prefix}{inner.ref.index}"
            if next(node_refs(inner), None) is None:  # a root of the body
                self.edge(node_id, inner_id, indent, style="dashed", color=style.color)
            if isinstance(inner.op, Bridge):
                position = first_bridge(node.op) + inner.op.slot
                captured = node.args[position] if position < len(node.args) else None
                if type(captured) is Ref:
                    self.edge(f"{prefix}{captured.index}", inner_id, indent, style="dotted", color="brown")


def to_dot(graph: Graph, *, title: str = "graph", recursive: bool = False, group: bool = False) -> str:
    """The DOT text of a picture of ``graph`` (pure and deterministic).

    Args:
        graph: the graph to draw.
        title: the picture's title (drawn at the top).
        recursive: also draw the nodes of every sub-graph (loop, condition
            and trace bodies), with a dashed edge from each context node to
            the first nodes of its body and a dotted one from each bridged
            value to its bridge.
        group: with ``recursive``, put each sub-graph in its own labelled box.

    Returns:
        DOT source text, ending with a newline.
    """
    if group and not recursive:
        warnings.warn("group=True draws sub-graphs only with recursive=True; ignoring group", stacklevel=2)
        group = False
    writer = _Writer(recursive, group)
    writer.lines.append(f"digraph {_quote(title)} {{")
    writer.lines.append(f"  graph [label={_quote(title)}, labelloc=t, fontsize=20, fontname=Helvetica];")
    writer.lines.append("  node [fontname=Helvetica, fontsize=12];")
    writer.lines.append("  edge [fontname=Helvetica, fontsize=10];")
    writer.graph(graph, "n", "  ")
    writer.lines.append("}")
    return "\n".join(writer.lines) + "\n"


FORMATS = ("png", "svg", "pdf", "dot")
"""What `render` writes: pictures through Graphviz's ``dot``, or the DOT text."""


def render(
    graph: Graph,
    *,
    title: str = "graph",
    path: str | os.PathLike[str] = ".",
    format: str = "png",
    recursive: bool = False,
    group: bool = False,
) -> pathlib.Path:
    """Write a picture of ``graph`` to ``{path}/{title}.{format}`` and return its path.

    ``format="dot"`` writes the DOT text itself (no Graphviz program needed);
    the other formats run Graphviz's ``dot``. ``path`` is created if missing.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if not title or os.sep in title or (os.altsep and os.altsep in title):
        raise ValueError(f"title names the file, so it cannot be empty or contain a path separator: {title!r}")
    text = to_dot(graph, title=title, recursive=recursive, group=group)
    folder = pathlib.Path(path)
    target = folder / f"{title}.{format}"
    if format == "dot":
        folder.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return target
    try:
        data = graphviz.Source(text).pipe(format=format)
    except graphviz.ExecutableNotFound as error:
        raise GraphvizNotFoundError(
            f"drawing a {format} picture needs Graphviz's `dot` program, which is not on PATH. "
            "Install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
            "graphviz; conda: conda install graphviz), or pass format='dot' to write the DOT "
            "text without it."
        ) from error
    folder.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target
