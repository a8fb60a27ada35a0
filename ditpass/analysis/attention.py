"""Attention sites: every op that mixes tokens, classified from symbolic lengths.

Kinds (``AttentionSite.kind``):

- ``self``: queries and keys are one visual sequence (image / video tokens).
- ``joint``: queries and keys are one sequence made of a text segment and a visual segment
  (FLUX: text then image; SD3: image then text). ``segments`` lists them in order.
- ``cross``: visual queries, keys/values from another sequence (text): no communication needed
  when the visual tokens are sharded.
- ``temporal``: attention along an axis that is not the visual token sequence while the visual
  tokens are folded into the batch (Latte's temporal blocks: ``[B*H*W, heads, frames, d]``).
  Token-wise with respect to the visual sequence. ``folded`` holds the query's batch expression
  whenever it carries visual symbols (also for Latte's spatial ``self`` with symbolic frames).
- ``text``: self-attention over text alone (text refiners).
- ``pooler``: a query of one vector (attention pooling of text: HunyuanDiT, Mochi), or a constant
  query that is the first segment of its own keys (``[mean(x), x]``).
- ``matmul``: tokens mixed by a plain matmul / einsum (linear attention), not by SDPA.

``torch.nn.attention.flex_attention`` (in an exported graph ``torch.ops.higher_order.flex_attention(q, k, v,
score_mod, block_mask, scale, kernel_options, score_bufs, mask_bufs)``, score_mod and mask_mod subgraphs of the
GraphModule) is classified as SDPA is, by its q / k / v; ``flex`` (`flex_info`) says what its subgraphs read
(the head, query and key indices they see are global: a sequence-parallel pass must keep them so), its block
sizes and which of its outputs (attention, log-sum-exp, max score) are used.
Attention written out (``softmax(q @ k.transpose(-2, -1) * scale) @ v``) is classified as SDPA is, by its
q / k / v: the site sits on the ``@ v`` matmul, with ``written`` naming q, k, v and the scale (a
sequence-parallel pass turns it into one attention op).
- ``other``: anything else, e.g. a sequence whose lengths export made all constant (nothing tells
  image from text then); sharding passes gather around it.

"Visual" means the length depends on a symbol that also sizes the model's output (the sample
has the image's size, never the text's), so no argument names or model names are consulted.
The output's leading (batch) dim does not count, unless its symbol also sizes another output dim.
Segments whose length export specialised to a constant have role ``const``: a constant cannot
be told apart from other constants symbolically (capture with symbolic sizes to avoid it).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from . import ops
from .blocks import block_path, module_path
from .symbolic import ExprClasses, dim_exprs, node_val

__all__ = ["AttentionSite", "find_attention", "is_sdpa", "is_flex", "flex_info", "written_attention"]

aten = torch.ops.aten


def is_sdpa(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in ops.SDPA


try:
    from torch._higher_order_ops.flex_attention import flex_attention as _FLEX_HOP
except ImportError:  # a torch without flex_attention
    _FLEX_HOP = None


def is_flex(node: torch.fx.Node) -> bool:
    """A ``torch.ops.higher_order.flex_attention`` call (``torch.nn.attention.flex_attention``, exported)."""
    return _FLEX_HOP is not None and node.op == "call_function" and node.target is _FLEX_HOP


_SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
_MASK_ARGS = ("b", "h", "q_idx", "kv_idx")


def _subgraph(node: torch.fx.Node, ref):
    if isinstance(ref, torch.fx.Node) and ref.op == "get_attr" and node.graph.owning_module is not None:
        try:
            return node.graph.owning_module.get_submodule(ref.target)
        except AttributeError:
            return None
    return None


def _reads(sub, names) -> frozenset | None:
    """The index arguments a score_mod / mask_mod subgraph uses (None: not a GraphModule, so unknown)."""
    if not isinstance(sub, torch.fx.GraphModule):
        return None
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    return frozenset(name for name, p in zip(names, phs) if p.users)


def flex_info(node: torch.fx.Node) -> dict | None:
    """What a flex_attention call's pieces are, for the analysis and the sequence-parallel pass: ``score`` /
    ``mask`` (the subgraphs, GraphModules), ``reads`` (``{"score": {...}, "mask": {...}}`` of ``b``, ``h``,
    ``q_idx``, ``kv_idx``; None for a mod that is not a subgraph), ``block`` (the BlockMask tuple, as in the
    graph), ``block_size`` (Q, KV), ``outputs`` (indices of the used outputs: 0 attention, 1 log-sum-exp, 2 max
    score; None when something other than ``getitem`` reads the result). None when not a flex_attention call."""
    if not is_flex(node):
        return None
    args = list(node.args) + [()] * (9 - len(node.args))
    block = tuple(args[4]) if isinstance(args[4], (list, tuple)) else ()
    score, mask = _subgraph(node, args[3]), _subgraph(node, block[-1] if block else None)
    outputs: set | None = set()
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            if user.users:
                outputs.add(user.args[1])
        else:
            outputs = None
            break
    return dict(score=score, mask=mask, block=block,
                reads={"score": _reads(score, _SCORE_ARGS), "mask": _reads(mask, _MASK_ARGS)},
                block_size=tuple(block[-3:-1]) if len(block) >= 3 else None,
                outputs=None if outputs is None else sorted(outputs))


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
    mask_shape: tuple | None = None
    folded: sympy.Expr | None = None  # batch-dim expr of the query when it carries visual tokens (temporal)
    # attention written out as ``softmax(q @ k^T * scale) @ v``: (q, k, v node names, scale), on the last matmul
    written: tuple | None = None
    # a flex_attention call: {"reads": {"score": ..., "mask": ...}, "block_size": (Q, KV), "outputs": [...]}
    flex: dict | None = None

    def describe(self) -> str:
        seg = " + ".join(str(s) for s in self.segments)
        kv = " + ".join(str(s) for s in self.kv_segments)
        return f"{self.kind:6s} q={seg} kv={kv} heads={self.heads} head_dim={self.head_dim}" + \
            (" flex_attention" if self.flex else "")


def _role(e: sympy.Expr, classes: ExprClasses, visual_syms: set) -> str:
    syms = classes.symbols_of(e) | e.free_symbols
    if not syms:
        return "const"
    return "visual" if syms & visual_syms else "text"


def _segments(e: sympy.Expr, classes: ExprClasses, visual_syms: set) -> list[Segment]:
    return [Segment(_role(p, classes, visual_syms), p) for p in classes.segments(e)]


def _outputs(graph: torch.fx.Graph) -> list:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    vals: list = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            vals.append(node_val(a))
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(out.args)
    return vals


def output_symbols(graph: torch.fx.Graph) -> set:
    """Free symbols of the graph's tensor outputs' sizes, the leading (batch) dim left out unless
    its symbols also size another dim: the sample's size (image rows and columns, frames)."""
    syms: set = set()
    for v in _outputs(graph):
        s = dim_exprs(v)
        if not s:
            continue
        for e in (s[1:] if len(s) > 1 else s):
            syms.update(e.free_symbols)
    return syms


