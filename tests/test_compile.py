"""A parallelized model compiled with inductor: one graph per forward (fullgraph), same output."""
from __future__ import annotations

import pytest
import torch

import ditpass
from ditpass.backend import BackendError, compile_graph

from dist_utils import run_distributed

_STATE: dict = {}


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    n_img, n_txt = 15, 7
    inputs = dict(hidden_states=torch.randn(1, n_img, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.randn(n_img, 3, generator=g),
                  txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    return model, inputs


def _compiled(rank, world):
    import torch._dynamo

    model, inputs, ref = _STATE["model"], _STATE["inputs"], _STATE["ref"]
    torch._dynamo.reset()
    with torch.no_grad():
        pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2, compile="inductor"))
        out = pm(**inputs)[0]
    # fullgraph=True makes any graph break an error; count the graphs Dynamo made to be sure
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return float((out - ref).abs().max()), frames


def test_inductor_no_graph_break_same_output():
    model, inputs = _tiny_flux()
    with torch.no_grad():
        ref = model(**inputs)[0]
    ditpass.capture(model, **inputs)
    _STATE.update(model=model, inputs=inputs, ref=ref)
    results = run_distributed(_compiled, 2, timeout=900, start_method="fork")
    for diff, graphs in results:
        assert diff <= 1e-4
        assert graphs == 1


def test_onediff_missing_is_a_clear_error():
    try:
        import nexfort  # noqa: F401
        pytest.skip("nexfort is installed")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="onediff and nexfort"):
        compile_graph(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), "nexfort")
