"""Native ``if``/``elif``/``else`` and ``for`` on proxies (nnsight 0.4's control-flow handling).

Inside an open block, ``if proxy:`` records exactly what ``with
tracer.cond(proxy):`` records, with ``elif``/``else`` as the chained
conditions of `Conditional.else_`; ``for item in proxy:`` records what
``with tracer.iter(proxy) as item:`` records. How, with documented
facilities only:

* ``Proxy.__bool__`` (``__iter__``) finds the statement it is the test of:
  the calling frame's current instruction (``frame.f_lasti``) has a source
  position (``code.co_positions()``) equal to that of an ``ast.If``
  (``ast.For``) of the caller's source, read through ``linecache`` (a file,
  or an IPython cell) and parsed with ``ast``.
* It opens the condition (loop) and returns ``True`` (a one-item iterator),
  so Python runs the body once, recording it.
* A trace function on that frame only (``frame.f_trace``; the thread's global
  trace function, installed while such a block is open, hands every other
  frame to whatever trace function was there before) sees the first line
  outside the body and closes the block there. For the next branch of a
  chain it jumps back, as debuggers do (``frame.f_lineno`` from a ``line``
  event): to an ``elif``'s test (whose ``__bool__`` opens the chained
  condition) or into the ``else`` body (whose condition it opens itself).
* When the last block of the thread closes, the previous trace functions
  (a debugger's, coverage's) are put back, on every way out: a branch left
  normally, by an exception, or by the frame returning.

Nothing is installed until a proxy is branched on, and everything lives in
the thread that branched (``sys.settrace`` is per thread). Python 3.11 is
what this was tested on; 3.12+ keeps ``sys.settrace`` and ``f_lineno``
jumps, so the same path is used there (not ``sys.monitoring``).

What cannot work raises a `TraceError` naming the line (see `_explain`).
"""

from __future__ import annotations

import ast
import dis
import linecache
import sys
import threading
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, TypeVar, Union

import attrs

from ..errors import TraceError
from ..graph import SourceLoc

if TYPE_CHECKING:
    from ..proxy import Proxy

TraceFunction = Callable[[FrameType, str, Any], Any]


# --- what this asks of the blocks it opens --------------------------------------------
#
# The blocks (contexts/flow.py) are above this module: they open native flow
# through it (`flow.FlowContext._native_branch`), handing over how to open a
# condition and a loop, and it knows them through these protocols.


class Block(Protocol):
    """A condition or loop block, opened and left as a ``with`` block."""

    @property
    def _open(self) -> bool: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None: ...


class Condition(Block, Protocol):
    """A condition (`flow.Conditional`): the next branch of its chain is an
    ``elif`` (`_chained`) or the ``else`` (`_else`)."""

    def _chained(self, condition: Any, where: SourceLoc | None) -> Condition: ...

    def _else(self, where: SourceLoc | None) -> Condition: ...


class Loop(Block, Protocol):
    """A loop over items (`flow.IteratorContext`)."""


C = TypeVar("C")
In = TypeVar("In", contravariant=True)
B = TypeVar("B", covariant=True)


class Opener(Protocol[In, B]):
    """Opens a block in ``context`` on ``proxy`` (a block class of flow.py)."""

    def __call__(self, context: In, proxy: Any, where: SourceLoc | None, /) -> B: ...

_COMPREHENSIONS = frozenset({"<listcomp>", "<genexpr>", "<setcomp>", "<dictcomp>"})


# --- finding the statement ------------------------------------------------------------


@attrs.frozen
class Branch:
    """One branch of an if/elif/else chain: its test (None for ``else``) and body lines."""

    test: Optional[tuple[int, int]]  # the test's first and last line
    first: int  # the body's first and last line
    last: int


@attrs.frozen
class IfStatement:
    """An ``if`` on a proxy: its chain of branches (``elif`` included)."""

    branches: tuple[Branch, ...]
    node: ast.If = attrs.field(eq=False)


@attrs.frozen
class ForStatement:
    """A ``for`` over a proxy: its body lines."""

    first: int
    last: int


Found = Union[IfStatement, ForStatement]


def _where(frame: FrameType) -> SourceLoc:
    return SourceLoc(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)


def _at(frame: FrameType) -> str:
    return f'File "{frame.f_code.co_filename}", line {frame.f_lineno}'


