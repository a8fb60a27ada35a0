"""step_cache: cut the transformer after its first blocks (and before its last) for step caching.

What it makes, from the final graph (it changes no node of it)::

    # Plan(step_cache="fbcache", cache_first_blocks=1, cache_last_blocks=0), FLUX
    head:    x_embedder, context_embedder, time/text/RoPE embeddings, transformer_blocks.0
             -> encoder_hidden_states_1, hidden_states_1 (what the middle reads),
                context_embedder, x_embedder (block 0's inputs: the decision's residual)
    middle:  transformer_blocks.1 .. 18, single_transformer_blocks.0 .. 37 -> hidden_states_57
    tail:    norm_out, proj_out                                            -> the outputs

and the *streams*: which head value each middle output continues (``hidden_states_57`` =
``hidden_states_1`` + the middle's residual), paired by shape among the middle output's ancestors; a
value the middle only passes on (DiT's final modulation, computed by block 0's module) is taken from
the head; a middle output with no stream is cached as it is. The runner
(`ditpass.runtime.step_cache.StepCacheRunner`, made by `ditpass.build.build` from what this pass leaves
in ``ctx.graphs["step_cache"]``) runs head, then middle or the cache, then tail, one decision per step.

The cut is made by `ditpass.analysis.stages.StageCut` with fixed sizes (first, middle, last blocks)
over the blocks of the main sequence (groups with self / joint attention, as PipeFusion's); nodes of
no block computed only from inputs and weights (embeddings, RoPE tables) are computed once, by the head,
which hands the middle and the tail the ones they read. Last in the pass order: the parts are cut from the graph every other pass has rewritten.
Off when ``Plan.step_cache`` is None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from ditpass.analysis.partition import _is_scalar_op
from ditpass.analysis.stages import StageCut
from ditpass.analysis.symbolic import node_val
from ditpass.pass_base import GraphPass, PassContext, PassResult, Table, _dims, nbytes
from ditpass.runtime.step_cache import CachePolicy

__all__ = ["StepCache", "StepCacheGraphs"]


@dataclass
class StepCacheGraphs:
    """What build() needs to make the runner (see the module docstring)."""

    head: torch.fx.GraphModule  # f(*inputs) -> (*middle inputs, *first-block inputs)
    middle: torch.fx.GraphModule  # f(*inputs, *middle inputs) -> (*middle outputs)
    tail: torch.fx.GraphModule  # f(*inputs, *middle outputs) -> the outputs
    n_middle_in: int
    metric: list  # (head output index of a stream, head output index of the block input it continues | None)
    streams: list  # per middle output: ("residual", i) | ("forward", i) | ("value", None); i: a middle input
    policy: CachePolicy
    blocks: list  # [first, middle, last] block paths
    middle_extra: list  # head output indices of the replicated values the middle reads (after the middle inputs)
    tail_extra: list  # head output indices of the replicated values the tail reads (after the middle outputs)


class StepCache(GraphPass):
    name = "step_cache"
    off_note = "off (step_cache=None)"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.plan.step_cache is not None

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        from ditpass.runtime.pipeline import _sub_graph

        plan = ctx.plan
        F, B = plan.cache_first_blocks, plan.cache_last_blocks
        main = {s.block for s in ctx.analysis.sites if s.block and s.kind in ("self", "joint")}
        groups = [g for g in ctx.analysis.transformer_blocks if any(b.path in main for b in g.blocks)]
        paths = [b.path for g in groups for b in g.blocks]
        if len(paths) <= F + B:
            raise ValueError(f"cache_first_blocks={F} + cache_last_blocks={B} leave none of the {len(paths)} blocks "
                             f"of the main sequence to cache: keep their sum below {len(paths)}")
        sizes = [F, len(paths) - F - B] + ([B] if B else [])
        cut = StageCut.balanced(gm, len(sizes), sizes=sizes, blocks=set(paths))
        graph = gm.graph
        stage = cut.assign(graph)
        if B:
            m_out = cut.boundary(graph, 1, stage)
            tail_nodes = {n for n, s in stage.items() if s == 2}
        else:  # the tail: what follows the last block (`StageCut.tail`, as PipeFusion's)
            tail, m_out = cut.tail(graph, stage)
            tail_nodes = set(tail)
        middle_nodes = {n for n, s in stage.items() if s == 1 and n not in tail_nodes}
        # replicated values (embeddings, RoPE tables, modulation inputs) the middle and the tail read: the
        # head computes them once and hands them on, instead of each part computing them again
        r_mid, r_tail = (_replicated(graph, stage, nodes) for nodes in (middle_nodes, tail_nodes))
        outputs = list(next(iter(graph.find_nodes(op="output"))).args[0])
        tail_gm = _sub_graph(gm, stage, m_out + r_tail, lambda n: n in tail_nodes or stage[n] == -1, outputs,
                             "CacheTail")
        out_set = set(m_out)
        m_in = [n for n in graph.nodes if stage.get(n, -1) == 0 and not _is_scalar_op(n)
                and (n in out_set or any(u in middle_nodes for u in n.users))]
        in_index = {n: i for i, n in enumerate(m_in)}
        middle_gm = _sub_graph(gm, stage, m_in + r_mid, lambda n: n in middle_nodes or stage[n] == -1, m_out,
                               "CacheMiddle")

        # streams: the head value each middle output continues
        streams, taken = [], set()
        for m in m_out:
            if m in in_index:
                streams.append(("forward", in_index[m]))
                continue
            i = _pair(m, [n for n in m_in if n not in taken])
            if i is None:
                streams.append(("value", None))
            else:
                taken.add(i)
                streams.append(("residual", in_index[i]))
        # the decision's residual: each stream's head value minus the first block's input it continues
        first = set(cut.blocks[0])
        block_in = [n for n in graph.nodes if stage.get(n) == -1 and n.op == "call_function" and not _is_scalar_op(n)
                    and any(u.meta.get("ditpass_block") in first for u in n.users)]
        heads = [m_in[i] for kind, i in streams if kind == "residual"] or \
                [n for n in m_in if _float(n)]
        xs, metric = [], []
        for h in heads:
            x = _pair(h, [n for n in block_in if n not in xs])
            if x is not None:
                xs.append(x)
            metric.append((in_index[h], len(m_in) + xs.index(x) if x is not None else None))
        extra = len(m_in) + len(xs)
        head_gm = _sub_graph(gm, stage, [], lambda n: stage[n] in (-1, 0), m_in + xs + r_mid + r_tail, "CacheHead")
        policy = CachePolicy(plan.step_cache, float(plan.cache_threshold), plan.cache_warmup_steps,
                             plan.cache_max_skip, plan.cache_order if plan.step_cache == "taylorseer" else 0)
        ctx.graphs["step_cache"] = StepCacheGraphs(
            head_gm, middle_gm, tail_gm, len(m_in), metric, streams, policy,
            [list(b) for b in cut.blocks] + ([] if B else [[]]),
            list(range(extra, extra + len(r_mid))), list(range(extra + len(r_mid), extra + len(r_mid) + len(r_tail))))

        def blocks_text(bs):
            return "-" if not bs else bs[0] if len(bs) == 1 else f"{bs[0]} .. {bs[-1]} ({len(bs)})"

        parts = [("head", cut.blocks[0], head_gm), ("middle (cached)", cut.blocks[1], middle_gm),
                 ("tail", cut.blocks[2] if B else [], tail_gm)]
        rows = [[name, blocks_text(bs), sum(cut.costs[b] for b in bs) / 1e6,
                 sum(1 for n in g.graph.nodes if n.op == "call_function")] for name, bs, g in parts]
        cut_table = Table("step cache cut: what runs every step and what a cached step skips",
                          ["part", "blocks", "params (M)", "nodes"], [[r[0], r[1], f"{r[2]:.2f}", r[3]] for r in rows])
        stream_rows = []
        for m, (kind, i) in zip(m_out, streams):
            src = _label(m_in[i]) if i is not None else "-"
            how = {"residual": f"{src} + cached residual" if plan.step_cache == "fbcache" else
                   f"{src} + forecast residual (order {policy.order})",
                   "forward": f"{src} (passed on from the head)", "value": "the cached value itself"}[kind]
            stream_rows.append([_label(m), _shape(m), _mb(nbytes(node_val(m))), how])
        stream_table = Table("what the tail reads on a cached step", ["middle output", "shape", "size", "cached step"],
                             stream_rows)
        metric_rows = [[_label(m_in[i]), _label(xs[x - len(m_in)]) if x is not None else "-",
                        "output - input" if x is not None else "output"] for i, x in metric]
        metric_table = Table(f"the decision: relative L1 change of the first blocks' residual against the last "
                             f"computed step, all-reduced over the world; compute when >= {plan.cache_threshold}",
                             ["stream", "first block's input", "residual"], metric_rows)
        skipped = rows[1][2] / max(sum(r[2] for r in rows), 1e-9)
        notes = [f"{plan.step_cache}: the first {F} block(s) and the last {B} always run; a cached step skips "
                 f"{len(cut.blocks[1])} blocks ({skipped:.0%} of the block parameters); warm-up steps "
                 f"{plan.cache_warmup_steps}, at most {plan.cache_max_skip} cached steps in a row"]
        return PassResult(self.name, False, notes=notes, tables=[cut_table, metric_table, stream_table],
                          details={"blocks": [list(b) for b in cut.blocks], "middle_inputs": [n.name for n in m_in],
                                   "middle_outputs": [n.name for n in m_out], "streams": streams,
                                   "metric": metric, "skipped_share": skipped})


def _replicated(graph, stage, nodes) -> list:
    """Replicated tensors (stage -1: computed from inputs and weights only) that ``nodes`` read."""
    return [n for n in graph.nodes if stage.get(n) == -1 and n.op == "call_function" and not _is_scalar_op(n)
            and isinstance(node_val(n), torch.Tensor) and any(u in nodes for u in n.users)]


def _float(n) -> bool:
    v = node_val(n)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _label(n) -> str:
    """A node's name and the module that made it: ``add_11 (transformer_blocks.0)``."""
    from ditpass.analysis.blocks import module_path

    where = module_path(n)
    return f"{n.name} ({where})" if where else n.name


def _shape(n) -> str:
    d = _dims(node_val(n))
    return "-" if d is None else "[" + ", ".join(str(h) for _, h in d) + "]"


def _mb(b) -> str:
    return f"{b / 2**20:.2f} MiB"


def _ancestors(node: torch.fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _pair(node: torch.fx.Node, candidates: list):
    """The first of ``candidates`` that ``node`` is computed from and that has its shape (as expressions)
    and dtype: the value it continues through a run of residual blocks; None when there is none."""
    val = node_val(node)
    if not isinstance(val, torch.Tensor):
        return None
    want = [e for e, _ in _dims(val)]
    up = _ancestors(node)
    for c in candidates:
        cv = node_val(c)
        if c in up and isinstance(cv, torch.Tensor) and cv.dtype == val.dtype and [e for e, _ in _dims(cv)] == want:
            return c
    return None
