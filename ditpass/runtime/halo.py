"""Feature maps split into row bands over ranks (the parallel VAE decode): the ops its pass inserts.

    halo_pad(x, dim, top, bottom, rows, rank, group, value)   this rank's band with ``top`` rows of the band
                                                               above and ``bottom`` of the one below
                                                               (``value`` at the map's own edges)
    gather_rows(x, dim, rows, rank, group)                    the whole map again (all-gather)
    group_norm_rows(x, groups, weight, bias, eps, count, group)
                                                               GroupNorm whose statistics are all-reduced

``rows``: every rank's band height at this resolution, in rank order (uneven allowed: exact bands, no
padding of the map); the band of rank r starts at ``sum(rows[:r])``. A convolution whose kernel reaches
``k`` rows reads its input through `halo_pad` with padding 0 along the rows, so it computes exactly the
rows of the whole map's convolution that fall in this band. GroupNorm's mean and variance are sums over
the whole map: two all-reduces of [B, groups] (the mean first, then the squared deviations: the same
two-pass arithmetic as one device, not E[x^2] - E[x]^2).

Collectives: functional ones (``torch.ops._c10d_functional``) over a c10d group name, as in
`ditpass.runtime.seq`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .seq import all_gather

__all__ = ["band_rows", "halo_pad", "gather_rows", "group_norm_rows"]

_c10d = torch.ops._c10d_functional


def band_rows(height: int, n: int) -> list[int]:
    """Rows of each of ``n`` bands of a map ``height`` rows high: as even as whole rows allow."""
    return [(r + 1) * height // n - r * height // n for r in range(n)]


def _edge(x: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    shape = list(x.shape)
    shape[0] = rows
    return x.new_full(shape, value)


@torch.library.custom_op("ditpass::halo_pad", mutates_args=())
def halo_pad(x: torch.Tensor, dim: int, top: int, bottom: int, rows: Sequence[int], rank: int, group: str,
             value: float) -> torch.Tensor:
    """``x`` (this rank's band along ``dim``) with ``top`` rows of the band above and ``bottom`` rows of the
    band below (``value`` beyond the map's first and last row). One all-gather of every band's edge rows."""
    n = len(rows)
    xm = x.movedim(dim, 0)
    if n == 1:
        above, below = _edge(xm, top, value), _edge(xm, bottom, value)
    else:
        # each band sends its first `bottom` rows (the halo of the band above) and its last `top` rows
        edges = torch.cat([xm[:bottom], xm[xm.shape[0] - top:]], 0).contiguous()
        got = all_gather(edges, n, group).view(n, top + bottom, *xm.shape[1:])
        above = got[rank - 1, bottom:] if rank > 0 else _edge(xm, top, value)
        below = got[rank + 1, :bottom] if rank < n - 1 else _edge(xm, bottom, value)
    return torch.cat([above, xm, below], 0).movedim(0, dim).contiguous()


@halo_pad.register_fake
def _(x, dim, top, bottom, rows, rank, group, value):
    shape = list(x.shape)
    shape[dim] = shape[dim] + top + bottom
    return x.new_empty(shape)


@torch.library.custom_op("ditpass::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, dim: int, rows: Sequence[int], rank: int, group: str) -> torch.Tensor:
    """The whole map from every rank's band along ``dim`` (bands padded to the tallest for the all-gather)."""
    rows = list(rows)
    n, tall = len(rows), max(rows)
    if n == 1:
        return x.contiguous()
    xm = x.movedim(dim, 0)
    if xm.shape[0] < tall:
        xm = torch.cat([xm, _edge(xm, tall - xm.shape[0], 0.0)], 0)
    got = all_gather(xm.contiguous(), n, group).view(n, tall, *xm.shape[1:])
    return torch.cat([got[r, :rows[r]] for r in range(n)], 0).movedim(0, dim).contiguous()


@gather_rows.register_fake
def _(x, dim, rows, rank, group):
    shape = list(x.shape)
    shape[dim] = sum(rows)
    return x.new_empty(shape)


def _all_reduce(t: torch.Tensor, group: str) -> torch.Tensor:
    if not group:
        return t
    return _c10d.wait_tensor(_c10d.all_reduce(t.contiguous(), "sum", group))


@torch.library.custom_op("ditpass::group_norm_rows", mutates_args=())
def group_norm_rows(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    eps: float, count: int, group: str) -> torch.Tensor:
    """``torch.group_norm`` of the whole map, computed on this rank's band: ``count`` is the number of
    elements of one (sample, group) over the whole map. In float32, a few groups at a time (a float copy of
    the whole band would double a bf16 decode's peak memory)."""
    B, C = x.shape[:2]
    xg = x.reshape(B, groups, C // groups, -1)
    mean = _all_reduce(xg.sum((2, 3), dtype=torch.float32), group) / count
    step = max(1, groups // 8)
    chunks = [slice(a, min(a + step, groups)) for a in range(0, groups, step)]
    sq = torch.cat([(xg[:, c].float() - mean[:, c, None, None]).square().sum((2, 3)) for c in chunks], 1)
    rstd = torch.rsqrt(_all_reduce(sq, group) / count + eps)
    w = weight.float().view(groups, C // groups, 1) if weight is not None else None
    b = bias.float().view(groups, C // groups, 1) if bias is not None else None
    y = torch.empty_like(xg)
    for c in chunks:
        part = (xg[:, c].float() - mean[:, c, None, None]) * rstd[:, c, None, None]
        if w is not None:
            part = part * w[c]
        if b is not None:
            part = part + b[c]
        y[:, c] = part
    return y.reshape(x.shape)


@group_norm_rows.register_fake
def _(x, groups, weight, bias, eps, count, group):
    return torch.empty_like(x)
