"""``torch.nn.attention.flex_attention`` as an attention site under exact sequence parallelism (2 gloo ranks).

flex_attention exports as ``torch.ops.higher_order.flex_attention(q, k, v, score_mod, block_mask, ...)`` with its
score_mod / mask_mod as subgraphs that read *global* indices (head ``h``, ``q_idx``, ``kv_idx``) and a BlockMask
over the whole sequences. Small hand-written DiT-like modules (token sequence of symbolic length 37, which 2 does
not divide; 3 heads, which 2 does not divide either) with a plain call, a causal mask_mod, a score_mod reading
``h`` and ``q_idx`` (and a buffer), and a per-head block mask over a joint text + image sequence run with
``ulysses=2`` and ``ring=2`` against one process. Each rank's flex_attention is checked to compute a shard (its
local ``heads x queries x keys`` at most 3/4 of the whole, read from the calls it makes) and every site to have a
sequence-parallel strategy. The BlockMask cutting is checked on its own against the block tables' semantics
(what a compiled kernel reads; flex_attention eager reads only the mask_mod).
"""
from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

import ditpass
from ditpass.passes.sequence_parallel import ReplicatedWarning
from ditpass.runtime import seq

from dist_utils import first_output, run_forked

TOL = 1e-4
PLANS = [dict(ulysses=2), dict(ring=2)]
N_TOKENS, N_TEXT = 37, 7


class FlexAttn(nn.Module):
    """Self-attention through flex_attention; ``mode`` picks the mask / score modification."""

    def __init__(self, dim: int, heads: int, mode: str):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("slopes", torch.linspace(-0.5, 0.5, heads))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        score_mod = block_mask = None
        if self.mode == "causal":
            block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, N, device=x.device,
                                           BLOCK_SIZE=16, _compile=False)
        if self.mode in ("score", "perhead"):
            slopes = self.slopes  # ALiBi-like, plus a bias by the query's position: reads h and q_idx

            def alibi(s, b, h, qi, ki):
                return s + slopes[h] * (qi - ki).float() * 0.05 + 0.01 * qi.float()
            score_mod = alibi
        if self.mode == "perhead":  # a window per head: the block mask has one row of blocks per head
            block_mask = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() <= 4 + 6 * h, None, self.heads, N, N,
                                           device=x.device, BLOCK_SIZE=8, _compile=False)
        if self.mode == "lse":  # the log-sum-exp is used too: not computed sharded
            o, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True))
            o = o * torch.sigmoid(aux.lse).unsqueeze(-1)
        else:
            o = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class FlexDiT(nn.Module):
    """Tokens in, tokens out, two residual flex-attention blocks. ``joint``: text tokens concatenated before the
    image tokens (one sequence of two segments), the image part returned."""

    def __init__(self, mode: str, heads: int = 3, joint: bool = False):
        super().__init__()
        dim = 16 * heads
        self.joint = joint
        self.img, self.txt, self.out = nn.Linear(4, dim), nn.Linear(6, dim), nn.Linear(dim, 4)
        self.blocks = nn.ModuleList([FlexAttn(dim, heads, mode) for _ in range(2)])

    def forward(self, x, text):
        h = self.img(x)
        T = text.shape[1]
        if self.joint:
            h = torch.cat([self.txt(text), h], 1)
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h[:, T:] if self.joint else h)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(1, N_TOKENS, 4, generator=g), text=torch.randn(1, N_TEXT, 6, generator=g))


def _run(rank, world, model, inputs, ref, plans):
    """Per plan: the max abs diff, each site's entry and every flex_attention call's (q, k) shapes on this rank."""
    calls = []
    inner = seq._flex_call

    def recording(q, k, *args):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return inner(q, k, *args)

    seq._flex_call = recording  # this forked rank's runtime only
    out = []
    with torch.no_grad():
        for fields in plans:
            calls.clear()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always", ReplicatedWarning)
                pm = ditpass.parallelize(model, ditpass.Plan(**fields))
                y = first_output(pm(**inputs))
            out.append(dict(diff=float((y - ref).abs().max()), shape=tuple(y.shape), calls=list(calls),
                            sites=[(s.kind, s.seq is not None, s.flex is not None, s.notes)
                                   for s in pm.ditpass_records[0].sites],
                            replicated=[str(w.message) for w in seen if issubclass(w.category, ReplicatedWarning)]))
    return out


