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

import torch.fx

from ditpass.pass_base import GraphPass, PassContext, PassResult

from .rewriter import Sharded, _Rewriter

__all__ = ["SequenceParallel", "ReplicatedWarning"]


class SequenceParallel(GraphPass):
    name = "sequence_parallel"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.plan.ring * ctx.plan.ulysses > 1

    def requires(self, gm, ctx):
        if not ctx.analysis.token_classes:
            raise ValueError("no token sequence found: the analysis saw no self or joint attention over "
                             "symbolic lengths (capture with dynamic shapes)")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = _Rewriter(gm, ctx)
        rw.run()
        inputs = {n.name: (lay.dim, [str(s) for s in lay.segs]) for n, lay in rw.layout.items()
                  if n.op == "placeholder" and lay is not None and not isinstance(lay, list)}
        notes = list(rw.notes)
        whole = _replicated_sites(gm, rw, ctx)
        if whole:
            notes.insert(0, _say_replicated(whole, len(ctx.sites), rw.notes, ctx))
        return PassResult(self.name, True, collectives=rw.collectives, notes=notes, io=rw.io(),
                          details={"sharded_inputs": inputs, "replicated_sites": [s.module for s in whole]})


class ReplicatedWarning(UserWarning):
    """Sequence parallelism left attention sites whole on every rank (exact, but not parallel work)."""


def _replicated_sites(gm, rw, ctx) -> list:
    """The attention sites whose output is not sharded: every sequence rank computes them whole."""
    import torch

    by_node = {}
    for node in gm.graph.nodes:
        if node.target is torch.ops.ditpass.attention.default:
            by_node[int(getattr(gm, node.args[3].target))] = isinstance(rw.layout.get(node), Sharded)
    return [s for s in ctx.sites if not by_node.get(s.site, True)]


def _say_replicated(whole, total: int, reasons, ctx) -> str:
    """One line for ``explain`` and, on rank 0, a `ReplicatedWarning`: which sites and why."""
    import warnings

    mods = sorted({s.module or s.node for s in whole})
    why = "; ".join(dict.fromkeys(r.split(": ", 1)[-1] for r in reasons[:3])) or "no sharded input reaches them"
    text = (f"{len(whole)} of {total} attention sites run whole on every rank (replicated, not sharded: "
            f"{ctx.plan.ring * ctx.plan.ulysses} sequence ranks do the same work there): "
            f"{', '.join(mods[:4])}{', ...' if len(mods) > 4 else ''}; why: {why}")
    if ctx.placement.rank == 0:
        warnings.warn(text, ReplicatedWarning, stacklevel=2)
    return text
