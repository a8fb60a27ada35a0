"""DiTFastAttn: per attention site and diffusion step, full attention, window attention with a cached
residual (WA-RS), the previous step's output (AST) or one CFG half's attention for both (ASC).

No node changes. Each ``ditpass::attention`` site's entry gets a `FastAttnSite` (``fast``): the name a plan
file knows it by (its module path), its place among the sites (the calibration's error bound grows with
it), the window, and which methods it may use under this plan; the op reads it and the model's compression
plan (`ditpass.runtime.fastattn`, which holds the kernels, caches, calibration and plan files)::

    o = torch.ops.ditpass.attention.default(q, k, v, site_3)   # site 3: "self: local, fastattn 12W 5S 3F"

The plan comes from a file (``Plan(fastattn="plan.json")``, loaded at the first build) or from a
calibration run (``Plan(fastattn=True)``: ``ditpass.runtime.fastattn.calibrate(pipe, inputs)`` before
generating, which ``ditpass generate --use_fast_attn`` does); until then the report says so and the sites
refuse to run. explain shows the plan as a table (sites x steps) and the attention FLOPs it saves; both are
filled in again when a calibration sets the plan.

What a site may use, and why (notes in the report):

- full and AST everywhere (AST reuses the site's own output, whatever the layout);
- WA-RS on self / joint attention without a mask, dropout or causal flag, locally or under Ulysses (the
  whole sequence per head group: the single-device window); not under ring attention (no halo exchange);
- ASC where both CFG halves are in the local batch (and no ring attention, whose keys are split), or with
  ``cfg=2`` through a broadcast from the first half's rank; not with ``dp > 1`` alone, which splits the
  halves' rows over ranks;
- nothing but full where SDPA has dropout, a causal flag or grouped-query heads.

After sequence_parallel (it reads the site's ``seq`` entry and the global lengths), before the passes that
only move or merge nodes. Off when ``Plan.fastattn`` is unset.
"""
from __future__ import annotations

import sympy
import torch
import torch.fx

from ditpass.errors import PlanError
from ditpass.pass_base import GraphPass, PassContext, PassResult, Table
from ditpass.runtime import fastattn as fa
from ditpass.runtime.ops import OPS

__all__ = ["FastAttn"]


