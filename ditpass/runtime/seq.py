"""Sequence-parallel runtime: shard, gather, Ulysses / ring / USP attention.

Legend: ``B`` batch, ``H`` heads, ``S`` local tokens, ``D`` head dim; ``n`` sequence-parallel
ranks (ring x ulysses), ``p`` this rank's index among them (ring-major: ``p = ring * u + ulysses``).

Layout of a sharded tensor: the sequence is a concatenation of segments (FLUX: text, image)
with global lengths ``lengths``. Each segment of length ``L`` is cut into ``n`` chunks of
``c = ceil(L / n)`` tokens; rank ``p`` holds chunk ``p`` of every segment, in segment order.
Chunks past the end are *edge padded* (copies of the segment's last token), so token-wise ops
on pad tokens compute the same finite values as on a real token, and attention drops pad keys
by slicing (no mask, so fused kernels stay usable). Results are exact, not approximate.

These are the bodies of the ``ditpass::`` custom ops (`ditpass.runtime.ops`): plain torch and
functional collectives, run eagerly inside the op. Group arguments are c10d group names (strings).
``ditpass::flex_attention`` (a flex_attention site) is registered here, with its body `flex_seq_attention`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fa3, sites

__all__ = ["all_gather", "sdpa_backend", "chunk_len", "local_len", "shard", "zero_pad", "gather", "ulysses_send", "seq_attention", "attend", "sdpa_lse", "merge_lse",
           "flex_seq_attention"]


_c10d = torch.ops._c10d_functional  # the functional collectives' ops: plain tensors in, plain tensors out


def all_gather(x: torch.Tensor, n: int, group: str) -> torch.Tensor:
    """The ``n`` ranks' ``x`` concatenated along dim 0 (waited)."""
    return _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), n, group))


def chunk_len(length, n: int):
    """Tokens per rank for a segment of ``length`` tokens over ``n`` ranks (ceil)."""
    return (length + n - 1) // n


def local_len(lengths: list, n: int):
    """Local token count of a sharded tensor made of segments of these global lengths."""
    total = 0
    for L in lengths:
        total = total + chunk_len(L, n)
    return total


def _valid(L, n: int, p):
    """How many of chunk ``p``'s ``chunk_len(L, n)`` tokens are real (the rest is padding)."""
    c = chunk_len(L, n)
    return max(0, min(c, L - p * c))


def shard(x: torch.Tensor, dim: int, lengths: list, n: int, p: int) -> torch.Tensor:
    """Rank ``p``'s chunks of every segment of the full tensor ``x`` along ``dim`` (edge padded)."""
    parts, off = [], 0
    for L in lengths:
        c = chunk_len(L, n)
        idx = (torch.arange(c, device=x.device) + p * c).clamp(max=L - 1) + off
        parts.append(x.index_select(dim, idx))
        off = off + L
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def zero_pad(x: torch.Tensor, dim: int, lengths: list, n: int, p: int) -> torch.Tensor:
    """Rank ``p``'s shard ``x`` (chunks of segments of global ``lengths`` along ``dim``) with the pad tokens
    (the edge copies past a segment's end) zeroed: what a sum over the tokens must not count."""
    keep = []
    for L in lengths:
        c, real = chunk_len(L, n), _valid(L, n, p)
        keep.append(torch.arange(c, device=x.device) < real)
    keep = torch.cat(keep)
    if bool(keep.all()):
        return x
    shape = [1] * x.dim()
    shape[dim % x.dim()] = keep.numel()
    return torch.where(keep.view(shape), x, torch.zeros((), dtype=x.dtype, device=x.device))


def gather(x: torch.Tensor, dim: int, lengths: list, n: int, group: str) -> torch.Tensor:
    """The full tensor from every rank's shard: all-gather, drop padding, restore segment order."""
    dim = dim % x.dim()
    xm = x.movedim(dim, 0).contiguous()
    g = all_gather(xm, n, group)  # [n * S, ...]
    g = g.view(n, xm.shape[0], *xm.shape[1:])
    parts, off = [], 0
    for L in lengths:
        c = chunk_len(L, n)
        parts.append(g[:, off:off + c].reshape(n * c, *xm.shape[1:])[:L])
        off = off + c
    full = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    return full.movedim(0, dim)