_TREES: dict[tuple[str, int], tuple[ast.AST, dict[int, tuple[ast.AST, str]]]] = {}
_FOUND: dict[tuple[CodeType, int, str], Union[Found, str]] = {}


def _tree(frame: FrameType) -> tuple[ast.AST, dict[int, tuple[ast.AST, str]]] | None:
    """The caller's source, parsed, with each node's parent (None: no source)."""
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if not lines:
        return None
    key = (filename, hash(tuple(lines)))
    cached = _TREES.get(key)
    if cached is None:
        try:
            tree = ast.parse("".join(lines), filename)
        except SyntaxError:
            return None
        parents: dict[int, tuple[ast.AST, str]] = {}
        for node in ast.walk(tree):
            for field, value in ast.iter_fields(node):
                for child in value if isinstance(value, list) else [value]:
                    if isinstance(child, ast.AST):
                        parents[id(child)] = (node, field)
        if len(_TREES) > 200:
            _TREES.clear()
        cached = _TREES[key] = (tree, parents)
    return cached


def _instruction(frame: FrameType) -> tuple[str, tuple[Any, ...]]:
    """The opcode name and source position of the frame's current instruction."""
    code, offset = frame.f_code, frame.f_lasti
    opname = dis.opname[code.co_code[offset]]
    positions = list(getattr(code, "co_positions")())[offset // 2]  # one per 2-byte code unit (3.11+)
    return opname, tuple(positions)


def find(frame: FrameType, kind: str) -> Found:
    """The ``if`` (kind ``"if"``) or ``for`` (``"for"``) statement the frame is
    testing, or a `TraceError` saying why there is none it can handle."""
    key = (frame.f_code, frame.f_lasti, kind)
    found = _FOUND.get(key)
    if found is None:
        found = _find(frame, kind)
        if len(_FOUND) > 10_000:
            _FOUND.clear()
        _FOUND[key] = found
    if isinstance(found, str):
        raise TypeError(f"{_at(frame)}: {found}")
    return found


_AS_VALUE = (
    "use the explicit form, tracer.cond(...) / cond.else_(...) or session.iter(...), or compute "
    "it in the graph (torch.where, &, |, ~)"
)


def _find(frame: FrameType, kind: str) -> Union[Found, str]:
    what = "the truth value of a traced value" if kind == "if" else "iterating a traced value"
    code = frame.f_code
    if not hasattr(code, "co_positions"):  # Python 3.10
        return f"{what} in a native `{kind}` needs Python 3.11+ (instruction positions); {_AS_VALUE}"
    if code.co_name in _COMPREHENSIONS:
        return f"{what} inside a comprehension is not supported (the model has not run yet); {_AS_VALUE}"
    parsed = _tree(frame)
    if parsed is None:
        return (
            f"{what} in a native `{kind}` needs the source of this code, which is not available "
            f"(code run by exec() or typed into a plain interpreter); {_AS_VALUE}"
        )
    tree, parents = parsed
    opname, (lineno, end_lineno, col, end_col) = _instruction(frame)
    match: ast.AST | None = None
    for node in ast.walk(tree):
        if not (
            isinstance(node, (ast.stmt, ast.expr))
            and node.lineno == lineno
            and node.end_lineno == end_lineno
            and node.col_offset == col
            and node.end_col_offset == end_col
        ):
            continue
        # The instruction is the statement's, or its test's (or a part of an `and`, a `not`).
        while True:
            parent, field = parents.get(id(node), (None, ""))
            if isinstance(parent, ast.BoolOp) or (isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Not)):
                node = parent
            elif isinstance(parent, (ast.If, ast.While, ast.Assert, ast.IfExp)) and field == "test":
                node = parent
            elif isinstance(parent, (ast.For, ast.AsyncFor)) and field == "iter":
                node = parent
            else:
                break
        if match is None or isinstance(node, (ast.If, ast.For, ast.While, ast.Assert, ast.IfExp, ast.BoolOp)):
            match = node
    inside = match
    while inside is not None:
        if isinstance(inside, ast.comprehension) or isinstance(
            inside, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
        ):
            return f"{what} inside a comprehension is not supported (it runs while tracing); {_AS_VALUE}"
        inside = parents.get(id(inside), (None, ""))[0]
    if kind == "for":
        if isinstance(match, ast.For) and opname == "GET_ITER":
            return _for_statement(match)
        return (
            f"{what} is unknown while tracing (the model has not run yet); only a plain "
            "`for item in proxy:` loop is recorded (as session.iter); index it instead (out[0], out[1])"
        )
    if isinstance(match, ast.While):
        return f"`while` on a traced value is not supported (it would loop while tracing); {_AS_VALUE}"
    if isinstance(match, ast.BoolOp) or (isinstance(match, ast.If) and isinstance(match.test, ast.BoolOp)):
        return (
            "`and`/`or` on a traced value is not supported (Python needs its truth value now); "
            "use `&`, `|` on the traced values, or " + _AS_VALUE
        )
    if isinstance(match, ast.If) and ("POP_JUMP" in opname or opname == "TO_BOOL"):
        if isinstance(match.test, ast.UnaryOp) and isinstance(match.test.op, ast.Not):
            return "`if not proxy:` is not supported; write `if ~(proxy):`, or " + _AS_VALUE
        return _if_statement(match, parents)
    return (
        f"{what} is unknown while tracing (the model has not run yet); only the test of a native "
        f"`if` or `elif` is recorded (as tracer.cond); {_AS_VALUE}"
    )


