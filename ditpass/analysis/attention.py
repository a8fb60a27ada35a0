"""Attention sites: every op that mixes tokens, classified from symbolic lengths.

Kinds (``AttentionSite.kind``):

- ``self``: queries and keys are one visual sequence (image / video tokens).
- ``joint``: queries and keys are one sequence made of a text segment and a visual segment
  (FLUX: text then image; SD3: image then text). ``segments`` lists them in order.
- ``cross``: visual queries, keys/values from another sequence (text): no communication needed
  when the visual tokens are sharded.
- ``text``: self-attention over text alone (text refiners).
- ``pooler``: a query of constant length (attention pooling of text, length 1).
- ``matmul``: tokens mixed by a plain matmul / einsum (linear attention), not by SDPA.
- ``other``: anything else; sharding passes gather around it.

"Visual" means the length depends on a symbol that also sizes the model's output (the sample
has the image's size, never the text's), so no argument names or model names are consulted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from .blocks import block_path, module_path
from .symbolic import ExprClasses, dim_exprs, node_val

__all__ = ["AttentionSite", "find_attention", "SDPA_TARGETS", "is_sdpa"]

SDPA_TARGETS = {torch.ops.aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention}
_MATMULS = {"matmul", "bmm", "einsum", "baddbmm"}


def is_sdpa(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


@dataclass
class Segment:
    role: str  # "visual" | "text" | "const"
    length: sympy.Expr

    def __str__(self) -> str:
        return f"{self.role}[{self.length}]"


@dataclass
class AttentionSite:
    node: str  # node name
    kind: str
    module: str  # innermost module path, e.g. "transformer_blocks.3.attn"
    block: str | None  # "transformer_blocks.3"
    heads: int | None
    head_dim: int | None
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    q_len: sympy.Expr
    kv_len: sympy.Expr
    segments: list[Segment] = field(default_factory=list)  # of the query sequence
    kv_segments: list[Segment] = field(default_factory=list)
    has_mask: bool = False
    causal: bool = False

    def describe(self) -> str:
        seg = " + ".join(str(s) for s in self.segments)
        kv = " + ".join(str(s) for s in self.kv_segments)
        return f"{self.kind:6s} q={seg} kv={kv} heads={self.heads} head_dim={self.head_dim}"


def _role(e: sympy.Expr, classes: ExprClasses, visual_syms: set) -> str:
    syms = classes.symbols_of(e) | e.free_symbols
    if not syms:
        return "const"
    return "visual" if syms & visual_syms else "text"


def _segments(e: sympy.Expr, classes: ExprClasses, visual_syms: set) -> list[Segment]:
    return [Segment(_role(p, classes, visual_syms), p) for p in classes.segments(e)]


def output_symbols(graph: torch.fx.Graph) -> set:
    """Free symbols of the graph's tensor outputs: the sample's size (image, frames)."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    syms: set = set()

    def visit(a):
        if isinstance(a, torch.fx.Node):
            s = dim_exprs(node_val(a))
            for e in s or ():
                syms.update(e.free_symbols)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(out.args)
    return syms


def _classify(q_len, kv_len, classes: ExprClasses, visual: set) -> tuple[str, list, list]:
    qs, ks = _segments(q_len, classes, visual), _segments(kv_len, classes, visual)
    qroles = {s.role for s in qs}
    if not classes.same(q_len, kv_len):
        if q_len.is_Integer and "visual" not in qroles:
            return "pooler", qs, ks
        return ("cross" if "visual" in qroles else "other"), qs, ks
    if "visual" in qroles and len(qs) > 1 and qroles - {"visual"}:
        return "joint", qs, ks
    if qroles == {"visual"}:
        return "self", qs, ks
    if qroles <= {"text", "const"}:
        return "text", qs, ks
    return "other", qs, ks


def find_attention(graph: torch.fx.Graph, classes: ExprClasses) -> list[AttentionSite]:
    """Every SDPA call and every matmul that mixes tokens; writes ``meta["ditpass_attention"]``."""
    visual = output_symbols(graph)
    # a symbol proven equal to a visual length is visual too (img_ids' s29 ~ hidden_states' s87)
    changed = True
    while changed:
        changed = False
        for e in list(classes.parent):
            members = classes.members(e)
            if any(m.free_symbols and m.free_symbols <= visual for m in members):
                new = set().union(*(m.free_symbols for m in members)) - visual
                if new:
                    visual |= new
                    changed = True
    sites: list[AttentionSite] = []
    for node in graph.nodes:
        if is_sdpa(node):
            q, k, v = (node_val(a) for a in node.args[:3])
            qs, ks, vs = dim_exprs(q), dim_exprs(k), dim_exprs(v)
            kind, qseg, kseg = _classify(qs[-2], ks[-2], classes, visual)
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
            site = AttentionSite(
                node.name, kind, module_path(node), block_path(node),
                int(q.shape[-3]) if q.dim() >= 3 and not isinstance(q.shape[-3], torch.SymInt) else None,
                int(q.shape[-1]), tuple(qs), tuple(ks), tuple(vs), qs[-2], ks[-2], qseg, kseg,
                mask is not None, bool(causal))
        elif node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in _MATMULS:
            site = _matmul_site(node, classes, visual)
            if site is None:
                continue
        else:
            continue
        node.meta["ditpass_attention"] = site
        sites.append(site)
    return sites


def _matmul_site(node: torch.fx.Node, classes: ExprClasses, visual: set) -> AttentionSite | None:
    """A matmul mixes tokens when a visual length is contracted or appears twice in its output."""
    out = dim_exprs(node_val(node))
    ins = [dim_exprs(node_val(a)) for a in node.args if isinstance(a, torch.fx.Node)]
    if out is None or not ins or any(s is None for s in ins):
        return None

    def vis(e):
        return bool(e.free_symbols) and bool(classes.symbols_of(e) & visual)

    out_vis = [e for e in out if vis(e)]
    in_vis = [e for s in ins for e in s if vis(e)]
    contracted = any(not any(classes.same(e, o) for o in out) for e in in_vis)
    if len(out_vis) < 2 and not contracted:
        return None
    length = (out_vis or in_vis)[0]
    return AttentionSite(node.name, "matmul", module_path(node), block_path(node), None, None,
                         tuple(ins[0]), tuple(ins[-1]), tuple(ins[-1]), length, length,
                         _segments(length, classes, visual), _segments(length, classes, visual))