def batch_symbols(graph: torch.fx.Graph, classes: ExprClasses) -> set:
    """Symbols of a batch that export kept symbolic (2 for CFG): the outputs' leading dim and the
    length of 1-D inputs (per-sample timestep, guidance, labels), closed over classes of plain
    symbols; never one that sizes a non-leading output dim (a 1-D input of token positions).
    With ``Dim.AUTO`` every input has its own batch symbol, and reshapes mix them into other
    sizes (Latte: frames ``(s33*s53)//s47``), so they must not count as visual."""
    outs = [s for s in (dim_exprs(v) for v in _outputs(graph)) if s]
    lead: set = set()
    for s in outs:
        if len(s) > 1 and s[0].is_Symbol:
            lead.add(s[0])
    for node in graph.nodes:
        if node.op == "placeholder":
            s = dim_exprs(node_val(node))
            if s and len(s) == 1 and s[0].is_Symbol:
                lead.add(s[0])
    sized = {classes.find(e) for s in outs for e in (s[1:] if len(s) > 1 else s)}
    lead = {x for x in lead if classes.find(x) not in sized}
    changed = bool(lead)
    while changed:
        changed = False
        for e in list(classes.parent):
            single = {m for m in classes.members(e) if m.is_Symbol}
            if single & lead and single - lead:
                lead |= single
                changed = True
    return lead


