"""FuseProjections: the linear layers of one block that read the same input become one matrix product.

FLUX's attention computes q, k and v as three ``linear`` calls on the same normed hidden states
(three more on the text stream in its double blocks), and its single blocks also feed that input to
the MLP's first projection. Each call is a GEMM with a third (or less) of the columns the GPU could
work on at once, and one launch more. Fused, it is one ``linear`` on the weights stacked along the
output dim, then ``split_with_sizes`` of the last dim that hands each consumer its columns (views,
no copy)::

    q = linear(x, wq, bq); k = linear(x, wk, bk); v = linear(x, wv, bv)
 -> qkv = linear(x, w_qkv, b_qkv); q, k, v = split_with_sizes(qkv, [Cq, Ck, Cv], -1)

A group is two or more ``aten.linear.default`` on the same input node whose weights (and biases:
all or none) are plain tensors of the graph module (``get_attr``) with one dtype, device and
in_features, all in one block (``meta["ditpass_block"]``): the regional compiler compiles one
template per block structure and reuses it for every block alike, so a group never spans two. A
weight that appears twice in a group, or in a group already fused, is left alone.

Memory: the weights are not duplicated. The stacked weight is allocated once (``torch.cat``) and
registered on the graph module as ``ditpass_fused_<n>``; each original parameter then becomes a view
of its rows (``param.data = fused[a:b]``), so the user's model, which shares those parameter
objects, keeps working on the same storage. Weights that already lie stacked in one storage (an
earlier build, for another input signature, fused them) are reused as they are, not stacked again.

Exactness: every output column is the same dot product as before, so results are equal within
rounding, not bit for bit: the BLAS may block (and choose a kernel for) the bigger product
differently.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx

from ditpass.analysis.blocks import ancestors_in_block
from ditpass.analysis.symbolic import node_val
from ditpass.pass_base import GraphPass, PassContext, PassResult
from ditpass.runtime.ops import OPS

aten = torch.ops.aten

__all__ = ["FuseProjections"]

_LINEAR = aten.linear.default
_META = ("nn_module_stack", "stack_trace", "ditpass_block", "ditpass_token_dims")


def _parts(node: torch.fx.Node):
    """(input, weight, bias) of a linear node."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias


def _attr(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The plain tensor (parameter or buffer, no subclass) that a get_attr node names, else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    t = operator.attrgetter(node.target)(gm)
    return t if type(t) in (torch.Tensor, torch.nn.Parameter) else None


def _feeding_sends(gm: torch.fx.GraphModule) -> set:
    """Nodes that a Ulysses all-to-all (``torch.ops.ditpass.ulysses_send``) depends on, within its block."""
    sends = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OPS["ulysses_send"]]
    return set().union(*(ancestors_in_block(n) for n in sends))


