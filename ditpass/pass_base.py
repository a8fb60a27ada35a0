"""The pass contract and the one runner that applies passes in order.

A pass is a small object: ``requires(gm, ctx)`` raises if the graph or plan can't take it,
``call(gm, ctx)`` rewrites the graph in place and returns a `PassResult`, ``ensures(gm, ctx)``
checks what the pass promises afterwards. A pass whose plan field is off does nothing and says
so (``PassResult.modified`` is False). `run_passes` names the failing pass and the ones that ran
before it. The order lives in ``ditpass.passes.registry``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

__all__ = ["PassContext", "GraphPass", "PassResult", "Collective", "PassError", "run_passes"]


class PassError(RuntimeError):
    """A pass refused or failed; the message names it and the passes that ran before."""


@dataclass
class Collective:
    """One communication a pass inserted, for `explain`."""

    node: str  # node name in the rewritten graph
    op: str  # "all_to_all" | "all_gather" | "ring" | ...
    axis: str  # mesh axis: "ulysses", "ring", "ulysses+ring"
    site: str  # what it serves: attention node name, or "output"
    bytes_per_forward: int  # bytes this rank sends per forward (at the captured shapes)


@dataclass
class PassResult:
    name: str
    modified: bool
    added: int = 0
    removed: int = 0
    collectives: list[Collective] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line per decision worth reading (fallbacks!)
    details: dict[str, Any] = field(default_factory=dict)  # pass-specific tables (e.g. strategy per site)
    graph_code: str = ""  # the rewritten graph's code, for explain

    def summary(self) -> str:
        if not self.modified:
            return f"{self.name}: no change" + (f" ({self.notes[0]})" if self.notes else "")
        return (f"{self.name}: +{self.added} / -{self.removed} nodes, {len(self.collectives)} collectives, "
                f"{sum(c.bytes_per_forward for c in self.collectives) / 2**20:.2f} MiB sent per forward per rank")


@dataclass
class PassContext:
    """What every pass may read: the analysis, the plan, the parallel dims, this process's rank."""

    analysis: Any  # ditpass.analysis.Analysis
    plan: Any  # ditpass.plan.Plan
    dims: Any = None  # ditpass.mesh.ParallelDims
    rank: int = 0
    mesh: Any = None  # DeviceMesh, None in a single process


class GraphPass:
    name = "pass"

    def enabled(self, ctx: PassContext) -> bool:  # off -> the runner records "no change"
        return True

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        pass

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        pass


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext, passes: list[GraphPass]) -> list[PassResult]:
    """Apply ``passes`` in order; every failure names the pass and what ran before it."""
    results: list[PassResult] = []
    for p in passes:
        if not p.enabled(ctx):
            results.append(PassResult(p.name, False, notes=[getattr(p, "off_note", "off in this plan")]))
            continue
        before = len(gm.graph.nodes)
        names_before = {n.name for n in gm.graph.nodes}
        try:
            p.requires(gm, ctx)
            res = p.call(gm, ctx)
            gm.graph.lint()
            gm.recompile()
            p.ensures(gm, ctx)
        except PassError:
            raise
        except Exception as exc:
            ran = ", ".join(r.name for r in results) or "none"
            raise PassError(f"pass {p.name!r} failed (passes run before it: {ran}): {type(exc).__name__}: {exc}") from exc
        names_after = {n.name for n in gm.graph.nodes}
        res.added = len(names_after - names_before)
        res.removed = len(names_before - names_after)
        res.modified = res.modified or len(gm.graph.nodes) != before or res.added > 0
        res.graph_code = gm.code
        results.append(res)
    return results
