"""pack_attention: compiled plans hand SDPA q/k/v as views of one [B, S, 3, H, D] tensor; same output."""
from __future__ import annotations

import torch

import ditpass
from ditpass.analysis.attention import SDPA_TARGETS
from ditpass.pass_base import PassContext
from ditpass.passes.pack_attention import PackAttention
from tiny_models import tiny_flux


def test_packed_views_same_output():
    model, inputs = tiny_flux()
    with torch.no_grad():
        ref = model(**inputs)[0]
        gm = ditpass.parallelize(model, ditpass.Plan()).build(**inputs).graph_module  # eager: not packed
        assert not any(n.target is torch.ops.aten.stack.default and n.args[1] == 2 for n in gm.graph.nodes)
        res = PackAttention().call(gm, PassContext(None, ditpass.Plan(compile="inductor")))
        gm.recompile()
        seen, seen_ops = [], set()

        class Spy(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "scaled_dot_product" in func.__name__ and not seen_ops or func in seen_ops:
                    seen_ops.add(func)  # the first attention op the call reaches (SDPA is decomposed)
                    q, k, v = args[:3]
                    seen.append(q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
                                == v.untyped_storage().data_ptr() and q.stride(2) == 3 * q.shape[1] * q.shape[3])
                return func(*args, **(kwargs or {}))

        with Spy():
            out = gm(**inputs)[0]
    n_attn = sum(1 for n in gm.graph.nodes if n.target in SDPA_TARGETS)
    assert res.details["packed"] == n_attn == len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert seen and all(seen), seen  # every call read q, k, v from one packed tensor
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert PackAttention().enabled(PassContext(None, ditpass.Plan())) is False  # eager plans: off