CASES = {
    "plain": dict(mode="plain"),
    "causal": dict(mode="causal"),
    "score_h_q_idx": dict(mode="score"),
    "per_head_block_mask_joint": dict(mode="perhead", joint=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_exact_and_sharded(name):
    torch.manual_seed(0)
    model = FlexDiT(**CASES[name]).eval()
    ref, results = run_forked(_run, 2, model, _inputs(), PLANS, timeout=300)
    seq_len = N_TOKENS + (N_TEXT if CASES[name].get("joint") else 0)
    heads = 3
    whole = heads * seq_len * seq_len  # one process: every head, every query, every key
    for rank_results in results:
        for fields, r in zip(PLANS, rank_results):
            assert r["shape"] == tuple(ref.shape)
            assert r["diff"] <= TOL, f"{name} {fields}: max abs diff {r['diff']:.3g}"
            assert len(r["calls"]) == 2, r["calls"]  # both sites ran as ditpass::flex_attention
            for q, k in r["calls"]:  # [B, heads here, queries here, D], [B, heads, keys, D]
                assert q[1] * q[2] * k[2] <= 0.75 * whole, f"{name} {fields}: not a shard: q {q}, k {k}"
            assert not r["replicated"], r["replicated"]
    for fields, r in zip(PLANS, results[0]):
        assert [kind for kind, *_ in r["sites"]] == ["joint" if CASES[name].get("joint") else "self"] * 2
        assert all(has_seq and has_flex for _, has_seq, has_flex, _ in r["sites"]), r["sites"]


def test_lse_used_is_replicated_with_a_reason():
    """flex_attention whose log-sum-exp the model reads: left whole on every rank (exact), and said why."""
    torch.manual_seed(0)
    model = FlexDiT("lse").eval()
    ref, results = run_forked(_run, 2, model, _inputs(), [dict(ring=2)], timeout=300)
    for (r,) in results:
        assert r["diff"] <= TOL
        assert not r["calls"]  # the captured call ran, not the sharded op
    (r,) = results[0]
    assert all(not has_seq for _, has_seq, _, _ in r["sites"]), r["sites"]
    assert r["replicated"] and "log-sum-exp" in r["replicated"][0], r["replicated"]


def test_flex_attention_is_a_site():
    """Each flex_attention call is a self-attention site over the symbolic token sequence; the analysis says which
    indices its score_mod / mask_mod read."""
    model = FlexDiT("score").eval()
    a = ditpass.analyze(ditpass.capture(model, **_inputs()))
    assert [s.kind for s in a.sites] == ["self", "self"]
    assert len(a.token_classes) == 1
    for s in a.sites:
        assert s.heads == 3 and s.head_dim == 16
        assert {"h", "q_idx", "kv_idx"} <= s.flex["reads"]["score"]
        assert not s.flex["reads"]["mask"] & {"h", "q_idx", "kv_idx"}  # no mask: nothing to offset there
        assert s.flex["outputs"] == [0]
    causal = ditpass.analyze(ditpass.capture(FlexDiT("causal").eval(), **_inputs()))
    assert all(s.has_mask and s.flex["reads"]["mask"] >= {"q_idx", "kv_idx"} for s in causal.sites)


# ---- the BlockMask cut for a rank, against the block tables' semantics ----------------------------------


def _dense(tup, B: int, H: int, Q: int, KV: int) -> torch.Tensor:
    """[B, H, Q, KV] bool: what a BlockMask tuple allows, block tables included (what a compiled kernel computes):
    a key of a listed partial block where the mask_mod allows it, or of a listed full block."""
    kv_nb, kv_idx, full_nb, full_idx = tup[2:6]
    QB, KB, mask_mod = tup[-3], tup[-2], tup[-1]
    qi, ki = torch.arange(Q), torch.arange(KV)

    def listed(nb, idx):
        if nb is None:
            return torch.zeros(1, 1, Q, KV, dtype=torch.bool)
        valid = torch.arange(idx.shape[-1]) < nb.unsqueeze(-1)
        blocks = torch.zeros(*idx.shape[:-1], math.ceil(KV / KB), dtype=torch.int32)
        blocks.scatter_add_(-1, idx.long(), valid.int())
        return (blocks > 0).index_select(2, qi // QB).index_select(3, ki // KB)

    m = mask_mod(torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1), qi.view(1, 1, -1, 1),
                 ki.view(1, 1, 1, -1))
    return ((listed(kv_nb, kv_idx) & m) | listed(full_nb, full_idx)).expand(B, H, Q, KV)


def _random_block_mask(H: int, L: int, QB: int, KB: int, mask_mod, gen) -> BlockMask:
    """A data-dependent sparsity (as NABLA's): random partial and full key blocks per head and query block."""
    nq, nk = math.ceil(L / QB), math.ceil(L / KB)
    pick = torch.rand(1, H, nq, nk, generator=gen)
    partial, full = pick < 0.45, pick > 0.8

    def tables(sel):
        return sel.sum(-1).to(torch.int32), sel.int().argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    return BlockMask.from_kv_blocks(*tables(partial), *tables(full), BLOCK_SIZE=(QB, KB), mask_mod=mask_mod,
                                    seq_lengths=(L, L))


@pytest.mark.parametrize("lengths,n,qb", [([N_TOKENS], 2, 16), ([N_TEXT, N_TOKENS], 2, 8), ([12, 32], 2, 8),
                                          ([12, 32], 4, 8), ([5, 64], 4, 16)])
def test_block_mask_cut_exactly(lengths, n, qb):
    """Every rank's queries (ring / query shard): its rows of the cut BlockMask, with q_idx mapped to global
    positions, allow what the captured one allows for those queries; Ulysses: a rank's heads of the head-cut one,
    with h mapped, what the captured one allows for those heads."""
    H, L, KB = 3, sum(lengths), 8

    def mask_mod(b, h, qi, ki):
        return ((qi - ki).abs() <= 3 + 5 * h) | (ki % 5 == 0)

    bm = _random_block_mask(H, L, qb, KB, mask_mod, torch.Generator().manual_seed(n * 100 + L))
    tup = bm.as_tuple()
    whole = _dense(tup, 1, H, L, L)
    f = types.SimpleNamespace(score_mod=None, mask_mod=mask_mod,
                              reads={"score": frozenset(), "mask": frozenset({"h", "q_idx", "kv_idx"})})
    blocks = list(tup[2:13])
    for p in range(n):
        src, qpos, dst, qb2, rows = seq._query_layout(lengths, n, [p], qb, torch.device("cpu"))
        assert qb % qb2 == 0 and (qpos[::qb2] // qb == rows).all()
        assert src.numel() <= 1.125 * seq.local_len(lengths, n) + 1  # little filler
        _, mask_fn = seq._flex_mods(f, None, qpos)
        local = seq._block_rows(blocks, rows, qb2, KB, int(src.numel()), L, mask_fn)
        got = _dense(local, 1, H, int(src.numel()), L)
        layout = seq._positions(lengths, n, [p], False, torch.device("cpu"))
        assert torch.equal(got[:, :, dst], whole[:, :, layout]), (p, qb2)
    for u in (2, 3):
        h = seq.chunk_len(H, u)
        for r in range(u):
            hmap = (torch.arange(h) + r * h).clamp(max=H - 1)
            _, mask_fn = seq._flex_mods(f, hmap, None)
            cut = seq._block_heads(blocks, hmap)
            got = _dense((*tup[:2], *cut, *tup[13:16], mask_fn), 1, h, L, L)
            assert torch.equal(got, whole[:, hmap]), (u, r)