def visual_symbols(graph: torch.fx.Graph, classes: ExprClasses) -> set:
    """Output symbols, closed over classes: a symbol proven equal to a visual length is visual too
    (FLUX: ``img_ids``' s29 ~ ``hidden_states``' s87). Batch symbols never are."""
    batch = batch_symbols(graph, classes)
    visual = output_symbols(graph) - batch
    changed = True
    while changed:
        changed = False
        for e in list(classes.parent):
            members = classes.members(e)
            if any(m.free_symbols - batch and m.free_symbols - batch <= visual for m in members):
                new = set().union(*(m.free_symbols for m in members)) - visual - batch
                if new:
                    visual |= new
                    changed = True
    return visual


def _classify(q_len, kv_len, classes: ExprClasses, visual: set, axial: bool) -> tuple[str, list, list]:
    qs, ks = _segments(q_len, classes, visual), _segments(kv_len, classes, visual)
    qroles = {s.role for s in qs}
    if axial and classes.same(q_len, kv_len):
        return "temporal", qs, ks
    if not classes.same(q_len, kv_len):
        if "visual" in qroles:
            return "cross", qs, ks
        # a pooler's query is one vector (or the first segment of its own keys: ``[mean(x), x]``)
        if q_len.is_Integer and (q_len == 1 or classes.same(ks[0].length, q_len)):
            return "pooler", qs, ks
        return "other", qs, ks
    if "visual" in qroles and len(qs) > 1 and qroles - {"visual"}:
        return "joint", qs, ks
    if qroles == {"visual"}:
        return "self", qs, ks
    if "text" in qroles and qroles <= {"text", "const"}:
        return "text", qs, ks
    return "other", qs, ks  # e.g. all lengths constant: nothing tells image from text


_CASTS = {"to", "_to_copy", "type_as", "contiguous", "clone", "alias", "dropout"}


