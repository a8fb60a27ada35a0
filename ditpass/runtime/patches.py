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

from .seq import chunk_len

__all__ = ["PatchAttention", "patch_attention", "assemble", "patch_of"]


class PatchAttention:
    """What a patch-mode attention site needs at run time; one object shared by the sites of a graph.

    ``n``: patches; ``u``, ``ulysses_rank``, ``ulysses_group``: the Ulysses split inside each patch (the
    hybrid; ``u = 1`` without it). The sequence is cut into ``n * u`` chunks: patch ``m`` is chunks
    ``m*u .. m*u + u - 1``, one per Ulysses rank. ``index``: the chunk this rank computes now (``m * u +
    ulysses_rank``, set by the driver); ``mode``: ``"full"`` (a warm-up step: the whole sequence) or
    ``"patch"``; ``partial``: the K/V of later patches are not there yet (first step without warm-up);
    ``state``: the `RunState` holding the buffers (None in a dry run or a unit test: buffers live here)."""

    def __init__(self, n: int, state=None, u: int = 1, ulysses_rank: int = 0, ulysses_group: str = "",
                 r: int = 1, ring_rank: int = 0, ring_group: str = ""):
        self.n, self.u, self.ulysses_rank, self.ulysses_group = n, u, ulysses_rank, ulysses_group
        self.r, self.ring_rank, self.ring_group = r, ring_rank, ring_group
        self.index = torch.zeros((), dtype=torch.long)
        self.mode = "full"
        self.partial = False
        self.state = state
        self._own: dict[str, torch.Tensor] = {}
        self._pos: dict[tuple, torch.Tensor] = {}

    def positions(self, lengths: list, n: int, srcs: list, compact: bool, device) -> torch.Tensor:
        """`seq._positions`, made once per layout: every call of every site of a step asks for the same few."""
        key = (tuple(int(L) for L in lengths), n, tuple(srcs), compact, str(device))
        pos = self._pos.get(key)
        if pos is None:
            from . import seq

            pos = self._pos[key] = seq._positions(list(key[0]), n, list(srcs), compact, device)
        return pos

    @property
    def sp(self) -> int:
        """Sequence-parallel ranks that share each patch (ring x ulysses)."""
        return self.u * self.r

    @property
    def chunks(self) -> int:
        return self.n * self.sp

    @property
    def patch(self) -> int:
        return int(self.index) // self.sp

    def __repr__(self) -> str:
        return f"PatchAttention(n={self.n}, u={self.u}, index={int(self.index)}, mode={self.mode}, partial={self.partial})"

    def describe(self) -> str:
        uly = "".join(f", {name} {d} inside each patch" for name, d in (("ulysses", self.u), ("ring", self.r)) if d > 1)
        return f"pipefusion: {self.n} patches{uly}, full-sequence K/V buffer"

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
    """(global start, local start, real tokens) of chunk ``p``'s part of each segment."""
    out, goff, loff = [], 0, 0
    for L in lengths:
        c = chunk_len(L, n)
        out.append((goff + p * c, loff, max(0, min(c, L - p * c))))
        goff, loff = goff + L, loff + c
    return out


def _filled(kb, vb, mask, lengths, chunks, upto):
    """Keys of chunks ``0 .. upto - 1`` only (a first step without warm-up): each segment's start."""
    spans, off = [], 0
    for L in lengths:
        spans.append((off, off + min(L, upto * chunk_len(L, chunks))))
        off += L
    kb = torch.cat([kb[:, :, a:b] for a, b in spans], 2)
    vb = torch.cat([vb[:, :, a:b] for a, b in spans], 2)
    if mask is not None and mask.shape[-1] != 1:
        mask = torch.cat([mask[..., a:b] for a, b in spans], -1)
    return kb, vb, mask


class _PatchSeq:
    """`seq.seq_attention`'s view of patch ``m`` under sequence parallelism: ``n = patches * sp`` chunks,
    the sources offset by ``base = m * sp`` (the patch's chunks, one per sequence rank)."""

    def __init__(self, pa: PatchAttention):
        self.u, self.r, self.n, self.base = pa.u, pa.r, pa.chunks, pa.patch * pa.sp
        self.ulysses_rank, self.ulysses_group = pa.ulysses_rank, pa.ulysses_group
        self.ring_rank, self.ring_group = pa.ring_rank, pa.ring_group


def patch_attention(q, k, v, scale, lengths, pa: PatchAttention, site, mask=None, sent=None):
    """Attention of one site under PipeFusion (see the module docstring); ``site``: its `SiteStrategy`."""
    from . import seq

    if pa.mode == "full":
        if site.seq is None:  # the whole sequence here
            kb, vb = pa.buffers(site.site, k, v, k.shape[2])
            kb.copy_(k)
            vb.copy_(v)
            return seq.attend(q, k, v, mask, scale=scale)

        def write_all(q_, k_, v_, m_, lengths_, n_, srcs):  # Ulysses gathered every token of our heads
            kb, vb = pa.buffers(site.site, k_, v_, sum(int(L) for L in lengths_))
            pos = pa.positions(lengths_, n_, srcs, True, k_.device)  # to global order
            kb.index_copy_(2, pos, k_)
            vb.index_copy_(2, pos, v_)
            return seq.attend(q_, k_, v_, m_, scale=scale)

        return seq.seq_attention(q, k, v, scale, list(lengths), site.seq, mask=mask, sent=sent, local=write_all,
                                 whole=True)
    lengths = [int(L) for L in lengths]
    total = sum(lengths)
    if pa.sp == 1:
        p = int(pa.index)
        kb, vb = pa.buffers(site.site, k, v, total)
        for g, loc, real in _segments(lengths, pa.n, p):
            if real:
                kb[:, :, g:g + real].copy_(k[:, :, loc:loc + real])
                vb[:, :, g:g + real].copy_(v[:, :, loc:loc + real])
        if mask is not None and mask.shape[-2] != 1:  # the mask is whole (global order): this patch's rows
            mask = mask.index_select(-2, pa.positions(lengths, pa.n, [p], False, mask.device))  # pads: last token
        if pa.partial and p < pa.n - 1:
            kb, vb, mask = _filled(kb, vb, mask, lengths, pa.n, p + 1)
        return seq.attend(q, kb, vb, mask, scale=scale)
    if mask is not None:
        # the pipefusion pass refuses a masked site under the hybrid (the rewriter's patch branch); a guard
        raise ValueError(f"site {site.module}: PipeFusion x sequence parallelism does not take an attention mask")

    def against_buffer(q_, k_, v_, m_, lengths_, n_, srcs):  # the patch's tokens, our heads
        kb, vb = pa.buffers(site.site, k_, v_, total)
        pos = pa.positions(lengths, n_, srcs, True, k_.device)
        kb.index_copy_(2, pos, k_)
        vb.index_copy_(2, pos, v_)
        if pa.partial and pa.patch < pa.n - 1:
            kb, vb, _ = _filled(kb, vb, None, lengths, pa.chunks, (pa.patch + 1) * pa.sp)
        return seq.attend(q_, kb, vb, scale=scale)

    return seq.seq_attention(q, k, v, scale, lengths, _PatchSeq(pa), sent=sent, local=against_buffer, whole=True)


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