def _groups(gm: torch.fx.GraphModule) -> list[list[torch.fx.Node]]:
    """Linear nodes that may be fused, grouped, each group in graph order. A linear that feeds a
    Ulysses all-to-all is not fused with one that does not: the other is the work that the overlap
    pass runs while q/k/v travel (FLUX's single blocks: q/k/v fused, proj_mlp apart)."""
    groups: dict[tuple, list[torch.fx.Node]] = {}
    feeds = _feeding_sends(gm)
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not _LINEAR:
            continue
        x, w, b = _parts(n)
        wt, bt = _attr(gm, w), _attr(gm, b)
        if not isinstance(x, torch.fx.Node) or wt is None or wt.dim() != 2:
            continue
        if b is not None and (bt is None or tuple(bt.shape) != (wt.shape[0],)):
            continue
        key = (x, n.meta.get("ditpass_block"), wt.dtype, wt.device, wt.shape[1],
               None if bt is None else (bt.dtype, bt.device), n in feeds)
        groups.setdefault(key, []).append(n)
    return [g for g in groups.values() if len(g) >= 2]


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(ts)``; or, where the tensors already lie so in one storage, a view over them."""
    first, off = ts[0], ts[0].storage_offset()
    if first.device.type != "meta":
        ptr = first.untyped_storage().data_ptr()
        for t in ts:
            if not t.is_contiguous() or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != off:
                break
            off += t.numel()
        else:  # contiguous: the stride of dim 0 does not depend on the number of rows
            return first.as_strided((sum(t.shape[0] for t in ts), *first.shape[1:]), first.stride())
    return torch.cat(ts)


def _register(gm: torch.fx.GraphModule, stacked: torch.Tensor, parts: list[torch.Tensor]) -> str:
    """Put ``stacked`` on ``gm`` under a new name; make each of ``parts`` a view of its rows."""
    k = 0
    while hasattr(gm, f"ditpass_fused_{k}"):
        k += 1
    name = f"ditpass_fused_{k}"
    gm.register_parameter(name, torch.nn.Parameter(stacked, requires_grad=False))
    for t, rows in zip(parts, stacked.split([t.shape[0] for t in parts])):
        t.data = rows  # the same Parameter object (the user's model holds it), now on the shared storage
    return name


def _fake(fn, *args):
    """``fn(*args)`` on fake values (symbolic sizes stay symbolic); None when a value is missing."""
    if any(a is None for a in args):
        return None
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - metadata only: the graph runs without it
        return None


def _fuse(gm: torch.fx.GraphModule, group: list[torch.fx.Node]) -> None:
    graph, first = gm.graph, group[0]
    x = first.args[0]
    ws = [_attr(gm, _parts(n)[1]) for n in group]
    bs = [_attr(gm, _parts(n)[2]) for n in group] if _parts(first)[2] is not None else None
    sizes = [w.shape[0] for w in ws]
    w_name = _register(gm, _stack(ws), ws)
    b_name = _register(gm, _stack(bs), bs) if bs else None
    with graph.inserting_before(first):
        w_node = graph.get_attr(w_name)
        b_node = graph.get_attr(b_name) if b_name else None
        fused = graph.call_function(_LINEAR, (x, w_node, b_node))
        split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        outs = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    vals = [node_val(n) for n in group]
    fused_val = _fake(lambda *v: torch.cat(v, -1), *vals)
    split_val = _fake(lambda v: aten.split_with_sizes.default(v, sizes, -1), fused_val)
    for new, val in [(fused, fused_val), (split, split_val)] + list(zip(outs, split_val or vals)):
        new.meta.update({k: first.meta[k] for k in _META if k in first.meta})
        if val is not None:
            new.meta["val"] = val
    for n, out in zip(group, outs):
        n.replace_all_uses_with(out)
        for user in out.users:  # a column slice is not contiguous: view -> reshape (a view where one exists)
            if user.target is aten.view.default:
                user.target = aten.reshape.default
        old = [a for a in _parts(n)[1:] if isinstance(a, torch.fx.Node)]
        graph.erase_node(n)
        for a in old:
            if not a.users:
                graph.erase_node(a)


def _path(node: torch.fx.Node) -> str:
    """The module path of a linear node's weight: "transformer_blocks.0.attn.to_q"."""
    return str(_parts(node)[1].target).rsplit(".", 1)[0]


class FuseProjections(GraphPass):
    name = "fuse_projections"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.plan.fuse_projections

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        done: set[int] = set()  # ids of weights and biases fused so far
        fused: list[list[str]] = []
        kinds: Counter = Counter()
        for group in _groups(gm):
            tensors = [_attr(gm, a) for n in group for a in _parts(n)[1:] if a is not None]
            ids = [id(t) for t in tensors]
            if len(set(ids)) < len(ids) or done.intersection(ids):
                continue  # a tensor twice, or shared with a fused group: stacking it would copy it
            done.update(ids)
            fused.append([_path(n) for n in group])
            kinds["/".join(p.rsplit(".", 1)[-1] for p in fused[-1])] += 1
            _fuse(gm, group)
        n = len(fused)
        removed = sum(len(g) for g in fused) - n
        note = (f"fused {n} groups of linear layers ({', '.join(f'{c} x {k}' for k, c in kinds.items()) or 'none'}) "
                f"into {n} matmuls, {removed} fewer")
        return PassResult(self.name, n > 0, notes=[note], details={"groups": fused, "count": n})
