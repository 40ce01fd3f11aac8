"""What the library knows about ops: effects, purity, aliasing, and the whitelist.

Each fact about an operation kind lives here once, and every layer asks this
module instead of keeping its own table:

* `writes_in_place` and `aliases_argument`: which nodes write into their
  first argument, and which values may share storage with it (the plan's
  out-of-order guard);
* `is_pure`: which nodes can be dropped when nothing uses their value
  (`passes.prune`);
* `safe_on_fakes`: which ops may be computed on fake tensors (`scan`);
* `TRACE_OPS`, `PLAIN_OPS`, `CONTEXT_OPS`: which kinds touch a model, which
  hold nothing but their fields, which hold a body: these live with the
  kinds, in ops.py;
* the whitelist of callables a document may name (`whitelisted_name`,
  `resolve_whitelisted`, `METHOD_NAMES`, `SAFE_DUNDERS`), which the JSON
  reader and writer enforce and `is_pure` trusts.

Pure: tables and predicates; nothing here runs an op.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from .caches import WHITELIST
from .ops import (
    ApplyModule,
    Bridge,
    Cache,
    Call,
    CallMethod,
    Export,
    GetAttr,
    Grad,
    IterItem,
    ModuleAttr,
    ModuleGet,
    Op,
    Result,
    SetAttr,
    print_at_run_time,
)

if TYPE_CHECKING:
    from .graph import Node

# --- kinds of ops ---------------------------------------------------------------------

# `CONTEXT_OPS`, `TRACE_OPS` and `PLAIN_OPS` are facts of the kinds alone: they
# live in ops.py, with the kinds (graph.py reads them, and must not import this
# module, which names graph nodes).

# --- writes and aliases ---------------------------------------------------------------

IN_PLACE_NAMES = ("iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul",
                  "ior", "ipow", "irshift", "isub", "itruediv", "ixor", "setitem", "delitem")
"""The `operator` functions that write into their first argument, by name."""

IN_PLACE_FUNCTIONS = frozenset(
    {
        operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
        operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
        operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    }
)
"""The functions a `Call` of which writes into its first argument."""

NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "register_hook"})
"""Names ending in ``_`` (torch's in-place spelling) that change no values."""

VIEW_METHODS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "narrow", "select", "squeeze", "unsqueeze",
        "transpose", "t", "permute", "expand", "expand_as", "flatten", "unflatten", "detach",
        "as_strided", "diagonal", "movedim", "swapaxes", "swapdims", "unfold", "split", "chunk",
        "unbind", "tensor_split", "contiguous", "__getitem__", "real", "imag", "view_as_real",
        "T", "mT", "H", "mH", "data",
    }
)
"""Tensor methods whose result shares storage with their receiver: writing
into the result writes into the module's value."""


def _in_place_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_") and name not in NOT_WRITES


def writes_in_place(node: Node) -> bool:
    """True when running the node writes into its first argument."""
    op = node.op
    if isinstance(op, SetAttr):
        return True
    if isinstance(op, Call):
        return op.fn in IN_PLACE_FUNCTIONS or _in_place_name(op.name)
    if isinstance(op, CallMethod):
        return _in_place_name(op.name)
    return False


is_inplace = writes_in_place  # the plan's name for it


def aliases_argument(node: Node) -> bool:
    """True when the node's value may share storage with its first argument."""
    op = node.op
    if isinstance(op, GetAttr):
        return True
    if isinstance(op, CallMethod):
        return op.name in VIEW_METHODS
    if isinstance(op, Call):
        return op.fn is operator.getitem or op.name in VIEW_METHODS
    return False


# --- the whitelist of callables -------------------------------------------------------

SAFE_BUILTINS = frozenset(
    {
        "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "float", "int",
        "isinstance", "len", "list", "max", "min", "pow", "print", "range", "reversed", "round",
        "set", "slice", "sorted", "str", "sum", "tuple", "zip",
    }
)
"""The builtins a document may call, by name (``print`` is the only one with an effect)."""

