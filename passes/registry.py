"""The one place that orders the transformer passes. Each is behind its plan field.

Order, and why:
1. sequence_parallel: first, because every later pass (PipeFusion's stage cut, DiTFastAttn's
   caches, the compile backend) must see the sharded shapes and the collectives it inserted.
2. fuse_projections: merges the linears of one block that read one input (q/k/v) into one
   matmul. After sequence_parallel, which works from the analysis of the graph as captured (node
   by node); the split it adds is along features, so sharded token dims are untouched.
3. overlap: moves each block's work that its attention does not need to after the start of the
   Ulysses all-to-all (`seq.ulysses_send`), so it runs while q/k/v travel. After the passes that
   add or merge nodes, so it orders the final nodes.
4. tidy: last, drops no-op nodes (asserts, same-dtype ``.to()``, p=0 dropout) that cost host time
   when the graph runs eagerly; after the analysis-driven passes, which name nodes it might drop.
"""
from __future__ import annotations

import os

from ditpass.pass_base import GraphPass
from ditpass.plan import Plan

from .fuse_projections import FuseProjections
from .overlap import Overlap
from .sequence_parallel import SequenceParallel
from .tidy import Tidy


class _Skipped(GraphPass):
    """A pass turned off by ``DITPASS_SKIP_PASSES``; it reports so and changes nothing."""

    off_note = "skipped (DITPASS_SKIP_PASSES)"

    def __init__(self, inner: GraphPass):
        self.name = inner.name

    def enabled(self, ctx) -> bool:
        return False


def transformer_passes(plan: Plan) -> list[GraphPass]:
    """The passes for one transformer graph, in order (those that are off report 'no change').

    ``DITPASS_SKIP_PASSES=overlap,tidy`` (comma-separated names) turns passes off for the builds that
    follow, to see or time what each does; sequence_parallel can't be skipped when the plan needs it."""
    passes = [SequenceParallel(), FuseProjections(), Overlap(), Tidy()]
    skip = {s.strip() for s in os.environ.get("DITPASS_SKIP_PASSES", "").split(",") if s.strip()}
    unknown = skip - {p.name for p in passes}
    if unknown:
        raise ValueError(f"DITPASS_SKIP_PASSES names unknown passes {sorted(unknown)}; "
                         f"passes: {', '.join(p.name for p in passes)}")
    if "sequence_parallel" in skip and plan.sp > 1:
        raise ValueError("DITPASS_SKIP_PASSES=sequence_parallel with a sequence-parallel plan: the plan needs it")
    return [_Skipped(p) if p.name in skip else p for p in passes]
