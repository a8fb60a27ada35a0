"""Read-only graph analyses; each writes facts into ``node.meta["ditpass_*"]``.

``analyze(captured)`` runs them in order and returns an `Analysis` summary:

- ``ditpass_attention``: an `AttentionSite` on every op that mixes tokens;
- ``ditpass_token_dims``: ``{dim: Segment-roles}`` on every tensor with a token dim, e.g.
  ``{1: ("text", "visual")}`` for FLUX's joint hidden states, ``{1: ("visual",)}`` for the image,
  ``{1: ("text",)}`` for text that is only attended to (cross-attention K/V);
- ``ditpass_block``: the transformer block (module path) a node belongs to.

`Analysis.token_classes` are the sequences a sequence-parallel pass shards: what self / joint /
text attention mixes (and the segments of it), and the query side of cross attention.
`Analysis.context_classes` are sequences that are only keys/values (cross-attention text, the
text of a pooler). Both are symbolic: a length that export specialised to a constant is in
neither (it cannot be told from other constants); `Analysis.const_segments` lists such sites.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from .attention import AttentionSite, Segment, find_attention, is_sdpa, visual_symbols
from .blocks import BlockGroup, find_blocks, module_path
from .symbolic import ExprClasses, build_classes, dim_exprs, node_val

__all__ = ["analyze", "Analysis", "AttentionSite", "Segment", "BlockGroup", "token_dims", "is_sdpa", "flat"]


@dataclass
class Analysis:
    graph_module: torch.fx.GraphModule
    classes: ExprClasses
    sites: list[AttentionSite]
    block_groups: list[BlockGroup]
    token_classes: dict[sympy.Expr, tuple[str, ...]]  # class representative -> segment roles
    inputs: dict[str, dict[int, tuple[str, ...]]] = field(default_factory=dict)  # placeholder -> token dims
    outputs: list[dict[int, tuple[str, ...]]] = field(default_factory=list)
    context_classes: dict[sympy.Expr, tuple[str, ...]] = field(default_factory=dict)  # K/V-only sequences
    visual: set = field(default_factory=set)  # symbols of the visual token count (they size the output)

    @property
    def const_segments(self) -> list[AttentionSite]:
        """Sites with a sequence segment of constant length (specialised by export): its role
        cannot be read from the sizes."""
        return [s for s in self.sites if any(g.role == "const" for g in s.segments + s.kv_segments)]

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
    """Lengths that are a sequence (or a segment of one) that some self/joint attention mixes,
    and the query sequence of cross attention."""
    out: dict[sympy.Expr, tuple[str, ...]] = {}
    for s in sites:
        if s.kind == "cross":  # the query side of cross attention is a visual sequence
            for seg in s.segments:
                if seg.role == "visual" and seg.length.free_symbols:
                    out.setdefault(classes.find(seg.length), ("visual",))
            continue
        if s.kind not in ("self", "joint", "text", "matmul"):
            continue  # pooler, temporal (frames; the tokens are in the batch), other
        if not s.q_len.free_symbols:
            continue  # constant lengths are never told apart from other constants
        roles = tuple(seg.role for seg in s.segments)
        out.setdefault(classes.find(s.q_len), roles)
        for seg in s.segments:
            if seg.length.free_symbols:
                out.setdefault(classes.find(seg.length), (seg.role,))
    return out


def _context_classes(classes: ExprClasses, sites: list[AttentionSite], tcls) -> dict[sympy.Expr, tuple[str, ...]]:
    """Key/value sequences that are not token classes: cross-attention text, a pooler's text (and
    the keys of any other site whose query is not a token sequence)."""
    out: dict[sympy.Expr, tuple[str, ...]] = {}
    for s in sites:
        if s.kind in ("self", "joint", "text", "matmul", "temporal"):
            continue
        for seg in s.kv_segments:
            c = classes.find(seg.length)
            if seg.length.free_symbols and c not in tcls and seg.role != "visual":
                out.setdefault(c, (seg.role,))
        if len(s.kv_segments) > 1 and s.kv_len.free_symbols and classes.find(s.kv_len) not in tcls:
            out.setdefault(classes.find(s.kv_len), tuple(g.role for g in s.kv_segments))
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
    visual = visual_symbols(graph, classes)
    sites = find_attention(graph, classes, visual)
    groups = find_blocks(graph)
    tcls = _token_classes(classes, sites)
    ccls = _context_classes(classes, sites, tcls)
    both = {**ccls, **tcls}
    inputs: dict[str, dict] = {}
    for node in graph.nodes:
        node.meta.pop("ditpass_token_dims", None)
        val = node_val(node)
        if isinstance(val, (list, tuple)):
            td = [_dims_of(v, classes, both) or {} for v in val]
            if any(td):
                node.meta["ditpass_token_dims"] = td
        else:
            td = _dims_of(val, classes, both)
            if td:
                node.meta["ditpass_token_dims"] = td
                if node.op == "placeholder":
                    inputs[node.name] = td
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = []
    for a in flat(out_node.args):
        outs.append(token_dims(a) if isinstance(a, torch.fx.Node) else {})
    return Analysis(gm, classes, sites, groups, tcls, inputs, outs, ccls, visual)


def flat(a):
    """The leaves of nested lists, tuples and dicts (an FX node's args), in order."""
    if isinstance(a, (list, tuple)):
        for x in a:
            yield from flat(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from flat(x)
    else:
        yield a
