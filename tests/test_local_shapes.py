"""After the passes, every node's ``meta["val"]`` is the shape this rank really computes.

On 2 gloo ranks the rewritten graph of a zoo model runs node by node (an FX interpreter) and each
node's real output shape is compared with its fake value, its sizes evaluated at the capture's sizes.
Sharded tensors must show their local length (a global one would fail), on several models and plans.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
from torch.fx._pytree import tree_flatten_spec

import ditpass
from ditpass.models import zoo

from dist_utils import run_forked

MODELS = ["FluxTransformer2DModel", "CogVideoXTransformer3DModel"]  # joint text+image; video (3-D patches)
PLANS = [dict(ulysses=2), dict(ring=2)]


def _size(s) -> int:
    if not isinstance(s, torch.SymInt):
        return int(s)
    hint = s.node.hint
    return int(hint if hint is not None else s.node.shape_env.size_hint(s.node.expr))


class _Shapes(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.seen: dict[str, tuple] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and isinstance(out, torch.Tensor):
            self.seen[n.name] = tuple(out.shape)
        return out


def _run(rank, world, model, inputs, ref, plans):
    warnings.filterwarnings("ignore")
    out = []
    with torch.no_grad():
        for fields in plans:
            pm = ditpass.parallelize(model, ditpass.Plan(**fields))
            rec = pm.build(**inputs)
            gm = rec.graph_module
            interp = _Shapes(gm)
            interp.run(*tree_flatten_spec(((), inputs), gm._in_spec))
            checked, wrong, local = 0, [], 0
            for node in gm.graph.nodes:
                val = node.meta.get("val")
                if node.name not in interp.seen or not isinstance(val, torch.Tensor):
                    continue
                fake = tuple(_size(s) for s in val.shape)
                checked += 1
                if fake != interp.seen[node.name]:
                    wrong.append((node.name, fake, interp.seen[node.name]))
                local += node.target is torch.ops.ditpass.shard.default
            out.append(dict(fields=fields, checked=checked, wrong=wrong[:5], shards=local))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_meta_val_is_the_local_shape(name):
    torch.manual_seed(0)
    model = zoo.build(name)
    inputs = zoo.make_inputs(name)
    _, results = run_forked(_run, 2, model, inputs, PLANS, timeout=600)
    for rank_results in results:
        assert len(rank_results) == len(PLANS), rank_results
        for r in rank_results:
            assert r["shards"] > 0, r  # the sequence was split: there are local shapes to get right
            assert r["checked"] > 100, r
            assert not r["wrong"], f"{name} {r['fields']}: meta['val'] differs from what runs: {r['wrong']}"
