"""nnsight_pure: nnsight's intervention API on an immutable graph core.

``import nnsight_pure as nnsight`` and write nnsight 0.4 code::

    model = nnsight.NNsight(torch_module)
    with model.trace(x):
        hidden = model.layer1.output.save()
        model.layer2.output = model.layer2.output * 0
    print(hidden.value)

Every operation inside the block adds a node to an immutable `Graph`; the
interpreter runs the graph once when the block exits. Graphs are also data:
``graph = nnsight.trace(model, fn)`` builds one without running,
``nnsight.run(model, graph, x)`` replays it, ``to_json``/``from_json`` store
it, ``compose`` and ``prune`` transform it.
"""

from . import notebook as notebook  # (registers how a graph shows itself in Jupyter: graph.display_with)
from . import reducers as reducers
from . import util as util
from .arguments import Ref as Ref
from .caches import clear_caches as clear_caches
from .config import CONFIG as CONFIG
from .config import logger as logger
from .config import remote_logger as remote_logger
from .contexts.editing import EditingTracer as EditingTracer
from .contexts.flow import Conditional as Conditional
from .contexts.flow import IteratorContext as IteratorContext
from .contexts.session import Session as Session
from .contexts.tracer import Invoker as Invoker
from .contexts.tracer import Tracer as Tracer
from .envoy import Envoy as Envoy
from .errors import GraphvizNotFoundError as GraphvizNotFoundError
from .errors import MissedCallsWarning as MissedCallsWarning
from .errors import OutOfOrderError as OutOfOrderError
from .errors import SweepError as SweepError
from .errors import TraceError as TraceError
from .errors import UnexecutedInterventionWarning as UnexecutedInterventionWarning
from .findings import Finding as Finding
from .findings import Findings as Findings
from .functional import check as check
from .functional import edit as edit
from .functional import run as run
from .functional import trace as trace
from .graph import Graph as Graph
from .graph import Node as Node
from .models.language import LanguageModel as LanguageModel
from .models.nnsight import NNsight as NNsight
from .passes import compose as compose
from .passes import prune as prune
from .patching import PatchingResult as PatchingResult
from .patching import patching_sweep as patching_sweep
from .printing import format_graph as format_graph
from .proxy import Proxy as Proxy
from .results import Results as Results
from .serialize import SerializationError as SerializationError
from .serialize import digest as digest
from .serialize import from_json as from_json
from .serialize import to_json as to_json
from .source import SourceLoc as SourceLoc
from .sweeps import SweepResults as SweepResults
from .sweeps import sweep as sweep
from .toplevel import apply as apply
from .toplevel import bool as bool
from .toplevel import bytearray as bytearray
from .toplevel import bytes as bytes
from .toplevel import cache as cache
from .toplevel import complex as complex
from .toplevel import cond as cond
from .toplevel import dict as dict
from .toplevel import float as float
from .toplevel import int as int
from .toplevel import iter as iter
from .toplevel import list as list
from .toplevel import local as local
from .toplevel import log as log
from .toplevel import result as result
from .toplevel import save as save
from .toplevel import set as set
from .toplevel import stop as stop
from .toplevel import str as str
from .toplevel import tuple as tuple
from .util import WrapperModule as WrapperModule
from .vis import render as render
from .vis import to_dot as to_dot

__all__ = [
    "CONFIG",
    "Conditional",
    "EditingTracer",
    "Envoy",
    "Finding",
    "Findings",
    "Graph",
    "GraphvizNotFoundError",
    "Invoker",
    "IteratorContext",
    "LanguageModel",
    "MissedCallsWarning",
    "NNsight",
    "Node",
    "OutOfOrderError",
    "PatchingResult",
    "Proxy",
    "Ref",
    "Results",
    "SerializationError",
    "Session",
    "SourceLoc",
    "SweepError",
    "SweepResults",
    "TraceError",
    "Tracer",
    "UnexecutedInterventionWarning",
    "WrapperModule",
    "apply",
    "bool",
    "bytearray",
    "bytes",
    "cache",
    "check",
    "clear_caches",
    "complex",
    "compose",
    "cond",
    "dict",
    "digest",
    "edit",
    "float",
    "format_graph",
    "from_json",
    "int",
    "iter",
    "list",
    "local",
    "log",
    "logger",
    "patching_sweep",
    "prune",
    "remote_logger",
    "render",
    "run",
    "result",
    "save",
    "set",
    "stop",
    "str",
    "sweep",
    "to_dot",
    "to_json",
    "trace",
    "tuple",
]