def _exits(body: list[ast.stmt]) -> ast.AST | None:
    """A return/break/continue/yield in ``body`` that would leave it while tracing
    (a break or continue of a loop inside the body is fine)."""
    todo: list[tuple[ast.AST, bool]] = [(node, False) for node in body]  # (node, in a loop of the body)
    while todo:
        node, in_loop = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom, ast.Await)):
            return node
        if isinstance(node, (ast.Break, ast.Continue)) and not in_loop:
            return node
        inner = in_loop or isinstance(node, (ast.For, ast.While, ast.AsyncFor))
        todo.extend((child, inner) for child in ast.iter_child_nodes(node))
    return None


def _falls_off(node: ast.AST, parents: dict[int, tuple[ast.AST, str]]) -> bool:
    """Whether Python runs no further line of the code after ``node`` (it is
    the last statement of its function or module): then nothing comes back
    to the ``elif``/``else`` after the first branch."""
    parent, field = parents.get(id(node), (None, ""))
    if parent is None:
        return True
    siblings = getattr(parent, field)
    if isinstance(siblings, list) and siblings and siblings[-1] is not node:
        return False
    if isinstance(parent, (ast.Module, ast.Interactive, ast.FunctionDef, ast.AsyncFunctionDef)):
        return True
    if isinstance(parent, (ast.For, ast.AsyncFor, ast.While)) and field == "body":
        return False  # back to the loop's head
    if isinstance(parent, (ast.With, ast.AsyncWith)):
        return False  # the block's exit runs on the `with` line
    if isinstance(parent, ast.Try) and parent.finalbody and field != "finalbody":
        return False
    if isinstance(parent, ast.ExceptHandler):
        parent, _ = parents.get(id(parent), (None, ""))
        if parent is None:
            return True
        if isinstance(parent, ast.Try) and parent.finalbody:
            return False
    return _falls_off(parent, parents)


def _lines(body: list[ast.stmt]) -> tuple[int, int]:
    last = body[-1].end_lineno
    assert last is not None
    return body[0].lineno, last


def _if_statement(node: ast.If, parents: dict[int, tuple[ast.AST, str]]) -> Union[IfStatement, str]:
    branches = []
    current: ast.If | None = node
    while current is not None:
        exit_node = _exits(current.body)
        if exit_node is not None:
            return _exit_message(exit_node, "if")
        end = current.test.end_lineno
        assert end is not None
        branches.append(Branch((current.test.lineno, end), *_lines(current.body)))
        orelse = current.orelse
        if len(orelse) == 1 and isinstance(orelse[0], ast.If):
            current = orelse[0]
        else:
            if orelse:
                exit_node = _exits(orelse)
                if exit_node is not None:
                    return _exit_message(exit_node, "else")
                branches.append(Branch(None, *_lines(orelse)))
            current = None
    if len(branches) > 1 and _falls_off(node, parents):
        return (
            "an `if` on a traced value with `elif`/`else` cannot be the last statement of a "
            "function or cell: Python would never come back to the other branches after "
            "the first. Add a statement after it (e.g. `pass`), or use tracer.cond(...) with "
            "cond.else_(...)"
        )
    return IfStatement(tuple(branches), node)


