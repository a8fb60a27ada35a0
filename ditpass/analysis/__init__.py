"""Read-only graph analyses; each writes facts into ``node.meta["ditpass_*"]``.

``analyze(captured)`` runs them in order and returns an `Analysis` summary:

- ``ditpass_attention``: an `AttentionSite` on every op that mixes tokens;
- ``ditpass_token_dims``: ``{dim: Segment-roles}`` on every tensor with a token dim, e.g.
  ``{1: ("text", "visual")}`` for FLUX's joint hidden states, ``{1: ("visual",)}`` for the image;
- ``ditpass_block``: the transformer block (module path) a node belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from .attention import AttentionSite, Segment, find_attention, is_sdpa
from .blocks import BlockGroup, find_blocks, module_path
from .symbolic import ExprClasses, build_classes, dim_exprs, node_val

__all__ = ["analyze", "Analysis", "AttentionSite", "Segment", "BlockGroup", "token_dims", "is_sdpa"]


@dataclass
class Analysis:
    graph_module: torch.fx.GraphModule
    classes: ExprClasses
    sites: list[AttentionSite]
    block_groups: list[BlockGroup]
    token_classes: dict[sympy.Expr, tuple[str, ...]]  # class representative -> segment roles
    inputs: dict[str, dict[int, tuple[str, ...]]] = field(default_factory=dict)  # placeholder -> token dims
    outputs: list[dict[int, tuple[str, ...]]] = field(default_factory=list)

    @property
    def transformer_blocks(self) -> list[BlockGroup]:
        """Block groups that hold attention: the repeated transformer blocks."""
        with_attn = {s.block for s in self.sites if s.block}
        return [g for g in self.block_groups if any(b.path in with_attn for b in g.blocks)]

    def sites_of(self, kind: str) -> list[AttentionSite]:
        return [s for s in self.sites if s.kind == kind]

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out


def token_dims(node: torch.fx.Node) -> dict[int, tuple[str, ...]]:
    """Token dims of a node's (first) tensor value, as written by `analyze`."""
    td = node.meta.get("ditpass_token_dims")
    if isinstance(td, list):
        return td[0] if td else {}
    return td or {}


def _token_classes(classes: ExprClasses, sites: list[AttentionSite]) -> dict[sympy.Expr, tuple[str, ...]]:
    """Lengths that are a sequence (or a segment of one) that some self/joint attention mixes."""
    out: dict[sympy.Expr, tuple[str, ...]] = {}
    for s in sites:
        if s.kind not in ("self", "joint", "text", "matmul"):
            if s.kind == "cross":  # the query side of cross attention is a visual sequence
                for seg in s.segments:
                    if seg.role == "visual" and seg.length.free_symbols:
                        out.setdefault(classes.find(seg.length), ("visual",))
            continue
        if not s.q_len.free_symbols:
            continue  # constant lengths are never told apart from other constants
        roles = tuple(seg.role for seg in s.segments)
        out.setdefault(classes.find(s.q_len), roles)
        for seg in s.segments:
            if seg.length.free_symbols:
                out.setdefault(classes.find(seg.length), (seg.role,))
    return out


def _dims_of(val, classes: ExprClasses, tcls) -> dict[int, tuple[str, ...]] | None:
    shape = dim_exprs(val)
    if shape is None:
        return None
    return {i: tcls[classes.find(e)] for i, e in enumerate(shape) if e.free_symbols and classes.find(e) in tcls}


def analyze(obj) -> Analysis:
    """Analyse a `Captured` (its first graph) or a GraphModule."""
    gm = obj.graph_module if hasattr(obj, "graph_module") else obj
    graph = gm.graph
    classes = build_classes(graph)
    sites = find_attention(graph, classes)
    groups = find_blocks(graph)
    tcls = _token_classes(classes, sites)
    inputs: dict[str, dict] = {}
    for node in graph.nodes:
        val = node_val(node)
        if isinstance(val, (list, tuple)):
            td = [_dims_of(v, classes, tcls) or {} for v in val]
            if any(td):
                node.meta["ditpass_token_dims"] = td
        else:
            td = _dims_of(val, classes, tcls)
            if td:
                node.meta["ditpass_token_dims"] = td
                if node.op == "placeholder":
                    inputs[node.name] = td
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = []
    for a in _flat(out_node.args):
        outs.append(token_dims(a) if isinstance(a, torch.fx.Node) else {})
    return Analysis(gm, classes, sites, groups, tcls, inputs, outs)


def _flat(a):
    if isinstance(a, (list, tuple)):
        for x in a:
            yield from _flat(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flat(x)
    else:
        yield a
