"""Hand-written "research-style" DiTs: what a user's own DiT usually looks like, not a diffusers class.

Each is small (width 32, 2 heads, 2 blocks) and comes with inputs whose token counts do not divide by 2,
so that sequence parallelism has to pad. ``RESEARCH_DITS`` maps a name to ``(build, inputs)``.

- `HandWrittenAttnDiT`: attention written out, ``softmax(q @ k.transpose(-2, -1) * scale) @ v``.
- `TimmStyleDiT`: timm's blocks: one fused qkv Linear, ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``.
- `SpatioTemporalDiT`: a video DiT whose blocks alternate spatial attention (over the patches of each frame)
  and temporal attention (over the frames of each patch), tokens kept as ``[B, frames, patches, C]``.
- `ClassTokenDiT`: class-conditional, a class token concatenated before 3x5 patches (1 + 15 tokens).
- `FixedPosTableDiT`: a learned ``[1, N, C]`` position table added to the tokens (pins N at capture).

Legend: ``B`` batch, ``N`` tokens, ``T`` frames, ``S`` patches per frame, ``H`` heads, ``D`` head dim,
``C`` width, ``p`` patch size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HandWrittenAttnDiT", "TimmStyleDiT", "SpatioTemporalDiT", "ClassTokenDiT", "FixedPosTableDiT",
           "RESEARCH_DITS"]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def patchify(x_BCHW: torch.Tensor, p: int) -> torch.Tensor:
    B, C, Hh, Ww = x_BCHW.shape
    x = x_BCHW.reshape(B, C, Hh // p, p, Ww // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (Hh // p) * (Ww // p), C * p * p)


def unpatchify(x_BNF: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    B = x_BNF.shape[0]
    x = x_BNF.reshape(B, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, c, h * p, w * p)


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim * ratio), nn.Linear(dim * ratio, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _AdaLNBlock(nn.Module):
    """A DiT block (adaLN-Zero) around an attention module ``attn(x) -> x``."""

    def __init__(self, dim: int, attn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = attn, Mlp(dim)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class _ImageDiT(nn.Module):
    """Patchify, blocks, unpatchify; ``make_attn(dim, heads)`` builds each block's attention."""

    def __init__(self, make_attn, in_ch: int = 4, dim: int = 32, heads: int = 2, depth: int = 2, p: int = 2):
        super().__init__()
        self.p, self.in_ch, self.dim = p, in_ch, dim
        self.embed = nn.Linear(in_ch * p * p, dim)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([_AdaLNBlock(dim, make_attn(dim, heads)) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, in_ch * p * p)

    def tokens(self, x_BCHW, y):
        return self.embed(patchify(x_BCHW, self.p))

    def forward(self, x, t, y=None):
        h, w = x.shape[-2] // self.p, x.shape[-1] // self.p
        c = self.t_embed(timestep_embedding(t, self.dim))
        tok = self.tokens(x, y)
        for blk in self.blocks:
            tok = blk(tok, c)
        tok = self.proj_out(self.norm_out(tok))
        return unpatchify(tok[:, tok.shape[1] - h * w:], h, w, self.p, self.in_ch)


# ---- (a) attention written out -------------------------------------------------------------


class HandWrittenAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x_BNC):
        B, N, C = x_BNC.shape
        q, k, v = (m(x_BNC).view(B, N, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = attn @ v  # [B, H, N, D]
        return self.o(out.transpose(1, 2).reshape(B, N, C))


class HandWrittenAttnDiT(_ImageDiT):
    def __init__(self, **kw):
        super().__init__(HandWrittenAttention, **kw)


# ---- (b) timm-style blocks ------------------------------------------------------------------


class TimmAttention(nn.Module):
    """timm's ``Attention`` (fused path): one qkv Linear, heads split by reshape + permute."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmStyleDiT(_ImageDiT):
    def __init__(self, **kw):
        super().__init__(TimmAttention, **kw)


# ---- (c) spatial + temporal attention ------------------------------------------------------


class AxisAttention(nn.Module):
    """Attention along one axis of ``x`` [B, T, S, C]: ``axis=2`` over the patches of each frame (spatial),
    ``axis=1`` over the frames of each patch (temporal); the other axis is a batch dim of SDPA."""

    def __init__(self, dim: int, heads: int, axis: int):
        super().__init__()
        self.heads, self.axis = heads, axis
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x_BTSC):
        B, T, S, C = x_BTSC.shape
        qkv = self.qkv(x_BTSC).reshape(B, T, S, 3, self.heads, C // self.heads)
        if self.axis == 2:  # [3, B, T, H, S, D]
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2, 4)  # [B, T, S, H, D]
        else:  # [3, B, S, H, T, D]
            q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v).permute(0, 3, 1, 2, 4)  # [B, T, S, H, D]
        return self.proj(o.reshape(B, T, S, C))


class _VideoBlock(nn.Module):
    def __init__(self, dim: int, heads: int, axis: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = AxisAttention(dim, heads, axis), Mlp(dim)
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x_BTSC, c):
        shift, scale = self.ada(F.silu(c))[:, None, None].chunk(2, dim=-1)
        x = x_BTSC + self.attn(self.norm1(x_BTSC) * (1 + scale) + shift)
        return x + self.mlp(self.norm2(x))


class SpatioTemporalDiT(nn.Module):
    """Latent [B, C, T, H, W] -> patches [B, T, S, C] -> spatial / temporal blocks in turn -> latent."""

    def __init__(self, in_ch: int = 4, dim: int = 32, heads: int = 2, depth: int = 2, p: int = 2):
        super().__init__()
        self.p, self.in_ch, self.dim = p, in_ch, dim
        self.embed = nn.Linear(in_ch * p * p, dim)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([_VideoBlock(dim, heads, axis) for _ in range(depth) for axis in (2, 1)])
        self.proj_out = nn.Linear(dim, in_ch * p * p)

    def forward(self, x, t):
        B, C, T, Hh, Ww = x.shape
        p, h, w = self.p, Hh // self.p, Ww // self.p
        tok = x.reshape(B, C, T, h, p, w, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T, h * w, C * p * p)
        tok = self.embed(tok)
        c = self.t_embed(timestep_embedding(t, self.dim))
        for blk in self.blocks:
            tok = blk(tok, c)
        out = self.proj_out(tok).reshape(B, T, h, w, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return out.reshape(B, C, T, Hh, Ww)


# ---- (d) class token, odd token count -------------------------------------------------------


class ClassTokenDiT(_ImageDiT):
    """A class token (a learned vector plus the label's embedding) before the patches: 1 + h*w tokens."""

    def __init__(self, num_classes: int = 10, **kw):
        super().__init__(TimmAttention, **kw)
        self.cls_token = nn.Parameter(torch.randn(1, 1, self.dim) * 0.02)
        self.label_embed = nn.Embedding(num_classes, self.dim)

    def tokens(self, x_BCHW, y):
        patches = self.embed(patchify(x_BCHW, self.p))
        cls = self.cls_token.expand(patches.shape[0], -1, -1) + self.label_embed(y)[:, None]
        return torch.cat([cls, patches], dim=1)


# ---- (e) fixed-size position table ----------------------------------------------------------


class FixedPosTableDiT(_ImageDiT):
    """The original DiT's habit: a ``[1, N, C]`` position table for one image size, added to the tokens."""

    def __init__(self, num_patches: int = 15, **kw):
        super().__init__(TimmAttention, **kw)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, self.dim) * 0.02)

    def tokens(self, x_BCHW, y):
        return self.embed(patchify(x_BCHW, self.p)) + self.pos_embed


def _image_inputs(seed: int = 1, h: int = 3, w: int = 5, **extra):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 4, 2 * h, 2 * w, generator=g), t=torch.tensor([0.3]), **extra)


def _video_inputs(seed: int = 1, frames: int = 3, h: int = 3, w: int = 5):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 4, frames, 2 * h, 2 * w, generator=g), t=torch.tensor([0.3]))


def _built(cls, **kw):
    def build():
        torch.manual_seed(0)
        return cls(**kw).eval()
    return build


# name -> (build(), inputs()): 3x5 patches (15 tokens), 3 frames, so nothing divides by 2
RESEARCH_DITS = {
    "hand_written_attention": (_built(HandWrittenAttnDiT), _image_inputs),
    "timm_blocks": (_built(TimmStyleDiT), _image_inputs),
    "spatial_temporal_video": (_built(SpatioTemporalDiT), _video_inputs),
    "class_token_odd_length": (_built(ClassTokenDiT), lambda: _image_inputs(y=torch.tensor([3]))),
    "fixed_position_table": (_built(FixedPosTableDiT), _image_inputs),
}
