"""The one place that orders the transformer passes. Each is behind its plan field.

Order, and why:
1. sequence_parallel: first, because every later pass (PipeFusion's stage cut, DiTFastAttn's
   caches, the compile backend) must see the sharded shapes and the collectives it inserted.
"""
from __future__ import annotations

from ditpass.pass_base import GraphPass
from ditpass.plan import Plan

from .sequence_parallel import SequenceParallel


def transformer_passes(plan: Plan) -> list[GraphPass]:
    """The passes for one transformer graph, in order (those that are off report 'no change')."""
    return [SequenceParallel()]
