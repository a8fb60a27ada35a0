"""PipeFusion: pipeline stages cut at block boundaries, patches of the token sequence, stale K/V.

What it makes, before sequence parallelism (the graph it is given stays the *full* graph: whole sequence,
exact; ``sequence_parallel`` shards it afterwards under ulysses)::

    # the patch graph: the sequence-parallel rewrite with the patch index in place of the rank
    hidden_states = ditpass.patch_shard(hidden_states, 1, [I], M, pipefusion_patch)   # patch m of M
    o = ditpass.attention(q, k, v, site_3, lengths=[T, I])   # site 3: patch K/V buffer
    return (proj_out(img), I)                                 # the patch, and the lengths to assemble it

    # the stage cut, the same for both graphs (ditpass.analysis.stages)
    stage 0: embeddings (replicated) + transformer_blocks.0-9   -> sends hidden_states, encoder_hidden_states
    stage 1: embeddings it needs + blocks 10-18 + norm_out, proj_out

Both graphs share their attention sites: the entry of each self / joint site gets a
`ditpass.runtime.patches.PatchAttention`, which keeps the site's full-sequence K/V buffer; the full
graph writes all of it (warm-up steps), the patch graph writes its patch and reads the rest (this
step's for earlier patches, the previous step's for later ones). Inside a diffusers pipeline the driver
pipelines across steps too (`ditpass.runtime.lazy`). Cross attention over replicated text
K/V stays local. The driver that runs a stage, whole or patch by patch, and moves activations between
stages is `ditpass.runtime.pipeline.PipeFusionRunner`; `ditpass.build.build` makes it from what this
pass leaves in ``ctx.graphs["pipefusion"]``.

Refused, with the reason: an op that needs the whole sequence (it cannot run on one patch), an
attention mask under PipeFusion x sequence parallelism, and (not built yet) PipeFusion with CUDA graphs.
With ``ring * ulysses > 1`` each patch is split over the stage's sequence ranks (``M x sp`` chunks;
`ditpass.runtime.patches`). Off when ``pipefusion == 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from ditpass.analysis.stages import StageCut
from ditpass.analysis.symbolic import node_val
from ditpass.pass_base import GraphPass, PassContext, PassResult, Table, nbytes
from ditpass.runtime.patches import PatchAttention

from .sequence_parallel.rewriter import _Rewriter

__all__ = ["PipeFusion", "PipeFusionGraphs"]


@dataclass
class PipeFusionGraphs:
    """What build() needs to make the runner: the patch graph, the cut, the shared patch state."""

    patch_gm: torch.fx.GraphModule
    tail_gm: torch.fx.GraphModule  # f(*inputs, *what the patch graph returns) -> the outputs
    cut: StageCut
    patch: PatchAttention
    patch_outputs: list  # (output index, token dim, number of lengths appended)
    positions: list  # per output of the graph: its dims sized by the visual tokens (None: not a tensor)


class PipeFusion(GraphPass):
    name = "pipefusion"
    off_note = "off (pipefusion=1)"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.plan.pipefusion > 1

    def requires(self, gm, ctx):
        plan = ctx.plan
        if plan.cuda_graphs:
            raise ValueError("pipefusion with cuda_graphs=True is not built yet (the driver sends between "
                             "stages from Python): set cuda_graphs=False")
        if not ctx.analysis.token_classes:
            raise ValueError("no token sequence found: the analysis saw no self or joint attention over "
                             "symbolic lengths (PipeFusion needs a capture with dynamic shapes)")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        from ditpass.build import copy_graph_module

        plan = ctx.plan
        M, N = plan.num_patches, plan.pipefusion
        pl = ctx.placement
        patch = PatchAttention(M, ctx.state, u=plan.ulysses, ulysses_rank=pl.coords["ulysses"],
                               ulysses_group=pl.group("ulysses"), r=plan.ring, ring_rank=pl.coords["ring"],
                               ring_group=pl.group("ring"))
        pgm = copy_graph_module(gm)
        pgm.register_buffer("pipefusion_patch", patch.index, persistent=False)
        first = next(n for n in pgm.graph.nodes if n.op != "placeholder")
        with pgm.graph.inserting_before(first):
            index = pgm.graph.get_attr("pipefusion_patch")
        index.meta["val"] = patch.index
        # the blocks of the main sequence: groups with self / joint attention (not a text refiner's)
        main = {s.block for s in ctx.analysis.sites if s.block and s.kind in ("self", "joint")}
        groups = [g for g in ctx.analysis.transformer_blocks if any(b.path in main for b in g.blocks)]
        blocks = {b.path for g in groups for b in g.blocks}
        cut = StageCut.balanced(gm, N, sizes=list(plan.stage_blocks) if plan.stage_blocks else None, blocks=blocks)
        # the patch graph ends where the tail starts (the un-patchify needs every patch): it returns what
        # the tail reads, which the last stage assembles and runs the tail on, once
        from ditpass.runtime.pipeline import tail_graph

        tail_gm, _ = tail_graph(gm, cut)  # now: the passes after this one rewrite gm, not it
        tail, tail_in = cut.tail(pgm.graph)
        out = next(iter(pgm.graph.find_nodes(op="output")))
        out.args = (tuple(tail_in),)
        for n in reversed(tail):
            pgm.graph.erase_node(n)
        rw = _Rewriter(pgm, ctx, patch=patch, patch_index=index, patch_blocks=blocks)
        rw.run()
        pgm.graph._codegen = torch.fx.graph.CodeGen()  # flat outputs: the patch, then its lengths
        pgm.graph.lint()
        pgm.recompile()

        ctx.graphs["pipefusion"] = PipeFusionGraphs(pgm, tail_gm, cut, patch, rw.patch_outputs,
                                                    _positions(gm, ctx.analysis.visual))
        sites = [e for e in ctx.sites if e.patch is not None]
        stage = cut.assign(gm.graph)
        rows, sends = [], []
        for s, blocks in enumerate(cut.blocks):
            params = sum(cut.costs[b] for b in blocks)
            sent = cut.boundary(gm.graph, s, stage) if s < N - 1 else []
            b = sum(nbytes(node_val(n)) for n in sent)
            sends.append(b)
            rows.append([s, f"{blocks[0]} .. {blocks[-1]}" if len(blocks) > 1 else blocks[0], len(blocks),
                         f"{params / 1e6:.2f} M", ", ".join(n.name for n in sent) or "-",
                         _mb(b), _mb(b / M) if b else "-"])
        table = Table(f"stage cut: {N} stages, {M} patches",
                      ["stage", "blocks", "count", "params", "sends", "per full step", "per patch"], rows)
        me = ctx.placement.coord("pipefusion")
        uly = f", each split over {plan.sp} sequence ranks" if plan.sp > 1 else ""
        if not plan.across_steps:
            sched = "within each transformer call (Plan(across_steps=False))"
        elif plan.dp * plan.cfg > 1:
            sched = "within each transformer call (dp / cfg gather the batch after each call)"
        else:
            sched = (f"across diffusion steps inside a pipeline (stage 0 starts step t+1 on patch m when step t's "
                     f"patch m is back; over S pipelined steps S*{M}/(S*{M}+{N}-1) of the ideal), within each "
                     f"call outside one ({M}/({M}+{N}-1) = {M / (M + N - 1):.0%})")
        notes = [f"the full graph cut into {N} stages, and a patch graph ({M} patches{uly}) made; this rank is stage {me} "
                 f"({len(cut.blocks[me])} blocks); {len(sites)} attention sites keep a full-sequence K/V buffer; "
                 f"warm-up steps: {plan.warmup_steps}; the pipeline runs {sched}"]
        T = M + N - 1
        picture = Table(f"patch schedule of one step after warm-up: stage x time slot (p<m>: patch m; "
                        f"{M}/{T} slots busy per stage)", ["stage", *(str(t) for t in range(T))],
                        [[s, *(f"p{t - s}" if 0 <= t - s < M else "." for t in range(T))] for s in range(N)])
        tables = [table, picture]
        if "across diffusion steps" in sched:  # two steps back to back: no drain between them
            T2 = 2 * M + N - 1
            tables.append(Table(f"across steps: two steps after warm-up (a<m>: step t, b<m>: step t+1; "
                                f"{2 * M}/{T2} slots busy per stage)", ["stage", *(str(t) for t in range(T2))],
                                [[s, *(("a" if t - s < M else "b") + f"{(t - s) % M}" if 0 <= t - s < 2 * M else "."
                                       for t in range(T2))] for s in range(N)]))
        return PassResult(self.name, False, notes=notes, tables=tables,
                          details={"stages": [list(b) for b in cut.blocks], "patches": M,
                                   "params": [sum(cut.costs[b] for b in bs) for bs in cut.blocks],
                                   "sent_bytes": sends, "patch_sites": len(sites),
                                   "patch_outputs": list(rw.patch_outputs)})


def _positions(gm, visual) -> list:
    """For each output of ``gm``: the dims whose size depends on the visual token count (a pipelined
    output is valid patch by patch along these only; `ditpass.runtime.lazy`)."""
    from ditpass.analysis.symbolic import to_expr

    out = []
    for o in next(iter(gm.graph.find_nodes(op="output"))).args[0]:
        v = node_val(o) if isinstance(o, torch.fx.Node) else None
        if isinstance(v, torch.Tensor):
            out.append(frozenset(d for d, n in enumerate(v.shape) if to_expr(n).free_symbols & set(visual)))
        else:
            out.append(None)
    return out


def _mb(b) -> str:
    return f"{b / 2**20:.2f} MiB"
