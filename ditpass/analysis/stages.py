"""PipeFusion's stage cut: transformer blocks -> ``n`` contiguous stages, every node -> a stage.

    cut = StageCut.balanced(gm, 4)                 # blocks split by parameter count
    cut.node_stage(node)                           # -1: computed by whichever stage needs it
    cut.boundary(gm.graph, 1)                      # what stage 1 hands on to stage 2

Rules (read-only, like the rest of the analysis):

- A node of a block (``meta["ditpass_block"]``) belongs to that block's stage (or to a later stage
  whose value it reads).
- Any other node (embeddings, the final norm, what a pass inserted) belongs to the latest stage
  among its inputs, or is *replicated* (-1) when its inputs are all graph inputs, weights or
  replicated nodes: the timestep / text embeddings, RoPE tables, the patch embedding. Every stage
  computes the replicated nodes it needs itself, so they never travel.
- The graph's outputs belong to the last stage.
- ``boundary(s)``: the values made by stages ``<= s`` that a stage ``> s`` reads, in graph order;
  stage ``s`` receives ``boundary(s - 1)`` and sends ``boundary(s)`` (it forwards what later stages
  read from earlier ones: long skip connections like Hunyuan-DiT's cross the stages in between).
  Sizes never travel: size arithmetic (``sym_size`` of a received tensor, sums of sizes) is computed
  again by the stage that reads it.

Balance: the blocks' costs are their parameter counts (the work per token of a DiT block is its
matmuls, which is its weights); ``balanced`` cuts the block list into ``n`` contiguous runs that
minimise the largest run, or takes the user's blocks per stage.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx

__all__ = ["StageCut", "block_costs", "split_balanced"]


def _tensor_attr(gm, node):
    try:
        t = operator.attrgetter(node.target)(gm)
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) else None


def block_costs(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Block path -> parameters its nodes read (each weight counted once), in graph order."""
    costs: dict[str, int] = {}
    seen: set[str] = set()
    for node in gm.graph.nodes:
        block = node.meta.get("ditpass_block")
        if node.op != "call_function" or block is None:
            continue
        costs.setdefault(block, 0)
        for a in node.all_input_nodes:
            if a.op == "get_attr" and a.target not in seen:
                t = _tensor_attr(gm, a)
                if t is not None and t.dim() > 0:
                    seen.add(a.target)
                    costs[block] += t.numel()
    return costs


def split_balanced(costs: list[int], n: int) -> list[int]:
    """Blocks per stage: ``n`` contiguous runs of ``costs`` minimising the largest run's sum (exact DP)."""
    m = len(costs)
    if n > m:
        raise ValueError(f"{n} stages need at least {n} blocks, the graph has {m}")
    pre = [0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    # best[k][j]: the smallest largest-run over the first j blocks in k runs; cut[k][j]: where run k starts
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, m - (n - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], pre[j] - pre[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    sizes, j = [], m
    for k in range(n, 0, -1):
        i = cut[k][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


@dataclass
class StageCut:
    """Which stage each block belongs to (see the module docstring)."""

    n: int
    blocks: list[list[str]]  # stage -> block paths, in graph order
    costs: dict[str, int] = field(default_factory=dict)  # block -> parameters

    @classmethod
    def balanced(cls, gm: torch.fx.GraphModule, n: int, sizes: list[int] | None = None,
                 blocks: set[str] | None = None) -> "StageCut":
        """``blocks``: the block paths to cut between (default: every block); nodes of other blocks (a
        text refiner's) count as glue."""
        costs = {b: c for b, c in block_costs(gm).items() if blocks is None or b in blocks}
        names = list(costs)
        if not names:
            raise ValueError("no transformer blocks found (meta['ditpass_block']): PipeFusion cuts between blocks")
        if sizes is None:
            sizes = split_balanced([costs[b] for b in names], n)
        elif len(sizes) != n or sum(sizes) != len(names) or min(sizes) < 1:
            raise ValueError(f"blocks per stage {list(sizes)}: need {n} counts >= 1 that sum to the "
                             f"{len(names)} blocks")
        blocks, i = [], 0
        for s in sizes:
            blocks.append(names[i:i + s])
            i += s
        return cls(n, blocks, costs)

    @property
    def block_stage(self) -> dict[str, int]:
        return {b: s for s, bs in enumerate(self.blocks) for b in bs}

    def assign(self, graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
        """Every call_function node -> its stage, -1 for replicated (see the module docstring)."""
        of = self.block_stage
        stage: dict[torch.fx.Node, int] = {}
        for node in graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                stage[node] = -1
            elif node.op == "call_function":
                latest = max([stage.get(a, -1) for a in node.all_input_nodes], default=-1)
                # a block's node runs in its block's stage, or later when it reads a later stage's value
                # (a block's module used again after the loop: DiT's final modulation reuses block 0's)
                stage[node] = max(of.get(node.meta.get("ditpass_block"), -1), latest)
            elif node.op == "output":
                stage[node] = self.n - 1
            else:  # call_module (export's _guards_fn): read nothing from it
                stage[node] = -1
        return stage

    def boundary(self, graph: torch.fx.Graph, s: int, stage: dict | None = None) -> list[torch.fx.Node]:
        """Values made by stages <= s (not replicated) that a later stage reads, in graph order."""
        from .partition import _is_scalar_op

        stage = self.assign(graph) if stage is None else stage
        return [n for n in graph.nodes
                if 0 <= stage.get(n, -1) <= s and not _is_scalar_op(n)
                and any(stage.get(u, -1) > s for u in n.users)]

    def tail(self, graph: torch.fx.Graph, stage: dict | None = None) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
        """The graph's *tail* and what it reads from the blocks: ``(tail nodes, tail inputs)``.

        The tail: nodes after the last block's last node that depend on a block's result (the final
        norm, projection and un-patchify). PipeFusion's patch graph stops before it (an un-patchify
        needs every patch); the last stage runs it once on the assembled patches."""
        stage = self.assign(graph) if stage is None else stage
        last_block = self.blocks[-1][-1]
        nodes = list(graph.nodes)
        end = max(i for i, n in enumerate(nodes) if n.meta.get("ditpass_block") == last_block)
        tail = [n for n in nodes[end + 1:] if n.op == "call_function" and stage.get(n, -1) >= 0]
        members = set(tail)
        inputs = [n for n in nodes[:end + 1] if stage.get(n, -1) >= 0 and any(u in members for u in n.users)]
        return tail, inputs

