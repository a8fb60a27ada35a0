"""VAE decode on GPUs: time and peak memory per GPU, ditpass's parallel VAE beside diffusers' own decodes.

    torchrun --nproc_per_node=4 benchmarks/bench_vae.py --sizes 2048,4096,8192     # ditpass on 4 GPUs
    python benchmarks/bench_vae.py --sizes 2048,4096                                 # 1 GPU: plain, tiled, ditpass
    python benchmarks/bench_vae.py --tiny                                            # CPU smoke run

The model is the FLUX.1 ``AutoencoderKL`` configuration (16 latent channels, 128-256-512-512, two resnets per
block; SD3's has the same decoder), random bf16 weights. Per picture size S (pixels): a latent [1, 16, S/8,
S/8]; each decode is run once to warm up (ditpass: the capture and build), then ``--iters`` times; the
median wall time and ``torch.cuda.max_memory_allocated`` of the timed calls are recorded, per rank. A size
that runs out of memory is recorded as ``oom``. Rows (``--configs``):

- ``plain``: ``vae.decode`` on one GPU (rank 0 only).
- ``tiled``: ``vae.enable_tiling()`` then ``vae.decode`` (diffusers' single-GPU way to fit big pictures:
  overlapping tiles blended, so not the same picture).
- ``distvae``: xDiT's DistVAE (``distvae.modules.adapters.vae.decoder_adapters.DecoderAdapter``, a hand-written
  patch-parallel decoder for this VAE class) over all ranks, where it is installed and there are 2+ ranks.
- ``ditpass``: `ditpass.vae.ParallelDecode` over all ranks (``Plan(dp=N, vae=True)``); its max abs
  difference against ``plain`` where both ran (one GPU: the same graph, no split).

Writes one JSON line per (config, size) to ``$OUT/vae_w<N>.jsonl`` and a Markdown table to ``$OUT/vae_w<N>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sp import import_ditpass  # noqa: E402  (ditpass from this checkout, no install needed)

FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False,
                sample_size=1024)  # (tiling: 1024 px tiles, as FLUX's)
TINY_VAE = dict(FLUX_VAE, block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4)


def log(msg):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.strftime('%H:%M:%S')} bench_vae] {msg}", flush=True)


def build(tiny: bool, device, dtype):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**(TINY_VAE if tiny else FLUX_VAE))
    for p in vae.parameters():  # weights of a scale that keeps activations O(1) layer after layer
        if p.dim() > 1:
            p.data.normal_(0, 0.5 / p[0].numel() ** 0.5)
    return torch.nn.Module.to(vae, dtype).eval().requires_grad_(False)  # (diffusers' .to warns about fp32 modules)


def timed(fn, iters, sync):
    fn()  # warm-up (ditpass: capture and build)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ts, out = [], None
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return out, statistics.median(ts), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--configs", default="plain,tiled,distvae,ditpass")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a small VAE on CPU (checks the script)")
    ap.add_argument("--deadline", type=float, default=500, help="seconds; later rows are recorded as skipped")
    args = ap.parse_args()
    t_start = time.perf_counter()

    ditpass = import_ditpass()
    from ditpass.mesh import init_distributed
    from ditpass.vae import ParallelDecode

    rank, world = init_distributed()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vae = build(args.tiny, device, dtype)
    out_dir = os.environ.get("OUT", "benchmarks/results/raw")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    env = dict(torch=torch.__version__, cuda=torch.version.cuda,
               card=torch.cuda.get_device_name(device) if cuda else "cpu", world=world)
    import diffusers

    env["diffusers"] = diffusers.__version__
    log(f"env {env}")
    configs = args.configs.split(",")
    for size in (int(s) for s in args.sizes.split(",")):
        z = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))
        ref = None
        for cfg in configs:
            row = dict(config=cfg, size=size, **env)
            if time.perf_counter() - t_start > args.deadline:
                row["status"] = "skipped (deadline)"
                rows.append(row)
                continue
            single = cfg in ("plain", "tiled")
            if cfg == "distvae" and world == 1:
                row["status"] = "skipped (needs 2+ ranks)"
                rows.append(row)
                continue
            if single and rank != 0:
                if world > 1:
                    dist.barrier()
                continue
            try:
                if cfg == "plain":
                    vae.disable_tiling()
                    fn = lambda: vae.decode(z, return_dict=False)[0]  # noqa: E731
                elif cfg == "tiled":
                    vae.enable_tiling()
                    fn = lambda: vae.decode(z, return_dict=False)[0]  # noqa: E731
                elif cfg == "distvae":
                    from distvae.modules.adapters.vae.decoder_adapters import DecoderAdapter

                    vae.disable_tiling()
                    own = vae.decoder
                    peer = build(args.tiny, device, dtype)  # its own copy: the adapter rewires the decoder's blocks
                    peer.decoder.load_state_dict(own.state_dict())
                    peer.decoder = DecoderAdapter(peer.decoder, vae_group=dist.group.WORLD)
                    fn = lambda: peer.decode(z, return_dict=False)[0]  # noqa: E731
                else:
                    vae.disable_tiling()
                    dec = ParallelDecode(vae, ditpass.Plan(dp=world, vae=True))
                    fn = lambda: dec(z, return_dict=False)[0]  # noqa: E731
                with torch.no_grad():
                    out, sec, peak = timed(fn, args.iters, sync)
                row.update(status="ok", seconds=round(sec, 4), peak_gib=None if peak is None else round(peak, 2))
                if cfg == "plain":
                    ref = out.float().cpu()
                elif ref is not None:
                    row["max_abs_diff_vs_plain"] = float((out.float().cpu() - ref).abs().max())
                del out
            except torch.OutOfMemoryError:
                row["status"] = "oom"
            finally:
                fn = dec = peer = None  # noqa: F841
                if cuda:
                    torch.cuda.empty_cache()
            if single and world > 1:
                dist.barrier()
            if cfg in ("ditpass", "distvae") and world > 1:  # every rank's peak: the figure is per GPU
                peaks = [None] * world
                dist.all_gather_object(peaks, row.get("peak_gib"))
                row["peak_gib_per_rank"] = peaks
            rows.append(row)
            log(json.dumps(row))
    if rank == 0:
        name = f"vae_w{world}" + ("_tiny" if args.tiny else "")
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        lines = [f"VAE decode, FLUX AutoencoderKL{' (tiny)' if args.tiny else ''}, {env['card']}, {world} rank(s), "
                 f"torch {env['torch']}, diffusers {env['diffusers']}", "",
                 "| config | size | status | seconds | peak GiB per GPU | max abs diff vs plain |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['config']} | {r['size']} | {r['status']} | {r.get('seconds', '')} | "
                         f"{r.get('peak_gib', '')} | {r.get('max_abs_diff_vs_plain', '')} |")
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