def _a2a(t: torch.Tensor, group: str) -> torch.Tensor:
    """all_to_all over dim 0 (one slice per rank: ``t.shape[0]`` is the group's size), waited."""
    splits = [1] * t.shape[0]
    return _c10d.wait_tensor(_c10d.all_to_all_single(t.contiguous(), splits, splits, group))


def _positions(lengths: list, n: int, ranks: list, compact: bool, device) -> torch.Tensor:
    """Global sequence positions of the layout [chunks of ranks[0] | ranks[1] | ...].

    ``compact``: only real tokens (the keys that attention keeps); else pad slots map to their
    segment's last token (the queries, which are edge-padded copies)."""
    pieces, seg_off = [], 0
    offs = []
    for L in lengths:
        offs.append(seg_off)
        seg_off = seg_off + L
    for p in ranks:
        for L, off in zip(lengths, offs):
            c = chunk_len(L, n)
            if compact:
                keep = _valid(L, n, p)
                if keep > 0:
                    pieces.append(torch.arange(keep, device=device) + (p * c + off))
            else:
                pieces.append((torch.arange(c, device=device) + p * c).clamp(max=L - 1) + off)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def _mask_for(mask, rows, cols):
    """The rows (queries) and columns (keys) of a global-order mask that a local attention uses."""
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask.index_select(-2, rows)
    if mask.shape[-1] != 1:
        mask = mask.index_select(-1, cols)
    return mask


def _additive(mask, dtype):
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


_SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
_attention = "auto"  # Plan.attention while `sdpa_backend` is entered (module.py: each call); read by `_use_fa3`


@contextlib.contextmanager
def sdpa_backend(name: str):
    """The context that makes attention use the kernel ``name`` (``Plan.attention``).

    An SDPA kernel ("flash", "efficient", "cudnn", "math") sets torch's SDPA backend flags, which
    ``F.scaled_dot_product_attention`` and the ring attention here (`sdpa_lse`) both follow. "fa3":
    FlashAttention-3 (`ditpass.runtime.fa3`) at every attention it computes exactly, SDPA as torch
    chooses at the others (masks, fp16 on a build without it); `PlanError` where the package does not
    import, or at the first attention on a GPU that is not Hopper. "auto": FA3 where it is installed,
    the GPU is Hopper and the call is one it computes, else torch's choice."""
    global _attention
    if name == "fa3":
        fa3.require()
    kernel = _SDPA_KERNELS.get(name)
    before, _attention = _attention, name
    try:
        with (sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext()):
            yield
    finally:
        _attention = before


def _use_fa3(q, k, v, mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False) -> bool:
    """Whether this attention runs FlashAttention-3, as `sdpa_backend` says (read when the op runs: the ops
    are opaque to ``torch.compile``, so each call's choice counts)."""
    if _attention == "fa3":
        fa3.require(q.device)
        return fa3.runs(q, k, v, mask, dropout_p, is_causal, enable_gqa)
    return (_attention == "auto" and q.shape[-2] * k.shape[-2] >= FA3_AUTO_MIN and fa3.device_ok(q.device)
            and fa3.available() and fa3.runs(q, k, v, mask, dropout_p, is_causal, enable_gqa))


# ``auto`` takes FlashAttention-3 from this many query x key positions up. On an H200, FLUX.1-dev's forward is
# 4.8% faster with it at 16896 tokens and 2.4% at 4608 (benchmarks/results/perf_fa3_20261202), though the
# kernel alone is 5% slower than cuDNN at 4608 (benchmarks/results/check_fa3.md); below 2048 tokens untried
FA3_AUTO_MIN = 2048 * 2048


