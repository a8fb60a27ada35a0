"""Step caching's driver: per diffusion step, run the middle blocks or reuse (forecast) their residual.

    runner = StepCacheRunner(full_gm, parts, policy, state)   # made by build() from passes/step_cache.py
    out = runner(**inputs)                                    # what the transformer returns
    runner.log[-1]        # the last generation: one entry per call, "computed" / "cached", the metric

Three graphs cut from the rewritten transformer at block boundaries (`passes/step_cache.py`):

    head(*inputs)               -> (*h, *x, *e)  glue + the first blocks; h: what the middle reads, x: the
                                                 first block's inputs (for the decision's residual), e: the
                                                 embeddings the middle and the tail read (computed once)
    middle(*inputs, *h, *e_m)   -> (*m,)         the cached blocks
    tail(*inputs, *m, *e_t)     -> outputs       the last blocks + glue (final norm, projection, un-patchify)

One call: run the head; the first blocks' residual ``d = h_s - x_s`` (per stream ``s``: the hidden
states that flow through the middle, e.g. FLUX's image and text streams) against ``d_ref``, its value
at the last computed step: ``metric = sum |d - d_ref| / sum |d_ref|``, the sums all-reduced over the
whole world, so every rank (sequence shards, CFG halves, data-parallel rows) takes the same decision.
Compute when it is a warm-up step, the first of a generation, after ``max_skip`` cached steps, or
``metric >= threshold``; then the middle runs and its residual ``m_s - h_s`` is kept. Otherwise each
stream's ``m_s`` is ``h_s`` plus the kept residual (``fbcache``) or its forecast from the last computed
steps (``taylorseer``: Newton's polynomial through the last ``order + 1`` computed residuals, in the
step index). The tail always runs. The decision (one ``.item()``) is on the host, between compiled
parts.

State: the residuals live in `RunState` buffers (zeroed by its reset); the runner notices a new
generation by ``state.generation`` and starts a fresh record. A pipeline that calls the transformer
twice per step (conditional and unconditional) gets one cache *slot* per call of the step, each with its
own reference and residuals (diffusers' cache contexts do the same).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CachePolicy", "StepCacheRunner", "forecast"]

_IDS = itertools.count()  # buffer names, unique per runner (one runner per input signature)


@dataclass(frozen=True)
class CachePolicy:
    """What decides and what a cached step uses; made by the pass from the plan."""

    method: str  # "fbcache": the last residual; "taylorseer": a forecast
    threshold: float  # compute when the first blocks' residual changed by >= this (relative L1)
    warmup_steps: int  # steps at the start that always compute
    max_skip: int  # most consecutive cached steps
    order: int = 0  # taylorseer's forecast order (0, 1, 2)

    @property
    def points(self) -> int:
        """Computed residuals kept per stream: order + 1 for a forecast, 1 to reuse."""
        return self.order + 1 if self.method == "taylorseer" else 1


def forecast(points: list[tuple[int, torch.Tensor]], t: int) -> torch.Tensor:
    """The polynomial through ``points`` ``[(step, value), ...]`` (oldest first) at step ``t`` (Newton's
    divided differences). One point: its value; two: ``r1 + (r1 - r0) * (t - t1) / (t1 - t0)``."""
    ts = [p[0] for p in points]
    coef = [p[1] for p in points]
    n = len(points)
    for j in range(1, n):
        for i in range(n - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (ts[i] - ts[i - j])
    out = coef[n - 1]
    for i in range(n - 2, -1, -1):
        out = coef[i] + (t - ts[i]) * out
    return out


@dataclass
class _Slot:
    """One call position within a step: its reference residual, kept middle residuals, counters."""

    ref: list = field(default_factory=list)  # first blocks' residual at the last computed step
    history: list = field(default_factory=list)  # [(step, buffer index, [residual per stream])], oldest first
    skipped: int = 0  # cached steps since the last computed one
    has_ref: bool = False


class StepCacheRunner:
    """Runs a step-cached transformer (see the module docstring)."""

    def __init__(self, full_gm, parts, policy: CachePolicy, state, compile_fn=None, group=None):
        from .pipeline import _flat_inputs
        from .state import RunState

        self.parts, self.policy = parts, policy
        self.state = state if state is not None else RunState()
        run = compile_fn or (lambda g: g)
        self._head, self._middle, self._tail = run(parts.head), run(parts.middle), run(parts.tail)
        self.inputs = _flat_inputs(full_gm)
        self.out_codegen = full_gm.graph._codegen
        self.group = group  # None: the default group (the whole world), where one is initialised
        self.uid = next(_IDS)
        self.log: list[list[dict]] = []  # per generation: one entry per call
        self._generation = None
        self._slots: dict[int, _Slot] = {}
        self._last_step, self._slot = None, 0

    # ---- one call ------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        flat = list(self.inputs(*args, **kwargs))
        step = self.state.step_index
        if self._generation != self.state.generation:  # a new generation: a fresh record, no reference
            self._generation, self._slots, self._last_step = self.state.generation, {}, None
            self.log.append([])
        self._slot = self._slot + 1 if step == self._last_step else 0
        self._last_step = step
        slot = self._slots.setdefault(self._slot, _Slot())

        head = list(self._head(*flat))
        p = self.parts
        h = head[:p.n_middle_in]
        d = [head[i] - head[x] if x is not None else head[i] for i, x in p.metric]
        compute, metric, why = self._decide(slot, step, d)
        if compute:
            m = list(self._middle(*flat, *h, *(head[i] for i in p.middle_extra)))
            self._keep(slot, step, d, h, m)
        else:
            m = self._cached(slot, step, h)
            slot.skipped += 1
        out = self._tail(*flat, *m, *(head[i] for i in p.tail_extra))
        self.log[-1].append({"step": step, "slot": self._slot, "action": "computed" if compute else "cached",
                             "metric": metric, "why": why})
        return self.out_codegen.process_outputs(list(out))

    def _decide(self, slot: _Slot, step: int, d: list[torch.Tensor]) -> tuple[bool, float | None, str]:
        pol = self.policy
        if not slot.has_ref:
            return True, None, "first step"
        if step < pol.warmup_steps:
            return True, None, "warm-up"
        metric = self._metric(d, slot.ref)
        if slot.skipped >= pol.max_skip:
            return True, metric, f"{slot.skipped} cached in a row"
        if metric >= pol.threshold:
            return True, metric, ">= threshold"
        return False, metric, "< threshold"

    def _metric(self, d, ref) -> float:
        """sum |d - ref| / sum |ref| over every stream and, all-reduced, every rank: one number everywhere."""
        num = sum((a.float() - b.float()).abs().sum() for a, b in zip(d, ref))
        den = sum(b.float().abs().sum() for b in ref)
        sums = torch.stack([num, den]).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(sums, group=self.group)
        num, den = sums.tolist()
        return num / den if den > 0 else float("inf")

    def _buffer(self, name, like):
        return self.state.buffer(f"step_cache.{self.uid}.slot{self._slot}.{name}", like)

    def _keep(self, slot: _Slot, step: int, d, h, m) -> None:
        """A computed step: it becomes the reference; its middle residual joins the history."""
        with torch.no_grad():
            slot.ref = [self._buffer(f"ref{k}", t).copy_(t) for k, t in enumerate(d)]
            slot.has_ref, slot.skipped = True, 0
            # the history's buffers rotate: the oldest entry's are written again
            if len(slot.history) >= self.policy.points:
                slot.history.pop(0)
            used = {k for _, k, _ in slot.history}
            k = next(i for i in range(self.policy.points) if i not in used)
            res = []
            for j, (kind, i) in enumerate(self.parts.streams):
                if kind == "forward":  # a head value the tail reads: nothing to keep
                    res.append(None)
                    continue
                value = m[j] - h[i] if kind == "residual" else m[j]
                res.append(self._buffer(f"res{j}.{k}", m[j]).copy_(value))
            slot.history.append((step, k, res))

    def _cached(self, slot: _Slot, step: int, h) -> list[torch.Tensor]:
        out = []
        for j, (kind, i) in enumerate(self.parts.streams):
            if kind == "forward":
                out.append(h[i])
                continue
            points = [(s, rs[j]) for s, _, rs in slot.history]
            if self.policy.method == "taylorseer" and len(points) > 1:
                r = forecast([(s, v.float()) for s, v in points], step).to(points[-1][1].dtype)
            else:
                r = points[-1][1]
            out.append(h[i] + r if kind == "residual" else r)
        return out

    # ---- the record ----------------------------------------------------------------------
    def summary(self, generation: int = -1) -> dict:
        """Counts of one generation's calls: computed, cached, and the cached steps' indices."""
        calls = self.log[generation] if self.log else []
        cached = [c["step"] for c in calls if c["action"] == "cached"]
        return {"calls": len(calls), "computed": len(calls) - len(cached), "cached": len(cached),
                "cached_steps": cached}

    def tables(self) -> list:
        """For `explain`: what the last generation computed and reused, call by call."""
        from ditpass.pass_base import Table

        if not self.log:
            return []
        s = self.summary()
        rows = [[c["step"], c["slot"], c["action"], "-" if c["metric"] is None else f"{c['metric']:.4f}", c["why"]]
                for c in self.log[-1]]
        title = (f"step cache, generation {len(self.log)}: {s['computed']} of {s['calls']} calls computed the "
                 f"middle blocks, {s['cached']} reused them ({self.policy.method}, threshold "
                 f"{self.policy.threshold})")
        return [Table(title, ["step", "slot", "middle", "metric", "why"], rows)]

    def describe(self) -> str:
        s = self.summary()
        lines = [f"step cache ({self.policy.method}): head, middle and tail graphs run one after the other; "
                 f"{len(self.log)} generation(s) so far, the last: {s['computed']} computed, {s['cached']} cached "
                 f"of {s['calls']} calls"]
        for name, part in (("head", self._head), ("middle", self._middle), ("tail", self._tail)):
            if hasattr(part, "describe"):  # compiled regions
                lines.append(f"{name}: " + part.describe().replace("\n", "\n  "))
        return "\n".join(lines)
