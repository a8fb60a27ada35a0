"""The tidy pass drops only nodes that do nothing: asserts, same-dtype .to(), p=0 dropout."""
from __future__ import annotations

import torch

import ditpass
from ditpass.passes.tidy import Tidy
from tiny_models import pass_context as _context, tiny_flux

aten = torch.ops.aten


class _Casts(torch.nn.Module):
    def forward(self, x):
        y = x.to(torch.float32)  # same dtype: a no-op
        z = torch.nn.functional.dropout(y, p=0.0, training=False)
        return z.to(torch.float16), x * 2  # a real conversion: stays


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_drops_noops_keeps_real_conversions():
    m = _Casts()
    x = torch.randn(3, 4)
    gm = torch.export.export(m, (x,)).module()
    before = gm(x)
    real_to = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (aten.to.dtype, aten._to_copy.default)
               and n.args[1:2] == (torch.float16,)]
    assert real_to, "the export should keep the float16 conversion"
    res = Tidy().call(gm, _context(ditpass.Plan()))
    gm.recompile()
    after = gm(x)
    assert res.modified and res.details["to"] >= 1
    assert after[0].dtype == torch.float16 and torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(n in gm.graph.nodes for n in real_to)  # the float16 conversion is still there
    assert _count(gm, aten.dropout.default) == 0


def test_flux_graph_same_output_fewer_nodes():
    model, inputs = tiny_flux()
    with torch.no_grad():
        ref = model(**inputs)[0]
        pm = ditpass.parallelize(model, ditpass.Plan())
        out = pm(**inputs)[0]
    rec = pm.ditpass_records[0]
    tidy = next(r for r in rec.results if r.name == "tidy")
    assert tidy.removed > 0 and tidy.details["asserts"] > 0
    assert not any("_assert_tensor_metadata" in str(n.target) for n in rec.graph_module.graph.nodes)
    assert len(rec.graph_module.graph.nodes) < len(rec.captured.graph_module.graph.nodes)
    assert torch.equal(out, ref)
