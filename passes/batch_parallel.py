"""Batch parallel: CFG and data parallelism split each transformer call's batch over ``dp x cfg`` ranks.

The split happens around the graph, not in it (`ditpass.runtime.batch.BatchSplit`): every rank takes
its rows of each per-sample input before the call, so the graph is captured and rewritten at this
rank's batch, and the outputs are all-gathered back into the full batch after it. This pass changes
no node; it states the split for this rank (which rows, over which group) and the all-gather it costs,
so that explain shows it like every other pass. Off when ``dp * cfg == 1``.
"""
from __future__ import annotations

import torch
import torch.fx

from ditpass.analysis import flat
from ditpass.analysis.symbolic import node_val
from ditpass.pass_base import Collective, GraphPass, PassContext, PassResult, nbytes

__all__ = ["BatchParallel"]


class BatchParallel(GraphPass):
    name = "batch_parallel"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.placement.degree("batch") > 1

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        pl = ctx.placement
        dp, cfg = pl.degrees["dp"], pl.degrees["cfg"]
        what = " x ".join(f"{name}={d} (this rank {pl.coords[name]})" for name, d in (("dp", dp), ("cfg", cfg)) if d > 1)
        note = (f"each call's batch split over {what}: the graph runs this rank's rows "
                + ("(CFG: one guidance half per cfg rank)" if cfg > 1 else "(an equal share of the prompts)"))
        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = [a for a in flat(out_node.args) if isinstance(a, torch.fx.Node) and isinstance(node_val(a), torch.Tensor)]
        collectives = [Collective(a.name, "all_gather", "batch", "output", nbytes(node_val(a))) for a in outs]
        io = {f"out {i}": f"rows all-gathered over dp x cfg ({pl.degree('batch')} ranks)" for i in range(len(outs))}
        return PassResult(self.name, False, collectives=collectives, notes=[note], io=io,
                          details={"dp": dp, "cfg": cfg, "dp_rank": pl.coords["dp"], "cfg_rank": pl.coords["cfg"]})
