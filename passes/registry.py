"""The one place that says which passes run on which component of a model, and in what order.

``passes_for(component, plan)``: the passes of one component (``"transformer"``: a denoising
transformer; ``"vae"``: the VAE decoder), each behind its plan field; those that are off report 'no
change'. Plan fields whose pass does not exist yet are refused here (`check_built`), and nowhere else.

Transformer order, and why:
1. attention_sites: first, because every pass that changes how attention runs refines a site's entry
   in the site table instead of rewriting the node: the sites must exist before them.
2. batch_parallel: CFG / data parallel. It changes no node (the batch is split around the graph, which
   is captured at this rank's rows); listed so that explain reports it with the others.
3. pipefusion: before sequence_parallel, because it copies the graph as captured into the patch graph
   (the sequence-parallel rewriter with patches x Ulysses ranks as the chunks, `passes/pipefusion.py`)
   and makes the tail graph and the stage cut from it; it changes no node of the full graph, only the
   site entries (``patch``), so the passes after it see the full graph. The patch graph gets none of the
   later passes (fuse_projections, overlap, tidy).
4. sequence_parallel: before every pass that adds or moves nodes, because it works from the analysis
   of the graph as captured (node by node), and every later pass (DiTFastAttn's caches, the compile
   backend) must see the sharded shapes and its collectives. Under pipefusion it shards the full
   (warm-up) graph.
4b. fastattn: DiTFastAttn. After sequence_parallel, whose site entries (``seq``) and global lengths it
   reads to decide what each site may use (the window needs the whole sequence: local or Ulysses); it
   sets only the entries' ``fast`` and changes no node, so the passes after it are unaffected.
5. fuse_projections: merges the linears of one block that read one input (q/k/v) into one matmul;
   the split it adds is along features, so sharded token dims are untouched.
6. overlap: moves each block's work that its attention does not need to after the start of the
   Ulysses all-to-all (``ditpass::ulysses_send``), so it runs while q/k/v travel. After the passes
   that add or merge nodes, so it orders the final nodes.
7. tidy: drops no-op nodes (asserts, same-dtype ``.to()``, p=0 dropout) that cost host time
   when the graph runs eagerly; after the analysis-driven passes, which name nodes it might drop.
8. step_cache: last, because it changes no node: it cuts the final graph (every pass's rewrite, the
   sequence-parallel collectives included) into head / middle / tail parts that the step-cache runner
   runs, so the parts get everything the passes before it did.

VAE order: parallel_vae (with ``Plan.vae``: the decoder's maps in row bands over the ranks, halo rows
before each convolution, group norm statistics all-reduced, the picture gathered; `passes/parallel_vae.py`).
"""
from __future__ import annotations

import os

from ditpass.errors import PlanError
from ditpass.pass_base import GraphPass

from .attention_sites import AttentionSites
from .batch_parallel import BatchParallel
from .fastattn import FastAttn
from .fuse_projections import FuseProjections
from .overlap import Overlap
from .parallel_vae import ParallelVAE
from .pipefusion import PipeFusion
from .sequence_parallel import SequenceParallel
from .step_cache import StepCache
from .tidy import Tidy

__all__ = ["passes_for", "check_built", "COMPONENTS"]

COMPONENTS = ("transformer", "vae")


class _Skipped(GraphPass):
    """A pass turned off by ``DITPASS_SKIP_PASSES``; it reports so and changes nothing."""

    off_note = "skipped (DITPASS_SKIP_PASSES)"

    def __init__(self, inner: GraphPass):
        self.name = inner.name

    def enabled(self, ctx) -> bool:
        return False


def check_built(plan) -> None:
    """Raise `PlanError` for plan fields whose pass does not exist yet (the one place that refuses them)."""
    if plan.pipefusion > 1 and plan.cuda_graphs:
        raise PlanError("pipefusion with cuda_graphs=True is not built yet (the stages send from Python): "
                        "set cuda_graphs=False")
    if plan.pipefusion > 1 and plan.fastattn:
        raise PlanError(f"pipefusion={plan.pipefusion} with fastattn={plan.fastattn!r} is not built yet: "
                        f"use one of them")
    if plan.step_cache is not None and plan.fastattn is True:
        raise PlanError(f"step_cache={plan.step_cache!r} with fastattn=True: DiTFastAttn's calibration calls the "
                        f"transformer several times per step, which the step cache would take for other calls: "
                        f"calibrate without step_cache, then use fastattn='<the saved plan>.json' with it")
    if plan.step_cache is not None and plan.pipefusion > 1:
        raise PlanError(f"step_cache={plan.step_cache!r} with pipefusion={plan.pipefusion} is not built (the cache "
                        f"would have to skip a pipeline stage on every rank at once): use one of them")
    if plan.overrides:
        raise PlanError(
            f"overrides={plan.overrides!r}: per-module overrides are validated, but no pass applies them yet; "
            f"drop them and use the plan-wide fields (e.g. attention={plan.attention!r})")


def passes_for(component: str, plan) -> list[GraphPass]:
    """The passes for one component's graph, in order (see the module docstring).

    ``DITPASS_SKIP_PASSES=overlap,tidy`` (comma-separated names) turns passes off for the builds that
    follow, to see or time what each does; a pass the plan needs can't be skipped."""
    check_built(plan)
    if component == "vae":
        return [ParallelVAE()]
    if component != "transformer":
        raise ValueError(f"unknown component {component!r}: one of {', '.join(COMPONENTS)}")
    passes = [AttentionSites(), BatchParallel(), PipeFusion(), SequenceParallel(), FastAttn(), FuseProjections(), Overlap(), Tidy(),
              StepCache()]
    skip = {s.strip() for s in os.environ.get("DITPASS_SKIP_PASSES", "").split(",") if s.strip()}
    unknown = skip - {p.name for p in passes}
    if unknown:
        raise ValueError(f"DITPASS_SKIP_PASSES names unknown passes {sorted(unknown)}; "
                         f"passes: {', '.join(p.name for p in passes)}")
    if "sequence_parallel" in skip and plan.sp > 1:
        raise ValueError("DITPASS_SKIP_PASSES=sequence_parallel with a sequence-parallel plan: the plan needs it")
    if "attention_sites" in skip:
        raise ValueError("DITPASS_SKIP_PASSES=attention_sites: every attention pass works on the sites it makes")
    return [_Skipped(p) if p.name in skip else p for p in passes]
