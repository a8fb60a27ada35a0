"""Symbolic sizes: which dims of which tensors are token dims, found from sympy expressions.

Legend: an *expr* is the sympy expression of one dim's size (``s29 + s31``, ``(s0//2)*(s1//2)``);
a *class* is a set of exprs proven equal by the graph (broadcasting two dims asserts they are
equal); a *segment* is one part of a concatenated sequence (FLUX: text, then image).

Why classes and not plain exprs: with ``Dim.AUTO`` export gives each input its own symbol, so
FLUX's image length is ``s87`` in ``hidden_states`` and ``s29`` in ``img_ids``; the RoPE product
``q * cos`` broadcasts ``s31 + s87`` against ``s96 + s29``, and since both sides are
concatenations of two parts, the parts are unified pairwise. Numbers are never compared: at
1024x1024 FLUX has 4096 image tokens and a 4096-wide text embedding, and the two stay apart.

A symbolic length is never merged into a constant's class, even where the graph proves them
equal (PixArt at its config size adds a 64-token position table to ``(s0//2)*(s1//2)`` tokens):
a constant's class would hold every dim of that size, the 64-wide features included. Such a
proof is kept aside instead (`ExprClasses.const_of`).
"""
from __future__ import annotations

from typing import Iterable

import sympy
import torch
import torch.fx

from . import ops

__all__ = ["node_val", "dim_exprs", "ExprClasses", "is_pointwise"]

is_pointwise = ops.is_pointwise  # re-exported: one answer for the analysis and the passes


def node_val(node: torch.fx.Node):
    """The fake value of a node (export: ``val``; Dynamo: ``example_value``)."""
    return node.meta.get("val", node.meta.get("example_value"))


def to_expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def dim_exprs(val) -> tuple[sympy.Expr, ...] | None:
    """Sizes of a tensor value as sympy exprs; None for non-tensors."""
    if isinstance(val, torch.Tensor):
        return tuple(to_expr(s) for s in val.shape)
    return None


class ExprClasses:
    """Union-find over size exprs, with ordered part lists from concatenations."""

    def __init__(self) -> None:
        self.parent: dict[sympy.Expr, sympy.Expr] = {}
        self.parts: dict[sympy.Expr, list[tuple[sympy.Expr, ...]]] = {}
        self.consts: dict[sympy.Expr, int] = {}  # class root -> the constant the graph proves it equals

    def find(self, e: sympy.Expr) -> sympy.Expr:
        self.parent.setdefault(e, e)
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:  # path compression
            self.parent[e], e = root, self.parent[e]
        return root

    def union(self, a: sympy.Expr, b: sympy.Expr) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra.is_Integer and rb.is_Integer:
            return  # two different constants never unify (and equal ones are one key already)
        if ra.is_Integer or rb.is_Integer:  # symbolic == constant: noted, never merged (see the module doc)
            c, r = (ra, rb) if ra.is_Integer else (rb, ra)
            self.consts.setdefault(r, int(c))
            return
        # keep the simpler expr as representative: fewer symbols, then shorter text
        if (len(rb.free_symbols), len(str(rb))) < (len(ra.free_symbols), len(str(ra))):
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.consts:
            self.consts.setdefault(ra, self.consts.pop(rb))
        pa, pb = self.parts.get(ra, []), self.parts.pop(rb, [])
        self.parts[ra] = pa + pb
        for x in pa:
            for y in pb:
                if _pairwise(x, y):
                    for u, v in zip(x, y):
                        if u != v and not (u.is_Integer and v.is_Integer):
                            self.union(u, v)

    def add_parts(self, total: sympy.Expr, parts: Iterable[sympy.Expr]) -> None:
        parts = tuple(parts)
        if len(parts) < 2:
            return
        root = self.find(total)
        lst = self.parts.setdefault(root, [])
        if parts not in lst:
            for other in lst:
                if _pairwise(other, parts):
                    for u, v in zip(other, parts):
                        if u != v:
                            self.union(u, v)
            self.parts[self.find(total)] = self.parts.get(self.find(total), []) + [parts]

    def const_of(self, e: sympy.Expr) -> int | None:
        """The constant that the graph proves a symbolic class equal to (guards of the capture), or None."""
        if e.is_Integer:
            return int(e)
        return self.consts.get(self.find(e))

    def same(self, a: sympy.Expr, b: sympy.Expr) -> bool:
        return self.find(a) == self.find(b)

    def segments(self, total: sympy.Expr) -> tuple[sympy.Expr, ...]:
        """The ordered parts of a concatenated length (itself alone if it was never a concatenation)."""
        lst = self.parts.get(self.find(total))
        return lst[0] if lst else (total,)

    def members(self, e: sympy.Expr) -> list[sympy.Expr]:
        r = self.find(e)
        return [x for x in self.parent if self.find(x) == r]

    def symbols_of(self, e: sympy.Expr) -> set:
        out: set = set()
        for m in self.members(e):
            out |= m.free_symbols
        return out


def _pairwise(x: tuple, y: tuple) -> bool:
    """Two decompositions of one length are the same segments, part by part, when they have as many parts
    and no pair is two different exprs of the same symbols: FLUX's ``s31 + s87`` and ``s96 + s29`` (each
    input with its own symbols) are; Helios' ``[long, mid + short + current]`` and ``[long + mid + short,
    current]`` (one sequence cut at two places) are not."""
    if len(x) != len(y):
        return False
    return not any(u != v and u.free_symbols & v.free_symbols and sympy.expand(u - v) != 0 for u, v in zip(x, y))


def build_classes(graph: torch.fx.Graph) -> ExprClasses:
    """Unify dims that the graph proves equal: broadcasting operands and concatenation parts."""
    classes = ExprClasses()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        val = node_val(node)
        name = ops.name_of(node.target)
        if name in ("cat", "concat") and isinstance(val, torch.Tensor):
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            ins = [dim_exprs(node_val(t)) for t in tensors if isinstance(t, torch.fx.Node)]
            ins = [s for s in ins if s is not None and len(s) == val.dim()]
            if len(ins) >= 2:
                d = dim % val.dim()
                out = dim_exprs(val)
                classes.add_parts(out[d], [s[d] for s in ins if s[d] != 0])
        if is_pointwise(node.target) and isinstance(val, torch.Tensor):
            data = node.args[:1] if ops.dtype_only_operands(node.target) else node.args
            shapes = [dim_exprs(node_val(a)) for a in data if isinstance(a, torch.fx.Node)]
            shapes = [s for s in shapes if s]
            out = dim_exprs(val)
            for s in shapes:
                for k in range(1, min(len(s), len(out)) + 1):
                    if s[-k] != 1 and out[-k] != 1 and s[-k] != out[-k]:
                        classes.union(s[-k], out[-k])
    return classes
