"""Regional compilation: each repeated transformer block compiled once, the graph run region by region.

``torch.compile`` of a whole exported DiT (FLUX.1: 57 blocks, ~7,500 nodes) takes 80 s on one GPU
and did not finish in 7 minutes with the sequence-parallel collectives on two. The blocks of one
module list are the same computation on different weights, so ditpass cuts the rewritten graph into
regions and compiles each distinct one once:

- A *region* is a run of consecutive nodes: one block (nodes whose ``meta["ditpass_block"]`` is the
  block, with the nodes a pass inserted among them), or the glue between blocks (embeddings, the
  final norm and projection, the output gather).
- Each region becomes a function ``f(*weights, *inputs) -> outputs``: the parameters it reads are
  lifted to arguments, so blocks of the same structure give the same graph. Regions are compared by
  a structural key (ops, targets, constants, argument wiring); equal keys share one
  ``torch.compile(..., fullgraph=True)`` callable. FLUX.1: 59 regions, 3 compiled block templates
  (double; single; the last single block, which hands on one value less). Glue runs eagerly, as in
  diffusers' ``compile_repeated_blocks``: compiled, it moved FLUX's output by 7.6% (its RoPE tables), and
  on 2 and 4 GPUs with NCCL the step with compiled glue (which holds the input shard and the output
  all-gather) never came back (benchmarks/results/perf_flux.md, finding 1).
- The top graph that calls the regions in order is an FX graph too (``RegionalModule.top``), so
  what runs can be printed like every other graph.

Weights are passed as aliases made once (``p.detach()``: same storage, so in-place updates of the
parameters are seen; replacing a parameter object is not, rebuild then). A graph break inside a
region is an error (``fullgraph=True``); a graph without block annotations is compiled whole.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx

__all__ = ["RegionalModule", "regions_of", "compile_regions"]


@dataclass
class Region:
    name: str
    block: str | None  # "transformer_blocks.3", or None for glue
    nodes: list[torch.fx.Node]
    params: list[torch.fx.Node] = field(default_factory=list)  # get_attr tensors read, in first-use order
    mods: list[torch.fx.Node] = field(default_factory=list)  # get_attr of submodules (e.g. autocast bodies)
    inputs: list[torch.fx.Node] = field(default_factory=list)  # other outside values read
    outputs: list[torch.fx.Node] = field(default_factory=list)  # values used after the region
    key: tuple = ()
    template: str = ""  # name of the compiled function this region calls


def _label(node: torch.fx.Node) -> str | None:
    return node.meta.get("ditpass_block")


def _is_scalar_op(node: torch.fx.Node) -> bool:
    """Integer arithmetic on sizes (``s0 + s1``, ``chunk_len(s0, 2)``, ``sym_size``): no tensor out."""
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten.sym_size.int:
        return True
    mod = getattr(node.target, "__module__", "") or ""
    if mod in ("_operator", "operator", "math", "builtins") or mod.startswith("torch.sym") or \
            mod == "ditpass.runtime.seq" and node.target.__name__ in ("chunk_len", "local_len"):
        return not isinstance(node.meta.get("val"), torch.Tensor) and not any(
            isinstance(a.meta.get("val"), torch.Tensor) and a.op != "placeholder" for a in node.all_input_nodes)
    return False


def hoist_scalars(graph: torch.fx.Graph) -> int:
    """Move size arithmetic up to just after its inputs, so that a block does not compute a size
    that later blocks read (which would make the first block's region differ from the rest)."""
    moved = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    head = None  # the end of the leading placeholders / get_attrs: sizes of inputs go there
    for n in graph.nodes:
        if n.op not in ("placeholder", "get_attr"):
            break
        head = n
    for node in list(graph.nodes):
        if not _is_scalar_op(node):
            continue
        node.meta.pop("ditpass_block", None)  # a hoisted size belongs to no block (a copy's meta)
        deps = [a for a in node.all_input_nodes if a.op not in ("placeholder", "get_attr")]
        anchor = max(deps, key=lambda a: order[a]) if deps else head
        if anchor is None or anchor.next is node or order[anchor] >= order[node]:
            continue
        anchor.append(node)
        moved += 1
        order = {n: i for i, n in enumerate(graph.nodes)}
    return moved


def regions_of(graph: torch.fx.Graph, root: torch.nn.Module | None = None) -> list[Region]:
    """Cut the call_function nodes of ``graph`` into block and glue regions, in graph order.

    A node without a block label (inserted by a pass, or a size query) joins the block around it
    when the labelled nodes before and after it belong to the same block; otherwise it is glue."""
    body = [n for n in graph.nodes if n.op == "call_function"]
    nxt: list[str | None] = [None] * len(body)
    following = None
    for i in range(len(body) - 1, -1, -1):
        nxt[i] = following
        following = _label(body[i]) or following
    regions: list[Region] = []
    last = None  # label of the last labelled node
    for i, node in enumerate(body):
        lab = _label(node)
        if lab is None and last is not None and nxt[i] == last:
            lab = last
        if not regions or regions[-1].block != lab:
            regions.append(Region(f"region_{len(regions)}", lab, []))
        regions[-1].nodes.append(node)
        last = _label(node) or last
    # a block entered again after its loop (DiT's final modulation) is another region: fine, it is
    # keyed by structure, not by name
    inside: dict[torch.fx.Node, int] = {}
    for k, r in enumerate(regions):
        for n in r.nodes:
            inside[n] = k
    for k, r in enumerate(regions):
        seen: set = set()
        for n in r.nodes:
            for a in n.all_input_nodes:
                if inside.get(a) == k or a in seen:
                    continue
                seen.add(a)
                if a.op != "get_attr":
                    r.inputs.append(a)
                elif root is not None and not isinstance(operator.attrgetter(a.target)(root), torch.Tensor):
                    r.mods.append(a)
                else:
                    r.params.append(a)
        r.outputs = [n for n in r.nodes if any(inside.get(u) != k for u in n.users)]
    return regions


def _structure_key(r: Region, gm: torch.fx.GraphModule) -> tuple:
    """Equal keys mean the region graphs are the same function of (weights, inputs)."""
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


def _region_graph(r: Region, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    root = torch.nn.Module()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, m in enumerate(r.mods):  # submodules stay attributes (the graph calls them by name)
        root.add_module(f"sub{i}", operator.attrgetter(m.target)(gm))
        env[m] = g.get_attr(f"sub{i}")
    for i, p in enumerate(r.params):
        env[p] = g.placeholder(f"w{i}")
    for i, a in enumerate(r.inputs):
        env[a] = g.placeholder(f"x{i}")
    for n in r.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in r.outputs))
    return torch.fx.GraphModule(root, g, f"Region_{r.name}")


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
        regions = regions_of(work, gm)
        self.regions = regions
        self.templates: dict[str, dict] = {}
        by_key: dict[tuple, str] = {}
        calls: dict[str, _Call] = {}
        for r in regions:
            r.key = _structure_key(r, gm)
            name = by_key.get(r.key)
            if name is None:
                name = by_key[r.key] = f"{r.block.rsplit('.', 1)[0] if r.block else 'glue'}_{len(self.templates)}"
                graph = _region_graph(r, gm)
                # glue (embeddings, RoPE tables, final norm) runs eagerly, as diffusers' regional
                # compile leaves it: it is a small share of the time, and inductor's RoPE tables
                # differ from eager ones (7.6% rel. output difference whole-graph vs 1.3% per block)
                fn = compile_fn(graph) if r.block else graph
                self.templates[name] = {"graph": graph, "fn": fn, "regions": [], "compiled": bool(r.block)}
            r.template = name
            self.templates[name]["regions"].append(r.name)
            weights = [operator.attrgetter(p.target)(gm).detach() for p in r.params]
            calls[r.name] = _Call(f"{r.name}__{name}", self.templates[name]["fn"], weights)
        # the top graph: placeholders, one call per region, getitems, the original output
        top = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in work.nodes:
            if n.op == "placeholder":
                env[n] = top.node_copy(n)
        for r in regions:
            call = top.call_function(calls[r.name], tuple(env[a] for a in r.inputs))
            for i, o in enumerate(r.outputs):
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
