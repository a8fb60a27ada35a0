"""Ops for sums over a sharded token dim (linear attention's ``K^T V`` and its normaliser ``sum(K)``).

    zero_pad(x, dim, lengths, n, p)    x with this rank's pad tokens along dim set to 0

A matmul or sum that contracts the token dim runs on each rank's shard and is then all-reduced over the
sequence ranks (a functional collective in the graph, `ditpass.runtime.seq`'s layout): exact once the
edge-padded copies that `seq.shard` adds past a segment's end count zero, which ``zero_pad`` makes them
do on one operand. Its fake returns the local shape (the input's), as the other ``ditpass::`` ops.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import seq

__all__ = ["zero_pad", "OPS"]


@torch.library.custom_op("ditpass::zero_pad", mutates_args=())
def zero_pad(x: torch.Tensor, dim: int, lengths: Sequence[int], n: int, p: int) -> torch.Tensor:
    """``x`` (rank ``p``'s chunks of segments of global ``lengths`` along ``dim``) with its pad tokens zeroed."""
    out = seq.zero_pad(x, dim, list(lengths), n, p)
    return out.clone(memory_format=torch.contiguous_format) if out is x else out.contiguous()  # never the input itself


@zero_pad.register_fake
def _(x, dim, lengths, n, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


OPS = {"zero_pad": torch.ops.ditpass.zero_pad.default}