TORCH_NAMESPACES: dict[str, tuple[Any, frozenset[int]]] = {
    name: (namespace, frozenset(id(value) for value in vars(operators).values() if callable(value)))
    for name, namespace, operators in (
        ("torch.linalg", torch.linalg, getattr(torch._C, "_linalg")),
        ("torch.special", torch.special, getattr(torch._C, "_special")),
        ("torch.fft", torch.fft, getattr(torch._C, "_fft")),
    )
}
"""Each namespace, with (the identities of) torch's generated operators (ATen
functions: C code made from ``native_functions.yaml``) its names may stand for."""

_NOT_ON_THE_LIST = frozenset({"from_file"})  # reads and writes files
TORCH_FUNCTIONS = frozenset(
    name for name in dir(torch._C._VariableFunctions) if not name.startswith("_") and name not in _NOT_ON_THE_LIST
)
"""``torch.<name>``: torch's generated tensor operators (``torch.sum``,
``torch.matmul``, ...), every one a C function of tensors and numbers."""

FUNCTIONAL = frozenset(
    """
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
    adaptive_max_pool1d_with_indices adaptive_max_pool2d adaptive_max_pool2d_with_indices
    adaptive_max_pool3d adaptive_max_pool3d_with_indices affine_grid alpha_dropout avg_pool1d
    avg_pool2d avg_pool3d batch_norm bilinear binary_cross_entropy binary_cross_entropy_with_logits
    celu celu_ channel_shuffle conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d
    conv_transpose3d cosine_embedding_loss cosine_similarity cross_entropy ctc_loss dropout
    dropout1d dropout2d dropout3d elu elu_ embedding embedding_bag feature_alpha_dropout fold
    fractional_max_pool2d fractional_max_pool2d_with_indices fractional_max_pool3d
    fractional_max_pool3d_with_indices gaussian_nll_loss gelu glu grid_sample group_norm
    gumbel_softmax hardshrink hardsigmoid hardswish hardtanh hardtanh_ hinge_embedding_loss
    huber_loss instance_norm interpolate kl_div l1_loss layer_norm leaky_relu leaky_relu_ linear
    local_response_norm log_softmax logsigmoid lp_pool1d lp_pool2d lp_pool3d margin_ranking_loss
    max_pool1d max_pool1d_with_indices max_pool2d max_pool2d_with_indices max_pool3d
    max_pool3d_with_indices max_unpool1d max_unpool2d max_unpool3d mish mse_loss
    multi_head_attention_forward multi_margin_loss multilabel_margin_loss
    multilabel_soft_margin_loss native_channel_shuffle nll_loss normalize one_hot pad
    pairwise_distance pdist pixel_shuffle pixel_unshuffle poisson_nll_loss prelu relu relu6 relu_
    rms_norm rrelu rrelu_ scaled_dot_product_attention selu selu_ sigmoid silu smooth_l1_loss
    soft_margin_loss softmax softmin softplus softshrink softsign tanh tanhshrink threshold
    threshold_ triplet_margin_loss unfold upsample upsample_bilinear upsample_nearest
    """.split()
)
"""``torch.nn.functional.<name>``: its tensor functions, written out (not
"whatever the namespace holds": it also holds ``handle_torch_function``,
which calls what it is given, and ``Tensor``, a class)."""

SAFE_DUNDERS = frozenset(
    name
    for name in dir(operator)
    if name.startswith("__") and name.endswith("__") and name[2:-2] in dir(operator) and name != "__call__"
) | {"__len__", "__float__", "__int__", "__bool__", "__complex__", "__reversed__"}
"""Dunder names that are plain operators (``__add__``, ``__getitem__``), not
the object machinery (``__class__``, ``__reduce_ex__``, ``__init_subclass__``).
Calling an arbitrary value (``operator.call``) is not on the list either: with
it, a method fetched as an attribute would escape the method list below."""

