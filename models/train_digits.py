"""Train the built-in "digits" model (see models/DIGITS.md for the recorded run).

    python -m ditpass.models.train_digits            # CPU, 2 threads, about 20 min on a quiet machine
    python -m ditpass.models.train_digits --device cuda --threads 8

1. Data: scikit-learn's `load_digits()` (1797 images, 8x8, grey levels 0..16), bilinear to 32x32, [-1, 1].
2. VAE (`AutoencoderKL`, 1 channel in/out, 2 blocks -> 4x16x16 latent): MSE + small KL.
3. Latents: the VAE posterior (mean, std) of every image, computed once; `scaling_factor` = 1 / std of
   the sampled latents, written into the VAE config as diffusers expects.
4. DiT (`DiTTransformer2DModel`, patch 2 -> 64 tokens, 10 classes + CFG null label 1000):
   epsilon prediction on the DDPM linear schedule (1000 steps), Min-SNR-5 loss weights,
   labels dropped to the null label 1000 with p=0.1 (the same label for every block), EMA weights.
5. Writes weights/digits_{transformer,vae}.safetensors (float16) and weights/digits.json, then loads
   them back through `digits.load_pipeline()` and reports how often an SVC trained on the real digits
   recognises the generated ones.

Deterministic for a given device, thread count and torch build (fixed seeds, no data-order randomness
outside the seeded generators).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ditpass.models import digits

SEED = 0

VAE_CONFIG = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[16, 32],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=1.0,  # replaced by the measured value
)

TRANSFORMER_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    sample_size=16,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,  # DiTPipeline's null label is the hard-coded 1000 -> table of 1001 rows
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
)

DEFAULTS = dict(num_inference_steps=20, guidance_scale=4.0)
NULL_LABEL = 1000
NUM_CLASSES = 10


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def load_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return digits.upscale(X), torch.as_tensor(y, dtype=torch.long), X, y


def train_vae(images, steps, batch, lr, kl_weight, device, gen):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    n = len(images)
    t0, run = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, 50)
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = images[idx].to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run = mse.item() if run is None else 0.98 * run + 0.02 * mse.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step:5d}/{steps}  mse {run:.5f}  kl/elt {kl.item():.4f}  {time.time() - t0:.0f}s")
    return vae.eval(), run, time.time() - t0


@torch.no_grad()
def encode_all(vae, images, device, batch=256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch].to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_dit(mean, std, labels, scale, steps, batch, lr, device, gen, ema_decay=0.999, p_uncond=0.1,
              snr_gamma=5.0, ckpt=None):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    model = DiTTransformer2DModel(**TRANSFORMER_CONFIG)
    # Rows 10..999 of the label tables are never used: zero them (they stay zero, no weight decay).
    with torch.no_grad():
        for block in model.transformer_blocks:
            emb = block.norm1.emb.class_embedder
            emb.embedding_table.weight[NUM_CLASSES:NULL_LABEL].zero_()
            emb.dropout_prob = 0.0  # we drop labels ourselves, once per sample for all blocks
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=SCHEDULER_CONFIG["beta_start"],
                          beta_end=SCHEDULER_CONFIG["beta_end"], beta_schedule="linear")
    abar = sched.alphas_cumprod.to(device)
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
    n = len(mean)
    t0, run = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, 200)
        idx = torch.randint(0, n, (batch,), generator=gen)
        z0 = mean[idx] * scale if std is None else (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        y = labels[idx].clone()
        y[torch.rand(batch, generator=gen) < p_uncond] = NULL_LABEL
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        z0, y, t, eps = z0.to(device), y.to(device), t.to(device), eps.to(device)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = model(zt, timestep=t, class_labels=y).sample
        loss_per = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (loss_per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        run = loss_per.mean().item() if run is None else 0.98 * run + 0.02 * loss_per.mean().item()
        if step % 100 == 0 or step == steps - 1:
            log(f"dit step {step:5d}/{steps}  eps-mse {run:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.time() - t0:.0f}s")
        if ckpt is not None and step > 0 and step % 500 == 0:
            ckpt(ema, step)
    return ema, run, time.time() - t0


def save_weights(out_dir, transformer, vae, scale, info):
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    vae_cfg = dict(VAE_CONFIG, scaling_factor=float(scale))
    for module, fname in ((transformer, "digits_transformer.safetensors"), (vae, "digits_vae.safetensors")):
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}
        save_file(state, os.path.join(out_dir, fname), metadata={"format": "pt", "model": "ditpass digits"})
    cfg = {
        "name": digits.NAME,
        "pipeline": "DiTPipeline",
        "transformer": TRANSFORMER_CONFIG,
        "vae": vae_cfg,
        "scheduler": SCHEDULER_CONFIG,
        "id2label": {str(i): str(i) for i in range(NUM_CLASSES)},
        "defaults": DEFAULTS,
        "data": {
            "source": "sklearn.datasets.load_digits (1797 images, 8x8, 0..16)",
            "image": "bilinear (align_corners=False) to 32x32, x/16*2-1, 1 channel",
            "inverse": "ditpass.models.digits.downscale (pinv of the bilinear map)",
        },
        "training": info,
    }
    with open(os.path.join(out_dir, "digits.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def evaluate(out_dir, X, y, per_class=10, seed=0, grid_path=None):
    """Generate `per_class` digits of every class with the saved weights; SVC accuracy on them."""
    from sklearn.svm import SVC

    clf = SVC(gamma=0.001).fit(X, y)
    pipe = digits.load_pipeline(weights_dir=out_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = [c for _ in range(per_class) for c in range(NUM_CLASSES)]
    imgs = digits.generate(labels, seed=seed, pipe=pipe, output_type="np")
    pred = clf.predict(digits.downscale(imgs).numpy())
    acc = float((pred == np.array(labels)).mean())
    per = {str(c): float((pred[np.array(labels) == c] == c).mean()) for c in range(NUM_CLASSES)}
    if grid_path:
        digits.grid(list(imgs), nrow=NUM_CLASSES).save(grid_path)
    return acc, per


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=digits.WEIGHTS_DIR)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-3)
    ap.add_argument("--dit-steps", type=int, default=4000)
    ap.add_argument("--dit-batch", type=int, default=64)
    ap.add_argument("--dit-lr", type=float, default=6e-4)
    ap.add_argument("--latents", choices=["mean", "sample"], default="mean",
                    help="train the DiT on the VAE posterior means (default) or on posterior samples")
    ap.add_argument("--eval-per-class", type=int, default=10)
    ap.add_argument("--grid", default="/tmp/digits_grid.png")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    t_start = time.time()
    images, labels, X, y = load_data()
    log(f"data: {tuple(images.shape)} in [{images.min():.2f}, {images.max():.2f}], threads {args.threads}, "
        f"device {args.device}")

    vae, vae_mse, vae_s = train_vae(images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight,
                                    args.device, gen)
    mean, std = encode_all(vae, images, args.device)
    z = mean if args.latents == "mean" else mean + std * torch.randn(mean.shape, generator=gen)
    scale = 1.0 / z.std().item()
    with torch.no_grad():
        rec = vae.decode(mean[:512].to(args.device)).sample.cpu()
    rec_err = float((digits.downscale(rec / 2 + 0.5) - torch.as_tensor(X[:512])).abs().mean())
    log(f"latents {tuple(mean.shape)}: std {z.std():.3f} -> scaling_factor {scale:.4f}, mean posterior std "
        f"{std.mean():.3f}; VAE recon error on the 0..16 scale (8x8) {rec_err:.3f}")

    def info(dit_steps_done, dit_loss, dit_s):
        return {
            "seed": SEED, "device": args.device, "threads": args.threads, "torch": torch.__version__,
            "vae": {"steps": args.vae_steps, "batch": args.vae_batch, "lr": args.vae_lr,
                    "kl_weight": args.kl_weight, "final_mse": round(vae_mse, 6), "seconds": round(vae_s),
                    "recon_mae_0_16": round(rec_err, 4)},
            "dit": {"steps": dit_steps_done, "batch": args.dit_batch, "lr": args.dit_lr, "ema": 0.999,
                    "p_uncond": 0.1, "min_snr_gamma": 5.0, "latents": "posterior " + args.latents, "objective": "epsilon, DDPM linear 1e-4..0.02",
                    "final_eps_mse": round(dit_loss, 5) if dit_loss is not None else None,
                    "seconds": round(dit_s)},
        }

    def ckpt(ema, step):
        save_weights(args.out, ema, vae, scale, info(step, None, time.time() - t_start))
        acc, _ = evaluate(args.out, X, y, per_class=3)
        log(f"checkpoint at step {step}: classifier accuracy {acc:.3f} on 30 samples")

    ema, dit_loss, dit_s = train_dit(mean, None if args.latents == "mean" else std, labels, scale, args.dit_steps, args.dit_batch, args.dit_lr,
                                     args.device, gen, ckpt=ckpt)
    meta = info(args.dit_steps, dit_loss, dit_s)
    meta["total_seconds"] = round(time.time() - t_start)
    save_weights(args.out, ema, vae, scale, meta)
    acc, per = evaluate(args.out, X, y, per_class=args.eval_per_class, grid_path=args.grid)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    log(f"done in {time.time() - t_start:.0f}s; weights {size / 1e6:.2f} MB in {args.out}; "
        f"SVC accuracy on {args.eval_per_class * NUM_CLASSES} generated digits: {acc:.3f}  per class {per}")
    meta["eval"] = {"samples": args.eval_per_class * NUM_CLASSES, "seed": 0, **DEFAULTS, "svc_accuracy": acc,
                    "per_class": per}
    save_weights(args.out, ema, vae, scale, meta)


if __name__ == "__main__":
    main()
