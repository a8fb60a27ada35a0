"""The pass contract and the one runner that applies passes in order.

A pass is a small object: ``enabled(ctx)`` says whether its plan field is on, ``requires(gm, ctx)``
raises if the graph or plan can't take it, ``call(gm, ctx)`` rewrites the graph in place and returns
a `PassResult`, ``ensures(gm, ctx)`` checks what the pass promises afterwards. A pass that is off does
nothing and says so (``PassResult.modified`` is False). The order lives in ``ditpass.passes.registry``.

`run_passes` names the failing pass and the ones that ran before it, and after every pass that
changed the graph it propagates fake values through the whole graph again, so that ``meta["val"]``
is what this rank computes (a sharded tensor has its local length) and the next pass reads true
shapes; then it checks that the outputs still have the shapes the captured module returns.

A pass owns its report: `PassResult` carries its notes, the collectives it inserted, its own tables
(`Table`) and what it did to the module's inputs and outputs (``io``); `ditpass.tools.explain`
renders any pass from these, with no code of its own per pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sympy
import torch
import torch.fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ditpass.analysis import flat

if TYPE_CHECKING:
    from ditpass.analysis import Analysis
    from ditpass.mesh import Placement
    from ditpass.plan import Plan
    from ditpass.runtime.sites import SiteTable
    from ditpass.runtime.state import RunState

__all__ = ["PassContext", "GraphPass", "PassResult", "Collective", "Table", "PassError", "run_passes",
           "propagate", "nbytes"]


class PassError(RuntimeError):
    """A pass refused or failed; the message names it and the passes that ran before."""


@dataclass
class Collective:
    """One communication a pass inserted, for `explain`."""

    node: str  # node name in the rewritten graph
    op: str  # "all_to_all x2" | "all_gather" | "all_gather(k,v)" ...
    axis: str  # mesh axis or flattened group: "ulysses", "ring", "sp", "batch"
    site: str  # what it serves: attention node name, or "output"
    bytes_per_forward: int  # bytes this rank sends per forward (at the captured sizes)


@dataclass
class Table:
    """A table a pass shows in its section of `explain`. ``fold``: the column holding a module path;
    rows equal but for one block index in it print as one row with a count."""

    title: str
    headers: list[str]
    rows: list[list]
    fold: str | None = None


@dataclass
class PassResult:
    name: str
    modified: bool
    added: int = 0
    removed: int = 0
    collectives: list[Collective] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line per decision worth reading (fallbacks!)
    tables: list[Table] = field(default_factory=list)
    io: dict[str, str] = field(default_factory=dict)  # "in <name>" / "out <i>" -> what the pass did to it
    details: dict[str, Any] = field(default_factory=dict)  # plain data for tests and JSON (counts, maps)
    graph_code: str = ""  # the rewritten graph's code, for explain

    def summary(self) -> str:
        if not self.modified and not self.collectives:
            return f"{self.name}: no change" + (f" ({self.notes[0]})" if self.notes else "")
        text = f"{self.name}: +{self.added} / -{self.removed} nodes" if self.modified else f"{self.name}: graph unchanged"
        if self.collectives:
            text += (f", {len(self.collectives)} collectives, "
                     f"{sum(c.bytes_per_forward for c in self.collectives) / 2**20:.2f} MiB sent per forward per rank")
        return text


@dataclass
class PassContext:
    """What every pass may read (and the site table, which passes refine)."""

    analysis: Analysis  # of the graph as captured (node by node; read-only)
    plan: Plan
    placement: Placement  # this rank's coordinates and group names
    sites: SiteTable  # one entry per attention site (`ditpass.runtime.sites`)
    state: RunState | None = None  # the model's state across calls (`ditpass.runtime.state`)
    # graphs a pass makes besides the one it rewrites (PipeFusion's patch graph), by name, for build()
    graphs: dict = field(default_factory=dict)


class GraphPass:
    name = "pass"
    off_note = "off in this plan"

    def enabled(self, ctx: PassContext) -> bool:  # off -> the runner records "no change"
        return True

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        pass

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} must define call()")

    def ensures(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        pass


def nbytes(val) -> int:
    """Bytes of a tensor value at the captured sizes (hints: never ``int()`` a SymInt, which would
    specialise it); 0 for a non-tensor."""
    if not isinstance(val, torch.Tensor):
        return 0
    numel = 1
    for s in val.shape:
        numel *= _size(s)[1] or 1
    return numel * val.element_size()


def _fake_mode(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and getattr(val, "fake_mode", None) is not None:
            return val.fake_mode
    return None


def _size(s) -> tuple:
    """(expr, value at the capture's sizes) of one dim."""
    if not isinstance(s, torch.SymInt):
        return int(s), int(s)
    hint = s.node.hint
    if hint is None:
        hint = s.node.shape_env.size_hint(s.node.expr, allow_none=True)
    return sympy.expand(sympy.sympify(s.node.expr)), hint


def _dims(val) -> tuple | None:
    return tuple(_size(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _same_shape(a, b) -> bool:
    """Equal as exprs, or, where the shape env can't prove two symbols equal (a gathered length read
    from another input of the same size), equal at the capture's sizes."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(ea == eb or (ha is not None and ha == hb) for (ea, ha), (eb, hb) in zip(a, b))


def _outputs(gm: torch.fx.GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in flat(out.args)]


def _wire(n: torch.fx.Node) -> tuple:
    """A node's op and arguments: what tells afterwards whether a pass added or rewired it."""
    return n.target, repr(n.args), repr(n.kwargs)


def _wiring(gm: torch.fx.GraphModule) -> dict:
    return {n: _wire(n) for n in gm.graph.nodes}


def _same_val(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype, a.device, tuple(map(str, a.shape)), tuple(map(str, a.stride()))) == \
            (b.dtype, b.device, tuple(map(str, b.shape)), tuple(map(str, b.stride())))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_val(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and str(a) == str(b)


def propagate(gm: torch.fx.GraphModule, before: dict | None = None) -> int:
    """Run the graph on fake values again and store every recomputed node's ``meta["val"]``.

    With ``before`` (`_wiring` of the graph before a pass), only the nodes the pass added or rewired,
    and the nodes whose inputs' values changed, are run; the rest keep their value. Returns the number
    of nodes run (0 for a graph without fake inputs: a Dynamo piece, a traced toy graph)."""
    mode = _fake_mode(gm)
    if mode is None:
        return 0
    prop = FakeTensorProp(gm, mode)
    changed: set = set()
    ran = 0
    # the python dispatcher, as export traces: ops whose C++ meta needs concrete sizes (constant_pad_nd
    # with a symbolic pad) run their Python meta / decomposition, which takes symbolic ones
    with mode, enable_python_dispatcher():
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                prop.env[node] = node.meta.get("val")
                continue
            fresh = before is None or before.get(node) != _wire(node)
            if not (fresh or "val" not in node.meta or any(a in changed for a in node.all_input_nodes)):
                prop.env[node] = node.meta["val"]
                continue
            old = node.meta.get("val")
            prop.env[node] = prop.run_node(node)
            ran += 1
            if not _same_val(old, node.meta.get("val")):
                changed.add(node)
    return ran


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext, passes: list[GraphPass]) -> list[PassResult]:
    """Apply ``passes`` in order; every failure names the pass and what ran before it."""
    results: list[PassResult] = []
    want = [_dims(v) for v in _outputs(gm)]  # the module's interface: passes keep it
    for p in passes:
        if not p.enabled(ctx):
            results.append(PassResult(p.name, False, notes=[p.off_note]))
            continue
        before = len(gm.graph.nodes)
        names_before = {n.name for n in gm.graph.nodes}
        ran = ", ".join(r.name for r in results) or "none"
        try:
            p.requires(gm, ctx)
            wiring = _wiring(gm)
            res = p.call(gm, ctx)
            gm.graph.lint()
            gm.recompile()
            if propagate(gm, wiring):
                got = [_dims(v) for v in _outputs(gm)]
                if not all(_same_shape(a, b) for a, b in zip(want, got)) or len(want) != len(got):
                    raise PassError(f"pass {p.name!r} (passes run before it: {ran}) changed the output shapes "
                                    f"from {want} to {got}")
            p.ensures(gm, ctx)
        except PassError:
            raise
        except Exception as exc:
            raise PassError(f"pass {p.name!r} failed (passes run before it: {ran}): {type(exc).__name__}: {exc}") from exc
        names_after = {n.name for n in gm.graph.nodes}
        res.added = len(names_after - names_before)
        res.removed = len(names_before - names_after)
        res.modified = res.modified or len(gm.graph.nodes) != before or res.added > 0
        res.graph_code = gm.code
        results.append(res)
    return results
