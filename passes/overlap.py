"""Overlap: start each Ulysses all-to-all before the block's independent work, not after it.

The sequence-parallel pass starts the all-to-all of q, k, v in its own node (``torch.ops.ditpass.ulysses_send``) and waits
for it in ``torch.ops.ditpass.attention``. Where the graph puts that node decides what can run while the data
travels: in the model's own order, a FLUX single block computes its MLP input projection and GELU
(a third of the block's matrix work) *before* the attention projections, so the all-to-all would start
after the MLP and the GPU would idle until it arrives.

This pass moves, within each block, every node that comes before the send but does not feed it, to
just after the send. The send then starts as soon as q, k, v exist, and the moved work (FLUX: the
MLP of 38 single blocks) runs on the compute stream while NCCL moves q, k, v on its own. Nothing is
computed differently: the same nodes in another valid order (each moved node still follows its
inputs and precedes its users), so the output is bit-identical.

Only labelled nodes of the send's own block move (regions stay contiguous for the regional compiler);
a block with an in-place op before its send is left alone (a reader moved past a write would read
something else). In FLUX's double blocks little moves (the AdaLN chunks their MLP reads later): their
attention needs everything computed before it.
"""
from __future__ import annotations

import torch.fx

from ditpass.analysis import ops
from ditpass.analysis.blocks import ancestors_in_block
from ditpass.pass_base import GraphPass, PassContext, PassResult, Table
from ditpass.runtime.ops import OPS



class Overlap(GraphPass):
    name = "overlap"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.plan.ulysses > 1

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        moved_by_block: dict[str, int] = {}
        for send in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OPS["ulysses_send"]]:
            block = send.meta.get("ditpass_block")
            if block is None:
                continue
            before = []
            n = send.prev
            while n.op == "call_function" and (n.meta.get("ditpass_block") == block or "ditpass_block" not in n.meta):
                before.append(n)
                n = n.prev
            if any(ops.mutates(m.target) for m in before):
                continue  # an in-place op in between: moving a reader past it would change what it reads
            feeds = ancestors_in_block(send)
            span, movable = set(before), set()
            for m in before:  # nearest the send first, so a node's users in the span are decided before it
                # a node that stays (before the send) keeps every input it has before it too
                if m.meta.get("ditpass_block") == block and m not in feeds and \
                        all(u in movable for u in m.users if u in span):
                    movable.add(m)
            free = [m for m in reversed(before) if m in movable]
            anchor = send
            for m in free:  # in their order, right after the send
                anchor.append(m)
                anchor = m
            if free:
                moved_by_block[block] = len(free)
        moved = sum(moved_by_block.values())
        note = (f"moved {moved} nodes of {len(moved_by_block)} blocks after their all-to-all's start, to run "
                f"while q/k/v travel" if moved else "no block has work independent of its attention's inputs")
        table = Table("nodes moved after the all-to-all's start", ["block", "nodes moved"],
                      [[b, k] for b, k in moved_by_block.items()], fold="block")
        return PassResult(self.name, moved > 0, notes=[note], tables=[table] if moved else [],
                          details={"moved_per_block": moved_by_block})