def _exit_message(node: ast.AST, kind: str) -> str:
    name = type(node).__name__.lower()
    return (
        f"`{name}` (line {getattr(node, 'lineno', '?')}) inside a native `{kind}` on a traced "
        "value would act while tracing, not when the graph runs; use nnsight.stop() to end a "
        "loop or a run, or the explicit form"
    )


def _for_statement(node: ast.For) -> Union[ForStatement, str]:
    if node.orelse:
        return "`for ... else` over a traced value is not supported; put the else part after the loop"
    if not isinstance(node.target, (ast.Name, ast.Attribute, ast.Subscript)):
        return (
            "a native `for` over a traced value takes one item (`for item in proxy:`); "
            "unpack the item inside the loop (a, b = item[0], item[1])"
        )
    exit_node = _exits(node.body)
    if exit_node is not None:
        return _exit_message(exit_node, "for")
    return ForStatement(*_lines(node.body))


# --- the per-thread trace functions --------------------------------------------------------


class _Thread(threading.local):
    """This thread's open native blocks, per frame, and the trace function they replaced."""

    def __init__(self) -> None:
        self.frames: dict[FrameType, _FrameTracer] = {}
        self.previous: Any = None  # the trace function before ours (sys.gettrace())


_THREAD = _Thread()


def _global_trace(frame: FrameType, event: str, arg: Any) -> Any:
    """The thread's trace function while a native block is open: other frames
    get whatever the previous one gave them (nothing, when there was none)."""
    previous = _THREAD.previous
    return previous(frame, event, arg) if previous is not None else None


class _Block:
    """An open native ``if`` chain or ``for`` in a frame."""

    def on_line(self, frame: FrameType, line: int, error: Any) -> bool:
        """Handle a line event; False when the block is finished."""
        raise NotImplementedError

    def close(self, error: Any) -> None:
        raise NotImplementedError


class _IfBlock(_Block):
    def __init__(self, statement: IfStatement, branch: Condition) -> None:
        self.statement = statement
        self.index = 0  # the branch being recorded (or, when `waiting`, whose test runs)
        self.branch: Condition | None = branch
        self.last: Condition = branch  # the chain's latest condition
        self.waiting = False  # jumped to an elif's test; its __bool__ comes next

    def on_line(self, frame: FrameType, line: int, error: Any) -> bool:
        branches = self.statement.branches
        if self.waiting:
            for later in branches[self.index :]:
                if later.test is not None and later.test[0] <= line <= later.test[1]:
                    return True  # an elif's test (false plain values go on to the next)
            # The tests were plain values: find the branch Python went into.
            for index in range(self.index, len(branches)):
                if branches[index].first <= line <= branches[index].last:
                    test_value = True if branches[index].test is not None else None
                    self._open(index, test_value, frame)
                    return True
            return False
        current = branches[self.index]
        if current.first <= line <= current.last:
            return True
        self.close(error)
        if error is not None or self.index + 1 >= len(branches):
            return False
        following = branches[self.index + 1]
        if following.test is not None:
            self.index += 1
            self.waiting = True
            self._jump(frame, following.test[0])
        else:
            self._open(self.index + 1, None, frame)
            self._jump(frame, following.first)
        return True

    def _open(self, index: int, condition: Any, frame: FrameType) -> None:
        where = _where(frame)
        branch = self.last._else(where) if condition is None else self.last._chained(condition, where)
        branch.__enter__()
        self.branch = self.last = branch
        self.index = index
        self.waiting = False

    def _jump(self, frame: FrameType, line: int) -> None:
        try:
            frame.f_lineno = line  # type: ignore[misc]  # a jump from a 'line' event (as debuggers do)
        except ValueError as error:  # pragma: no cover - the statement checks make it rare
            if self.branch is not None and self.branch._open:
                self.close(error)
            raise TraceError(
                f"{_at(frame)}: cannot go back to line {line} of a native `if` on a traced value "
                f"({error}); use tracer.cond(...) / cond.else_()"
            ) from None

    def elif_test(self, node: ast.If, proxy: Proxy, frame: FrameType) -> bool:
        """Whether ``node`` is the elif test this chain waits for (then it opens it)."""
        if not self.waiting:
            return False
        branches = self.statement.branches
        for index in range(self.index, len(branches)):  # (after elifs on false plain values)
            if branches[index].test == (node.test.lineno, node.test.end_lineno):
                self._open(index, proxy, frame)
                return True
        return False

    def close(self, error: Any) -> None:
        branch, self.branch = self.branch, None
        _exit(branch, error)


