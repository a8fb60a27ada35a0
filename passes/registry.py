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

from ditpass.pass_base import GraphPass
from ditpass.plan import Plan

from .fuse_projections import FuseProjections
from .overlap import Overlap
from .sequence_parallel import SequenceParallel
from .tidy import Tidy


def transformer_passes(plan: Plan) -> list[GraphPass]:
    """The passes for one transformer graph, in order (those that are off report 'no change')."""
    return [SequenceParallel(), FuseProjections(), Overlap(), Tidy()]
