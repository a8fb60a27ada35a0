"""The operations passes insert: ``torch.ops.ditpass.*`` custom ops, each with a fake implementation.

    shard(x, dim, lengths, n, p)            this rank's chunks of every segment of x along dim
    patch_shard(x, dim, lengths, n, index)  PipeFusion: the same for the patch that ``index`` names
    gather(x, dim, lengths, n, group)       the full tensor again (all-gather, padding dropped)
    ulysses_send(q, k, v, u, group)         start the Ulysses all-to-all of q/k/v (not waited)
    attention(q, k, v, site, ...)           one attention site, run as its `SiteStrategy` says
    flex_attention(q, k, v, site, ...)      a flex_attention site (registered in `seq`, with its body)
    cache_write(buf, value)                 copy value into a run-state buffer (declared mutation)

Why custom ops and not Python functions in the graph: the fake implementations return the shape this
rank really computes (``shard`` the local length, ``gather`` the global one), so after every pass
``meta["val"]`` can be propagated again and is true (`ditpass.pass_base.run_passes` does it); passes,
explain and the compiler match them by target (``node.target is torch.ops.ditpass.attention.default``);
dead-code elimination and ``torch.compile`` keep them (``cache_write`` declares what it mutates); and
a printed graph reads ``torch.ops.ditpass.attention.default(q, k, v, site_7)``. The bodies are
`ditpass.runtime.seq` (plain torch and functional collectives), run eagerly inside the op.

Layout contract (what the fakes promise and the bodies keep, because the compiler trusts the fake's
strides): ``attention`` returns [B, H, S, D] values in [B, S, H, D] memory (what fused attention
kernels produce, and what the next op, the head flattening, reads as a view); the others return
contiguous tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import fastattn, patches, seq, sites

__all__ = ["shard", "patch_shard", "gather", "ulysses_send", "attention", "cache_write", "OPS"]


def _local(x: torch.Tensor, dim: int, size) -> torch.Tensor:
    sizes = list(x.shape)
    sizes[dim] = size
    return x.new_empty(sizes)


@torch.library.custom_op("ditpass::shard", mutates_args=())
def shard(x: torch.Tensor, dim: int, lengths: Sequence[int], n: int, p: int) -> torch.Tensor:
    """Rank ``p``'s chunk of each segment (global ``lengths``) of ``x`` along ``dim``, edge padded."""
    return seq.shard(x, dim, list(lengths), n, p).contiguous()


@shard.register_fake
def _(x, dim, lengths, n, p):
    return _local(x, dim, seq.local_len(list(lengths), n))


@torch.library.custom_op("ditpass::patch_shard", mutates_args=())
def patch_shard(x: torch.Tensor, dim: int, lengths: Sequence[int], n: int, index: torch.Tensor) -> torch.Tensor:
    """PipeFusion: `shard` with the patch index read from ``index`` (a 0-dim CPU int64 tensor the
    pipeline driver sets before each patch), so one graph computes every patch."""
    return seq.shard(x, dim, list(lengths), n, int(index)).contiguous()


@patch_shard.register_fake
def _(x, dim, lengths, n, index):
    return _local(x, dim, seq.local_len(list(lengths), n))


@torch.library.custom_op("ditpass::gather", mutates_args=())
def gather(x: torch.Tensor, dim: int, lengths: Sequence[int], n: int, group: str) -> torch.Tensor:
    """The full tensor along ``dim`` from the ``n`` ranks' shards (all-gather over ``group``)."""
    return seq.gather(x, dim, list(lengths), n, group).contiguous()


@gather.register_fake
def _(x, dim, lengths, n, group):
    total = 0
    for L in lengths:
        total = total + L
    return _local(x, dim, total)


@torch.library.custom_op("ditpass::ulysses_send", mutates_args=())
def ulysses_send(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: int, group: str) -> torch.Tensor:
    """q/k/v packed as [u, B, S, 3, ceil(H/u), D] and sent; the all-to-all is in flight on return."""
    return seq.ulysses_send(q, k, v, u, group)


@ulysses_send.register_fake
def _(q, k, v, u, group):
    B, H, S, D = q.shape
    return q.new_empty((u, B, S, 3, seq.chunk_len(H, u), D))


def _bshd(out: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] values in [B, S, H, D] memory (a copy only where the kernel left another layout)."""
    if out.dim() != 4:
        return out.contiguous()
    if out.transpose(1, 2).is_contiguous():
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("ditpass::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: torch.Tensor,
              attn_mask: Optional[torch.Tensor] = None, sent: Optional[torch.Tensor] = None,
              lengths: Optional[Sequence[int]] = None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False) -> torch.Tensor:
    """Attention at one site: local SDPA, or sequence-parallel, or DiTFastAttn, as the site's entry says.

    ``site``: a 0-dim CPU int64 tensor, the id in `ditpass.runtime.sites`. ``lengths``: the global
    segment lengths of a sharded sequence; ``sent``: `ulysses_send`'s result where the graph started
    the all-to-all earlier. The other arguments are SDPA's."""
    s = sites.lookup(int(site))
    if s.patch is not None:  # PipeFusion: this patch against the site's full-sequence K/V buffer
        out = patches.patch_attention(q, k, v, scale, list(lengths or ()), s.patch, s, mask=attn_mask, sent=sent)
    elif s.fast is not None:  # DiTFastAttn: this step's method (full, window + residual, shared)
        out = fastattn.attend(s, q, k, v, attn_mask, sent, list(lengths or ()), dropout_p, is_causal, scale,
                              enable_gqa)
    elif s.seq is None:  # SDPA, or FlashAttention-3 where Plan.attention chose it (`seq.attend`)
        out = seq.attend(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    else:
        out = seq.seq_attention(q, k, v, scale, list(lengths or ()), s.seq, mask=attn_mask, sent=sent)
    return _bshd(out)


@attention.register_fake
def _(q, k, v, site, attn_mask=None, sent=None, lengths=None, dropout_p=0.0, is_causal=False, scale=None,
      enable_gqa=False):
    if q.dim() != 4:
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    B, H, S, _ = q.shape
    return q.new_empty((B, S, H, v.shape[-1])).transpose(1, 2)


@torch.library.custom_op("ditpass::cache_write", mutates_args=("buf",))
def cache_write(buf: torch.Tensor, value: torch.Tensor) -> None:
    """``buf[...] = value``: a run-state buffer (`ditpass.runtime.state`) written by the graph."""
    buf.copy_(value)


@cache_write.register_fake
def _(buf, value):
    return None


# op targets by name, for passes and explain that match nodes (``node.target is OPS["attention"]``)
OPS = {name: getattr(torch.ops.ditpass, name).default
       for name in ("shard", "patch_shard", "gather", "ulysses_send", "attention", "flex_attention", "cache_write")}
