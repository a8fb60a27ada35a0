"""The ``torch.ops.ditpass`` ops, one by one: local-shape fakes, the layout contract, the site table,
the declared mutation of ``cache_write``, and Ulysses / ring / USP attention through the ops on 2 and
4 gloo processes against plain SDPA. Plus the sequence-parallel rules on hand-built graphs, keyed by
op target."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch._subclasses.fake_tensor import FakeTensorMode

from ditpass.runtime import seq, sites
from ditpass.runtime.ops import OPS
from ditpass.runtime.state import RunState

from dist_utils import run_distributed

ditpass_ops = torch.ops.ditpass


def _symbolic(*shape):
    """A fake tensor of ``shape`` whose dim 1 is symbolic (its hint: the given size)."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    dyn = [DimDynamic.DYNAMIC if i == 1 else DimDynamic.STATIC for i in range(len(shape))]
    x = mode.from_tensor(torch.empty(shape), symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn))
    return x, mode


def test_shard_and_gather_fakes_give_local_and_global_lengths():
    x, mode = _symbolic(1, 15, 8)
    L = x.shape[1]
    assert isinstance(L, torch.SymInt)
    with mode:
        s = ditpass_ops.shard(x, 1, [L], 2, 0)
        g = ditpass_ops.gather(s, 1, [L], 2, "g")
    sym = str(L.node.expr)
    assert str(s.shape[1].node.expr) == f"(({sym} + 1)//2)" and s.shape[1].node.hint == 8
    assert s.shape[0] == 1 and s.shape[2] == 8
    assert str(g.shape[1].node.expr) == sym
    # two segments (text + image): each padded to its own ceil
    with mode:
        s2 = ditpass_ops.shard(torch.empty(1, 7 + 15, 4), 1, [7, 15], 4, 3)
    assert s2.shape[1] == 2 + 4


def test_shard_real_pads_and_gather_inverts():
    x = torch.arange(2 * 9 * 3, dtype=torch.float32).view(2, 9, 3)
    parts = [seq.shard(x, 1, [4, 5], 3, p) for p in range(3)]
    assert all(p.shape == (2, 2 + 2, 3) for p in parts)
    # rank 2's text chunk is [4:6] clamped: the last real token repeated (edge padding)
    assert torch.equal(parts[2][:, 0], x[:, 3]) and torch.equal(parts[2][:, 1], x[:, 3])
    stacked = torch.cat([p.movedim(1, 0) for p in parts])  # what the all-gather returns, as [n*S, ...]
    n, S = 3, parts[0].shape[1]
    g = stacked.view(n, S, 2, 3)
    text = g[:, :2].reshape(n * 2, 2, 3)[:4]
    img = g[:, 2:].reshape(n * 2, 2, 3)[:5]
    assert torch.equal(torch.cat([text, img]).movedim(0, 1), x)


def _site(seq_attn=None):
    table = sites.SiteTable()
    s = table.add("sdpa", "self", "blocks.0.attn")
    if seq_attn is not None:
        table.refine(s.site, seq=seq_attn)
    return table, torch.tensor(s.site)


def test_attention_local_is_sdpa_with_the_fake_layout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.randn(2, 1, 5, 5)
    table, site = _site()
    out = ditpass_ops.attention(q, k, v, site, attn_mask=mask, scale=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref)
    # the contract the compiler trusts: the fake's strides are the real ones ([B, S, H, D] memory)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = ditpass_ops.attention(fq, fk, fv, mode.from_tensor(site))
    assert fake.shape == out.shape and fake.stride() == out.stride() == (60, 4, 12, 1)


def test_site_table_refine_is_what_the_op_reads():
    table, site = _site()
    entry = table[int(site)]
    assert entry.describe() == "self: local" and sites.lookup(entry.site) is entry
    table.refine(entry.site, note="K/V replicated")
    assert sites.lookup(entry.site).describe() == "self: local (K/V replicated)"
    with pytest.raises(KeyError, match="no site table"):
        sites.lookup(10**9)


def test_cache_write_is_kept_by_dce_and_compile():
    state = RunState()
    buf = state.buffer("b", torch.zeros(3))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("buf", buf)  # the state's tensor itself, read by get_attr

        def forward(self, x):
            ditpass_ops.cache_write.default(self.buf, x * 2)  # its result is used by nothing
            return x + 1

    gm = torch.fx.symbolic_trace(M())
    gm.graph.eliminate_dead_code()
    assert [n.target for n in gm.graph.nodes].count(OPS["cache_write"]) == 1
    gm.recompile()
    gm(torch.ones(3))
    assert torch.equal(buf, torch.full((3,), 2.0))
    compiled = torch.compile(gm, fullgraph=True)
    compiled(torch.full((3,), 3.0))
    assert torch.equal(buf, torch.full((3,), 6.0))
    assert state.buffer("b", torch.zeros(3)) is buf  # one storage for the model's life
    state.reset()
    assert state.generation == 1 and state.calls == 0 and torch.equal(buf, torch.zeros(3))


