"""`ParallelDecode`: a VAE's ``decode`` run on row bands over the ranks (``Plan(vae=True)``).

    vae.decode = ParallelDecode(vae, plan)      # what parallelize(pipe, Plan(..., vae=True)) does
    image = vae.decode(latents, return_dict=False)[0]    # every rank: the whole picture

On the first call of each latent shape the decode is captured as one static graph (``torch.export``),
built for this rank (`ditpass.build.build` with the ``"vae"`` component: `passes/parallel_vae.py`) and
cached; ``.ditpass_records`` holds the records for `ditpass.explain`. The VAE uses every rank of the
world (the transformer's plan does not split it): each decodes its band of rows, exchanging halo rows
with its neighbours, and the picture is all-gathered at the end.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .build import Record, build
from .capture import capture, signature_of

__all__ = ["ParallelDecode"]


class _Decode(torch.nn.Module):
    """``vae.decode(z, **kw)``'s picture as a module's forward (what is captured)."""

    def __init__(self, vae, decode):
        super().__init__()
        self.vae = vae
        self._decode = decode

    def forward(self, z, **kwargs):
        out = self._decode(z, return_dict=False, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out.sample


class ParallelDecode:
    """A replacement for ``vae.decode``: same arguments, same output, the work split by rows."""

    def __init__(self, vae, plan, placement=None):
        self.vae, self.plan = vae, plan
        self.original = vae.__dict__.get("_ditpass_decode") or vae.decode
        vae.__dict__["_ditpass_decode"] = self.original  # (components._parallel_decode puts it back)
        if placement is None:  # every rank of the world, whatever the transformer's plan splits
            from .mesh import ParallelDims, Placement, init_distributed

            rank, world = init_distributed()
            dims = ParallelDims(plan, world)
            placement = Placement(rank, world, dims.degrees, dims.coords(rank))
        world_group = dist.group.WORLD.group_name if dist.is_initialized() else ""
        self.placement = dataclasses.replace(placement, groups={**placement.groups, "vae": world_group})
        self.module = _Decode(vae, self.original)
        self.rank, self.world_size = self.placement.rank, self.placement.world_size
        self.ditpass_name = f"{type(vae).__name__}.decode"  # what explain calls it
        self._records: dict[tuple, Record] = {}

    @property
    def ditpass_records(self) -> list[Record]:
        return list(self._records.values())

    def __call__(self, z, *args, return_dict: bool = True, **kwargs):
        if args:  # decode(z, return_dict) positionally
            return_dict = args[0]
        from .runtime import lazy

        z, kwargs = lazy.force_tree((z, kwargs))  # PipeFusion's pipelined latents: whole, on every rank
        sig = signature_of((z,), kwargs)
        if sig not in self._records:
            captured = capture(self.module, z, dynamic_shapes=None, strategies=("export-static",), **kwargs)
            self._records[sig] = build(captured, self.plan, self.placement, component="vae")
        sample = self._records[sig].runner(z, **kwargs)
        if not return_dict:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)