CALLBACK_TAKERS = frozenset(
    {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook"}
)
"""Tensor methods that call a function they are given: left out, so that no
value of a run (a bound method read as an attribute) can be called."""

WITH_EFFECTS = frozenset(
    {"storage", "untyped_storage", "from_file", "share_memory_", "pin_memory", "tofile", "dump", "record_stream"}
)
"""Methods whose value or effect reaches past tensor math: storage objects
(``storage.from_file`` maps a file), shared memory, files."""

METHOD_NAMES = (
    frozenset(
        name
        for kind in (torch.Tensor, list, dict, set, str, tuple, int, float, bytes)
        for name in dir(kind)
        if not name.startswith("_")
    )
    | {"to_tuple"}  # transformers' ModelOutput
) - {"format", "format_map"} - CALLBACK_TAKERS - WITH_EFFECTS  # str.format reads attributes: "{0.__class__}".format(x)
"""Method names a graph may call (`CallMethod`): those of tensors and of
Python's plain containers, numbers and strings; nothing that reads files."""


def resolve_whitelisted(name: str) -> Callable[..., Any] | None:
    """The callable a whitelisted qualified name stands for, or ``None`` for
    every name off the list."""
    module, _, attribute = name.rpartition(".")
    found: Any = None
    if attribute.startswith("_") and attribute not in SAFE_DUNDERS:
        found = None
    elif module == "operator" and attribute not in ("call", "attrgetter", "methodcaller"):
        found = getattr(operator, attribute, None)
    elif name == "nnsight_pure.print":
        found = print_at_run_time  # what log nodes call: the builtin as it is at run time
    elif module == "builtins" and attribute in SAFE_BUILTINS:
        found = getattr(builtins, attribute)
    elif module == "math":
        found = getattr(math, attribute, None)
    elif module == "torch" and attribute in TORCH_FUNCTIONS:
        found = getattr(torch, attribute, None)
    elif module == "torch.Tensor" and (attribute in METHOD_NAMES or attribute in SAFE_DUNDERS):
        found = getattr(torch.Tensor, attribute, None)
        if isinstance(found, type):
            found = None
    elif module == "torch.nn.functional" and attribute in FUNCTIONAL:
        found = getattr(torch.nn.functional, attribute, None)
    elif module in TORCH_NAMESPACES:
        namespace, operators = TORCH_NAMESPACES[module]
        found = getattr(namespace, attribute, None)
        if id(found) not in operators:
            found = None  # not one of torch's generated operators (a helper, a class)
    return found if callable(found) else None


def whitelist_index() -> dict[int, tuple[str, Any]]:
    """Every whitelisted callable by identity, with its name (built once, kept
    in `caches.WHITELIST`)."""
    index = WHITELIST.table
    if not index:
        names = [f"torch.{name}" for name in sorted(TORCH_FUNCTIONS)]
        names += [f"torch.Tensor.{name}" for name in sorted(dir(torch.Tensor))]
        for prefix, (namespace, _) in TORCH_NAMESPACES.items():
            names += [f"{prefix}.{name}" for name in sorted(dir(namespace)) if not name.startswith("_")]
        names += [f"torch.nn.functional.{name}" for name in sorted(FUNCTIONAL)]
        names += [f"operator.{name}" for name in sorted(dir(operator)) if not name.startswith("_")]
        names += [f"math.{name}" for name in sorted(dir(math)) if not name.startswith("_")]
        names += [f"builtins.{name}" for name in sorted(SAFE_BUILTINS)]
        built: dict[int, tuple[str, Any]] = {}
        for name in names:
            found = resolve_whitelisted(name)
            if found is not None:
                built.setdefault(id(found), (name, found))
        built[id(print_at_run_time)] = ("nnsight_pure.print", print_at_run_time)
        index.update(built)
    return index


def whitelisted_name(fn: Any) -> str | None:
    """The whitelisted qualified name of ``fn`` (``torch.sum``,
    ``operator.add``), or ``None`` if it has none. Compare `ops.callable_name`,
    the display name every callable has."""
    entry = whitelist_index().get(id(fn))
    return entry[0] if entry is not None and entry[1] is fn else None


# --- purity ---------------------------------------------------------------------------

PURE_OPERATORS = frozenset(
    getattr(operator, name)
    for name in dir(operator)
    if not name.startswith("_") and name not in IN_PLACE_NAMES
    and name not in ("attrgetter", "methodcaller", "itemgetter", "call")
)
"""`operator` functions with no effect (not the in-place ones, not those that call)."""

PURE_BUILTINS = frozenset(getattr(builtins, name) for name in SAFE_BUILTINS - {"print"})
"""The safe builtins, less ``print``: none has an effect."""

RANDOM_PARTS = ("rand", "normal", "bernoulli", "multinomial", "dropout", "poisson", "uniform",
                "exponential", "cauchy", "geometric", "gumbel", "sample", "rrelu")
"""Parts of torch names that draw random numbers (dropping such a call changes the generator's state)."""

EFFECTFUL_METHODS = frozenset(
    {"add", "sort", "append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault",
     "discard", "popitem", "reverse", "backward", "register_hook", "register_post_accumulate_grad_hook",
     "retain_grad", "record_stream", "put", "index_put", "apply_"}
)
"""Method names that change their receiver (of a tensor, or of a plain container) or a gradient."""

_TENSOR_METHODS = frozenset(dir(torch.Tensor))


def _pure_name(name: str) -> bool:
    """A torch function or tensor method name that neither writes in place nor draws random numbers."""
    return not name.endswith("_") and not any(part in name for part in RANDOM_PARTS)


def pure_call(fn: object, kwargs: Mapping[str, object]) -> bool:
    """Whether calling ``fn`` with these keyword names has no effect: a pure
    operator or builtin, a `math` function, or a whitelisted torch function
    or tensor method that neither writes in place nor draws random numbers."""
    if "out" in kwargs:
        return False
    if fn in PURE_OPERATORS or fn in PURE_BUILTINS:
        return True
    if getattr(fn, "__module__", None) == "math":
        return True
    name = whitelisted_name(fn)
    if name is None or not name.startswith("torch."):
        return False
    last = name.rpartition(".")[2]
    if name.startswith("torch.Tensor."):
        return pure_method(last, kwargs)
    return _pure_name(last)


def pure_method(name: str, kwargs: Mapping[str, object]) -> bool:
    """Whether calling the tensor method ``name`` has no effect."""
    if "out" in kwargs or name not in _TENSOR_METHODS or name in EFFECTFUL_METHODS:
        return False
    if name.startswith("__"):
        function = getattr(operator, name, None)
        return function is not None and function in PURE_OPERATORS
    return _pure_name(name)


def is_pure(node: Node) -> bool:
    """True when dropping ``node``, if nothing uses its value, cannot change a
    run's values: a read, or a computation known to write nothing in place
    and draw no random numbers. Anything unknown counts as an effect."""
    match node.op:
        case ModuleGet() | ModuleAttr() | Grad() | Export() | Bridge() | Result() | Cache():
            return True
        case Call(fn):
            return pure_call(fn, node.kwargs)
        case CallMethod(name):
            return pure_method(name, node.kwargs)
        case GetAttr() | IterItem():
            return True
        case _:
            return False


# --- fake tensors ---------------------------------------------------------------------

NOT_ON_FAKES = frozenset({"backward", "retain_grad", "register_hook", "item", "tolist", "numpy"})
"""Methods a scan never calls on fake values: effects, or a real value's data."""


def safe_on_fakes(op: Op) -> bool:
    """Whether computing ``op`` on fake values is safe: torch and operator
    functions and tensor methods, never arbitrary Python (it could have effects)."""
    if isinstance(op, Call):
        module = getattr(op.fn, "__module__", None) or ""
        return (
            module.startswith("torch")
            or module in ("_operator", "operator")
            or getattr(op.fn, "__objclass__", None) is torch._C.TensorBase
            or op.fn in (getattr, len)
        )
    if isinstance(op, CallMethod):
        return op.name not in NOT_ON_FAKES
    return isinstance(op, (GetAttr, ModuleAttr, ApplyModule))
