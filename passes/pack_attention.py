"""PackAttention: hand the attention kernel q, k and v as views of one [B, S, 3, H, D] tensor.

Measured on an H200 (benchmarks/results/perf_flux.md): cuDNN's attention kernel at FLUX.1's 2048^2 shape
ran at 709 TFLOP/s on contiguous inputs and on the packed q/k/v that the Ulysses all-to-all delivers,
but took 17% longer per head inside the compiled single-GPU step, where q and k come out of the RoPE
kernel in the layout inductor picks. This pass writes q, k, v into one packed tensor in front of every
local ``scaled_dot_product_attention`` (the Ulysses sites already get that layout from
`seq.seq_attention`), so the kernel always reads the layout it is fast on::

    o = sdpa(q, k, v)  ->  qkv = stack([q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)], 2)
                           o = sdpa(qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1]..., qkv[:, :, 2]...)

Under ``compile="inductor"`` the stack is fused into the kernels that produce q, k and v (they write
straight into the packed tensor); eagerly it would be one more copy, so the pass is on only for
compiled plans. Values are copied, not changed: the output is the same.
"""
from __future__ import annotations

import torch
import torch.fx

from ditpass.analysis.attention import SDPA_TARGETS
from ditpass.analysis.symbolic import node_val
from ditpass.pass_base import GraphPass, PassContext, PassResult

aten = torch.ops.aten


def _packable(node: torch.fx.Node) -> bool:
    vals = [node_val(a) if isinstance(a, torch.fx.Node) else None for a in node.args[:3]]
    if any(not isinstance(v, torch.Tensor) or v.dim() != 4 for v in vals):
        return False
    q, k, v = vals
    return q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype


class PackAttention(GraphPass):
    name = "pack_attention"

    def enabled(self, ctx: PassContext) -> bool:
        return ctx.plan.compile != "eager"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        g, packed = gm.graph, 0
        for node in list(g.nodes):
            if node.op != "call_function" or node.target not in SDPA_TARGETS or not _packable(node):
                continue
            meta = {k: node.meta[k] for k in ("ditpass_block", "nn_module_stack", "stack_trace") if k in node.meta}
            with g.inserting_before(node):
                ts = [g.call_function(aten.transpose.int, (a, 1, 2)) for a in node.args[:3]]
                qkv = g.call_function(aten.stack.default, (ts, 2))  # [B, S, 3, H, D]
                views = [g.call_function(aten.transpose.int, (g.call_function(aten.select.int, (qkv, 2, i)), 1, 2))
                         for i in range(3)]
            for n in [*ts, qkv, *views, *(v.args[0] for v in views)]:
                n.meta.update(meta)
            node.args = (*views, *node.args[3:])
            packed += 1
        note = f"q/k/v of {packed} attention calls packed as [B, S, 3, H, D]" if packed else "no local attention call"
        return PassResult(self.name, packed > 0, notes=[note], details={"packed": packed})
