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

from .rewriter import _Rewriter

__all__ = ["SequenceParallel"]


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
        return PassResult(self.name, True, collectives=rw.collectives, notes=rw.notes, io=rw.io(),
                          details={"sharded_inputs": inputs})