def attend(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention``'s result, computed by FlashAttention-3 where `sdpa_backend` chose it."""
    if _use_fa3(q, k, v, mask, dropout_p, is_causal, enable_gqa):
        return fa3.attention(q, k, v, scale)[0]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _sdpa_flags() -> tuple[bool, bool, bool]:
    """torch's SDPA backend flags (flash, cudnn, efficient), read when the op runs (it is opaque to
    ``torch.compile``, so the flags of each call count)."""
    f = torch.backends.cuda
    return f.flash_sdp_enabled(), f.cudnn_sdp_enabled(), f.mem_efficient_sdp_enabled()


def sdpa_lse(q, k, v, scale=None, mask=None):
    """Attention output and its log-sum-exp per query (float32), from a fused kernel where one exists.

    Follows torch's SDPA backend flags (``torch.nn.attention.sdpa_kernel``, set by ``Plan.attention``):
    a fused kernel only where its flag is on, else the math path. A query whose keys are all masked
    gets output 0 and lse -inf, so merging ignores it. FlashAttention-3 where `sdpa_backend` chose it."""
    if _use_fa3(q, k, v, mask):
        return fa3.attention(q, k, v, scale)
    flash, cudnn, efficient = _sdpa_flags()
    if mask is not None or not (flash or cudnn or efficient):
        return _math_lse(q, k, v, scale, mask)
    if q.device.type == "cuda":
        half = q.dtype in (torch.float16, torch.bfloat16)
        # cuDNN's kernel runs about twice as fast as FlashAttention-2 on Hopper (measured:
        # benchmarks/results/sp_flux.md); flash where cuDNN refuses the shape or the GPU
        if half and cudnn:
            try:
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
                return out, lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])
            except RuntimeError:
                pass
        if half and flash:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        if efficient:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                             scale=scale)[:2]
            return out, lse[..., : q.shape[-2]]
    if q.device.type == "cpu" and flash:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse
    return _math_lse(q, k, v, scale, mask)


