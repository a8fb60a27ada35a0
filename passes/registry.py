"""The one place that orders the transformer passes. Each is behind its plan field.

Order, and why:
1. sequence_parallel: first, because every later pass (PipeFusion's stage cut, DiTFastAttn's
   caches, the compile backend) must see the sharded shapes and the collectives it inserted.
2. tidy: last, drops no-op nodes (asserts, same-dtype ``.to()``, p=0 dropout) that cost host time
   when the graph runs eagerly; after the analysis-driven passes, which name nodes it might drop.
"""
from __future__ import annotations

from ditpass.pass_base import GraphPass
from ditpass.plan import Plan

from .sequence_parallel import SequenceParallel
from .tidy import Tidy


def transformer_passes(plan: Plan) -> list[GraphPass]:
    """The passes for one transformer graph, in order (those that are off report 'no change')."""
    return [SequenceParallel(), Tidy()]
