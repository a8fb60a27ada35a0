"""The rewriter of sequence parallelism: one walk in graph order (see the package docstring).

A node is *sharded* (`Sharded`: token dim, segment list) or *replicated* (None). Which ops keep a
sharded token dim is `rules.tokenwise`; this walk applies it, slices replicated operands that meet a
sharded one, works through concatenation and slicing of the token dim segment by segment, gives
self / joint attention sites their sequence-parallel strategy (in the site table) and takes the safe
path (gather, compute replicated, a note) where no rule applies. Inside the walk ``meta["val"]`` is
still the captured (global) value of every node; `ditpass.pass_base.run_passes` propagates the local
shapes afterwards.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx

from ditpass.analysis import flat, ops
from ditpass.analysis.attention import flex_info, is_flex
from ditpass.analysis.blocks import module_path
from ditpass.analysis.symbolic import dim_exprs, node_val
from ditpass.pass_base import Collective, PassContext, nbytes
from ditpass.runtime import seq
from ditpass.runtime.ops import OPS
from ditpass.runtime.sites import FlexSite, SeqAttention
from ditpass.runtime.tokens import OPS as TOKEN_OPS

from ..attention_sites import site_id_node
from . import rules

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional


@dataclass(frozen=True)
class Sharded:
    dim: int
    segs: tuple  # segment class representatives, in order


def _tensor_args(node):
    out = []
    for a in node.args:
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.fx.Node))
    out.extend(v for v in node.kwargs.values() if isinstance(v, torch.fx.Node))
    return [a for a in out if isinstance(node_val(a), torch.Tensor)]


class _Rewriter:
    """``patch``: PipeFusion's patch mode (`ditpass.runtime.patches.PatchAttention`): the ``n`` shards are
    patches computed one after another by this rank, not ranks: only nodes of ``patch_blocks`` are
    patched (what runs before the blocks stays whole), ``patch_shard`` reads the patch index
    from ``patch_index`` (a get_attr node of the index tensor), self / joint sites attend against their
    K/V buffer, outputs stay patches (their global lengths are appended to the outputs, for the driver to
    assemble them), and an op that needs the whole sequence is an error (no other patch exists yet)."""

    def __init__(self, gm: torch.fx.GraphModule, ctx: PassContext, patch=None, patch_index=None,
                 patch_blocks=frozenset()):
        self.gm, self.g = gm, gm.graph
        self.an, self.cls = ctx.analysis, ctx.analysis.classes
        pl = ctx.placement
        self.patch, self.patch_index = patch, patch_index
        self.patch_blocks = patch_blocks  # patch mode: the blocks that run patch by patch
        self.written = _written_in_place(gm.graph)  # tensors an in-place op writes through a view: kept as they are
        self.vmap_region = _vmap_regions(gm.graph)  # node inside traced torch.vmap -> the region's first node
        self.vmap_rewired: set = set()  # the regions (their first node) where a node's input was gathered
        self.patch_outputs: list[tuple[int, int, int]] = []  # (output index, token dim, number of lengths)
        if patch is not None:
            self.n, self.p = patch.chunks, patch_index  # chunks: patches x sequence ranks in each
        else:
            self.n, self.p = pl.degree("sp"), pl.coord("sp")  # p: ring-major index among the n sequence ranks
        self.sp_group = pl.group("sp")
        self.seq = SeqAttention(pl.degrees["ulysses"], pl.degrees["ring"], pl.coords["ulysses"], pl.coords["ring"],
                                pl.group("ulysses"), pl.group("ring"))
        self.sites = ctx.sites
        self.fastattn = bool(ctx.plan.fastattn)
        self.layout: dict[torch.fx.Node, Sharded | list | None] = {}
        self.seg_len: dict = {}  # segment class rep -> node giving its global length
        self.sym_src: dict = {}  # input size symbol -> node giving its value
        self.notes: list[str] = []
        self.collectives: list[Collective] = []
        self.token_classes = set(ctx.analysis.token_classes)
        self.gathered: dict[torch.fx.Node, torch.fx.Node] = {}
        self.shards: list[torch.fx.Node] = []
        # token-mixing matmuls (linear attention) are sites too: in the table, local until sharded here
        self.matmul_sites: dict[torch.fx.Node, int] = {}
        # flex_attention calls too: in the table from the start (replicated until `_flex` shards one), so that a
        # flex site left whole is reported as such
        self.flex_sites: dict[torch.fx.Node, int] = {}
        if patch is None:
            for node in self.g.nodes:
                site = node.meta.get("ditpass_attention")
                if node.op == "call_function" and site is not None and site.kind == "matmul":
                    self.matmul_sites[node] = self.sites.add(node.name, "matmul", site.module).site
                elif site is not None and is_flex(node):
                    self.flex_sites[node] = self.sites.add(node.name, site.kind, site.module).site

    # ---- symbolic helpers -------------------------------------------------------------
    def find(self, e):
        return self.cls.find(e)

    def dim_class(self, node, dim, val=None):
        val = node_val(node) if val is None else val
        return self.find(dim_exprs(val)[dim])

    def segs_of(self, e) -> tuple:
        return tuple(self.find(s) for s in self.cls.segments(e))

    def is_token(self, e) -> bool:
        return bool(e.free_symbols) and self.find(e) in self.token_classes

    def eq(self, a, b) -> bool:
        if self.cls.same(a, b):
            return True
        canon = {s: self.find(s) for e in (a, b) for s in e.free_symbols if self.find(s).is_Symbol}
        return sympy.expand(a.subs(canon) - b.subs(canon)) == 0

    def _val_expr(self, x):
        if isinstance(x, torch.fx.Node):
            v = node_val(x)
            return sympy.sympify(v.node.expr) if isinstance(v, torch.SymInt) else (sympy.Integer(v) if isinstance(v, int) else None)
        if isinstance(x, int):
            return sympy.Integer(x)
        return None

    # ---- inserted nodes ---------------------------------------------------------------
    def length_node(self, seg, before: torch.fx.Node):
        if seg in self.seg_len:
            return self.seg_len[seg]
        if seg.is_Integer:  # a constant-length segment (text whose length export fixed)
            return int(seg)
        # no tensor of this length was seen replicated (AuraFlow's text is only ever concatenated after its
        # register tokens; Helios' history latents are cut and concatenated): compute it from the input
        # sizes it is an expression of, in the graph
        for e in [seg] + [m for m in self.cls.members(seg) if m != seg]:
            if e.free_symbols and e.free_symbols <= self.sym_src.keys():
                try:
                    with self.g.inserting_before(before):
                        ln = self._emit(e)
                except _Fallback:
                    continue
                self.seg_len[seg] = ln
                return ln
        raise _Fallback(f"no global length source for segment {seg}")

    def _emit(self, e):
        """A size expression as graph arithmetic on the input sizes (``operator`` nodes, as `_chunk_len`)."""
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            return self.sym_src[e]
        fn = type(e).__name__
        binary = {"FloorDiv": operator.floordiv, "Mod": operator.mod, "PythonMod": operator.mod}
        if isinstance(e, (sympy.Add, sympy.Mul)):
            op = operator.add if isinstance(e, sympy.Add) else operator.mul
            terms = [self._emit(a) for a in e.args]
            out = terms[0]
            for t in terms[1:]:
                out = self.g.call_function(op, (out, t))
            return out
        if fn in binary and len(e.args) == 2:
            return self.g.call_function(binary[fn], tuple(self._emit(a) for a in e.args))
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
            base = self._emit(e.base)
            out = base
            for _ in range(int(e.exp) - 1):
                out = self.g.call_function(operator.mul, (out, base))
            return out
        raise _Fallback(f"size {e} is not integer arithmetic")

    def _record_symbols(self, node: torch.fx.Node, val):
        """Where each input size symbol can be read: a SymInt input, or ``sym_size`` of an input tensor."""
        if isinstance(val, torch.SymInt):
            e = sympy.sympify(val.node.expr)
            if e.is_Symbol:
                self.sym_src.setdefault(e, node)
            return
        for d, e in enumerate(dim_exprs(val) or ()):
            if e.is_Symbol and e not in self.sym_src:
                with self.g.inserting_after(node):
                    ln = self.g.call_function(aten.sym_size.int, (node, d))
                    ln.meta["val"] = val.shape[d]
                self.sym_src[e] = ln

    def lengths(self, segs, before):
        return [self.length_node(s, before) for s in segs]

    def _record_lengths(self, node: torch.fx.Node, val):
        """Remember a node that gives each token segment's global length (first R appearance)."""
        shape = dim_exprs(val)
        if shape is None:
            return
        for d, e in enumerate(shape):
            if not e.free_symbols:
                continue
            c = self.find(e)
            if c in self.token_classes and c not in self.seg_len and len(self.segs_of(e)) == 1:
                with self.g.inserting_after(node):
                    ln = self.g.call_function(aten.sym_size.int, (node, d))
                    ln.meta["val"] = val.shape[d]
                self.seg_len[c] = ln

    def shard_node(self, x: torch.fx.Node, dim: int, at: torch.fx.Node, segs: tuple | None = None) -> torch.fx.Node:
        """``x`` (replicated) sharded along ``dim`` as ``segs`` say (default: the segments its length is made of)."""
        val = node_val(x)
        segs = self.segs_of(dim_exprs(val)[dim]) if segs is None else segs
        with self.g.inserting_before(at):
            lens = self.lengths(segs, at)
            op = OPS["shard"] if self.patch is None else OPS["patch_shard"]
            s = self.g.call_function(op, (x, dim, lens, self.n, self.p))
        s.meta["val"] = val
        self.shards.append(s)
        self.layout[s] = Sharded(dim, segs)
        return s

    def gather_node(self, x: torch.fx.Node, at: torch.fx.Node, why: str) -> torch.fx.Node:
        if x in self.gathered:
            return self.gathered[x]
        if self.patch is not None:
            raise ValueError(
                f"PipeFusion cannot run `{at.name}` ({at.target}) in `{module_path(at) or '<root>'}` patch by "
                f"patch: it needs the whole token sequence ({why}); use sequence parallelism (ulysses/ring) "
                f"for this model")
        lay = self.layout[x]
        with self.g.inserting_before(at):
            lens = self.lengths(lay.segs, at)
            gnode = self.g.call_function(OPS["gather"], (x, lay.dim, lens, self.n, self.sp_group))
        gnode.meta["val"] = node_val(x)
        self.layout[gnode] = None
        self.gathered[x] = gnode
        self.collectives.append(Collective(gnode.name, "all_gather", "sp", why, _nbytes(node_val(x), self.n)))
        return gnode

    # ---- the walk ---------------------------------------------------------------------
    def run(self):
        nodes = list(self.g.nodes)
        for node in nodes:
            if node._erased:  # replaced on the way (a flex_attention call's getitems)
                continue
            if node.op == "placeholder":
                self.layout[node] = None
                self._record_lengths(node, node_val(node))
                self._record_symbols(node, node_val(node))
                continue
            if node.op == "output":
                self._output(node)
                continue
            if node.op != "call_function":
                self.layout[node] = None
                continue
            if node in self.vmap_region:
                self._in_vmap(node)
                continue
            try:
                self._visit(node)
            except _Fallback as fb:
                self._fallback(node, str(fb))
            if node in self.matmul_sites and isinstance(self.layout.get(node), Sharded):
                self.sites.refine(self.matmul_sites[node], note="token-wise on this rank's shard", seq=self.seq)
            val = node_val(node)
            if self.layout.get(node) is None and isinstance(val, torch.Tensor):
                self._record_lengths(node, val)
        # shard every input with a token dim where it enters (after the length nodes)
        self.g.eliminate_dead_code()
        self._forget_vmap_values()

    def _output(self, node):
        if self.patch is not None:  # patches stay patches; their global lengths go out too
            outs, extra = list(node.args[0]), []
            for i, a in enumerate(outs):
                lay = self.layout.get(a) if isinstance(a, torch.fx.Node) else None
                if isinstance(lay, Sharded):
                    with self.g.inserting_before(node):
                        lens = self.lengths(lay.segs, node)
                    self.patch_outputs.append((i, lay.dim, len(lens)))
                    extra.extend(lens)
            node.args = (tuple(outs) + tuple(extra),)
            return

        def fix(a):
            if isinstance(a, torch.fx.Node) and isinstance(self.layout.get(a), Sharded):
                return self.gather_node(a, node, "output")
            return a

        node.args = torch.fx.node.map_arg(node.args, fix)

    def _fallback(self, node, why: str):
        """Gather every sharded input, compute replicated."""
        sharded = [a for a in _tensor_args(node) if isinstance(self.layout.get(a), Sharded)]
        if not sharded:
            self.layout[node] = None
            return
        order = {n: i for i, n in enumerate(self.g.nodes)}
        for a in sharded:
            gnode = self.gather_node(a, node, f"fallback:{node.name}")
            node.replace_input_with(a, gnode)
            if rules.mutates(node) and node.args and node.args[0] is gnode:
                # an in-place op now writes the gathered copy: later readers must read that copy
                for user in list(a.users):
                    if user is not node and order.get(user, -1) > order[node]:
                        user.replace_input_with(a, gnode)
        self.layout[node] = None
        self.notes.append(f"gather before `{node.name}` ({node.target}) in `{module_path(node) or '<root>'}`: {why}")

    def _in_vmap(self, node):
        """A node of a traced ``torch.vmap`` (`_vmap_regions`): runs as captured, on whole values; a sharded input
        is gathered before the region starts (a collective on a batched value inside it would not be one)."""
        for a in _tensor_args(node):
            if isinstance(self.layout.get(a), Sharded):
                node.replace_input_with(a, self.gather_node(a, self.vmap_region[node], f"vmap:{node.name}"))
                self.vmap_rewired.add(self.vmap_region[node])
        self.layout[node] = None

    def _forget_vmap_values(self):
        """The regions with a rewired node lose their nodes' ``meta["val"]``: propagation (`ditpass.pass_base`)
        runs again the nodes without one, so it runs the whole region in order, entering its vmap levels; a
        rewired node run alone would meet batched values outside their level."""
        for node, start in self.vmap_region.items():
            if start in self.vmap_rewired:
                node.meta.pop("val", None)

    def _visit(self, node: torch.fx.Node):
        info = rules.family(node)
        name = info.name if info else None
        args = _tensor_args(node)
        lays = {a: self.layout.get(a) for a in args}
        val = node_val(node)
        if node.target is operator.getitem:
            src = self.layout.get(node.args[0])
            self.layout[node] = src[node.args[1]] if isinstance(src, list) else (src if isinstance(src, Sharded) else None)
            return
        if node.target is aten.sym_size.int:
            lay = self.layout.get(node.args[0])
            if isinstance(lay, Sharded) and node.args[1] % node_val(node.args[0]).dim() == lay.dim:
                self._global_size(node, lay)
            return
        if info is not None and info.kind == "skip":
            return
        sharded = [a for a in args if isinstance(lays[a], Sharded)]
        out_tok = self.out_token_dims(val)
        if node.target is OPS["attention"]:
            return self._attention(node, lays)
        if node in self.flex_sites:
            return self._flex(node, lays)
        if not sharded:
            # all replicated: shard the result right away when every input token dim can be sliced
            # and the op is token-wise; otherwise stay replicated (cheap ops, creation ops)
            # (patch mode: only inside blocks; the embeddings before them run whole on every patch)
            inside = self.patch is None or node.meta.get("ditpass_block") in self.patch_blocks
            if inside and out_tok and node not in self.written and rules.tokenwise(self, node, None):
                ins = [a for a in args if self._in_token_dim(a) is not None]
                if ins and all(rules.tokenwise(self, node, a) for a in ins):
                    for a in ins:
                        node.replace_input_with(a, self.shard_node(a, self._in_token_dim(a), node))
                    return self._visit(node)
            self.layout[node] = None
            return
        # at least one sharded input
        if node in self.written:  # an in-place write (or the view it writes through) must see whole values
            raise _Fallback("an in-place write takes a sharded value")
        if self.patch is None and self._contract(node, name, sharded):
            return
        if name in ("cat", "concat") and self._cat_on_token(node, lays):
            return
        if name in ("slice", "narrow", "split_with_sizes", "split", "chunk") and self._split_on_token(node, lays):
            return
        for a in sharded:
            if not rules.tokenwise(self, node, a):
                raise _Fallback(f"{name} mixes or reshapes the token dim")
        # bring replicated operands with the token dim into the same layout
        ref = self.layout[sharded[0]]
        ref_cls = self.dim_class(sharded[0], ref.dim)
        pointwise = rules.is_pointwise(node)
        from_right = node_val(sharded[0]).dim() - ref.dim
        for a in args:
            if lays[a] is None:
                va = node_val(a)
                if pointwise:  # broadcasting aligns dims from the right: that is the proof of equality
                    d = va.dim() - from_right
                    d = d if d >= 0 and not (isinstance(va.shape[d], int) and va.shape[d] == 1) else None
                else:
                    d = self._class_dim(va, ref_cls)
                if d is not None and not (ops.dtype_only_operands(node.target) and a is not node.args[0]):
                    # a length proven equal to the sharded operand's is cut as that one is (HiDream's RoPE table
                    # is one text segment where the hidden states are two): the same chunks on every rank
                    same = self.find(dim_exprs(va)[d]) == ref_cls
                    node.replace_input_with(a, self.shard_node(a, d, node, ref.segs if same else None))
        for a in sharded[1:]:
            if self.layout[a].segs != ref.segs:
                raise _Fallback("operands sharded with different segment layouts")
        out_layout = self._out_layout(val, ref_cls, ref.segs)
        if out_layout is None:
            raise _Fallback("result has no single token dim")
        self._fix_shape_args(node, name, sharded[0], ref, out_layout)
        self.layout[node] = out_layout

    # ---- rules ------------------------------------------------------------------------
    def out_token_dims(self, val):
        shape = dim_exprs(val) if isinstance(val, torch.Tensor) else None
        return [d for d, e in enumerate(shape or ()) if self.is_token(e)]

    def _in_token_dim(self, a):
        val = node_val(a)
        dims = self.out_token_dims(val)
        if len(dims) != 1:
            return None
        return dims[0]

    def _class_dim(self, val, c):
        shape = dim_exprs(val) if isinstance(val, torch.Tensor) else None
        if shape is None:
            return None
        if c.is_Integer:
            # a constant segment, known to be one from the dataflow (it was concatenated onto a
            # symbolic sequence); follow it only where its size is unambiguous, else fall back
            ds = [d for d, e in enumerate(shape) if e == c]
        else:
            ds = [d for d, e in enumerate(shape) if e.free_symbols and self.find(e) == c]
        return ds[0] if len(ds) == 1 else None

    def _out_layout(self, val, c, segs):
        if isinstance(val, (list, tuple)):
            outs = [self._out_layout(v, c, segs) for v in val]
            return outs if all(o is not None for o in outs) else None
        d = self._class_dim(val, c)
        return Sharded(d, segs) if d is not None else None

    def in_dim(self, a):
        """The token dim of operand ``a``: where it is sharded, else its one token dim (None if not one)."""
        lay = self.layout.get(a)
        if isinstance(lay, Sharded):
            return lay.dim
        return self._in_token_dim(a)

    def view_keeps(self, node, a, d) -> bool:
        """A view keeps token dim ``d`` of ``a`` when the sizes before it are the same product after."""
        vin, vout = node_val(a), node_val(node)
        ins, outs = dim_exprs(vin), dim_exprs(vout)
        c = self.find(ins[d])
        j = self._class_dim(vout, c)
        if j is None:
            return False
        return self.eq(sympy.Mul(*ins[:d]), sympy.Mul(*outs[:j]))

    def _fix_shape_args(self, node, name, src, src_lay, out_lay):
        """Shape arguments that name the global token count get the local one."""
        if name in ("view", "reshape", "_unsafe_view", "expand"):
            sizes = list(node.args[1])
            j = out_lay.dim
            if name == "expand":
                sizes[j] = -1
            else:
                with self.g.inserting_before(node):
                    loc = self.g.call_function(aten.sym_size.int, (src, src_lay.dim))
                loc.meta["val"] = node_val(src).shape[src_lay.dim]
                sizes[j] = loc
            node.args = (node.args[0], sizes, *node.args[2:])
        elif name == "unflatten":
            dim = node.args[1] % node_val(src).dim()
            if dim == src_lay.dim:
                raise _Fallback("unflatten of the token dim")

    def _global_size(self, node, lay: Sharded):
        """``x.shape[token_dim]`` of a sharded x is the global length: sum of segment lengths."""
        lens = self.lengths(lay.segs, node)
        with self.g.inserting_before(node):
            total = lens[0]
            for ln in lens[1:]:
                total = self.g.call_function(operator.add, (total, ln))
        node.replace_all_uses_with(total)
        self.layout[node] = None

    def _local_lengths(self, segs, at):
        lens = self.lengths(segs, at)
        with self.g.inserting_before(at):
            return [self._chunk_len(ln) for ln in lens]

    def _chunk_len(self, ln):
        """``ceil(ln / n)`` as size arithmetic in the graph (plain ``operator`` nodes; an int stays an int)."""
        if isinstance(ln, int):
            return seq.chunk_len(ln, self.n)
        up = self.g.call_function(operator.add, (ln, self.n - 1))
        return self.g.call_function(operator.floordiv, (up, self.n))

    def _contract(self, node, name, sharded) -> bool:
        """A sum or matmul over the sharded token dim (linear attention: ``sum(K)``, ``V K^T``): computed on this
        rank's tokens, its pad tokens zeroed in one operand, then all-reduced over the sequence ranks. The
        result is replicated (it has no token dim left)."""
        if name == "sum":
            x = node.args[0]
            lay = self.layout.get(x)
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if sharded != [x] or not isinstance(lay, Sharded):
                return False
            nd = node_val(x).dim()
            if isinstance(dims, int) or dims:  # None or [] sums every dim
                dims = [dims] if isinstance(dims, int) else list(dims)
                if lay.dim not in [d % nd for d in dims]:
                    return False
            operand = x
        elif name in ("matmul", "bmm", "mm"):
            a, b = node.args[:2]
            la, lb = self.layout.get(a), self.layout.get(b)
            if not (isinstance(la, Sharded) and isinstance(lb, Sharded)) or node_val(b).dim() < 2:
                return False
            if la.dim != node_val(a).dim() - 1 or lb.dim != node_val(b).dim() - 2 or la.segs != lb.segs:
                return False
            operand = a
        else:
            return False
        lay = self.layout[operand]
        with self.g.inserting_before(node):
            lens = self.lengths(lay.segs, node)
            z = self.g.call_function(TOKEN_OPS["zero_pad"], (operand, lay.dim, lens, self.n, self.p))
        z.meta["val"] = node_val(operand)
        self.layout[z] = lay
        node.replace_input_with(operand, z)
        with self.g.inserting_after(node):
            red = self.g.call_function(_c10d.all_reduce.default, (node, "sum", self.sp_group))
        with self.g.inserting_after(red):
            done = self.g.call_function(_c10d.wait_tensor.default, (red,))
        red.meta["val"] = done.meta["val"] = node_val(node)
        for k in ("nn_module_stack", "ditpass_block", "stack_trace"):
            if k in node.meta:
                red.meta[k] = done.meta[k] = node.meta[k]
        node.replace_all_uses_with(done, delete_user_cb=lambda u: u is not red)
        self.layout[node] = self.layout[red] = self.layout[done] = None
        self.collectives.append(Collective(node.name, "all_reduce", "sp", f"sum over tokens:{node.name}",
                                           nbytes(node_val(node))))
        if node in self.matmul_sites:
            self.sites.refine(self.matmul_sites[node], note="partial sums over this rank's tokens, all-reduced",
                              seq=self.seq)
        return True

    def _cat_on_token(self, node, lays) -> bool:
        tensors = node.args[0]
        val = node_val(node)
        d = rules.op_dim(node) % val.dim()
        if not self.is_token(dim_exprs(val)[d]):
            return False
        segs = []
        new = []
        for t in tensors:
            lay = self.layout.get(t)
            if not isinstance(lay, Sharded):
                e = dim_exprs(node_val(t))[d]
                if not (self.is_token(e) or e.is_Integer):
                    raise _Fallback("concatenates a non-token piece onto the sequence")
                t = self.shard_node(t, d, node)
                lay = self.layout[t]
            if lay.dim != d:
                raise _Fallback("pieces sharded on different dims")
            segs.extend(lay.segs)
            new.append(t)
        node.args = (new, *node.args[1:])
        self.layout[node] = Sharded(d, tuple(segs))
        return True

    def _split_on_token(self, node, lays) -> bool:
        src = node.args[0]
        lay = self.layout.get(src)
        if not isinstance(lay, Sharded):
            return False
        name = rules.family(node).name
        nd = node_val(src).dim()
        dim = rules.op_dim(node)
        if dim is None or dim % nd != lay.dim:
            return False
        seg_exprs = [self.cls.segments(s)[0] if len(self.cls.segments(s)) == 1 else s for s in lay.segs]
        cum = [sympy.Integer(0)]
        for e in seg_exprs:
            cum.append(cum[-1] + e)
        total = cum[-1]

        def boundary(x, default):
            if x is None:
                return default
            e = self._val_expr(x)
            if e is None:
                raise _Fallback("slice bound is not a size")
            if isinstance(x, int) and x >= 2**62:
                return len(cum) - 1
            if (e.is_Integer and e < 0) or (not e.is_Integer and e.could_extract_minus_sign()):
                e = total + e  # x[:, :-T]
            for k, c in enumerate(cum):
                if self.eq(e, c):
                    return k
            raise _Fallback(f"slice bound {e} is not a segment boundary")

        if name in ("slice", "narrow"):
            if name == "slice":
                start = node.args[2] if len(node.args) > 2 else None
                end = node.args[3] if len(node.args) > 3 else None
                step = node.args[4] if len(node.args) > 4 else 1
                if step != 1:
                    raise _Fallback("strided slice of the token dim")
                k0, k1 = boundary(start, 0), boundary(end, len(cum) - 1)
            else:
                start, length = node.args[2], node.args[3]
                k0 = boundary(start, 0)
                k1 = next((k for k in range(k0, len(cum)) if self.eq(cum[k] - cum[k0], self._val_expr(length))), None)
                if k1 is None:
                    raise _Fallback("narrow length is not a segment sum")
            loc = self._local_lengths(lay.segs, node)
            with self.g.inserting_before(node):
                s0 = _sum(self.g, loc[:k0])
                s1 = _sum(self.g, loc[:k1])
            node.target = aten.slice.Tensor
            node.args = (src, lay.dim, s0, s1, 1)
            node.kwargs = {}
            self.layout[node] = Sharded(lay.dim, lay.segs[k0:k1])
            return True
        if name == "split_with_sizes":
            sizes = node.args[1]
            ks, k = [0], 0
            acc = sympy.Integer(0)
            for sz in sizes:
                acc = acc + self._val_expr(sz)
                k = boundary_index(cum, acc, self.eq)
                if k is None:
                    raise _Fallback("split sizes are not segment sums")
                ks.append(k)
            loc = self._local_lengths(lay.segs, node)
            with self.g.inserting_before(node):
                new_sizes = [_sum(self.g, loc[a:b]) for a, b in zip(ks, ks[1:])]
            node.args = (src, new_sizes, *node.args[2:])
            self.layout[node] = [Sharded(lay.dim, lay.segs[a:b]) for a, b in zip(ks, ks[1:])]
            return True
        raise _Fallback(f"{name} along the token dim")

    def _attention(self, node, lays):
        """A ``ditpass::attention`` site: its table entry says how it runs (`ditpass.runtime.sites`)."""
        q, k, v, site_t = node.args[:4]
        site = self.sites[int(getattr(self.gm, site_t.target))]
        lq, lk, lv = (lays.get(x) for x in (q, k, v))
        kw = node.kwargs
        mask = kw.get("attn_mask")
        nd = node_val(q).dim()
        sharded = [x for x in (lq, lk, lv) if isinstance(x, Sharded)]
        if sharded and all(x.dim < nd - 2 for x in sharded):
            return self._attention_batched(node, site, sharded[0])
        if nd > 4 and sharded and all(x.dim == nd - 2 for x in sharded):
            return self._attention_flattened(node, lays)
        if not any(isinstance(x, Sharded) for x in (lq, lk, lv)):
            # replicated attention: shard the query side if it is a token sequence
            d = self._in_token_dim(q)
            if d == 2 and lk is None and not self.out_token_dims(node_val(k)) and mask is None:
                node.replace_input_with(q, self.shard_node(q, d, node))
                self.layout[node] = self.layout[node.args[0]]
                self.sites.refine(site.site, note="query sharded, K/V replicated")
                return
            self.layout[node] = None
            return
        if isinstance(lq, Sharded) and lq.dim == 2 and lk is None and lv is None and not self.out_token_dims(node_val(k)):
            if mask is not None and isinstance(self.layout.get(mask), Sharded):
                raise _Fallback("attention mask sharded differently")
            if mask is not None and self._class_dim(node_val(mask), self.dim_class(q, 2)) is not None:
                node.replace_input_with(mask, self.shard_node(mask, self._class_dim(node_val(mask), self.dim_class(q, 2)), node))
            self.layout[node] = Sharded(2, lq.segs)
            self.sites.refine(site.site, note="K/V replicated, no communication")
            return
        # self / joint attention: q, k, v all carry the same sharded sequence on dim 2
        for x in (q, k, v):
            if not isinstance(self.layout.get(x), Sharded):
                d = self._in_token_dim(x)
                if d != 2:
                    raise _Fallback("q/k/v not laid out as [B, H, S, D]")
                node.replace_input_with(x, self.shard_node(x, 2, node))
        q, k, v = node.args[:3]
        lq, lk, lv = (self.layout[x] for x in (q, k, v))
        if not (lq.dim == lk.dim == lv.dim == 2 and lq.segs == lk.segs == lv.segs):
            raise _Fallback("q/k/v sharded on different dims or segments")
        if kw.get("dropout_p", 0.0) not in (0, 0.0):
            raise _Fallback("dropout in self-attention")
        if (kw.get("is_causal") or kw.get("enable_gqa")) and (self.patch is not None or self.fastattn):
            raise _Fallback("causal or GQA attention under PipeFusion or DiTFastAttn")
        kwargs = dict(kw)
        if kwargs.pop("enable_gqa", False):  # grouped K/V heads: repeated to one per query head, as SDPA reads them
            k, v = (self._repeat_heads(node, x, node_val(q).shape[1] // node_val(x).shape[1]) for x in (k, v))
        if kwargs.pop("is_causal", False):  # causal in global order: a mask the sharded attention picks from
            if mask is not None:
                raise _Fallback("causal attention with a mask")
            mask = kwargs["attn_mask"] = self._causal_mask(node, q, lq.segs)
        if mask is not None:
            mv = node_val(mask)
            # a mask per head (Lumina-Next expands its key mask over the heads): Ulysses picks this rank's heads
            # of it (`seq.seq_attention`); PipeFusion's and DiTFastAttn's attention take one for all heads
            per_head = mv.dim() == 4 and mv.shape[1] != 1
            if mv.dim() < 2 or (per_head and (self.patch is not None or self.fastattn)):
                raise _Fallback("attention mask per head")
            if isinstance(self.layout.get(mask), Sharded):
                kwargs["attn_mask"] = self.gather_node(mask, node, f"mask:{node.name}")
        qv, kv = node_val(q), node_val(k)
        if qv.shape[1] != kv.shape[1]:
            raise _Fallback("different head counts for q and k")
        st = self.seq
        if self.patch is not None:  # a mask stays whole (global order): the op picks this patch's rows
            if self.patch.sp > 1 and mask is not None:
                raise _Fallback("attention mask under PipeFusion x sequence parallelism")
            with self.g.inserting_before(node):
                kwargs["lengths"] = self.lengths(lq.segs, node)
                if self.patch.u > 1:
                    sent = self.g.call_function(OPS["ulysses_send"], (q, k, v, self.patch.u, self.patch.ulysses_group))
                    sent.meta = {k_: node.meta[k_] for k_ in ("ditpass_block", "nn_module_stack", "stack_trace")
                                 if k_ in node.meta}
                    kwargs["sent"] = sent
            node.kwargs = kwargs
            self.layout[node] = Sharded(2, lq.segs)
            self.sites.refine(site.site, note="patch K/V buffer", patch=self.patch)
            return
        with self.g.inserting_before(node):
            kwargs["lengths"] = self.lengths(lq.segs, node)
            if st.u > 1:  # the all-to-all starts in its own node: the overlap pass may move work after it
                sent = self.g.call_function(OPS["ulysses_send"], (q, k, v, st.u, st.ulysses_group))
                sent.meta = {k_: node.meta[k_] for k_ in ("ditpass_block", "nn_module_stack", "stack_trace")
                             if k_ in node.meta}
                kwargs["sent"] = sent
        node.kwargs = kwargs
        self.layout[node] = Sharded(2, lq.segs)
        heads = qv.shape[1]
        pad = None if st.u == 1 or heads % st.u == 0 else f"heads {heads} padded to {seq.chunk_len(heads, st.u) * st.u}"
        self.sites.refine(site.site, note=pad, seq=st)
        local = _nbytes(qv, 1) // st.n  # one of q/k/v/out on this rank (meta vals are global)
        if st.u > 1:  # q, k, v in one all-to-all and the output in another; (u-1)/u of it leaves
            self.collectives.append(Collective(node.name, "all_to_all x2", "ulysses", node.name,
                                               int(4 * local * (st.u - 1) / st.u)))
        if st.r > 1:  # k and v go to the r-1 other ring ranks
            self.collectives.append(Collective(node.name, "all_gather(k,v)", "ring", node.name, 2 * local * (st.r - 1)))

    # ---- flex_attention ---------------------------------------------------------------
    _FLEX_BLOCK_LEN = 17  # BlockMask.as_tuple(): (Q_LEN, KV_LEN), 11 tables, dq_kv_order_spt, (Q, KV) block size, mask_mod

    def _flex_refusal(self, node, fx) -> str | None:
        """Why a flex_attention call cannot run sequence-parallel as `ditpass.runtime.seq.flex_seq_attention`
        computes it (None: it can)."""
        if fx["outputs"] is None:
            return "flex_attention's result is read other than by getitem"
        if any(i != 0 for i in fx["outputs"]):
            return "flex_attention's log-sum-exp or max score is used (only its output is computed sharded)"
        q, k, v = node.args[:3]
        if any(node_val(x).dim() != 4 for x in (q, k, v)):
            return "flex_attention's q/k/v are not [B, H, S, D]"
        block = fx["block"]
        if len(block) != self._FLEX_BLOCK_LEN:
            return f"flex_attention's BlockMask has {len(block)} fields, not the {self._FLEX_BLOCK_LEN} known"
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in block[14:16]):
            return "flex_attention's block size is not a constant"
        if not isinstance(fx["score"], torch.fx.GraphModule) or not isinstance(fx["mask"], torch.fx.GraphModule):
            return "flex_attention's score_mod or mask_mod is not a subgraph"
        if fx["reads"]["score"] is None or fx["reads"]["mask"] is None:
            return "flex_attention's score_mod or mask_mod arguments cannot be read"
        kvn = block[2]
        H = node_val(q).shape[1]
        if not isinstance(kvn, torch.fx.Node) or node_val(kvn).dim() != 3 or node_val(kvn).shape[1] not in (1, H):
            return "flex_attention's BlockMask is not [B, H or 1, query blocks]"
        return None

    def _whole(self, x, node, why):
        """``x`` (a node, or anything else) whole: gathered where it is sharded."""
        if isinstance(x, torch.fx.Node) and isinstance(self.layout.get(x), Sharded):
            g = self.gather_node(x, node, why)
            node.replace_input_with(x, g)
            return g
        return x

    def _flex(self, node, lays):
        """A ``torch.ops.higher_order.flex_attention`` call whose q is a sharded token sequence becomes one
        ``ditpass::flex_attention`` op (`ditpass.runtime.seq.flex_seq_attention`), its score_mod / mask_mod / block
        size in the site's entry; the HOP and its getitems go. K/V the same sharded sequence (self / joint): Ulysses
        gives each rank its heads of every token, the ring (or USP) each rank's queries against the whole K/V. K/V
        whole and no token sequence (cross attention): each rank's queries against them, no communication. The op
        maps the local head and query indices to the global ones that the mods read and cuts the block mask for its
        heads / queries: exact for any score_mod and mask_mod. A call it cannot take is gathered around (a note)."""
        sid = self.flex_sites[node]
        fx = flex_info(node)
        q, k, v = node.args[:3]
        lq, lk, lv = (self.layout.get(x) for x in (q, k, v))
        any_sharded = any(isinstance(x, Sharded) for x in (lq, lk, lv))
        kv_tok = bool(self.out_token_dims(node_val(k)) or self.out_token_dims(node_val(v))) or \
            isinstance(lk, Sharded) or isinstance(lv, Sharded)
        if not any_sharded and self._in_token_dim(q) != 2:
            self.layout[node] = None  # no token sequence reaches it: it runs as captured
            return
        why = self._flex_refusal(node, fx)
        if why is None and any(isinstance(x, Sharded) and x.dim != 2 for x in (lq, lk, lv)):
            why = "the sharded tokens are not flex_attention's sequence dim (dim 2 of [B, H, S, D])"
        if why is None and kv_tok and self.seq.u > 1:
            qv, kv_, vv = (node_val(x) for x in (q, k, v))
            if vv.shape[-1] != qv.shape[-1] or qv.shape[1] % kv_.shape[1]:
                why = "flex_attention with a value head dim unlike q's, or K/V heads that do not divide q's, under Ulysses"
        if why is not None:
            if any_sharded:
                raise _Fallback(why)
            self.layout[node] = None
            self.notes.append(f"flex_attention `{node.name}` in `{module_path(node) or '<root>'}`: {why}")
            return
        for x in ((q, k, v) if kv_tok else (q,)):  # the sequence's tensors that are not sharded yet: cut here
            if not isinstance(self.layout.get(x), Sharded):
                if self._in_token_dim(x) != 2:
                    raise _Fallback("flex_attention's q/k/v not laid out as [B, H, S, D]")
                node.replace_input_with(x, self.shard_node(x, 2, node))
        q, k, v = node.args[:3]
        lq = self.layout[q]
        if kv_tok and not all(isinstance(self.layout.get(x), Sharded) and self.layout[x].segs == lq.segs
                              for x in (k, v)):
            raise _Fallback("flex_attention's q/k/v sharded on different dims or segments")
        # everything else it reads is whole on every rank (block tables, the mods' buffers: global positions)
        tables = [self._whole(t, node, f"flex block mask:{node.name}") for t in node.args[4][2:13]]
        score_bufs = [self._whole(t, node, f"flex score_mod buffer:{node.name}") for t in node.args[7]]
        mask_bufs = [self._whole(t, node, f"flex mask_mod buffer:{node.name}") for t in node.args[8]]
        block = node.args[4]
        qv = node_val(q)
        st = self.seq
        with self.g.inserting_before(node):
            lens = self.lengths(lq.segs, node)
            new = self.g.call_function(seq.FLEX_OP, (q, k, v, self._site_attr(sid), tables, score_bufs,
                                                               mask_bufs, list(block[:2])), {"lengths": lens})
        new.meta = {k_: node.meta[k_] for k_ in ("ditpass_block", "nn_module_stack", "stack_trace", "ditpass_attention")
                    if k_ in node.meta}
        new.meta["val"] = node_val(node)[0]
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(new)
        for user in list(node.users):
            self.g.erase_node(user)
        self.g.erase_node(node)
        self.layout[new] = Sharded(2, lq.segs)
        self.layout[node] = None
        reads = fx["reads"]["score"] | fx["reads"]["mask"]
        per_head = node_val(block[2]).shape[1] != 1
        large = 1 << 30
        masked = tuple(block[14:16]) != (large, large)
        if kv_tok and st.u > 1 and st.r == 1:
            how = ["Ulysses: this rank's heads of every token, in global order"]
            how += ["h mapped to the global head"] if "h" in reads else []
            how += ["the block mask's heads cut to this rank's"] if masked and per_head else []
        else:
            how = [("USP: this rank's heads and queries" if kv_tok and st.u > 1 else "this rank's queries") +
                   (" against the whole K/V (all-gathered)" if kv_tok else " against the whole K/V (replicated)")]
            how += ["h mapped to the global head"] if "h" in reads and kv_tok and st.u > 1 else []
            how += ["q_idx mapped to global positions"] if "q_idx" in reads else []
            how += ["the block mask's heads cut to this rank's"] if masked and per_head and kv_tok and st.u > 1 else []
            how += ["the block mask's rows cut for them"] if masked else []
        spec = FlexSite(fx["score"], fx["mask"], node.args[5], dict(node.args[6]), tuple(block[14:16]), block[13],
                        int(qv.shape[1]), kv_tok, fx["reads"])
        self.sites.refine(sid, note="flex_attention: " + "; ".join(how), seq=st, flex=spec)
        local = _nbytes(qv, 1) // st.n
        if kv_tok and st.u > 1:
            self.collectives.append(Collective(new.name, "all_to_all x2", "ulysses", new.name,
                                               int(4 * local * (st.u - 1) / st.u)))
        if kv_tok and st.r > 1:
            self.collectives.append(Collective(new.name, "all_gather(k,v)", "ring", new.name, 2 * local * (st.r - 1)))

    def _site_attr(self, sid: int) -> torch.fx.Node:
        """The get_attr node of site ``sid``'s id tensor (``site_<id>``, a buffer of the graph module), at the top."""
        site_t = site_id_node(self.gm, sid, next(n for n in self.g.nodes if n.op != "placeholder"))
        self.layout[site_t] = None
        return site_t

    def _attention_batched(self, node, site, lay: Sharded):
        """The sharded dim is a batch dim of this attention (a video DiT's temporal attention over the frames of
        each patch, the patches a batch dim of SDPA): each rank attends for its own tokens, no communication."""
        q, k, v = node.args[:3]
        mask = node.kwargs.get("attn_mask")
        ref_cls = self.dim_class(q if isinstance(self.layout.get(q), Sharded) else k, lay.dim)
        for x in (q, k, v) + ((mask,) if isinstance(mask, torch.fx.Node) else ()):
            lx = self.layout.get(x)
            if isinstance(lx, Sharded):
                if (lx.dim, lx.segs) != (lay.dim, lay.segs):
                    raise _Fallback("q/k/v sharded on different dims or segments")
                continue
            d = self._class_dim(node_val(x), ref_cls)
            if x is mask and d is None:
                continue  # a mask without the token dim broadcasts over it
            if d != lay.dim:
                raise _Fallback("q/k/v sharded on different dims or segments")
            node.replace_input_with(x, self.shard_node(x, d, node))
        self.layout[node] = Sharded(lay.dim, lay.segs)
        self.sites.refine(site.site, note="token-wise: the sharded tokens are a batch dim here, no communication")

    def _attention_flattened(self, node, lays):
        """[B, T, H, S, D] attention (more batch dims than [B, H, S, D]): the batch dims flattened into one around
        the sequence-parallel attention, which takes 4-D q/k/v."""
        q = node.args[0]
        nd = node_val(q).dim()
        if isinstance(node.kwargs.get("attn_mask"), torch.fx.Node) and node_val(node.kwargs["attn_mask"]).dim() > 2:
            raise _Fallback("attention mask with more than one batch dim")
        lead = []  # the leading sizes back, read from q in the graph (a SymInt cannot be a constant); -1 last
        for d in range(nd - 4):
            size = node_val(q).shape[d]
            if isinstance(size, torch.SymInt):
                with self.g.inserting_before(node):
                    size = self.g.call_function(aten.sym_size.int, (q, d))
                size.meta["val"] = node_val(q).shape[d]
            lead.append(size)
        lead.append(-1)
        flat_args = []
        for x in node.args[:3]:
            with self.g.inserting_before(node):
                f = self.g.call_function(aten.flatten.using_ints, (x, 0, nd - 4))
            f.meta["val"] = node_val(x).flatten(0, nd - 4)
            lx = self.layout.get(x)
            self.layout[f] = Sharded(2, lx.segs) if isinstance(lx, Sharded) else None
            flat_args.append(f)
        out_val = node_val(node)
        node.args = (*flat_args, *node.args[3:])
        node.meta["val"] = out_val.flatten(0, nd - 4)
        with self.g.inserting_after(node):
            back = self.g.call_function(aten.unflatten.int, (node, 0, lead))
        back.meta["val"] = out_val
        for key in ("nn_module_stack", "ditpass_block", "stack_trace"):
            if key in node.meta:
                back.meta[key] = node.meta[key]
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        self._attention(node, {a: self.layout.get(a) for a in _tensor_args(node)})
        lay = self.layout.get(node)
        self.layout[back] = Sharded(nd - 2, lay.segs) if isinstance(lay, Sharded) else None

    def _repeat_heads(self, node, x, g: int):
        """``x`` ([B, H_kv, S, D], sharded) with each head repeated ``g`` times (GQA as plain attention)."""
        if g == 1:
            return x
        with self.g.inserting_before(node):
            r = self.g.call_function(aten.repeat_interleave.self_int, (x, g, 1))
        r.meta["val"] = node_val(x).repeat_interleave(g, 1)
        self.layout[r] = self.layout[x]
        node.replace_input_with(x, r)
        return r

    def _causal_mask(self, node, q, segs):
        """``is_causal`` as a [S, S] boolean mask of global positions (key <= query), replicated."""
        with self.g.inserting_before(node):
            total = _sum(self.g, self.lengths(segs, node))
            idx = self.g.call_function(aten.arange.default, (total,), {"device": node_val(q).device})
            rows = self.g.call_function(aten.unsqueeze.default, (idx, 1))
            cols = self.g.call_function(aten.unsqueeze.default, (idx, 0))
            m = self.g.call_function(aten.le.Tensor, (cols, rows))
        S = node_val(q).shape[2]
        i = node_val(q).new_empty((S,), dtype=torch.long)
        idx.meta["val"], rows.meta["val"], cols.meta["val"] = i, i.unsqueeze(1), i.unsqueeze(0)
        m.meta["val"] = i.unsqueeze(0) <= i.unsqueeze(1)
        for x in (idx, rows, cols, m):
            self.layout[x] = None
        return m

    def io(self) -> dict[str, str]:
        """What happened to the module's inputs and outputs, for explain's layout table.

        An input of symbolic size that is not sharded where it enters may be sharded later, as part of
        a tensor computed from it (FLUX's ``img_ids`` -> the RoPE table, DiT's latent -> the patch
        tokens): that tensor is named."""
        placeholders = {n.name: n for n in self.g.nodes if n.op == "placeholder"}
        direct: dict[str, list[str]] = {}
        derived: list[tuple[torch.fx.Node, str]] = []
        for s in self.shards:
            if s._erased:  # removed as dead code
                continue
            src, dim = s.args[0], s.args[1]
            if src.op == "placeholder":
                direct.setdefault(src.name, []).append(f"sharded along dim {dim} where it enters")
            else:
                users = ", ".join(f"`{u.name}`" for u in s.users)
                derived.append((src, f"sharded: dim {dim} of `{src.name}` (computed from it), before {users}"))
        out = {f"in {k}": "; ".join(v) for k, v in direct.items()}
        for src, text in derived:
            for ph in _upstream_placeholders(src):
                if ph not in direct and _symbolic(placeholders[ph]):
                    key = f"in {ph}"
                    out[key] = f"{out[key]}; {text}" if key in out else text
        out_node = next(n for n in reversed(self.g.nodes) if n.op == "output")
        gathered = set(self.gathered.values())
        for i, a in enumerate(flat(out_node.args)):
            if a in gathered:
                out[f"out {i}"] = f"all-gathered along dim {a.args[1]} (`{a.name}`)"
        return out


def boundary_index(cum, e, eq):
    for k, c in enumerate(cum):
        if eq(e, c):
            return k
    return None


def _sum(g, nodes):
    if not nodes:
        return 0
    total = nodes[0]
    for x in nodes[1:]:
        total = g.call_function(operator.add, (total, x))
    return total


def _nbytes(val, n: int) -> int:
    """Bytes this rank sends of ``val`` in an all-gather over ``n`` ranks: (n-1)/n of it."""
    total = nbytes(val)
    return total * (n - 1) // n if n > 1 else total


def _written_in_place(graph: torch.fx.Graph) -> set:
    """In-place ops and the nodes they write through (``img_mask[i, :n] = 1`` is ``fill_`` of a ``select`` /
    ``slice`` view of ``zeros``): the view chain back to its base. Sharding one of them would give the write a copy, and
    the base (read later, e.g. by a ``cat``) would never see it; they stay replicated, unchanged."""
    out: set = set()
    for node in graph.nodes:
        t = node.target
        if not (isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable) or not node.args:
            continue
        out.add(node)  # (nor its inputs swapped for shards)
        x = node.args[0]
        while isinstance(x, torch.fx.Node) and x not in out:
            out.add(x)
            xt = x.target
            if not (isinstance(xt, torch._ops.OpOverload) and getattr(xt, "is_view", False)) or not x.args:
                break
            x = x.args[0]
    return out


class _Fallback(Exception):
    pass


def _vmap_regions(graph: torch.fx.Graph) -> dict:
    """Nodes that export traced inside ``torch.vmap`` (flex_attention's BlockMask: ``create_block_mask``,
    ``BlockMask.from_kv_blocks``): everything from a ``_vmap_increment_nesting`` to its matching
    ``_vmap_decrement_nesting``, mapped to the outermost increment (where the region starts). Their values are
    batched at a vmap level; ops inserted among them would see them so."""
    try:
        from torch._functorch import predispatch
    except ImportError:
        return {}
    inc, dec = getattr(predispatch, "_vmap_increment_nesting", None), getattr(predispatch, "_vmap_decrement_nesting", None)
    out, depth, start = {}, 0, None
    for node in graph.nodes:
        if node.op == "call_function" and inc is not None and node.target is inc:
            if depth == 0:
                start = node
            depth += 1
        if depth > 0:
            out[node] = start
        if node.op == "call_function" and dec is not None and node.target is dec and depth > 0:
            depth -= 1
    return out



def _symbolic(node) -> bool:
    val = node_val(node)
    return isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape)


def _upstream_placeholders(node, limit: int = 400) -> list[str]:
    seen, todo, found = set(), [node], []
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if isinstance(node_val(n), torch.Tensor):
                found.append(n.name)
            continue
        todo.extend(n.all_input_nodes)
    return sorted(found)
