"""A readable text form of graphs and nodes (``repr(graph)``, error messages).

One line per node, like a jaxpr: ``%3 = add(%2, 1)``. Module paths read as
the user wrote them (``model.transformer.h.0.output``). The output depends
only on the graph value, never on memory addresses or hash order. Pure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .events import OPERATION_MARK, EndProgram, GradProgram, LoopPart, ProgramKey
from .ops import (
    CONTEXT_OPS,
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
)

if TYPE_CHECKING:
    from .graph import Graph, Node


def module_expr(path: str) -> str:
    """How a module path reads in user code: ``model.layer1`` (``model`` for the root;
    an operation site, ``model.h.0.attn.source.split_0``)."""
    if not path:
        return "model"
    if OPERATION_MARK in path:
        path = path.replace(OPERATION_MARK, "source")
    return f"model.{path}"


def _selection(call: int) -> str:
    return f" [call {call}]" if call else ""


def format_args(node: Node, skip: int = 0) -> str:
    """The node's arguments as call syntax, keyword arguments sorted by name."""
    parts = [repr(arg) for arg in list(node.args)[skip:]]
    parts += [f"{name}={node.kwargs[name]!r}" for name in sorted(node.kwargs)]
    return ", ".join(parts)


def format_op(op: Op, node: Node) -> str:
    """The right-hand side of a node's line."""
    match op:
        case ModuleGet(path, kind, call):
            return f"{module_expr(path)}.{kind}{_selection(call)}"
        case ModuleSet(path, kind, call):
            return f"set {module_expr(path)}.{kind}{_selection(call)} = {format_args(node)}"
        case Skip(path, call):
            return f"skip {module_expr(path)}{_selection(call)} with {format_args(node)}"
        case Result():
            return "tracer.result"
        case Cache(cached, include_inputs=inputs, include_output=output):
            what = "+".join(part for part, on in (("inputs", inputs), ("outputs", output)) if on)
            return f"tracer.cache({_module_list(cached)}; {what})"
        case ModuleAttr(path, name):
            return f"{module_expr(path)}.{name}.clone()"
        case ApplyModule(path, hook):
            hooked = ", hook=True" if hook else ""
            return f"{module_expr(path)}({format_args(node)}{hooked})"
        case Call():
            return f"{op.name}({format_args(node)})"
        case CallMethod(name):
            receiver = repr(node.args[0]) if node.args else "?"
            return f"{receiver}.{name}({format_args(node, skip=1)})"
        case GetAttr(name):
            return f"{format_args(node)}.{name}"
        case SetAttr(name):
            value = repr(node.args[1]) if len(node.args) > 1 else "?"
            return f"setattr {node.args[0]!r}.{name} = {value}"
        case Save():
            return f"save {format_args(node)}"
        case Stop():
            return f"stop after {format_args(node)}" if node.args else "stop"
        case Grad():
            return f"{node.args[0]!r}.grad"
        case SetGrad():
            return f"set {node.args[0]!r}.grad = {node.args[1]!r}"
        case Bridge(slot):
            return f"bridge {slot}"
        case IterItem():
            return "item"
        case Export(index):
            return f"export %{index} of {format_args(node)}"
        case Cond():
            return f"cond {node.args[0]!r}{_bridges(node)}"
        case Iterate():
            return f"iter {node.args[0]!r}{_bridges(node)}"
        case EachCall(scope=scope):
            calls = call_range(op)
            modules = ", ".join(module_expr(path) for path in scope)
            captured = f" bridging ({', '.join(repr(arg) for arg in node.args)})" if node.args else ""
            return f"each call [{calls}] of {modules}{captured}"
        case TraceRun(_, method):
            how = f"trace {method}" if method else "trace"
            keywords = "".join(f", {name}={node.kwargs[name]!r}" for name in sorted(node.kwargs))
            return f"{how}({_invoke_inputs(node.args[0])}{keywords}){_bridges(node)}"


def _module_list(modules: tuple[str, ...]) -> str:
    if len(modules) <= 3:
        return ", ".join(module_expr(path) for path in modules)
    return f"{len(modules)} modules: {module_expr(modules[0])} ... {module_expr(modules[-1])}"


def call_range(op: EachCall) -> str:
    """The calls a loop over calls visits, as written: ``0, 2, 5`` when
    listed, else ``start:stop`` (``:step`` when not 1; no stop: open)."""
    if op.calls:
        return ", ".join(map(str, op.calls))
    stop = "" if op.stop is None else op.stop
    return f"{op.start}:{stop}" + (f":{op.step}" if op.step != 1 else "")


def _invoke_inputs(invokes: object) -> str:
    """Each invoke's inputs, separated by ``;`` (an invoke without inputs is ``()``)."""
    parts = []
    for invoke in invokes if isinstance(invokes, tuple) else ():
        if invoke is None:
            parts.append("()")
            continue
        args, kwargs = invoke
        items = [repr(arg) for arg in args]
        items += [f"{name}={value!r}" for name, value in getattr(kwargs, "items", ())]
        parts.append(", ".join(items))
    return "; ".join(parts)


def _bridges(node: Node) -> str:
    captured = list(node.args)[1:]
    return f" bridging ({', '.join(repr(arg) for arg in captured)})" if captured else ""


def body_of(node: Node) -> Graph | None:
    """The sub-graph a context node holds, if any."""
    op = node.op
    return op.body if isinstance(op, CONTEXT_OPS) else None


def format_node(node: Node) -> str:
    """One node as one line: ``%3 = add(%2, 1)``."""
    return f"{node.ref!r} = {format_op(node.op, node)}"


def invoke_label(invoke: int | None) -> str:
    return "outside invokes" if invoke is None else f"invoke {invoke}"


def program_label(program: ProgramKey) -> str:
    """How a program is named in messages: an invoke, a gradient's, or a loop's later iterations."""
    match program:
        case GradProgram(node):
            return f"the gradient of %{node}"
        case LoopPart(step):
            return f"the later iterations of the loop over calls %{step}"
        case EndProgram(node):
            return f"the cache %{node}"
        case _:
            return invoke_label(program)


def format_graph(graph: Graph, *, indent: str = "  ") -> str:
    """The whole graph, one node per line, inside ``graph { ... }``.

    When the nodes belong to more than one invoke, a header line names the
    invoke wherever it changes.
    """
    if not len(graph):
        return "graph {}"
    lines = _lines(graph, indent, indent)
    if graph.outputs is not None:
        lines.append(f"{indent}outputs {graph.outputs!r}")
    return "graph {\n" + "\n".join(lines) + "\n}"


def _lines(graph: Graph, prefix: str, indent: str) -> list[str]:
    several = len({node.invoke for node in graph.nodes}) > 1
    lines = []
    previous: object = object()
    for node in graph.nodes:
        if several and node.invoke != previous:
            lines.append(f"{prefix}{invoke_label(node.invoke)}:")
            previous = node.invoke
        at = prefix + indent if several else prefix
        body = body_of(node)
        if body is None:
            lines.append(at + format_node(node))
        else:
            lines.append(at + format_node(node) + " {")
            lines.extend(_lines(body, at + indent, indent))
            lines.append(at + "}")
    return lines
