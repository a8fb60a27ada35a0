"""Cut an FX graph into parts by a node-to-part callback, as ``torch.fx.passes.split_module`` does.

Regional compile cuts at transformer blocks (one part per block, glue between); PipeFusion cuts at
stage boundaries (stage index per block). Both are this: a callback ``part_of(node)`` names each
node's part, and a part is a run of consecutive nodes with the same key, in graph order.

Legend:

- *key*: what ``part_of`` returns (``"transformer_blocks.3"``, a stage index); ``None`` for a node
  that belongs to no part by itself: a node a pass inserted, a size query.
- *glue*: a part whose key is ``None`` (embeddings, the final norm and projection, an output gather).
- *params*: ``get_attr`` tensors a part reads (weights, per-site scalars), lifted to arguments of
  the part's function so that blocks with the same structure give the same graph.
- *mods*: ``get_attr`` of submodules (e.g. autocast bodies); they stay attributes, the graph calls them.
- *inputs* / *outputs*: the other values a part reads / the values of its nodes used after it.

``partition`` reads the graph and changes nothing; ``part_graph`` builds one part's function;
``hoist_scalars`` is the one rewrite, run before partitioning so that size arithmetic lives in glue.
"""
from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
import torch.fx

__all__ = ["Part", "partition", "part_graph", "hoist_scalars"]


@dataclass
class Part:
    name: str  # part_<i>, in graph order
    key: Hashable | None  # what part_of returned; None for glue
    nodes: list[torch.fx.Node]  # call_function nodes, in graph order
    params: list[torch.fx.Node] = field(default_factory=list)  # get_attr tensors read, first-use order
    mods: list[torch.fx.Node] = field(default_factory=list)  # get_attr of submodules
    inputs: list[torch.fx.Node] = field(default_factory=list)  # other outside values read
    outputs: list[torch.fx.Node] = field(default_factory=list)  # its nodes used after it

    def __repr__(self) -> str:
        return (f"Part({self.name}, key={self.key!r}: {len(self.nodes)} nodes, {len(self.params)} params, "
                f"{len(self.inputs)} inputs -> {len(self.outputs)} outputs)")


def partition(graph: torch.fx.Graph, part_of: Callable[[torch.fx.Node], Hashable | None],
              root: torch.nn.Module | None = None) -> list[Part]:
    """The call_function nodes of ``graph`` cut into parts, in graph order.

    A node whose key is None joins the part around it when the keyed nodes before and after it have
    the same key (what a pass inserted inside a block stays in the block); otherwise it is glue. A
    key that comes back after other parts starts a new part (DiT's final modulation re-enters block
    0 after the loop). ``root`` tells submodules from tensors among the ``get_attr`` nodes; without
    it every ``get_attr`` is a param. Only call_function nodes are cut: that is all export emits,
    but for its ``_guards_fn`` call_module, which nothing reads and no part holds."""
    body = [n for n in graph.nodes if n.op == "call_function"]
    keys = [part_of(n) for n in body]
    after: list[Hashable | None] = [None] * len(body)  # the key of the next keyed node
    following = None
    for i in range(len(body) - 1, -1, -1):
        after[i] = following
        if keys[i] is not None:
            following = keys[i]
    parts: list[Part] = []
    before = None  # the key of the last keyed node
    for i, node in enumerate(body):
        key = keys[i]
        if key is None and before is not None and after[i] == before:
            key = before
        if not parts or parts[-1].key != key:
            parts.append(Part(f"part_{len(parts)}", key, []))
        parts[-1].nodes.append(node)
        if keys[i] is not None:
            before = keys[i]
    _wire(parts, root)
    return parts


def _wire(parts: list[Part], root: torch.nn.Module | None) -> None:
    """Fill each part's params, mods, inputs (first-use order) and outputs."""
    where = {n: k for k, p in enumerate(parts) for n in p.nodes}
    for k, p in enumerate(parts):
        seen: set[torch.fx.Node] = set()
        for n in p.nodes:
            for a in n.all_input_nodes:
                if where.get(a) == k or a in seen:
                    continue
                seen.add(a)
                if a.op != "get_attr":
                    p.inputs.append(a)
                elif root is not None and not isinstance(operator.attrgetter(a.target)(root), torch.Tensor):
                    p.mods.append(a)
                else:
                    p.params.append(a)
        p.outputs = [n for n in p.nodes if any(where.get(u) != k for u in n.users)]


def part_graph(part: Part, gm: torch.nn.Module) -> torch.fx.GraphModule:
    """The function ``f(*params, *inputs) -> tuple(outputs)`` of one part (submodules it calls are
    attributes ``sub<i>``). Parts of the same structure on different weights give the same graph
    (node names aside)."""
    g = torch.fx.Graph()
    holder = torch.nn.Module()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, m in enumerate(part.mods):
        holder.add_module(f"sub{i}", operator.attrgetter(m.target)(gm))
        env[m] = g.get_attr(f"sub{i}")
    for i, p in enumerate(part.params):
        env[p] = g.placeholder(f"w{i}")
    for i, a in enumerate(part.inputs):
        env[a] = g.placeholder(f"x{i}")
    for n in part.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in part.outputs))
    return torch.fx.GraphModule(holder, g, part.name.capitalize())


_TORCH_SYM = {getattr(torch, n) for n in dir(torch) if n.startswith("sym_")}  # sym_max, sym_float, ...


def _is_scalar_op(node: torch.fx.Node) -> bool:
    """Integer arithmetic on sizes (``s0 + s1``, ``(s0 + 1) // 2``, ``sym_size``): no tensor out, no
    computed tensor in. Matched by identity with ``operator`` / ``math`` / ``builtins`` / ``torch.sym_*``
    functions, never by name: a function that happens to be called ``add`` is not one."""
    if node.op != "call_function":
        return False
    t = node.target
    if t is torch.ops.aten.sym_size.int:
        return True
    name = getattr(t, "__name__", None)
    python = isinstance(name, str) and any(getattr(m, name, None) is t for m in (operator, math, builtins))
    if not (python or t in _TORCH_SYM):
        return False
    return not isinstance(node.meta.get("val"), torch.Tensor) and not any(
        a.op != "placeholder" and _maybe_tensor(a) for a in node.all_input_nodes)


def _maybe_tensor(node: torch.fx.Node) -> bool:
    """Passes insert size arithmetic without ``meta["val"]``: a value of unknown type is a tensor
    unless it is size arithmetic itself."""
    if "val" in node.meta:
        return isinstance(node.meta["val"], torch.Tensor)
    return not _is_scalar_op(node)


def hoist_scalars(graph: torch.fx.Graph) -> int:
    """Move size arithmetic up to just after its inputs; returns how many nodes moved.

    Export puts ``s0 + s1`` where it is first needed, often inside the first block; later blocks
    then read it as an input the first block hands on, and the first block's part differs from the
    rest. Hoisted, it sits in the glue before the blocks (and drops its ``ditpass_block`` label: it
    belongs to no block), so every block reads it alike."""
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
        node.meta.pop("ditpass_block", None)
        deps = [a for a in node.all_input_nodes if a.op not in ("placeholder", "get_attr")]
        anchor = max(deps, key=lambda a: order[a]) if deps else head
        if anchor is None or anchor.next is node or order[anchor] >= order[node]:
            continue
        anchor.append(node)
        moved += 1
        order = {n: i for i, n in enumerate(graph.nodes)}
    return moved