def _shape_env(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for s in (val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(s, torch.SymInt):
                return s.node.shape_env
    return None


def _hint(x, env) -> int:
    """An int at the captured sizes from a SymInt, a sympy expression of the capture's symbols or an int."""
    if isinstance(x, torch.SymInt):
        x = x.node.expr
    if isinstance(x, sympy.Basic) and x.free_symbols:
        return int(x.xreplace(dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)))
    return int(x)


class FastAttn(GraphPass):
    name = "fastattn"
    off_note = "off (Plan.fastattn unset)"

    def enabled(self, ctx: PassContext) -> bool:
        return bool(ctx.plan.fastattn)

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        run = fa.run_for(ctx.state, ctx.plan)
        pl = ctx.placement
        batch, cfg = pl.degree("batch"), pl.degree("cfg")
        nodes = [n for n in gm.graph.nodes if n.target is OPS["attention"]]
        sites = [ctx.sites[int(getattr(gm, n.args[3].target))] for n in nodes]  # args[3]: the site id's get_attr
        keys, seen = [], {}
        for node, entry in zip(nodes, sites):
            module = entry.module or node.name
            seen[module] = seen.get(module, 0) + 1
            keys.append(module if seen[module] == 1 else f"{module}#{seen[module] - 1}")
        notes = []
        if run.plan is not None:
            unknown = [k for k in keys if k not in run.plan]
            if keys and len(unknown) == len(keys):
                raise PlanError(f"fastattn={ctx.plan.fastattn!r}: the saved plan names sites "
                                f"{sorted(run.plan)[:3]}..., none of this model's ({keys[:3]}...): a plan of another "
                                f"model; calibrate this one (fastattn=True)")
            if unknown:
                notes.append(f"{len(unknown)} of {len(keys)} sites are not in the saved plan and run full attention: "
                             f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        captured = {s.node: s for s in ctx.analysis.sites}  # the shapes before sequence parallel: global
        env = _shape_env(gm)
        entries = []
        for i, (node, entry, key) in enumerate(zip(nodes, sites, keys)):
            methods, why = self._methods(node, entry, pl)
            found = captured.get(entry.node)
            q, k = (found.q_shape, found.k_shape) if found is not None else (a.meta["val"].shape for a in node.args[:2])
            geometry = (_hint(q[0], env) * batch, *(_hint(x, env) for x in (q[1], q[-2], k[-2], q[-1])))
            fast = fa.FastAttnSite(key, i, len(nodes), run.window, methods, geometry,
                                   cfg_group=pl.group("cfg") if cfg > 1 and "asc" in methods else "",
                                   cfg_rank=pl.coord("cfg"), run=run)
            entries.append(ctx.sites.refine(entry.site, note=why, fast=fast))
        run.register(keys, {e.fast.key: e.fast.methods for e in entries})
        notes.append(f"window: {run.window:g} of each sequence (WA-RS); "
                     + (f"plan loaded from {run.source}" if run.source != "calibrate" else
                        f"plan: calibrated at run time (threshold {run.threshold:g}, {run.n_calib} inputs)"))
        if pl.degree("ring") > 1:
            notes.append("ring attention holds part of the keys on each rank: its sites get no WA-RS (no halo "
                         "exchange) and no local ASC")
        elif pl.degree("ulysses") > 1:
            notes.append("WA-RS under Ulysses: after the all-to-all each rank holds the whole sequence of its heads, "
                         "so the window is computed there, in global token order: the single-device window")
        if cfg > 1:
            notes.append("ASC with cfg=2: the first half's cfg rank computes the attention and broadcasts it (and "
                         "its residual) to the other, which computes none: the single-device result, no faster")
        elif batch > 1:
            notes.append("ASC off: dp splits the CFG halves' rows over ranks")
        notes.append("AST and ASC skip the attention, not the q/k/v and output projections around it (one graph "
                     "for every step)")
        result = PassResult(self.name, False)
        self._fill(result, entries, run, notes)
        run.listeners.append(lambda: self._fill(result, entries, run, notes))
        return result

    @staticmethod
    def _methods(node, entry, pl) -> tuple[tuple[str, ...], str | None]:
        """The methods besides full this site may use here, and a note where that is fewer than all."""
        kw = node.kwargs
        if kw.get("dropout_p", 0.0) or kw.get("is_causal") or kw.get("enable_gqa"):
            return (), "fastattn off: SDPA with dropout, a causal flag or grouped-query heads"
        ring = pl.degree("ring") > 1
        wars = entry.kind in ("self", "joint", "text") and kw.get("attn_mask") is None and not ring
        if pl.degree("cfg") > 1:
            asc = True
        else:
            asc = pl.degree("batch") == 1 and not ring
        allowed = {"ast": True, "wars": wars, "asc": asc, "wars+asc": wars and asc}
        methods = tuple(m for m in fa.CANDIDATES if allowed[m])
        missing = []
        if not wars:
            missing.append("no WA-RS (" + ("ring attention" if ring else "a mask" if kw.get("attn_mask") is not None
                                           else f"{entry.kind} attention") + ")")
        if not asc:
            missing.append("no ASC")
        return methods, ("fastattn: " + ", ".join(missing)) if missing and entry.kind in ("self", "joint", "text") else None

    @staticmethod
    def _fill(result: PassResult, entries, run, notes: list[str]) -> None:
        """The report from the run's plan as it is now: the first note (explain's summary line), the plan
        table (sites x steps) with the attention FLOPs each site saves, and how DiTFastAttn runs here."""
        result.tables.clear()
        how = Table("how DiTFastAttn runs here", ["decision"], [[n] for n in notes])
        if run.plan is None:
            result.notes[:] = ["no compression plan yet: ditpass.runtime.fastattn.calibrate(pipe, inputs) chooses "
                               "one before the first generation (ditpass generate --use_fast_attn does)"] + notes
            result.tables.append(how)
            result.details.update(sites=len(entries), plan=None)
            return
        steps = run.steps
        rows, total_full, total = [], 0.0, 0.0
        counts: dict[str, int] = {}
        for e in entries:
            f = e.fast
            methods = f.plan() + ["full"] * (steps - len(f.plan()))
            site_full = site_used = 0.0
            for t, m in enumerate(methods):
                refresh = run.plan_needs(f.key, t)[1] and m in ("full", "asc") and "wars" in f.methods
                a, b = fa.step_flops(f, m, refresh)
                site_full, site_used = site_full + a, site_used + b
                counts[m] = counts.get(m, 0) + 1
            total_full, total = total_full + site_full, total + site_used
            saved = 1 - site_used / site_full if site_full else 0.0
            rows.append([e.site, f.key, *(fa.CODES[m] for m in methods), f"{saved:.0%}"])
        legend = "F full, S AST (last step's output), W WA-RS (window + residual), WC WA-RS+ASC, C ASC (one CFG half)"
        result.tables.append(Table(f"compression plan, method per step ({legend})",
                                   ["site", "module", *map(str, range(steps)), "attn FLOPs saved"], rows, fold="module"))
        result.tables.append(how)
        saved = 1 - total / total_full if total_full else 0.0
        n = max(1, sum(counts.values()))
        mix = ", ".join(f"{fa.CODES[m]} {c / n:.0%}" for m, c in counts.items())
        result.notes[:] = [f"{saved:.1%} of the attention FLOPs saved: {total / 1e9:,.3g} of {total_full / 1e9:,.3g} GFLOP "
                           f"per generation ({steps} steps, whole model, captured sizes); sites x steps: {mix}"] + notes
        result.details.update(sites=len(entries), steps=steps, attn_flops_full=total_full, attn_flops=total,
                              attn_flops_saved=saved, methods=counts,
                              plan={e.fast.key: e.fast.plan() for e in entries})
