"""Parallel VAE decode: the decoder's feature maps split into row bands over the ranks, exactly.

Before (one device, the whole map)::

    h = conv2d(z, w, b, [1, 1], [1, 1])            # [B, C, H, W], 3x3 kernel, padding 1
    h = group_norm(h, 32, gw, gb, 1e-6)
    h = upsample_nearest2d(h, None, [2.0, 2.0])     # [B, C, 2H, 2W]
    out = conv2d(h, w2, b2, [1, 1], [1, 1])

After (rank r of n holds rows [sum(rows[:r]), sum(rows[:r+1])) of every map)::

    h = conv2d(halo_pad(z_band, 2, 1, 1, rows, r, group, 0.0), w, b, [1, 1], [0, 1])
    h = group_norm_rows(h, 32, gw, gb, 1e-6, count, group)     # statistics all-reduced
    h = upsample_nearest2d(h, None, [2.0, 2.0])                 # bands double with the map: aligned
    out = gather_rows(conv2d(halo_pad(h, 2, 1, 1, 2 * rows, ...), ...), 2, 2 * rows, r, group)

The decoder is captured statically (``torch.export`` at the latent's shape; one capture per shape) and
the latent enters split into bands of the latent rows (`ditpass.runtime.halo.band_rows`: uneven heights
are exact, each rank needs one row). Rules, one walk in graph order; a node is *banded* (its row dim and
every rank's rows there) or *whole*:

- pointwise ops (``torch.Tag.pointwise``, and dropout / clone / ``.to`` / ``type_as`` / ``expand_as``),
  with broadcasting: banded. A whole operand as tall as the band's map is cut to this rank's rows.
- ``conv2d`` / ``conv3d`` (stride 1 along the rows): the rows the kernel reaches across the band's edge
  come from the neighbours (`halo_pad`, zeros at the map's edges = the conv's zero padding), and the conv
  runs with no row padding. An explicit ``pad`` before a conv (causal 3-D convs pad by hand) becomes the
  halo the same way.
- ``group_norm``: `group_norm_rows`, the same normalisation with all-reduced statistics.
- nearest upsampling (2-D, 3-D, "exact") by an integer factor along the rows: banded, every band scaled.
- layout ops that keep the rows a dim of their own (permute, transpose, (un)squeeze, select / slice /
  cat / stack / chunk along another dim, view / reshape that merge or split other dims, ``*_like``),
  and reductions over other dims (the channel norm of Wan's RMS norm): banded.
- anything else with a banded input (attention in the mid block, which mixes all positions): the input
  is gathered (`gather_rows`), the op runs on the whole map, and ``explain`` says so; where its result
  meets a banded map again it is cut back to this rank's rows. The outputs are gathered: every rank gets
  the whole picture.

The decode is exact up to float rounding (the group norm's sums are summed in another order).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx

from ditpass.analysis.blocks import module_path
from ditpass.pass_base import Collective, GraphPass, PassContext, PassResult, Table, nbytes
from ditpass.runtime.halo import band_rows

__all__ = ["ParallelVAE"]

aten = torch.ops.aten
H = torch.ops.ditpass

_CONV = {aten.conv2d.default, aten.conv3d.default}
_PAD = {aten.pad.default, aten.constant_pad_nd.default}
_UPSAMPLE = {aten.upsample_nearest2d.vec, aten._upsample_nearest_exact2d.vec, aten.upsample_nearest3d.vec,
             aten._upsample_nearest_exact3d.vec}
_SAME = {aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default, aten.to.dtype,
         aten.to.dtype_layout, aten.to.device, aten.expand_as.default,
         aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default}
# reductions: (index of the dims argument, index of keepdim)
_REDUCE = {aten.linalg_vector_norm.default: (2, 3), aten.sum.dim_IntList: (1, 2), aten.mean.dim: (1, 2),
           aten.amax.default: (1, 2), aten.var.correction: (1, 3)}
_SKIP = {aten._assert_tensor_metadata.default}


class _Whole(Exception):
    """This op cannot run on bands: gather its inputs and run it on the whole map."""


class Band:
    """A map split into row bands: ``dim`` the row dim, ``rows`` every rank's rows (sum: the map's height)."""

    __slots__ = ("dim", "rows")

    def __init__(self, dim: int, rows: tuple):
        self.dim, self.rows = dim, tuple(rows)

    def __repr__(self):
        return f"Band(dim={self.dim}, rows={list(self.rows)})"


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule, rank: int, n: int, group: str):
        self.gm, self.g = gm, gm.graph
        self.rank, self.n, self.group = rank, n, group
        self.lay: dict = {}
        self.halos: list = []  # (node, module path, rows exchanged, bytes)
        self.norms: list = []
        self.gathers: list = []  # (node, why, bytes)
        self.heights: dict[int, tuple] = {}  # map height -> bands, for cutting whole maps back

    # ---- helpers ------------------------------------------------------------------------------
    def _offset(self, rows) -> int:
        return sum(rows[:self.rank])

    def _insert(self, before, target, args, like):
        """A new node; its ``meta['val']`` is ``like``'s, the whole map's value (what the walk reads: sizes
        stay those of the capture; `run_passes` propagates this rank's values after the pass)."""
        with self.g.inserting_before(before):
            new = self.g.call_function(target, args)
        new.meta["val"] = like.meta.get("val")
        if "nn_module_stack" in like.meta:  # (explain names the module it serves)
            new.meta["nn_module_stack"] = like.meta["nn_module_stack"]
        return new

    def _gather(self, x, before, why: str):
        lay = self.lay[x]
        v = _val(x)
        node = self._insert(before, H.gather_rows.default, (x, lay.dim, list(lay.rows), self.rank, self.group), x)
        self.gathers.append((before.name, why, nbytes(v) if v is not None else 0))
        return node

    def _cut(self, x, dim: int, rows, before):
        """This rank's rows of a whole map (no communication)."""
        return self._insert(before, aten.narrow.default, (x, dim, self._offset(rows), rows[self.rank]), x)

    # ---- the walk -----------------------------------------------------------------------------
    def run(self):
        placeholders = [n for n in self.g.nodes if n.op == "placeholder"]
        for p in placeholders:
            v = _val(p)
            self.lay[p] = None
            if isinstance(v, torch.Tensor) and v.dim() in (4, 5) and v.is_floating_point():
                self._band_input(p, v)
        for node in list(self.g.nodes):
            if node.op == "placeholder" or node in self.lay and node.op != "output":
                continue
            if node.op == "output":
                self._output(node)
            elif node.op != "call_function":
                self.lay[node] = None
            else:
                try:
                    self._visit(node)
                except _Whole as why:
                    self._whole(node, str(why))
        self.g.eliminate_dead_code()

    def _band_input(self, p, v):
        dim = v.dim() - 2
        height = int(v.shape[dim])
        if height < self.n:
            raise ValueError(f"the latent has {height} rows, fewer than the {self.n} ranks of the parallel VAE: "
                             f"decode it on fewer ranks (or whole)")
        rows = tuple(band_rows(height, self.n))
        users = [u for u in p.users if u.op == "call_function"]  # (not export's guard function: the whole z)
        with self.g.inserting_after(p):
            band = self.g.call_function(aten.narrow.default, (p, dim, self._offset(rows), rows[self.rank]))
        band.meta["val"] = v
        for u in users:
            u.replace_input_with(p, band)
        self.lay[band] = Band(dim, rows)
        self.heights[height] = rows

    def _whole(self, node, why: str):
        for a in node.all_input_nodes:
            if isinstance(self.lay.get(a), Band):
                node.replace_input_with(a, self._gather(a, node, why))
        self.lay[node] = None

    def _output(self, node):
        def fix(a):
            if isinstance(a, torch.fx.Node) and isinstance(self.lay.get(a), Band):
                return self._gather(a, node, "output: every rank gets the whole picture")
            return a

        node.args = (torch.fx.node.map_arg(node.args[0], fix),)

    def _visit(self, node):
        t = node.target
        if t in _SKIP:  # asserts of dtype and device: true of a band too
            self.lay[node] = None
            return
        if t is operator.getitem:
            src = self.lay.get(node.args[0])
            self.lay[node] = src[node.args[1]] if isinstance(src, list) else None
            return
        bands = [a for a in node.all_input_nodes if isinstance(self.lay.get(a), Band)]
        if not bands:
            self.lay[node] = None
            return
        if t in _CONV:
            return self._conv(node)
        if t in _PAD:
            return self._pad(node)
        if t is aten.group_norm.default:
            return self._group_norm(node)
        if t in _UPSAMPLE:
            return self._upsample(node)
        if t in _REDUCE:
            return self._reduce(node)
        if t in _SAME or (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags):
            return self._pointwise(node)
        handler = _LAYOUT.get(t)
        if handler is not None:
            return handler(self, node)
        raise _Whole(f"{t} mixes the rows")

    # ---- rules --------------------------------------------------------------------------------
    def _pointwise(self, node):
        out = _val(node)
        ref = None
        for a in node.all_input_nodes:
            lay = self.lay.get(a)
            if isinstance(lay, Band):
                d = lay.dim + out.dim() - _val(a).dim()
                if ref is not None and (ref.dim != d or ref.rows != lay.rows):
                    raise _Whole("operands banded differently")
                ref = Band(d, lay.rows)
        for a in list(node.all_input_nodes):
            v = _val(a)
            if isinstance(self.lay.get(a), Band) or not isinstance(v, torch.Tensor):
                continue
            d = ref.dim - (out.dim() - v.dim())
            if d < 0 or int(v.shape[d]) == 1:
                continue  # broadcast along the rows
            if int(v.shape[d]) != sum(ref.rows):
                raise _Whole("a whole operand of another height")
            node.replace_input_with(a, self._cut(a, d, ref.rows, node))
        self.lay[node] = ref

    def _conv(self, node):
        x, w = node.args[0], node.args[1]
        lay, xv, wv = self.lay.get(x), _val(x), _val(w)
        if not isinstance(lay, Band) or isinstance(self.lay.get(w), Band) or lay.dim != xv.dim() - 2:
            raise _Whole("convolution over banded weights or along another dim")
        if isinstance(lay, _Halo):  # an explicit pad made the halo: the conv reads exactly its rows
            self.lay[node] = Band(lay.dim, lay.rows)
            return
        nd = xv.dim() - 2
        args = list(node.args) + [None] * (7 - len(node.args))
        stride = _expand(args[3] if args[3] is not None else 1, nd)
        padding = _expand(args[4] if args[4] is not None else 0, nd)
        dilation = _expand(args[5] if args[5] is not None else 1, nd)
        k = int(wv.shape[-2])
        if stride[-2] != 1:
            raise _Whole("strided convolution along the rows")
        reach = dilation[-2] * (k - 1)
        top = padding[-2]
        bottom = reach - top
        if reach:
            if bottom < 0 or min(lay.rows) < max(top, bottom):
                raise _Whole("halo taller than a band")
            x2 = self._insert(node, H.halo_pad.default, (x, lay.dim, top, bottom, list(lay.rows), self.rank,
                                                         self.group, 0.0), x)
            node.replace_input_with(x, x2)
            padding[-2] = 0
            args[0], args[3], args[4], args[5] = x2, stride, padding, dilation
            node.args = tuple(args[:max(len(node.args), 6)])
            self._record_halo(node, x, top + bottom)
        self.lay[node] = Band(lay.dim, lay.rows)

    def _pad(self, node):
        """An explicit zero pad of the rows before a convolution becomes the halo."""
        x, pad = node.args[0], list(node.args[1])
        mode = node.args[2] if len(node.args) > 2 and node.target is aten.pad.default else "constant"
        value = node.args[3] if len(node.args) > 3 and node.target is aten.pad.default else (
            node.args[2] if node.target is aten.constant_pad_nd.default and len(node.args) > 2 else 0.0)
        lay, xv = self.lay[x], _val(x)
        i = 2 * (xv.dim() - 1 - lay.dim)  # pad pairs run from the last dim
        top, bottom = (pad[i], pad[i + 1]) if i + 1 < len(pad) else (0, 0)
        if not (top or bottom):
            self.lay[node] = Band(lay.dim, lay.rows)
            return
        if mode != "constant" or min(lay.rows) < max(top, bottom) or top < 0 or bottom < 0:
            raise _Whole("a pad of the rows that is not a zero halo")
        convs = [u for u in node.users if u.target in _CONV and u.args[0] is node]
        if len(convs) != len(node.users) or any(_row_padding(u) or _row_reach(u) != top + bottom for u in convs):
            raise _Whole("a pad of the rows read by something other than a convolution it pads for")
        rest = pad[:i] + [0, 0] + pad[i + 2:]
        src = x
        if any(rest):
            src = self._insert(node, aten.constant_pad_nd.default, (x, rest, value or 0.0), x)
        halo = self._insert(node, H.halo_pad.default, (src, lay.dim, top, bottom, list(lay.rows), self.rank,
                                                       self.group, float(value or 0.0)), node)
        node.replace_all_uses_with(halo)
        self.g.erase_node(node)
        self._record_halo(halo, x, top + bottom)
        # the consumer (a conv with no row padding) reads rows+top+bottom rows: its output is banded
        self.lay[halo] = _Halo(lay.dim, lay.rows, top + bottom)

    def _group_norm(self, node):
        x, groups = node.args[0], node.args[1]
        weight, bias = (node.args + (None, None))[2:4]
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        lay, xv = self.lay[x], _val(x)
        if lay.dim < 2:
            raise _Whole("group norm over the rows dim's own axis")
        count = xv.numel() // (xv.shape[0] * groups)  # elements of one (sample, group) of the whole map
        new = self._insert(node, H.group_norm_rows.default, (x, groups, weight, bias, eps, count, self.group), node)
        node.replace_all_uses_with(new)
        self.g.erase_node(node)
        self.lay[new] = Band(lay.dim, lay.rows)
        self.norms.append((new.name, module_path(node) or "<root>", 2 * xv.shape[0] * groups * 4))

    def _upsample(self, node):
        x = node.args[0]
        lay = self.lay[x]
        size, scales = node.args[1], (node.args[2] if len(node.args) > 2 else None)
        sdim = lay.dim - 2  # spatial index of the rows in output_size / scale_factors
        height = sum(lay.rows)
        if size is not None:
            new_h = int(size[sdim])
        elif scales is not None:
            new_h = int(math.floor(height * scales[sdim]))
        else:
            raise _Whole("upsampling without a size")
        if new_h % height:
            raise _Whole("upsampling by a factor that is not a whole number")
        f = new_h // height
        rows = tuple(r * f for r in lay.rows)
        if size is not None:
            size = list(size)
            size[sdim] = rows[self.rank]
            node.args = (x, size, *node.args[2:])
        self.lay[node] = Band(lay.dim, rows)
        self.heights[new_h] = rows

    def _reduce(self, node):
        x = node.args[0]
        lay, xv = self.lay[x], _val(x)
        di, ki = _REDUCE[node.target]
        dims = node.args[di] if len(node.args) > di else node.kwargs.get("dim")
        keep = node.args[ki] if len(node.args) > ki else node.kwargs.get("keepdim", False)
        if not dims and dims != 0:
            raise _Whole("a reduction over every dim")
        dims = [d % xv.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if lay.dim in dims:
            raise _Whole("a reduction over the rows")
        d = lay.dim if keep else lay.dim - sum(1 for x_ in dims if x_ < lay.dim)
        self.lay[node] = Band(d, lay.rows)

    def _record_halo(self, node, x, rows_exchanged):
        v = _val(x)
        per_row = nbytes(v) // max(int(v.shape[self.lay[x].dim]), 1) if v is not None else 0
        self.halos.append((node.name, module_path(node) or "<root>", rows_exchanged, per_row * rows_exchanged))


class _Halo(Band):
    """A band with ``extra`` halo rows (an explicit pad made a halo): only a convolution may read it."""

    __slots__ = ("extra",)

    def __init__(self, dim, rows, extra):
        super().__init__(dim, rows)
        self.extra = extra


def _row_padding(conv) -> int:
    pad = conv.args[4] if len(conv.args) > 4 else 0
    return _expand(pad, _val(conv.args[0]).dim() - 2)[-2]


def _row_reach(conv) -> int:
    dil = conv.args[5] if len(conv.args) > 5 else 1
    return _expand(dil, _val(conv.args[0]).dim() - 2)[-2] * (int(_val(conv.args[1]).shape[-2]) - 1)


def _expand(v, nd: int) -> list:
    return list(v) * (nd if len(list(v)) == 1 else 1) if isinstance(v, (list, tuple)) else [v] * nd


# ---- layout ops: where the row dim goes ---------------------------------------------------------


def _same_dim(rw, node):
    lay = rw.lay[node.args[0]]
    rw.lay[node] = Band(lay.dim, lay.rows)


def _along_other(rw, node, dim_arg: int = 1):
    x = node.args[0]
    lay, xv = rw.lay[x], _val(x)
    d = node.args[dim_arg] % xv.dim() if len(node.args) > dim_arg else 0
    if d == lay.dim:
        raise _Whole(f"{node.target} along the rows")
    return lay, d


def _slice(rw, node):
    lay, _ = _along_other(rw, node)
    rw.lay[node] = Band(lay.dim, lay.rows)


def _select(rw, node):
    lay, d = _along_other(rw, node)
    rw.lay[node] = Band(lay.dim - (d < lay.dim), lay.rows)


def _chunk(rw, node):
    lay, _ = _along_other(rw, node, 2)
    rw.lay[node] = [Band(lay.dim, lay.rows) for _ in _val(node)]


def _stack(rw, node):
    """A new dim at ``d`` (never the rows): the rows move one on where it is inserted before them."""
    parts, d = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
    lays = [rw.lay.get(p) for p in parts]
    ref = next(lay for lay in lays if isinstance(lay, Band))
    if not all(isinstance(lay, Band) and lay.dim == ref.dim and lay.rows == ref.rows for lay in lays):
        raise _Whole("stack of maps banded differently")
    rw.lay[node] = Band(ref.dim + (d % (_val(parts[0]).dim() + 1) <= ref.dim), ref.rows)


def _type_as(rw, node):
    """``x.type_as(other)``: only ``other``'s dtype matters."""
    _same_dim(rw, node) if isinstance(rw.lay.get(node.args[0]), Band) else rw.lay.__setitem__(node, None)


def _cat(rw, node):
    parts, d = node.args[0], (node.args[1] if len(node.args) > 1 else 0)
    lays = [rw.lay.get(p) for p in parts]
    ref = next(lay for lay in lays if isinstance(lay, Band))
    nd = _val(parts[0]).dim()
    if d % nd == ref.dim or not all(isinstance(lay, Band) and lay.dim == ref.dim and lay.rows == ref.rows
                                    for lay in lays):
        raise _Whole("cat along the rows, or of maps banded differently")
    rw.lay[node] = Band(ref.dim, ref.rows)


def _permute(rw, node):
    lay = rw.lay[node.args[0]]
    perm = [p % _val(node.args[0]).dim() for p in node.args[1]]
    rw.lay[node] = Band(perm.index(lay.dim), lay.rows)


def _transpose(rw, node):
    lay = rw.lay[node.args[0]]
    nd = _val(node.args[0]).dim()
    a, b = node.args[1] % nd, node.args[2] % nd
    rw.lay[node] = Band(b if lay.dim == a else a if lay.dim == b else lay.dim, lay.rows)


def _unsqueeze(rw, node):
    lay = rw.lay[node.args[0]]
    d = node.args[1] % (_val(node.args[0]).dim() + 1)
    rw.lay[node] = Band(lay.dim + (d <= lay.dim), lay.rows)


def _squeeze(rw, node):
    lay, d = _along_other(rw, node)
    rw.lay[node] = Band(lay.dim - (d < lay.dim), lay.rows)


def _view(rw, node):
    """A view / reshape that keeps the rows a dim of their own: the same product of dims before and after."""
    x = node.args[0]
    lay, xv, out = rw.lay[x], _val(x), _val(node)
    whole_in = [int(s) for s in xv.shape]  # (the captured values: the whole map's sizes)
    before, after = math.prod(whole_in[:lay.dim]), math.prod(whole_in[lay.dim + 1:])
    shape = [int(s) for s in out.shape]
    acc = 1
    for d, s in enumerate(shape):
        if acc == before and s == whole_in[lay.dim] and math.prod(shape[d + 1:]) == after:
            local = list(shape)
            local[d] = lay.rows[rw.rank]
            node.args = (x, local, *node.args[2:])
            rw.lay[node] = Band(d, lay.rows)
            return
        acc *= s
    raise _Whole("a view that merges or splits the rows")


_LAYOUT = {
    aten.slice.Tensor: _slice, aten.select.int: _select, aten.chunk.default: _chunk, aten.split.Tensor: _chunk,
    aten.split_with_sizes.default: _chunk, aten.cat.default: _cat, aten.stack.default: _stack,
    aten.type_as.default: _type_as,
    aten.permute.default: _permute, aten.transpose.int: _transpose, aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze, aten.view.default: _view, aten.reshape.default: _view,
    aten._unsafe_view.default: _view,
}


class ParallelVAE(GraphPass):
    """The VAE decoder's maps in row bands over the VAE's ranks (``Plan.vae``; ``ctx.placement.group("vae")``)."""

    name = "parallel_vae"
    off_note = "off (Plan.vae unset)"

    def enabled(self, ctx: PassContext) -> bool:
        return bool(ctx.plan.vae) and ctx.placement.world_size > 1

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        pl = ctx.placement
        rw = _Rewriter(gm, pl.rank, pl.world_size, pl.group("vae"))
        rw.run()
        collectives = [Collective(name, "all_gather(halo rows)", "vae", mod, b) for name, mod, _, b in rw.halos]
        collectives += [Collective(name, "all_reduce x2 (group norm)", "vae", mod, b) for name, mod, b in rw.norms]
        collectives += [Collective(name, "all_gather (whole map)", "vae", why, b) for name, why, b in rw.gathers]
        notes = [f"latent rows per rank: {list(r)} (map height {h})" for h, r in list(rw.heights.items())[:1]]
        whole = [f"{why} before `{name}`" for name, why, _ in rw.gathers if not why.startswith("output")]
        if whole:
            notes.append(f"{len(whole)} op(s) run on the whole map: " + "; ".join(dict.fromkeys(whole)))
        halo_rows = [[name, mod, rows, f"{b / 2**10:.1f} KiB"] for name, mod, rows, b in rw.halos]
        tables = [Table("halo exchanges (rows of the neighbours' bands, per conv)",
                        ["node", "module", "rows", "bytes sent"], halo_rows, fold="module")]
        return PassResult(self.name, True, collectives=collectives, notes=notes, tables=tables,
                          details={"heights": {h: list(r) for h, r in rw.heights.items()}, "halos": len(rw.halos),
                                   "norms": len(rw.norms), "whole": len(whole)})

