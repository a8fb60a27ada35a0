"""Parallel VAE decode on CPU (gloo): the picture equals one device's decode, and each rank did its band.

Three diffusers VAEs with small random configs: the image VAE (``AutoencoderKL``, FLUX/SD's class) and two
video VAEs (Wan's, with causal 3-D convolutions padded by hand and a feature cache across frame chunks, and
CogVideoX's, with 3-D group norms and nearest 3-D upsampling), on 2 and 4 ranks, at latent heights that do
not divide by the rank count.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

TOL = 1e-4


def _kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                         latent_channels=4, norm_num_groups=4)


def _wan():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=["CogVideoXDownBlock3D"] * 2,
                                  up_block_types=["CogVideoXUpBlock3D"] * 2, block_out_channels=[8, 16],
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                  temporal_compression_ratio=2)


VAES = {"kl": (_kl, (1, 4, 7, 6)), "wan": (_wan, (1, 4, 2, 7, 6)), "cogvideox": (_cogvideox, (1, 4, 2, 7, 6))}


def _vae(name):
    torch.manual_seed(0)
    build, shape = VAES[name]
    vae = build().eval().requires_grad_(False)
    for p in vae.parameters():  # random weights of a scale that keeps activations O(1) through every layer
        p.data.normal_(0, 0.3 / max(1, p[0].numel()) ** 0.5) if p.dim() > 1 else None
    return vae, torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _decode(rank, world, name, height):
    import ditpass
    from ditpass.vae import ParallelDecode

    vae, z = _vae(name)
    if height is not None:
        z = torch.randn(*z.shape[:-2], height, z.shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        dec = ParallelDecode(vae, ditpass.Plan(dp=world, vae=True))
        out = dec(z).sample
    rec = dec.ditpass_records[0]
    res = next(r for r in rec.results if r.name == "parallel_vae")
    convs = [n for n in rec.graph_module.graph.nodes if n.target in (torch.ops.aten.conv2d.default,
                                                                      torch.ops.aten.conv3d.default)]
    last_conv_rows = convs[-1].meta["val"].shape[-2]  # what this rank computed of the last, full-size conv
    return dict(diff=float((out - ref).abs().max()), scale=float(ref.abs().max()), shape=tuple(out.shape),
                ref_shape=tuple(ref.shape), details=res.details, conv_rows=int(last_conv_rows),
                full_rows=int(ref.shape[-2]), text=str(ditpass.explain(dec)) if rank == 0 else "")


@pytest.mark.parametrize("name", list(VAES))
@pytest.mark.parametrize("world", [2, 4])
def test_decode_equals_one_device_with_uneven_bands(name, world):
    results = run_distributed(_decode, world, name, None, timeout=300)
    for r in results:
        assert r["shape"] == r["ref_shape"]
        assert r["diff"] <= TOL * max(1.0, r["scale"]), r
        # each rank computed its band of the full-size map, not all of it (7 latent rows: uneven bands)
        assert r["conv_rows"] < r["full_rows"] and r["details"]["halos"] > 0
        assert r["details"]["norms"] > 0 or name == "wan"  # (Wan normalises over channels: RMS norm, per pixel)
        # the mid block's attention mixes every position: it runs on the whole (latent-size) map, said so
        assert r["details"]["whole"] == {"kl": 1, "wan": 2, "cogvideox": 0}[name]
    assert sum(r["conv_rows"] for r in results) == results[0]["full_rows"]
    assert "halo exchanges" in results[0]["text"]
    assert ("all_reduce x2 (group norm)" in results[0]["text"]) == (name != "wan")


def test_latent_shorter_than_the_ranks_is_a_clear_error():
    with pytest.raises(Exception, match="fewer than the 4 ranks of the parallel VAE"):
        run_distributed(_decode, 4, "kl", 3, timeout=300)


def test_generate_with_parallel_vae_draws_the_same_digits(tmp_path):
    """The built-in digits pipeline through ``ditpass generate --use_parallel_vae`` (cfg=2 on 2 ranks, the VAE's
    rows over both): the same pictures as one process, and the explanation of the decode names its halos."""
    import json

    import numpy as np

    from cli_utils import run_generate, saved_images

    one = run_generate(tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    par = run_generate(tmp_path / "par", "--use_cfg_parallel", "--use_parallel_vae", nproc=2)
    assert par.returncode == 0, par.stderr[-2000:]
    assert "Plan(cfg=2, vae=True) on 2 process(es)" in par.stdout
    run = json.loads((tmp_path / "par" / "last_run.json").read_text())
    assert run["vae"]["halos"] > 0 and run["vae"]["rows"] == [[8, 8]], run["vae"]
    for a, b in zip(saved_images(tmp_path / "one"), saved_images(tmp_path / "par")):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