def _math_lse(q, k, v, scale=None, mask=None):
    """Attention and its log-sum-exp in float32 from plain matmuls (masks, and ``Plan.attention='math'``)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        s = s + _additive(mask, q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).float()
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return (p @ v.float()).to(q.dtype), lse


def merge_lse(out, lse, out_j, lse_j):
    """Combine two partial attentions over disjoint key sets (exact)."""
    if out is None:
        return out_j.float(), lse_j
    new = torch.logaddexp(lse, lse_j)
    # a query with every key masked so far has lse -inf in both: weights 0 (not exp(-inf + inf) = NaN), so
    # its output stays 0, as torch's SDPA gives for a fully masked row
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    out = out * torch.exp(lse - ref).unsqueeze(-1) + out_j.float() * torch.exp(lse_j - ref).unsqueeze(-1)
    return out, new


def _compact(t: torch.Tensor, lengths: list, n: int, src_ranks: list, dim: int = 2) -> torch.Tensor:
    """Keep the real tokens of a K/V laid out as [chunks of src_ranks[0] | src_ranks[1] | ...]."""
    cs = [chunk_len(L, n) for L in lengths]
    width = sum(cs)
    pieces, padded = [], False
    for i, src in enumerate(src_ranks):
        off = i * width
        for L, c in zip(lengths, cs):
            keep = _valid(L, n, src)
            padded = padded or keep != c
            if keep > 0:
                pieces.append(t.narrow(dim, off, keep))
            off = off + c
    if not padded:
        return t
    return torch.cat(pieces, dim) if pieces else t.narrow(dim, 0, 0)


def ulysses_send(q, k, v, u: int, ulysses_group: str):
    """The first half of Ulysses attention: start the all-to-all of ``q, k, v`` ([B, H, S, D]) and return
    without waiting, so that the graph can compute something else while it travels; `seq_attention`
    with ``sent=`` waits and finishes. Heads that ``u`` does not divide are padded with zero heads.

    One all-to-all for q, k and v, sent as [u (dest), B, S, 3, h, D]: token-major, like the [B, S, H, D]
    memory the projections leave behind, so the one copy per tensor (the stack) moves runs of h*D
    values, and what arrives is [u (source), B, S, 3, h, D]: for B == 1 the q, k, v of the whole
    sequence are views of it (no copy) in the packed [B, S, 3, H, D] layout that the fused attention
    kernels take as is. The result is a plain tensor whose collective is in flight (the functional
    collective op, not its async wrapper), so it can leave a custom op; ``wait_tensor`` finishes it."""
    B, H, S, D = q.shape
    Hp = chunk_len(H, u) * u
    if Hp != H:
        pad = (0, 0, 0, 0, 0, Hp - H)
        q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
    h = Hp // u
    qkv = torch.stack([t.transpose(1, 2).reshape(B, S, u, h, D).permute(2, 0, 1, 3, 4) for t in (q, k, v)], 3)
    splits = [qkv.shape[0] // u] * u
    return _c10d.all_to_all_single(qkv.contiguous(), splits, splits, ulysses_group)


def seq_attention(q, k, v, scale, lengths: list, s, mask=None, sent=None, local=None, whole: bool = False):
    """Exact attention over a sequence sharded on dim 2 of ``q, k, v`` ([B, H, S, D]) as strategy ``s``
    (`ditpass.runtime.sites.SeqAttention`: degrees, this rank's coordinates, group names) says.

    Ulysses (``s.u > 1``): all-to-all turns [B, H, S] into [B, H/u, u*S] (`ulysses_send`; ``sent`` is its
    result when the graph started it earlier); padded heads are dropped after. Ring (``s.r > 1``): K/V
    of the ``r`` ring ranks are exchanged and the partial results merged by log-sum-exp. Both: USP on
    a 2-D mesh.

    ``local(q, k, v, mask, lengths, n, srcs)``, where given (DiTFastAttn, `ditpass.runtime.fastattn`), replaces
    the attention of the gathered sequence when ``r == 1``: q with its pad slots, k/v compacted, in the layout
    of the ranks ``srcs``. ``whole`` (PipeFusion's K/V buffer): with ring too, gather the ring's K/V first and
    call ``local`` once over every source. ``s.base`` (default 0) offsets the source chunks (PipeFusion's patch
    ``m`` is chunks ``m * n_sp ..``).
    """
    u, r, n = s.u, s.r, s.n
    B, H, S, D = q.shape
    if u > 1:
        if sent is None:
            sent = ulysses_send(q, k, v, u, s.ulysses_group)
        qkv = _c10d.wait_tensor(sent)  # [u (source), B, S, 3, h, D]
        h = qkv.shape[4]
        qkv = qkv.transpose(0, 1).reshape(B, u * S, 3, h, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, h, u*S, D]
        if mask is not None and mask.dim() == 4 and mask.shape[1] != 1:  # a mask per head: this rank's heads
            heads = (torch.arange(h, device=mask.device) + s.ulysses_rank * h).clamp(max=H - 1)  # pad heads: any
            mask = mask.index_select(1, heads)
    uly_ranks = list(range(u)) if u > 1 else [s.ulysses_rank]
    base = getattr(s, "base", 0)
    # a mask is in global order; pick the rows of our queries and the columns of each key chunk
    rows = None if mask is None else _positions(lengths, n, [base + s.ring_rank * u + i for i in uly_ranks], False,
                                                q.device)
    if r > 1 and whole and local is not None:  # every ring rank's K/V here, then one local call
        kv = torch.stack([k.transpose(1, 2), v.transpose(1, 2)])  # [2, B, u*S, h, D], token-major
        kv = all_gather(kv, r, s.ring_group).view(r, 2, B, k.shape[2], k.shape[1], D).transpose(3, 4)
        srcs = [base + j * u + i for j in range(r) for i in uly_ranks]
        ks = torch.cat([_compact(kv[j, 0], lengths, n, srcs[j * len(uly_ranks):(j + 1) * len(uly_ranks)])
                        for j in range(r)], 2)
        vs = torch.cat([_compact(kv[j, 1], lengths, n, srcs[j * len(uly_ranks):(j + 1) * len(uly_ranks)])
                        for j in range(r)], 2)
        m = None if mask is None else _mask_for(mask, rows, _positions(lengths, n, srcs, True, q.device))
        out = local(q, ks, vs, m, lengths, n, srcs)
    elif r == 1:
        srcs = [base + s.ring_rank * u + i for i in uly_ranks]
        m = None if mask is None else _mask_for(mask, rows, _positions(lengths, n, srcs, True, q.device))
        if local is not None:
            out = local(q, _compact(k, lengths, n, srcs), _compact(v, lengths, n, srcs), m, lengths, n, srcs)
        else:
            out = attend(q, _compact(k, lengths, n, srcs), _compact(v, lengths, n, srcs), m, scale=scale)
    else:
        kv = torch.stack([k.transpose(1, 2), v.transpose(1, 2)])  # [2, B, u*S, h, D], token-major
        kv = all_gather(kv, r, s.ring_group)
        kv = kv.view(r, 2, B, k.shape[2], k.shape[1], D).transpose(3, 4)  # [r, 2, B, h, u*S, D]
        acc, lse = None, None
        for j in range(r):
            srcs = [base + j * u + i for i in uly_ranks]
            kj, vj = _compact(kv[j, 0], lengths, n, srcs), _compact(kv[j, 1], lengths, n, srcs)
            if kj.shape[2] == 0:
                continue
            m = None if mask is None else _mask_for(mask, rows, _positions(lengths, n, srcs, True, q.device))
            o, l = sdpa_lse(q, kj, vj, scale, m)
            acc, lse = merge_lse(acc, lse, o, l)
        out = acc.to(q.dtype)
    if u > 1:
        # back: send [u (dest: the rank these tokens came from), B, S, h, D], token-major again
        h = out.shape[1]
        t = out.transpose(1, 2).reshape(B, u, S, h, D).transpose(0, 1)
        t = _a2a(t, s.ulysses_group)  # [u (source = head group), B, S, h, D]
        # as [B, S, H, D] memory: the graph's next ops (permute to [B, S, H, D], flatten the
        # heads) are views, not another copy
        out = t.permute(1, 2, 0, 3, 4).reshape(B, S, u * h, D)[:, :, :H].transpose(1, 2)
    return out


# ---- flex_attention ---------------------------------------------------------------------------
#
# A captured ``torch.ops.higher_order.flex_attention`` call is a site too (`ditpass::flex_attention`). Its
# score_mod / mask_mod read *global* indices (head ``h``, ``q_idx``, ``kv_idx``) and its BlockMask is over the
# whole sequences, so the sharded op computes in global terms:
#
# - K/V: always whole and in global order here (Ulysses' all-to-all, the ring's all-gather), so ``kv_idx`` and
#   the block mask's key blocks are as captured.
# - Ulysses: this rank's heads of every token. The queries are put in global order too, so the block mask is
#   used as captured but for its head dim (this rank's heads, where it has one per head), and ``h`` is mapped to
#   the global head (pad heads, where ``u`` does not divide the heads, to the last one; their output is dropped).
# - Ring (and cross attention against whole K/V): this rank's queries against the whole K/V. ``q_idx`` is mapped
#   to each query's global position, and the block mask's rows are cut for the local queries (`_query_layout`).
#
# ``flex_attention`` eager (what the captured graph runs, and what this does) evaluates mask_mod on every score
# and does not read the block tables; they are cut exactly all the same (a compiled kernel reads them).

_LARGE_BLOCK = 1 << 30  # the block size of the no-op BlockMask flex_attention makes when given none


def _flex_call(q, k, v, score_mod, block_mask: tuple, scale, kernel_options, score_bufs, mask_bufs):
    """One flex_attention (the higher-order op, as the captured graph calls it); its output only."""
    from torch._higher_order_ops.flex_attention import flex_attention as hop

    return hop(q, k, v, score_mod, tuple(block_mask), scale, kernel_options, tuple(score_bufs), tuple(mask_bufs))[0]


def _flex_mods(f, hmap, qmap):
    """The site's score_mod and mask_mod reading global indices: ``h`` through ``hmap`` (local head -> global),
    ``q_idx`` through ``qmap`` (local query row -> global position); unwrapped where they do not read them."""

    def wrap(fn, reads, score: bool):
        h_on, q_on = hmap is not None and "h" in reads, qmap is not None and "q_idx" in reads
        if not (h_on or q_on):
            return fn
        if score:
            def mod(s, b, h, i, j, *bufs):
                return fn(s, b, hmap[h] if h_on else h, qmap[i] if q_on else i, j, *bufs)
        else:
            def mod(b, h, i, j, *bufs):
                return fn(b, hmap[h] if h_on else h, qmap[i] if q_on else i, j, *bufs)
        return mod

    return wrap(f.score_mod, f.reads["score"], True), wrap(f.mask_mod, f.reads["mask"], False)


def _global_slots(lengths: list, n: int, ranks: list, device) -> torch.Tensor:
    """Slots, in the layout [chunks of ranks[0] | ranks[1] | ...] (``ranks``: all ``n`` ranks), of the global
    positions 0, 1, ... in order: the real tokens, segment by segment, rank by rank."""
    cs = [chunk_len(L, n) for L in lengths]
    width = sum(cs)
    where = {p: i for i, p in enumerate(ranks)}
    pieces, coff = [], 0
    for L, c in zip(lengths, cs):
        for p in range(n):
            keep = _valid(L, n, p)
            if keep > 0:
                pieces.append(torch.arange(keep, device=device) + (where[p] * width + coff))
        coff += c
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def _query_layout(lengths: list, n: int, ranks: list, qb: int, device):
    """The local query rows of ``ranks`` (layout [chunks of ranks[0] | ...]) laid out so that the block mask's rows
    can be cut for them exactly: each chunk with real tokens is a run of consecutive global positions (its pad
    rows repeat the segment's last one), and every run starts at a multiple of a block size ``qb2`` that divides
    ``qb`` and every run's global start (filler rows, copies of the previous run's last, in between), so each block
    of ``qb2`` local rows lies in one block of ``qb`` global rows and takes that block's row of the tables. Of the
    sizes that qualify, the largest whose filler is at most 1/8 of the rows.

    Returns ``(src, pos, dst, qb2, rows)``: local row -> layout row, local row -> global position, layout row ->
    local row, the local block size, local block -> global query block."""
    offs, off = [], 0
    for L in lengths:
        offs.append(off)
        off += L
    runs, start = [], 0
    for p in ranks:
        for L, o in zip(lengths, offs):
            c = chunk_len(L, n)
            if c > 0:
                runs.append((start, c, o + p * c if _valid(L, n, p) > 0 else None, o + L - 1))
            start += c
    g = qb
    for _, _, g0, _ in runs:
        if g0 is not None:
            g = math.gcd(g, g0)

    def filler(d):
        return sum((-c) % d for _, c, _, _ in runs[:-1])

    divisors = sorted({x for i in range(1, math.isqrt(g) + 1) if g % i == 0 for x in (i, g // i)}, reverse=True)
    qb2 = next(d for d in divisors if 8 * filler(d) <= start)
    src, pos, dst, cur = [], [], [], 0
    for i_run, (st, c, g0, last) in enumerate(runs):
        i = torch.arange(c, device=device)
        src.append(i + st)
        pos.append((i + g0).clamp(max=last) if g0 is not None else torch.full((c,), last, device=device))
        dst.append(i + cur)
        cur += c
        fill = (-c) % qb2 if i_run < len(runs) - 1 else 0
        if fill:
            end = last if g0 is None else min(g0 + c - 1, last)
            src.append(torch.full((fill,), st + c - 1, device=device))
            pos.append(torch.full((fill,), end, device=device))
            cur += fill
    src, pos, dst = torch.cat(src), torch.cat(pos), torch.cat(dst)
    return src, pos, dst, qb2, pos[::qb2] // qb


def _block_heads(blocks: list, hmap) -> list:
    """The block tables ([B, H or 1, ...]) for this rank's heads; the dQ write-order tables (backward only) dropped."""
    out = []
    for i, t in enumerate(blocks):
        if t is None or i >= 8:
            out.append(None)
        else:
            out.append(t.index_select(1, hmap.clamp(max=t.shape[1] - 1)) if t.shape[1] != 1 else t)
    return out


def _block_rows(blocks: list, rows, qb2: int, kb: int, q_len: int, kv_len, mask_mod) -> tuple:
    """The BlockMask tuple of the local query rows: block row ``j`` is the captured row ``rows[j]`` (the transposed
    tables recomputed from them)."""
    from torch.nn.attention.flex_attention import BlockMask

    sel = [None if t is None else t.index_select(2, rows) for t in blocks[:4]]
    return BlockMask.from_kv_blocks(*sel, BLOCK_SIZE=(qb2, kb), mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len)).as_tuple()


def _gather_ring(t: torch.Tensor, r: int, group: str) -> torch.Tensor:
    """[B, h, S', D] of each of the ``r`` ring ranks, concatenated on the token dim in ring order."""
    g = all_gather(t, r, group).view(r, *t.shape)
    return g.permute(1, 2, 0, 3, 4).reshape(t.shape[0], t.shape[1], r * t.shape[2], t.shape[3])


def flex_seq_attention(q, k, v, blocks: list, score_bufs: tuple, mask_bufs: tuple, seq_lengths: list, lengths: list,
                       s, f):
    """A flex_attention site (``f``: `ditpass.runtime.sites.FlexSite`) on a sequence sharded on dim 2 of ``q``
    ([B, H, S, D]) as strategy ``s`` says (see the section comment above); ``s`` None: the call as captured.
    ``blocks``: the BlockMask's tables, ``seq_lengths`` its (Q_LEN, KV_LEN), ``lengths`` the global segment
    lengths of the sharded sequence. K/V are sharded as q (``f.kv_sharded``) or whole."""
    if s is None:
        tup = (*seq_lengths, *blocks, f.spt, *f.block_size, f.mask_mod)
        return _flex_call(q, k, v, f.score_mod, tup, f.scale, f.kernel_options, score_bufs, mask_bufs)
    u, r, n = s.u, s.r, s.n
    B, H, S, D = q.shape
    hmap = None
    if f.kv_sharded:
        if u > 1 and k.shape[1] != H:  # grouped K/V heads, split with q's: one per query head, as flex pairs them
            k, v = (t.repeat_interleave(H // t.shape[1], 1) for t in (k, v))
        if u > 1:  # this rank's heads of every token ([B, h, u*S, D], the u ranks' chunks in order)
            qkv = _c10d.wait_tensor(ulysses_send(q, k, v, u, s.ulysses_group))
            h = qkv.shape[4]
            qkv = qkv.transpose(0, 1).reshape(B, u * S, 3, h, D)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            hmap = (torch.arange(h, device=q.device) + s.ulysses_rank * h).clamp(max=H - 1)
        ranks = [s.ring_rank * u + i for i in range(u)]
        if r > 1:
            if k.shape == v.shape:
                kv = _gather_ring(torch.cat([k, v], 0), r, s.ring_group)  # [2B, h, n*S, D]
                k, v = kv[:B], kv[B:]
            else:
                k, v = _gather_ring(k, r, s.ring_group), _gather_ring(v, r, s.ring_group)
        order = _global_slots(lengths, n, list(range(n)), q.device)
        k, v = k.index_select(2, order), v.index_select(2, order)  # every key, in global order
    else:
        ranks = [s.ring_rank * u + s.ulysses_rank]
    tables = list(blocks) if hmap is None else _block_heads(list(blocks), hmap)
    noop = tuple(f.block_size) == (_LARGE_BLOCK, _LARGE_BLOCK)  # no block mask was given: nothing to cut
    if len(ranks) == n:  # every query (Ulysses): in global order, the block mask's rows as captured
        score_fn, mask_fn = _flex_mods(f, hmap, None)
        qg = q.index_select(2, _global_slots(lengths, n, ranks, q.device))
        tup = (*seq_lengths, *tables, f.spt, *f.block_size, mask_fn)
        out = _flex_call(qg, k, v, score_fn, tup, f.scale, f.kernel_options, score_bufs, mask_bufs)
        out = out.index_select(2, _positions(lengths, n, ranks, False, q.device))
    elif noop:  # this rank's queries; any rows of the one block
        qpos = _positions(lengths, n, ranks, False, q.device)
        score_fn, mask_fn = _flex_mods(f, hmap, qpos)
        tup = (*seq_lengths, *tables, f.spt, *f.block_size, mask_fn)
        out = _flex_call(q, k, v, score_fn, tup, f.scale, f.kernel_options, score_bufs, mask_bufs)
    else:  # this rank's queries, the block mask's rows cut for them
        src, qpos, dst, qb2, rows = _query_layout(lengths, n, ranks, int(f.block_size[0]), q.device)
        score_fn, mask_fn = _flex_mods(f, hmap, qpos)
        tup = _block_rows(tables, rows, qb2, int(f.block_size[1]), int(src.numel()), seq_lengths[1], mask_fn)
        out = _flex_call(q.index_select(2, src), k, v, score_fn, tup, f.scale, f.kernel_options, score_bufs,
                         mask_bufs)
        out = out.index_select(2, dst)
    if f.kv_sharded and u > 1:  # back to this rank's tokens of every head
        h, Dv = out.shape[1], out.shape[3]
        t = out.transpose(1, 2).reshape(B, u, S, h, Dv).transpose(0, 1)
        t = _a2a(t, s.ulysses_group)
        out = t.permute(1, 2, 0, 3, 4).reshape(B, S, u * h, Dv)[:, :, :H].transpose(1, 2)
    return out


@torch.library.custom_op("ditpass::flex_attention", mutates_args=())
def flex_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: torch.Tensor,
                      blocks: Sequence[Optional[torch.Tensor]], score_bufs: Sequence[torch.Tensor],
                      mask_bufs: Sequence[torch.Tensor], seq_lengths: Sequence[int],
                      lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``torch.ops.ditpass.flex_attention``: a ``torch.ops.higher_order.flex_attention`` site, sequence-parallel as
    the site's entry says (`flex_seq_attention`; ``site``: the id tensor, as for ``ditpass::attention``).
    ``blocks``: the BlockMask's tensors in ``BlockMask.as_tuple`` order, ``seq_lengths`` its (Q_LEN, KV_LEN);
    ``score_bufs`` / ``mask_bufs``: the tensors the score_mod and mask_mod read (whole); the mods, scale, kernel
    options and block sizes are in the entry (``flex``); ``lengths``: the global segment lengths of the sharded
    sequence. Returns [B, H, S, Dv] (this rank's S), contiguous; the fake gives that local shape."""
    s = sites.lookup(int(site))
    out = flex_seq_attention(q, k, v, list(blocks), tuple(score_bufs), tuple(mask_bufs), list(seq_lengths),
                             list(lengths or ()), s.seq, s.flex)
    return out.contiguous()


@flex_attention_op.register_fake
def _(q, k, v, site, blocks, score_bufs, mask_bufs, seq_lengths, lengths=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


FLEX_OP = torch.ops.ditpass.flex_attention.default  # the op's target, for passes that match nodes