def test_printed_graph_names_the_ops():
    table, site = _site()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("site_0", site)

        def forward(self, q):
            return ditpass_ops.attention.default(q, q, q, self.site_0, scale=0.5)

    code = torch.fx.symbolic_trace(M()).code
    assert "torch.ops.ditpass.attention.default(q, q, q, site_0, scale = 0.5)" in code


def _attention_ranks(rank, world, u, r, lengths, masked):
    torch.manual_seed(0)
    B, H, D = 1, 4, 8
    S = sum(lengths)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    mask = (torch.rand(B, 1, S, S) > 0.2) if masked else None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if u > 1 and r > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (r, u), mesh_dim_names=("ring", "ulysses"))
        ug, rg = mesh["ulysses"].get_group().group_name, mesh["ring"].get_group().group_name
        ur, rr = mesh.get_local_rank("ulysses"), mesh.get_local_rank("ring")
    else:
        g = dist.group.WORLD.group_name
        ug, rg = (g, "") if u > 1 else ("", g)
        ur, rr = (rank, 0) if u > 1 else (0, rank)
    table, site = _site(sites.SeqAttention(u, r, ur, rr, ug, rg))
    n, p = u * r, rr * u + ur
    qs, ks, vs = (ditpass_ops.shard(t, 2, lengths, n, p) for t in (q, k, v))
    sent = ditpass_ops.ulysses_send(qs, ks, vs, u, ug) if u > 1 else None
    out = ditpass_ops.attention(qs, ks, vs, site, attn_mask=mask, sent=sent, lengths=lengths)
    full = ditpass_ops.gather(out, 2, lengths, n, dist.group.WORLD.group_name)
    return float((full - ref).abs().max()), tuple(out.shape), out.stride()


@pytest.mark.parametrize("u,r,world", [(2, 1, 2), (1, 2, 2), (2, 2, 4)])
def test_sequence_parallel_attention_through_the_ops(u, r, world):
    """Joint text+image lengths that do not divide (7 + 15), with and without a mask."""
    for masked in (False, True):
        for diff, shape, stride in run_distributed(_attention_ranks, world, u, r, [7, 15], masked, timeout=120):
            assert diff < 1e-5, (u, r, masked, diff)
            local = seq.local_len([7, 15], u * r)
            assert shape == (1, 4, local, 8)  # each rank holds its share of the tokens, not all
            assert stride == (local * 32, 8, 32, 1)  # [B, S, H, D] memory, as the fake says


# ---- the sequence-parallel rules on hand-built graphs -----------------------------------------


class _Probe:
    """What the rules ask the rewriter: the token dim of an operand (here: given by hand)."""

    def __init__(self, token_dims):
        self.token_dims = token_dims

    def in_dim(self, a):
        return self.token_dims.get(a.name)

    def out_token_dims(self, val):
        return []

    def view_keeps(self, node, a, d):
        return True


def test_rules_by_op_target():
    """A graph built node by node with aten targets, as export leaves them; token dim 1 of x."""
    from ditpass.passes.sequence_parallel import rules

    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    x.meta["val"], w.meta["val"] = torch.empty(2, 6, 4), torch.empty(4, 4)
    nodes = {}
    for name, target, args in [("linear", aten.linear.default, (x, w)),             # features: kept
                               ("softmax_features", aten.softmax.int, (x, -1)),      # over features: kept
                               ("softmax_tokens", aten.softmax.int, (x, 1)),         # over the tokens
                               ("norm", aten.layer_norm.default, (x, [4])),
                               ("sum_tokens", aten.sum.dim_IntList, (x, [1])),
                               ("transpose", aten.transpose.int, (x, 1, 2)),         # moves it, keeps each token
                               ("narrow_tokens", aten.narrow.default, (x, 1, 0, 2)),
                               ("narrow_features", aten.narrow.default, (x, 2, 0, 2)),
                               ("cumprod", aten.cumprod.default, (x, 2))]:            # not in the table
        nodes[name] = g.call_function(target, args)
    probe = _Probe({"x": 1, "w": 0})
    tw = {name: rules.tokenwise(probe, n, x) for name, n in nodes.items()}
    assert tw == {"linear": True, "softmax_features": True, "softmax_tokens": False, "norm": True,
                  "sum_tokens": False, "transpose": True, "narrow_tokens": False, "narrow_features": True,
                  "cumprod": False}
    assert rules.family(nodes["cumprod"]) is None  # unknown op: the rewriter gathers around it
    assert not rules.tokenwise(probe, nodes["linear"], w)  # a linear's weight is never sharded
    assert rules.op_dim(nodes["narrow_tokens"]) == 1 and rules.op_dim(nodes["transpose"]) is None
