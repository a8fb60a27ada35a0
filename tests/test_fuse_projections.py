"""The fuse_projections pass: linears of one block on one input become one matmul, same output,
weights shared with the user's model (not copied), never across blocks, compatible with Ulysses and
with the regional compiler's templates."""
from __future__ import annotations

import torch

import ditpass
from ditpass.models import zoo
from ditpass.passes.fuse_projections import FuseProjections
from ditpass.backend.regional import RegionalModule

from dist_utils import run_forked
from tiny_models import pass_context as _context, tiny_flux

aten = torch.ops.aten


def _linears(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default)


def _result(pm, index=0):
    return next(r for r in pm.ditpass_records[index].results if r.name == "fuse_projections")


def _sp(rec):
    return next(r for r in rec.results if r.name == "sequence_parallel")


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_flux_fused_same_output_shared_weights():
    model, inputs = tiny_flux()
    blocks, singles = len(model.transformer_blocks), len(model.single_transformer_blocks)
    with torch.no_grad():
        ref = model(**inputs)[0]
        off = ditpass.parallelize(model, ditpass.Plan())  # off: the graph keeps every linear
        off(**inputs)
        pm = ditpass.parallelize(model, ditpass.Plan(fuse_projections=True))
        out = pm(**inputs)[0]
        again = model(**inputs)[0]  # the user's model runs on the fused storage
    assert not _result(off).modified and _result(off).notes == ["off in this plan"]
    rec = pm.ditpass_records[0]
    before = _linears(rec.captured.graph_module)
    assert _linears(off.ditpass_records[0].graph_module) == before
    res = _result(pm)
    # double block: to_q/k/v and add_q/k/v_proj (2 groups of 3); single block: proj_mlp + to_q/k/v
    assert res.modified and res.details["count"] == 2 * blocks + singles
    assert "q_proj" in res.notes[0] and "proj_mlp/to_q/to_k/to_v" in res.notes[0]
    assert _linears(rec.graph_module) == before - 4 * blocks - 3 * singles
    assert _close(out, ref) and _close(again, ref)
    gm = rec.graph_module
    fused = {n.args[1].target for n in gm.graph.nodes if n.target is aten.linear.default
             and n.args[1].target.startswith("ditpass_fused_")}
    assert len(fused) == res.details["count"]
    attn = model.transformer_blocks[0].attn
    w = next(getattr(gm, t) for t in fused if getattr(gm, t).shape[0] == 3 * attn.to_q.weight.shape[0]
             and getattr(gm, t).data_ptr() == attn.to_q.weight.data_ptr())
    assert attn.to_k.weight.data_ptr() == w.data_ptr() + attn.to_q.weight.numel() * w.element_size()
    assert torch.equal(w[: attn.to_q.weight.shape[0]], attn.to_q.weight)

    # another input signature is built again: its stacked weights are the same storage, not a copy
    with torch.no_grad():
        pm(**tiny_flux(n_img=9)[1])
    gm2 = pm.ditpass_records[1].graph_module
    assert {getattr(gm2, t).data_ptr() for t in fused} == {getattr(gm, t).data_ptr() for t in fused}


class _Two(torch.nn.Module):
    def __init__(self, bias_b=True):
        super().__init__()
        self.a = torch.nn.Linear(8, 6)
        self.b = torch.nn.Linear(8, 4, bias=bias_b)

    def forward(self, x):  # the views merge the feature dim: impossible on a column slice, reshape is not
        return torch.cat([self.a(x).view(x.shape[0], -1), self.b(x).view(x.shape[0], -1)], 1)


def _run_pass(m, x, labels):
    gm = torch.export.export(m, (x,)).module()
    for n, lab in zip([n for n in gm.graph.nodes if n.target is aten.linear.default], labels):
        n.meta["ditpass_block"] = lab
    res = FuseProjections().call(gm, _context(ditpass.Plan(fuse_projections=True)))
    gm.graph.lint()
    gm.recompile()
    return res, gm


def test_never_across_blocks_nor_mixed_bias():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for m, labels, fuses in [(_Two(), ["blocks.0", "blocks.0"], True),  # control: it does fuse
                             (_Two(), ["blocks.0", "blocks.1"], False),
                             (_Two(bias_b=False), ["blocks.0", "blocks.0"], False)]:
        ref = m(x)
        res, gm = _run_pass(m, x, labels)
        assert res.modified == fuses and _linears(gm) == (1 if fuses else 2)
        assert torch.allclose(gm(x), ref, atol=1e-6)


def test_tied_weight_and_meta_device():
    m = _Two()
    m.b.weight, m.b.bias = m.a.weight, m.a.bias  # one parameter read twice: stacking it would copy it
    x = torch.randn(2, 5, 8)
    res, gm = _run_pass(m, x, ["b.0", "b.0"])
    assert not res.modified and torch.allclose(gm(x), m(x))
    with torch.device("meta"):
        m, x = _Two(), torch.randn(2, 5, 8)
    res, gm = _run_pass(m, x, ["b.0", "b.0"])
    assert res.modified and gm(x).shape == (2, 50) and m.a.weight.device.type == "meta"


def _ulysses(rank, world, model, inputs, ref):
    with torch.no_grad():
        pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2, fuse_projections=True))
        out = pm(**inputs)[0]
    res = _result(pm)
    return out, res.details["groups"], bool(_sp(pm.ditpass_records[0]).collectives)


def test_ulysses_with_fusion_matches_single_device():
    ref, results = run_forked(_ulysses, 2, *tiny_flux(), timeout=120)
    for out, groups, sharded in results:
        assert sharded and len(groups) == 3
        assert _close(out, ref)
        # the single block's MLP projection stays apart from its q/k/v, which feed the all-to-all: it is
        # the work that runs while they travel (passes/overlap.py)
        single = [g for g in groups if g[0].startswith("single_transformer_blocks")]
        assert [p.rsplit(".", 1)[-1] for p in single[0]] == ["to_q", "to_k", "to_v"], single


def test_regional_templates_unchanged():
    """3 double + 4 single blocks: fused, the blocks still share as many templates as unfused."""
    cfg = dict(zoo.config("FluxTransformer2DModel", "tiny"), num_layers=3, num_single_layers=4)
    inputs = zoo.make_inputs("FluxTransformer2DModel", "tiny")
    counts = []
    for fuse in (False, True):
        torch.manual_seed(0)
        model = type(zoo.build("FluxTransformer2DModel", "tiny"))(**cfg).eval()
        with torch.no_grad():
            ref = model(**inputs)[0]
            pm = ditpass.parallelize(model, ditpass.Plan(fuse_projections=fuse))
            gm = pm.build(**inputs).graph_module
            compiled = []
            rm = RegionalModule(gm, lambda g: compiled.append(g) or g)  # "compile" = identity: count them
            out = rm(**inputs)[0]
        assert _close(out, ref) and _result(pm).details.get("count", 0) == (2 * 3 + 4 if fuse else 0)
        counts.append((len(compiled), len(rm.regions)))
    assert counts[0] == counts[1]


def test_inductor_compiles_fused_blocks():
    model, inputs = tiny_flux()
    with torch.no_grad():
        ref = model(**inputs)[0]
        pm = ditpass.parallelize(model, ditpass.Plan(compile="inductor", fuse_projections=True))
        out = pm(**inputs)[0]
    runner = pm.ditpass_records[0].runner
    assert _result(pm).details["count"] == 3 and sum(t["compiled"] for t in runner.templates.values()) >= 2
    assert float((out - ref).abs().max()) <= 1e-4
