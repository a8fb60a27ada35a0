"""The one build path: a captured graph, a plan and this rank's placement -> what runs (a `Record`).

    record = build(captured, plan, placement)        # ParallelModule, on the first call of a signature
    record = build(captured, plan, dry_placement, backend=False)   # explain / inspect: a dry run

Steps, in order: copy the captured graph (the capture stays the single-device reference), analyse the
copy, check the plan against the model (heads, blocks), run the component's passes
(`ditpass.passes.registry.passes_for`), hand the result to the backend. Both the parallelized model and
the dry run of ``explain`` / ``inspect`` call this function, so they cannot disagree about what a plan
does to a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .analysis import Analysis, analyze
from .errors import PlanError
from .pass_base import PassContext, PassResult, run_passes
from .runtime.sites import SiteTable

__all__ = ["Record", "build", "validate_for_model"]


@dataclass
class Record:
    """What was done for one input signature: capture, analysis and every pass's result."""

    signature: tuple
    captured: Any  # ditpass.capture.Captured
    analysis: Analysis | None
    plan: Any
    placement: Any  # ditpass.mesh.Placement
    results: list[PassResult] = field(default_factory=list)
    graph_module: torch.fx.GraphModule | None = None  # the rewritten copy
    sites: SiteTable = field(default_factory=SiteTable)
    runner: Any = None  # what forward calls: the graph module, its compiled form, or None (dry run)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph over the same parameters (no weight copies)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    return torch.fx.GraphModule(gm, graph, type(gm).__name__)


def validate_for_model(plan, analysis: Analysis, world_size: int) -> None:
    """The plan against the model the analysis saw: heads of the sequence attention, block count."""
    heads = [s.heads for s in analysis.sites if s.heads and s.kind in ("self", "joint", "text")]
    plan.validate(world_size, heads=min(heads) if heads else None,
                  num_blocks=sum(len(g) for g in analysis.transformer_blocks) or None)


def build(captured, plan, placement, *, component: str = "transformer", state=None,
          backend: bool = True) -> Record:
    """Rewrite ``captured`` for ``plan`` as the rank ``placement`` describes (see the module docstring).

    ``backend=False``: stop after the passes (a dry run: nothing will be called). A model captured
    only in pieces (Dynamo's graphs) runs as captured when the plan needs no graph pass or backend, and
    is refused, naming the plan fields, when it does."""
    from ditpass.passes.registry import passes_for

    passes = passes_for(component, plan)
    name = type(captured.module).__name__
    if not captured.whole:
        needs = [f for f, on in (("ulysses/ring", plan.sp > 1), ("fuse_projections", plan.fuse_projections),
                                 (f"compile={plan.compile!r}", plan.compile != "eager"),
                                 ("cuda_graphs", plan.cuda_graphs), ("step_cache", plan.step_cache is not None))
                 if on]
        if needs:
            raise PlanError(
                f"{name} could only be captured in pieces ({captured.method}: "
                f"{'; '.join(captured.errors.values())}); {', '.join(needs)} need(s) one whole graph: "
                f"turn them off (dp / cfg still split the batch)")
        return Record(captured.signature, captured, None, plan, placement, runner=captured if backend else None)
    gm = copy_graph_module(captured.graph_module)
    analysis = analyze(gm)
    if component == "transformer":
        validate_for_model(plan, analysis, placement.world_size)
    sites = SiteTable()
    ctx = PassContext(analysis, plan, placement, sites, state)
    results = run_passes(gm, ctx, passes)
    runner = None
    if backend and "pipefusion" in ctx.graphs:
        from .backend import compile_graph
        from .runtime.pipeline import PipeFusionRunner, free_unused

        pf = ctx.graphs["pipefusion"]
        runner = PipeFusionRunner(gm, pf.patch_gm, pf.tail_gm, pf.cut, pf.patch, pf.patch_outputs, plan, placement, state,
                                  compile_fn=lambda g: compile_graph(g, plan.compile), positions=pf.positions)
        # this rank keeps its stage's weights only (what its two stage graphs read)
        runner.freed = free_unused(captured.module, runner.graphs)
    elif backend and "step_cache" in ctx.graphs:
        from .backend import compile_graph
        from .runtime.step_cache import StepCacheRunner

        sc = ctx.graphs["step_cache"]  # the head, middle and tail parts, each compiled on its own
        runner = StepCacheRunner(gm, sc, sc.policy, state, compile_fn=lambda g: compile_graph(g, plan.compile))
    elif backend and component == "vae":  # the decoder runs eagerly: its pass is for memory, once per picture
        runner = gm
    elif backend:
        from .backend import compile_graph

        runner = compile_graph(gm, plan.compile)
        if plan.cuda_graphs:
            from .backend.cudagraph import GraphedStep

            runner = GraphedStep(runner)
    return Record(captured.signature, captured, analysis, plan, placement, results, gm, sites, runner)
