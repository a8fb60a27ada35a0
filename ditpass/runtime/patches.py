"""PipeFusion's patch runtime: one patch of the token sequence at a time, K/V of the rest from a buffer.

Legend: ``n`` patches; patch ``p`` holds chunk ``p`` of every token segment (FLUX: text, image), in the
layout of a sequence-parallel shard (`ditpass.runtime.seq`: ``c = ceil(L / n)`` tokens per segment,
edge padded), so the graph that runs one patch is the sequence-parallel rewrite with the patch index
in place of the rank. The index is one 0-dim CPU int64 tensor (`PatchAttention.index`) that the
pipeline driver (`ditpass.runtime.pipeline`) sets before each patch; the graph reads it through
``ditpass.patch_shard`` and every attention site of the patch graph through its `PatchAttention`.

Every self / joint attention site keeps a full-sequence K and V buffer ([B, H, S, D], global token
order, in the model's `RunState`, so a new generation zeroes it):

- a full (warm-up) step writes the whole K/V and attends exactly;
- patch ``p`` writes its own tokens' K/V (fresh) and attends over the whole buffer: patches before
  ``p`` hold this step's K/V, patches after it the previous step's (stale, PipeFusion's approximation);
- a mask (text padding) stays whole, in global order: patch ``p`` uses its own rows of it;
- in the first step of a generation that has no full step before it (``warmup_steps=0``), patches
  after ``p`` hold nothing yet, so patch ``p`` attends over patches ``0..p`` only (``partial``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .seq import chunk_len

__all__ = ["PatchAttention", "patch_attention", "assemble", "patch_of"]


class PatchAttention:
    """What a patch-mode attention site needs at run time; one object shared by the sites of a graph.

    ``index``: the patch being computed (set by the driver); ``partial``: the K/V of later patches are
    not there yet (first step without warm-up); ``state``: the `RunState` holding the buffers (None in
    a dry run or a unit test: buffers then live here)."""

    def __init__(self, n: int, state=None):
        self.n = n
        self.index = torch.zeros((), dtype=torch.long)
        self.partial = False
        self.state = state
        self._own: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"PatchAttention(n={self.n}, index={int(self.index)}, partial={self.partial})"

    def describe(self) -> str:
        return f"pipefusion: {self.n} patches, full-sequence K/V buffer"

    def buffers(self, site: int, k: torch.Tensor, v: torch.Tensor, length: int):
        """This site's K and V buffers, [B, H, length, D] like ``k`` / ``v``."""
        out = []
        for name, t in (("k", k), ("v", v)):
            shape = (*t.shape[:2], length, t.shape[3])
            key = f"pipefusion.site{site}.{name}"
            if self.state is not None:
                out.append(self.state.buffer(key, shape=shape, dtype=t.dtype, device=t.device))
            else:
                buf = self._own.get(key)
                if buf is None or buf.shape != shape or buf.dtype != t.dtype or buf.device != t.device:
                    buf = self._own[key] = torch.zeros(shape, dtype=t.dtype, device=t.device)
                out.append(buf)
        return out


def _segments(lengths: list, n: int, p: int):
    """(global start, local start, real tokens) of patch ``p``'s chunk of each segment."""
    out, goff, loff = [], 0, 0
    for L in lengths:
        c = chunk_len(L, n)
        out.append((goff + p * c, loff, max(0, min(c, L - p * c))))
        goff, loff = goff + L, loff + c
    return out


def patch_attention(q, k, v, scale, lengths, pa: PatchAttention, site: int, mask=None):
    """Attention of one site under PipeFusion (see the module docstring). ``lengths`` None: a full step."""
    if not lengths:
        kb, vb = pa.buffers(site, k, v, k.shape[2])
        kb.copy_(k)
        vb.copy_(v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    lengths = [int(L) for L in lengths]
    p = int(pa.index)
    kb, vb = pa.buffers(site, k, v, sum(lengths))
    for g, loc, real in _segments(lengths, pa.n, p):
        if real:
            kb[:, :, g:g + real].copy_(k[:, :, loc:loc + real])
            vb[:, :, g:g + real].copy_(v[:, :, loc:loc + real])
    if mask is not None and mask.shape[-2] != 1:  # the mask is whole (global order): this patch's rows
        mask = mask.index_select(-2, _rows(lengths, pa.n, p, mask.device))
    if pa.partial and p < pa.n - 1:
        # only patches 0..p have K/V in this generation: each segment's first (p + 1) chunks
        spans, off = [], 0
        for L in lengths:
            spans.append((off, off + min(L, (p + 1) * chunk_len(L, pa.n))))
            off += L
        kb = torch.cat([kb[:, :, a:b] for a, b in spans], 2)
        vb = torch.cat([vb[:, :, a:b] for a, b in spans], 2)
        if mask is not None and mask.shape[-1] != 1:
            mask = torch.cat([mask[..., a:b] for a, b in spans], -1)
    return F.scaled_dot_product_attention(q, kb, vb, attn_mask=mask, scale=scale)


def _rows(lengths: list, n: int, p: int, device) -> torch.Tensor:
    """Global positions of patch ``p``'s query slots (pad slots: their segment's last token)."""
    pieces, off = [], 0
    for L in lengths:
        c = chunk_len(L, n)
        pieces.append((torch.arange(c, device=device) + p * c).clamp(max=L - 1) + off)
        off += L
    return torch.cat(pieces)


def patch_of(x: torch.Tensor, dim: int, lengths: list, n: int, p: int) -> torch.Tensor:
    """Patch ``p`` of a full tensor (what ``ditpass.patch_shard`` computes), for tests and the driver."""
    from .seq import shard

    return shard(x, dim, [int(L) for L in lengths], n, p)


def assemble(chunks: list[torch.Tensor], dim: int, lengths: list, n: int) -> torch.Tensor:
    """The full tensor from the ``n`` patches' outputs (in patch order): padding dropped, segments in order."""
    lengths = [int(L) for L in lengths]
    dim = dim % chunks[0].dim()
    parts, loff = [], 0
    for L in lengths:
        c = chunk_len(L, n)
        segs = [x.narrow(dim, loff, c) for x in chunks]
        parts.append(torch.cat(segs, dim).narrow(dim, 0, L))
        loff += c
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
