"""Regional compilation: each repeated transformer block compiled once, the graph run region by region.

``torch.compile`` of a whole exported DiT (FLUX.1: 57 blocks, ~7,500 nodes) takes 80 s on one GPU
and did not finish in 7 minutes with the sequence-parallel collectives on two. The blocks of one
module list are the same computation on different weights, so ditpass cuts the rewritten graph into
regions and compiles each distinct one once:

- A *region* is a part of the graph cut by `ditpass.analysis.partition` with
  ``meta["ditpass_block"]`` as the key: one run of a block (with the nodes a pass inserted among
  them), or the glue between blocks (embeddings, the final norm and projection, the output gather).
  Size arithmetic is hoisted into the glue first (`hoist_scalars`), so no block computes a size
  that later blocks read.
- Each region runs as its part's function ``f(*weights, *inputs) -> outputs`` (`part_graph`): the
  parameters it reads are lifted to arguments, so blocks of the same structure give the same graph.
  Regions are compared by a structural key (ops, targets, constants, argument wiring, params by
  shape and dtype; here, not in the partitioner, as it is what compile reuse needs); equal keys
  share one ``torch.compile(..., fullgraph=True)`` callable. FLUX.1: 59 regions, 3 compiled block
  templates (double; single; the last single block, which hands on one value less). Glue runs
  eagerly, as in diffusers' ``compile_repeated_blocks``: compiled, it moved FLUX's output by 7.6%
  (its RoPE tables), and on 2 and 4 GPUs with NCCL the step with compiled glue (which holds the
  input shard and the output all-gather) never came back (benchmarks/results/perf_flux.md,
  finding 1).
- The top graph that calls the regions in order is an FX graph too (``RegionalModule.top``), so
  what runs can be printed like every other graph.

Weights are passed as aliases made once (``p.detach()``: same storage, so in-place updates of the
parameters are seen; replacing a parameter object is not, rebuild then). A graph break inside a
region is an error (``fullgraph=True``); a graph without block annotations is compiled whole.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from ..analysis.partition import Part, hoist_scalars, part_graph, partition

__all__ = ["RegionalModule", "regions_of", "compile_regions"]


@dataclass
class Region:
    """A part as regional compile runs it: its structure key and the template it calls."""
    part: Part
    structure: tuple  # equal structures: the same function of (weights, inputs), one compiled template
    template: str = ""

    @property
    def name(self) -> str:
        return self.part.name

    @property
    def block(self) -> str | None:  # "transformer_blocks.3", or None for glue
        return self.part.key


def _label(node: torch.fx.Node) -> str | None:
    return node.meta.get("ditpass_block")


def regions_of(graph: torch.fx.Graph, root: torch.nn.Module | None = None) -> list[Part]:
    """``graph`` cut at transformer blocks: one part per run of a block, glue between."""
    return partition(graph, _label, root)


def _structure_key(r: Part, gm: torch.fx.GraphModule) -> tuple:
    """Equal keys mean the parts' graphs (`part_graph`) are the same function of (params, inputs).
    Params count by shape and dtype only: blocks that read other weights, or another attention
    site's scalar (``site_7 = self.site_7``), share a template."""
    index: dict[torch.fx.Node, tuple] = {}
    for i, p in enumerate(r.params):
        t = operator.attrgetter(p.target)(gm)
        index[p] = ("param", i, tuple(t.shape), str(t.dtype))
    for i, a in enumerate(r.inputs):
        index[a] = ("input", i)
    for i, m in enumerate(r.mods):
        sub = operator.attrgetter(m.target)(gm)
        index[m] = ("module", i, type(sub).__name__, sub.code if isinstance(sub, torch.fx.GraphModule) else id(sub))
    out = []

    def ref(v):  # nodes by their place in the region, constants by value
        if isinstance(v, torch.fx.Node):
            return index[v]
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(ref(x) for x in v))
        if isinstance(v, dict):
            return tuple(sorted((k, ref(x)) for k, x in v.items()))
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), str(v.dtype), v.data_ptr())
        return (type(v).__name__, repr(v))

    for j, n in enumerate(r.nodes):
        index[n] = ("node", j)
        target = n.target
        out.append((getattr(target, "__module__", ""), getattr(target, "__qualname__", str(target)), id(target),
                    ref(n.args), ref(n.kwargs)))
    out.append(tuple(index[o] for o in r.outputs))
    return tuple(out)


