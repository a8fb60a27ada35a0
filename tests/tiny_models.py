"""Small models built directly (not from the zoo) for tests that need a particular shape."""
from __future__ import annotations

import torch


def tiny_flux(heads: int = 4, n_img: int = 15, n_txt: int = 7):
    """A 1 + 1 block FLUX with ``heads`` heads and its inputs (uneven token counts by default)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, n_img, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.randn(n_img, 3, generator=g),
                  txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    return model, inputs


def pass_context(plan, analysis=None):
    """A `PassContext` for calling one pass by hand: rank 0 of the plan's world, dry-run group names."""
    from ditpass.mesh import ParallelDims
    from ditpass.pass_base import PassContext
    from ditpass.runtime.sites import SiteTable

    return PassContext(analysis, plan, ParallelDims(plan, plan.world_size).placement(0), SiteTable())