def _through(node, names):
    """Back from ``node`` through single-input ops of the families ``names`` (dtype casts)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and ops.name_of(node.target) in names:
        if ops.name_of(node.target) == "dropout" and node.args[1:2] not in ((0.0,), (0,)) and \
                not (len(node.args) > 2 and node.args[2] is False):
            return None
        node = node.args[0]
    return node


def written_attention(node: torch.fx.Node):
    """``(q, k, v, scale, inner)`` when ``node`` is the ``@ v`` of attention written out: ``softmax(q @ k^T * c,
    -1) @ v`` (``* c``, ``/ c`` or no scaling; casts between), q/k/v of shape [..., S, D]; ``inner``: the score
    nodes, each used only by the next. None otherwise."""
    if not (node.op == "call_function" and ops.name_of(node.target) == "matmul" and len(node.args) == 2):
        return None
    p, v = node.args
    sm = _through(p, _CASTS)
    if not (isinstance(sm, torch.fx.Node) and sm.op == "call_function"
            and ops.name_of(sm.target) in ("softmax", "_softmax")):
        return None
    nd = node_val(sm).dim()
    if sm.args[1] % nd != nd - 1:
        return None
    x, scale, inner = _through(sm.args[0], _CASTS), 1.0, [sm]
    scaling = x.target if isinstance(x, torch.fx.Node) and x.op == "call_function" else None
    if scaling in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) \
            and isinstance(x.args[1], (int, float)) and x.args[1] != 0:
        scale = float(x.args[1]) if scaling in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / float(x.args[1])
        inner.append(x)
        x = _through(x.args[0], _CASTS)
    if not (isinstance(x, torch.fx.Node) and x.op == "call_function" and ops.name_of(x.target) == "matmul"):
        return None
    q, kt = x.args[:2]
    inner.append(x)
    if not (isinstance(kt, torch.fx.Node) and kt.op == "call_function"):
        return None
    kv = node_val(kt)
    if ops.name_of(kt.target) == "transpose" and {d % kv.dim() for d in kt.args[1:3]} == {kv.dim() - 2, kv.dim() - 1}:
        k = kt.args[0]
    elif ops.name_of(kt.target) == "permute" and list(kt.args[1])[-2:] in ([kv.dim() - 1, kv.dim() - 2], [-1, -2]) \
            and list(kt.args[1])[:-2] == list(range(kv.dim() - 2)):
        k = kt.args[0]
    else:
        return None
    vals = [node_val(t) for t in (q, k, v)]
    if not all(isinstance(t, torch.Tensor) and t.dim() == nd for t in vals) or vals[0].shape[-1] != vals[1].shape[-1]:
        return None
    # every score node feeds only the next: folding the chain into one attention leaves nothing behind
    if any(len(n.users) != 1 for n in inner) or len(p.users) != 1:
        return None
    return q, k, v, scale, inner


def _qkv_nodes(graph: torch.fx.Graph):
    """(node, q, k, v) of every SDPA call and every attention written out."""
    for node in graph.nodes:
        if is_sdpa(node) or is_flex(node):
            yield node, *node.args[:3]
        else:
            w = written_attention(node)
            if w is not None:
                yield node, *w[:3]


def _main_sequences(graph: torch.fx.Graph, classes: ExprClasses, visual: set) -> set:
    """Classes of the visual sequences that attention runs along: the query of cross attention and
    of self/joint attention whose batch holds no visual symbols. Where every visual attention folds
    visual symbols into its batch (axial attention only), the one with the most visual symbols in
    its sequence (rows x columns before frames). A visual attention along any other class, with the
    rest of the visual tokens in its batch, is ``temporal`` (Latte: frames)."""
    main: set = set()
    folded: list = []
    for node, q, k, _ in _qkv_nodes(graph):
        qs, ks = (dim_exprs(node_val(a)) for a in (q, k))
        if not qs or not ks:
            continue
        q_len, kv_len = qs[-2], ks[-2]
        visual_q = any(_role(p, classes, visual) == "visual" for p in classes.segments(q_len))
        if not visual_q:
            continue
        if not classes.same(q_len, kv_len) or _folded(qs, classes, visual) is None:
            main.add(classes.find(q_len))
        else:
            folded.append(q_len)
    if not main and folded:
        def nvis(e):
            return len((classes.symbols_of(e) | e.free_symbols) & visual)
        main.add(classes.find(max(folded, key=nvis)))
    return main


def _folded(shape, classes: ExprClasses, visual: set) -> sympy.Expr | None:
    """The query's batch dims (before heads, seq, head_dim) as one expr, if it carries visual symbols."""
    if len(shape) < 3:
        return None
    lead = shape[:-3] if len(shape) >= 4 else shape[:-2]
    if not lead:
        return None
    e = sympy.Mul(*lead)
    syms = set(e.free_symbols)
    for d in lead:
        syms |= classes.symbols_of(d)
    return e if syms & visual else None


def find_attention(graph: torch.fx.Graph, classes: ExprClasses, visual: set | None = None) -> list[AttentionSite]:
    """Every SDPA call and every matmul that mixes tokens; writes ``meta["ditpass_attention"]``."""
    if visual is None:
        visual = visual_symbols(graph, classes)
    main = _main_sequences(graph, classes, visual)
    sites: list[AttentionSite] = []
    written = {node: written_attention(node) for node in graph.nodes}
    written = {n: w for n, w in written.items() if w is not None}
    scores = {x for w in written.values() for x in w[4]}
    for node in graph.nodes:
        if is_sdpa(node) or node in written or is_flex(node):
            w = written.get(node)
            fx = flex_info(node)
            qkv = w[:3] if w else node.args[:3]
            q, k, v = (node_val(a) for a in qkv)
            qs, ks, vs = dim_exprs(q), dim_exprs(k), dim_exprs(v)
            folded = _folded(qs, classes, visual)
            axial = folded is not None and classes.find(qs[-2]) not in main
            kind, qseg, kseg = _classify(qs[-2], ks[-2], classes, visual, axial)
            mask = None if w or fx else node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            causal = False if w or fx else node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
            mval = node_val(mask) if isinstance(mask, torch.fx.Node) else None
            site = AttentionSite(
                node.name, kind, module_path(node), block_path(node),
                int(q.shape[-3]) if q.dim() >= 4 and not isinstance(q.shape[-3], torch.SymInt) else None,
                int(q.shape[-1]), tuple(qs), tuple(ks), tuple(vs), qs[-2], ks[-2], qseg, kseg,
                mask is not None or bool(fx and _flex_masked(fx)), bool(causal),
                tuple(dim_exprs(mval)) if isinstance(mval, torch.Tensor) else None, folded,
                (w[0].name, w[1].name, w[2].name, w[3]) if w else None,
                {k_: fx[k_] for k_ in ("reads", "block_size", "outputs")} if fx else None)
        elif node in scores:
            continue  # the q @ k^T of attention written out: part of the site at its ``@ v``
        elif node.op == "call_function" and node.target in ops.MATMUL:
            site = _matmul_site(node, classes, visual)
            if site is None:
                continue
        else:
            continue
        node.meta["ditpass_attention"] = site
        sites.append(site)
    return sites


