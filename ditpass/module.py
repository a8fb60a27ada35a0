"""`ParallelModule`: a transformer run through ditpass's passes; call it exactly like the original.

The returned module behaves like the original (same forward inputs and full outputs on every rank,
same attributes through ``__getattr__``, same parameters, not copies). On the first call of each
input signature the graph is captured and built (`ditpass.build.build`) and the `Record` cached in
``.ditpass_records`` for `ditpass.explain`. ``.ditpass_state`` is the state across the calls of one
generation (`ditpass.runtime.state.RunState`), reset by the pipeline hook.
"""
from __future__ import annotations

from typing import Any

import torch

from .build import Record, build
from .capture import capture, signature_of
from .mesh import ParallelDims, init_distributed
from .plan import Plan
from .runtime.batch import BatchSplit
from .runtime.seq import sdpa_backend
from .runtime.state import RunState

__all__ = ["ParallelModule"]


class ParallelModule(torch.nn.Module):
    """A transformer run through ditpass's passes. Call it exactly like the original."""

    def __init__(self, module: torch.nn.Module, plan: Plan, dynamic_shapes: Any = "auto"):
        super().__init__()
        from ditpass.passes.registry import check_built

        check_built(plan)
        self.module = module  # registered: parameters are the original ones
        self.plan = plan
        self.dynamic_shapes = dynamic_shapes
        rank, world = init_distributed()
        self.rank, self.world_size = rank, world
        dims = ParallelDims(plan, world)
        # every rank builds the mesh and its flattened groups here, together (collective)
        self.placement = dims.placement(rank, dims.build_mesh() if world > 1 else None)
        self.ditpass_state = RunState()
        self._records: dict[tuple, Record] = {}
        # dp x cfg: each call's batch is split over those ranks, outputs gathered (runtime/batch.py)
        self.batch_split = BatchSplit.from_placement(self.placement, type(module).__name__)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    @property
    def ditpass_records(self) -> list[Record]:
        return list(self._records.values())

    def build(self, *args, **kwargs) -> Record:
        """Capture and build for these inputs (done by the first call automatically)."""
        sig = signature_of(args, kwargs)
        if sig not in self._records:
            if self.plan.pipefusion > 1 and self._records:
                from .errors import PlanError

                raise PlanError(
                    "PipeFusion freed the weights of the other pipeline stages on this rank after the first "
                    "input signature, so a call with new input shapes cannot be captured again: parallelize a "
                    "fresh model for each resolution (or batch size)")
            captured = capture(self.module, *args, dynamic_shapes=self.dynamic_shapes, **kwargs)
            self._records[sig] = build(captured, self.plan, self.placement, state=self.ditpass_state)
        return self._records[sig]

    def forward(self, *args, **kwargs):
        if self.batch_split is not None:  # this rank's rows of the batch; outputs all-gathered
            out = self.batch_split.run(self._forward_local, self.module, args, kwargs)
        else:
            out = self._forward_local(*args, **kwargs)
        self.ditpass_state.calls += 1
        return out

    def _forward_local(self, *args, **kwargs):
        runner = self.build(*args, **kwargs).runner
        with sdpa_backend(self.plan.attention):
            return runner(*args, **kwargs)