class _ForBlock(_Block):
    def __init__(self, statement: ForStatement, loop: Loop) -> None:
        self.statement = statement
        self.loop: Loop | None = loop

    def on_line(self, frame: FrameType, line: int, error: Any) -> bool:
        if self.statement.first <= line <= self.statement.last:
            return True
        self.close(error)
        return False

    def close(self, error: Any) -> None:
        loop, self.loop = self.loop, None
        _exit(loop, error)


def _exit(block: Any, error: Any) -> None:
    """Leave a native block's context (if still open), as ``with`` would with ``error``."""
    if block is not None and block._open:
        block.__exit__(None if error is None else type(error), error, None)


class _FrameTracer:
    """The local trace function of one frame with open native blocks."""

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self.user: Any = frame.f_trace  # a debugger's local trace function
        self.blocks: list[_Block] = []
        self.error: Any = None  # an exception raised in this frame, not yet handled

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.user is not None:
            self.user = self.user(frame, event, arg)
        try:
            return self._event(frame, event, arg)
        except BaseException as error:
            # (Python drops the thread's trace function when this raises:
            # leave nothing of ours open behind it.)
            while self.blocks:
                try:
                    self.blocks.pop().close(error)
                except BaseException:
                    pass
            self.finish()
            raise

    def _event(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            error, self.error = self.error, None
            line = frame.f_lineno
            while self.blocks and not self.blocks[-1].on_line(frame, line, error):
                self.blocks.pop()
        elif event == "exception":
            self.error = arg[1]
        elif event == "return":
            error, self.error = self.error, None
            while self.blocks:
                self.blocks.pop().close(error)
        if not self.blocks:
            self.finish()
            return self.user
        return self

    def finish(self) -> None:
        """Give the frame (and, if it was the last, the thread) its trace functions back."""
        thread = _THREAD
        if thread.frames.get(self.frame) is self:
            del thread.frames[self.frame]
            self.frame.f_trace = self.user
        if not thread.frames:
            previous, thread.previous = thread.previous, None
            sys.settrace(previous)


def _tracer_of(frame: FrameType) -> _FrameTracer:
    thread = _THREAD
    tracer = thread.frames.get(frame)
    if tracer is None:
        if not thread.frames:
            thread.previous = sys.gettrace()
            sys.settrace(_global_trace)
        tracer = thread.frames[frame] = _FrameTracer(frame)
        frame.f_trace = tracer
    return tracer


# --- what __bool__ and __iter__ call ---------------------------------------------------------


def branch(context: C, proxy: Proxy, frame: FrameType, open_condition: Opener[C, Condition]) -> bool:
    """``if proxy:`` (or ``elif proxy:``) in ``frame``, inside the innermost
    block ``context``: open its condition (``open_condition(context, proxy,
    where)``, a `flow.Conditional`); Python runs the body."""
    found = find(frame, "if")
    assert isinstance(found, IfStatement)
    tracer = _THREAD.frames.get(frame)
    if tracer is not None:
        for block in reversed(tracer.blocks):
            if isinstance(block, _IfBlock) and block.elif_test(found.node, proxy, frame):
                return True
    condition = open_condition(context, proxy, _where(frame))
    tracer = _tracer_of(frame)
    try:
        condition.__enter__()
    except BaseException:
        if not tracer.blocks:
            tracer.finish()
        raise
    tracer.blocks.append(_IfBlock(found, condition))
    return True


def loop(context: C, proxy: Proxy, frame: FrameType, open_loop: Opener[C, Loop]) -> Any:
    """``for item in proxy:`` in ``frame``, inside the innermost block
    ``context``: open its loop (``open_loop(context, proxy, where)``, a
    `flow.IteratorContext`); Python runs the body once, with its item."""
    found = find(frame, "for")
    assert isinstance(found, ForStatement)
    iterator = open_loop(context, proxy, _where(frame))
    tracer = _tracer_of(frame)
    try:
        item = iterator.__enter__()
    except BaseException:
        if not tracer.blocks:
            tracer.finish()
        raise
    tracer.blocks.append(_ForBlock(found, iterator))
    return iter((item,))
