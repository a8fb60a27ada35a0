"""Sequence parallel: shard the token sequence over ``ring x ulysses`` ranks, derived from the graph.

Before (one rank, FLUX joint attention, sizes global)::

    txt = linear(encoder_hidden_states)            # [B, T, C]
    img = linear(hidden_states)                     # [B, I, C]
    q = cat([q_txt, q_img], 1) ... permute          # [B, H, T+I, D]
    o = ditpass.attention(q, k, v, site_3)          # local (the attention_sites pass made it)
    out = proj_out(img)                             # [B, I, C]

After (rank p of n; every tensor with a token dim holds chunk p of each segment)::

    encoder_hidden_states = ditpass.shard(encoder_hidden_states, 1, [T], n, p)   # at the inputs
    hidden_states = ditpass.shard(hidden_states, 1, [I], n, p)
    ...                                              # token-wise ops run unchanged on [B, T/n, C]
    sent = ditpass.ulysses_send(q, k, v, u, group)   # Ulysses: the all-to-all starts here
    o = ditpass.attention(q, k, v, site_3, sent=sent, lengths=[T, I])   # site 3: ulysses / ring / USP
    out = ditpass.gather(proj_out(img), 1, [I], n, group)              # the graph output, full again

The attention node stays the same node: the pass sets its ``lengths`` (and ``sent``) and refines the
site's entry in the site table (``seq``: degrees, coordinates, groups), which the op reads.

Rules (`rules`), one walk in graph order (`rewriter`). A node is *sharded* (token dim, segment
list) or *replicated*. Token-wise ops (pointwise, linear, norms over features, layout ops that keep
the token dim) keep it sharded; a replicated operand with a token dim meeting a sharded one is sliced
locally (RoPE tables, position embeddings). Concatenation and slicing along the token dim work
segment by segment (joint text+image attention), so boundaries map to local boundaries. Self / joint
attention gets a sequence-parallel strategy; cross attention with replicated K/V stays local.
Anything else that touches a sharded token dim gets the safe path: gather, compute replicated, and a
line in ``explain``. Integers in the graph stay global (a ``sym_size`` of a sharded tensor is
rewritten to the global length); only shapes of sharded tensors are local, and shape arguments of
ops on them are rewritten. Lengths and head counts that do not divide are padded: exact.

When off (``ring * ulysses == 1``) the pass does nothing.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from ditpass.pass_base import GraphPass, PassContext, PassResult

from ..attention_sites import site_id_node
from .rewriter import Sharded, _Rewriter

__all__ = ["SequenceParallel", "ReplicatedWarning"]


class SequenceParallel(GraphPass):
    name = "sequence_parallel"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.plan.ring * ctx.plan.ulysses > 1

    def requires(self, gm, ctx):
        if not ctx.analysis.token_classes:
            const = ctx.analysis.const_segments
            why = ""
            if const:  # sites there are, but their lengths are numbers: nothing tells the image from the rest
                lens = ", ".join(dict.fromkeys(str(s.q_len) for s in const))
                why = (f"; {len(const)} of its {len(ctx.analysis.sites)} attention sites have lengths the capture "
                       f"fixed to constants ({lens}): export specialised the sizes (the model reads them as Python "
                       f"numbers, or the capture is static)")
            raise ValueError("no token sequence found: the analysis saw no self or joint attention over "
                             f"symbolic lengths (capture with dynamic shapes){why}")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        folded = _fold_written_attention(gm, ctx)
        rw = _Rewriter(gm, ctx)
        rw.run()
        inputs = {n.name: (lay.dim, [str(s) for s in lay.segs]) for n, lay in rw.layout.items()
                  if n.op == "placeholder" and lay is not None and not isinstance(lay, list)}
        notes = list(rw.notes)
        if folded:
            notes.insert(0, f"{folded} attention sites written out as softmax(q @ k^T * scale) @ v became one "
                            f"ditpass::attention each")
        whole = _replicated_sites(gm, rw, ctx)
        if whole:
            notes.insert(0, _say_replicated(whole, len(ctx.sites), rw.notes, ctx, gm))
        return PassResult(self.name, True, collectives=rw.collectives, notes=notes, io=rw.io(),
                          details={"sharded_inputs": inputs, "replicated_sites": [s.module for s in whole]})


def _fold_written_attention(gm, ctx) -> int:
    """Attention written out (the analysis' sites with ``written``: ``softmax(q @ k^T * c) @ v``) becomes one
    ``ditpass::attention`` site, as the attention_sites pass makes of SDPA, so that it can run sequence-parallel::

        s = matmul(q, transpose(k, -2, -1)); p = softmax(mul(s, 0.125), -1); o = matmul(p, v)
        ->  o = ditpass.attention(q, k, v, site_5, scale=0.125)

    The score nodes are left to dead-code elimination. Returns how many were folded."""
    from ditpass.runtime.ops import OPS

    nodes = {n.name: n for n in gm.graph.nodes}
    top = next(n for n in gm.graph.nodes if n.op != "placeholder")
    made = 0
    for node in list(gm.graph.nodes):
        site = node.meta.get("ditpass_attention")
        if site is None or not getattr(site, "written", None):
            continue
        q, k, v = (nodes[x] for x in site.written[:3])
        entry = ctx.sites.add(node.name, site.kind, site.module)
        site_t = site_id_node(gm, entry.site, top)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(OPS["attention"], (q, k, v, site_t), {"scale": site.written[3]})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        made += 1
    if made:
        gm.graph.eliminate_dead_code()  # the score nodes, before the rewriter would gather for them
    return made


class ReplicatedWarning(UserWarning):
    """Sequence parallelism left attention sites whole on every rank (exact, but not parallel work): raised as a
    warning whenever any site is left so, however few; its text names the sites, their share of the attention
    FLOPs (so that "most of the work is unsharded" shows) and the fallback that left each whole."""


def _replicated_sites(gm, rw, ctx) -> list:
    """The attention sites whose output is not sharded: every sequence rank computes them whole."""
    by_node = {}
    for node in gm.graph.nodes:
        if node.target in (torch.ops.ditpass.attention.default, torch.ops.ditpass.flex_attention.default):
            by_node[int(getattr(gm, node.args[3].target))] = isinstance(rw.layout.get(node), Sharded)
    # a token-mixing matmul site (linear attention), or a flex_attention call left as captured, that the rewriter
    # did not shard has no strategy
    return [s for s in ctx.sites if not by_node.get(s.site, True) or (s.site not in by_node and s.seq is None)]


def _hint(x):
    if isinstance(x, int):
        return x
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

    return int(guarding_hint_or_throw(x))


def _site_flops(gm) -> dict[int, int | None]:
    """SDPA FLOPs (``4 * prod(q.shape[:-1]) * kv_len * head_dim``) of each attention site at the captured
    sizes, by site id; None where a size has no hint (a length that depends on data)."""
    out = {}
    for node in gm.graph.nodes:
        if node.target not in (torch.ops.ditpass.attention.default, torch.ops.ditpass.flex_attention.default):
            continue
        q, k = (a.meta.get("val") for a in node.args[:2])
        try:
            shape = [_hint(x) for x in q.shape]
            out[int(getattr(gm, node.args[3].target))] = 4 * math.prod(shape[:-1]) * _hint(k.shape[-2]) * shape[-1]
        except Exception:  # noqa: BLE001 - an unbacked size: no share for this site
            out[int(getattr(gm, node.args[3].target))] = None
    return out


def _why(site, notes: list[str]) -> str:
    """The first fallback note inside the site's module (or its block), else the first note of all."""
    mod = site.module or ""
    block = mod.rsplit(".", 1)[0] if "." in mod else mod
    for prefix in (f"in `{mod}`:", f"in `{block}"):
        for r in notes:
            if prefix in r:
                return r.split(": ", 1)[-1]
    return notes[0].split(": ", 1)[-1] if notes else "no sharded input reaches it"


def _say_replicated(whole, total: int, reasons, ctx, gm=None) -> str:
    """One line for ``explain`` and, on rank 0, a `ReplicatedWarning`: which sites, their share of the attention
    FLOPs, and why each (the fallback that left it whole)."""
    import warnings

    share = ""
    if gm is not None:
        flops = _site_flops(gm)
        known = [f for f in flops.values() if f is not None]
        if known and None not in flops.values() and sum(known):
            part = sum(flops.get(s.site) or 0 for s in whole) / sum(known)
            share = f" ({100 * part:.0f}% of the attention FLOPs)"
    mods: dict[str, str] = {}
    for s in whole:
        mods.setdefault(s.module or s.node, _why(s, reasons))
    names = list(mods)
    why = "; ".join(dict.fromkeys(mods.values()))
    listed = ", ".join(f"{m}" for m in names[:4]) + (", ..." if len(names) > 4 else "")
    text = (f"{len(whole)} of {total} attention sites{share} run whole on every rank (replicated, not sharded: "
            f"{ctx.plan.ring * ctx.plan.ulysses} sequence ranks do the same work there): {listed}; why: {why}")
    if ctx.placement.rank == 0:
        warnings.warn(text, ReplicatedWarning, stacklevel=2)
    return text