class _Call:
    """What the top graph calls for one region: the shared compiled function with its weights."""

    def __init__(self, name: str, fn, weights: list[torch.Tensor]):
        self.__name__ = self.__qualname__ = name
        self.fn, self.weights = fn, weights

    def __call__(self, *inputs):
        return self.fn(*self.weights, *inputs)


class RegionalModule(torch.nn.Module):
    """Runs a rewritten graph region by region, each distinct region compiled once.

    ``top`` is the FX graph of region calls; ``templates`` maps a template name to its region
    graph (``GraphModule``) and the regions that use it."""

    def __init__(self, gm: torch.fx.GraphModule, compile_fn):
        super().__init__()
        work = torch.fx.Graph()  # a copy: the rewritten graph stays as the passes left it
        work.output(work.graph_copy(gm.graph, {}))
        work._codegen = gm.graph._codegen
        hoist_scalars(work)
        self.regions = [Region(part, _structure_key(part, gm)) for part in regions_of(work, gm)]
        self.templates: dict[str, dict] = {}
        by_key: dict[tuple, str] = {}
        calls: dict[str, _Call] = {}
        for r in self.regions:
            name = by_key.get(r.structure)
            if name is None:
                name = by_key[r.structure] = f"{r.block.rsplit('.', 1)[0] if r.block else 'glue'}_{len(self.templates)}"
                graph = part_graph(r.part, gm)
                # glue (embeddings, RoPE tables, final norm) runs eagerly, as diffusers' regional
                # compile leaves it: it is a small share of the time, and inductor's RoPE tables
                # differ from eager ones (7.6% rel. output difference whole-graph vs 1.3% per block)
                fn = compile_fn(graph) if r.block else graph
                self.templates[name] = {"graph": graph, "fn": fn, "regions": [], "compiled": bool(r.block)}
            r.template = name
            self.templates[name]["regions"].append(r.name)
            weights = [operator.attrgetter(p.target)(gm).detach() for p in r.part.params]
            calls[r.name] = _Call(f"{r.name}__{name}", self.templates[name]["fn"], weights)
        # the top graph: placeholders, one call per region, getitems, the original output
        top = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in work.nodes:
            if n.op == "placeholder":
                env[n] = top.node_copy(n)
        for r in self.regions:
            call = top.call_function(calls[r.name], tuple(env[a] for a in r.part.inputs))
            for i, o in enumerate(r.part.outputs):
                env[o] = top.call_function(operator.getitem, (call, i))
        out = next(n for n in work.nodes if n.op == "output")
        top.node_copy(out, lambda a: env[a])
        top._codegen = gm.graph._codegen
        self.top = torch.fx.GraphModule(torch.nn.Module(), top, "RegionalTop")
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(gm, attr):
                setattr(self.top, attr, getattr(gm, attr))
        self.top.recompile()

    def forward(self, *args, **kwargs):
        return self.top(*args, **kwargs)

    def describe(self) -> str:
        compiled = sum(t["compiled"] for t in self.templates.values())
        lines = [f"{len(self.regions)} regions, {len(self.templates)} templates ({compiled} compiled)"]
        for name, t in self.templates.items():
            nodes = len([n for n in t["graph"].graph.nodes if n.op == "call_function"])
            lines.append(f"  {name}: {len(t['regions'])} region(s), {nodes} ops, "
                         f"{'compiled' if t['compiled'] else 'eager (glue)'}")
        return "\n".join(lines)


def compile_regions(gm: torch.fx.GraphModule, **compile_kwargs) -> torch.nn.Module:
    """``gm`` compiled region by region (repeated blocks once); whole if it has no block labels."""
    kw = dict(fullgraph=True, dynamic=False)
    kw.update(compile_kwargs)
    if not any(_label(n) for n in gm.graph.nodes):
        return torch.compile(gm, **kw)
    return RegionalModule(gm, lambda g: torch.compile(g, **kw))