def _flex_masked(fx: dict) -> bool:
    """A flex_attention call with a mask: a BlockMask of real blocks, or a mask_mod that reads an index."""
    large = 1 << 30  # the no-op BlockMask's block size
    reads = fx["reads"]["mask"]
    return fx["block_size"] != (large, large) or reads is None or bool(reads & {"h", "q_idx", "kv_idx"})


def _einsum_dims(eq: str, shapes: list) -> tuple[list, list] | None:
    """(contracted exprs, [(expr from operand i, expr from operand j)] for output letters from two
    different operands) of an einsum; None if the equation cannot be read."""
    if "->" not in eq:
        return None
    lhs, rhs = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        return None
    size: dict[str, list] = {}
    for t, shape in zip(terms, shapes):
        head, _, tail = t.partition("...") if "..." in t else (t, "", "")
        if len(head) + len(tail) > len(shape) or ("..." not in t and len(t) != len(shape)):
            return None
        pairs = list(zip(head, shape)) + list(zip(tail, shape[len(shape) - len(tail):] if tail else ()))
        for ch, e in pairs:
            size.setdefault(ch, []).append(e)
    contracted = [size[ch][0] for ch in size if ch not in rhs and len(size[ch]) >= 2]
    return contracted, [size[ch][0] for ch in rhs.replace("...", "") if ch in size]


def _matmul_site(node: torch.fx.Node, classes: ExprClasses, visual: set) -> AttentionSite | None:
    """A matmul of two operands mixes tokens when it contracts a visual length (``k^T v`` of
    linear attention, ``attn @ v``) or when its result is a visual x visual score matrix of one
    sequence (``q k^T``). Linear layers (``x @ W``), RoPE rotations and position outer products
    keep the token dim as a batch or row dim and are not sites; one-operand einsums
    (unpatchify permutations) neither."""
    name = ops.name_of(node.target)
    out = dim_exprs(node_val(node))
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if name == "einsum" and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
        tensors = [a for a in node.args[1] if isinstance(a, torch.fx.Node)]
    shapes = [dim_exprs(node_val(a)) for a in tensors]
    if out is None or len(shapes) < 2 or any(not s for s in shapes):
        return None

    def vis(e):
        return bool(e.free_symbols) and bool((classes.symbols_of(e) | e.free_symbols) & visual)

    if name == "einsum":
        parsed = _einsum_dims(str(node.args[0]), shapes)
        if parsed is None:
            return None
        contracted, kept = parsed
        kept_vis = [e for e in kept if vis(e)]
        pairs = len({classes.find(e) for e in kept_vis}) < len(kept_vis)
    else:
        a_shape, b_shape = shapes[-2], shapes[-1]  # addmm / baddbmm: (bias, a, b)
        if len(a_shape) < 2 or len(b_shape) < 2:
            return None
        contracted = [a_shape[-1]]
        pairs = vis(a_shape[-2]) and vis(b_shape[-1]) and classes.same(a_shape[-2], b_shape[-1])
    mixed = [e for e in contracted if vis(e)]
    if not mixed and not pairs:
        return None
    length = mixed[0] if mixed else next(e for e in out if vis(e))
    segs = _segments(length, classes, visual)
    return AttentionSite(node.name, "matmul", module_path(node), block_path(node), None, None,
                         tuple(shapes[-2]), tuple(shapes[-1]), tuple(shapes[-1]), length, length, segs, list(segs))
