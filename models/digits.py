"""The built-in "digits" model: a small class-conditional DiT that draws handwritten digits 0-9.

A `DiTTransformer2DModel` and an `AutoencoderKL` (plain diffusers classes) run by diffusers' own
`DiTPipeline` with classifier-free guidance. Trained by `models/train_digits.py` on scikit-learn's
8x8 digits, upscaled bilinearly to 32x32 grey images; the VAE maps them to a 4x16x16 latent, which the
DiT (patch 2) sees as 64 tokens. Weights ship in `weights/` (safetensors, float16 on disk) with the
configs in `weights/digits.json`; nothing is downloaded. See `models/DIGITS.md`.

    from ditpass.models.digits import load_pipeline
    pipe = load_pipeline()
    images = pipe(pipe.get_label_ids(["3", "7"]), num_inference_steps=20, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).images   # PIL, mode "L", 32x32

The DiT's label table has 1001 rows because `DiTPipeline` hard-codes class 1000 as the null
("unconditional") label: `num_embeds_ada_norm=1000`, the table is `num_classes + 1` rows, row 1000 is
the CFG null embedding. Only rows 0-9 and 1000 are trained; rows 10-999 are zero.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache

import torch
import torch.nn.functional as F

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
CONFIG_FILE = os.path.join(WEIGHTS_DIR, "digits.json")
TRANSFORMER_FILE = os.path.join(WEIGHTS_DIR, "digits_transformer.safetensors")
VAE_FILE = os.path.join(WEIGHTS_DIR, "digits_vae.safetensors")

NAME = "digits"
LABELS = [str(i) for i in range(10)]
ID2LABEL = {i: s for i, s in enumerate(LABELS)}
DATA_SIZE = 8    # load_digits() images are 8x8 ...
IMAGE_SIZE = 32  # ... upscaled to 32x32 for the VAE
GREY_LEVELS = 16  # load_digits() pixels are 0..16


# ----------------------------------------------------------------------------------------------
# data mapping (shared by the training script and the tests)

@lru_cache(maxsize=None)
def _bilinear_1d(n_in: int = DATA_SIZE, n_out: int = IMAGE_SIZE) -> torch.Tensor:
    """The (n_out, n_in) matrix of 1-D linear upsampling (align_corners=False), float64."""
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False).view(n_in, n_out).T.contiguous()


def upscale(digits) -> torch.Tensor:
    """load_digits() rows (N, 64) or (N, 8, 8) on the 0..16 scale -> (N, 1, 32, 32) in [-1, 1].

    Bilinear upsampling (align_corners=False), i.e. `F.interpolate(x, 32, mode="bilinear")`,
    written as the separable matrix A (32x8): img = A @ x @ A.T.
    """
    x = torch.as_tensor(digits, dtype=torch.float64).reshape(-1, DATA_SIZE, DATA_SIZE) / GREY_LEVELS
    a = _bilinear_1d()
    img = a @ x @ a.T
    return (img * 2 - 1).unsqueeze(1).float()


def downscale(images) -> torch.Tensor:
    """Inverse of `upscale`: images in [0, 1] (what DiTPipeline returns: (N, 32, 32, 1) numpy, a list of
    PIL images, or an (N, 1, 32, 32) tensor) -> (N, 64) float64 on load_digits()' 0..16 scale.

    Least-squares inverse of the bilinear map, pinv(A) @ img @ pinv(A).T, so
    downscale(upscale(x) / 2 + 0.5) == x up to float rounding. Clipped to [0, 16].
    """
    if isinstance(images, (list, tuple)):
        import numpy as np

        images = np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])
    t = torch.as_tensor(images, dtype=torch.float64)
    if t.dim() == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):  # NHWC numpy from the pipeline
        t = t.permute(0, 3, 1, 2)
    if t.dim() == 4:
        t = t.mean(1)  # (N, H, W)
    p = torch.linalg.pinv(_bilinear_1d())
    x = p @ t @ p.T * GREY_LEVELS
    return x.clamp(0, GREY_LEVELS).reshape(len(x), -1)


# ----------------------------------------------------------------------------------------------
# loading

def read_config(path: str = CONFIG_FILE) -> dict:
    with open(path) as f:
        return json.load(f)


def build_modules(cfg: dict):
    """Fresh (untrained) transformer, VAE and scheduler from the json configs."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel, DPMSolverMultistepScheduler

    transformer = DiTTransformer2DModel(**cfg["transformer"])
    vae = AutoencoderKL(**cfg["vae"])
    scheduler = DPMSolverMultistepScheduler(**cfg["scheduler"])
    return transformer, vae, scheduler


def load_pipeline(device="cpu", dtype: torch.dtype = torch.float32, weights_dir: str | None = None):
    """diffusers' `DiTPipeline` with the built-in digits weights (no hub access).

    `pipe.get_label_ids(["3"]) == [3]`; `pipe.labels` maps "0".."9" to 0..9.
    """
    from diffusers import DiTPipeline
    from safetensors.torch import load_file

    wdir = weights_dir or WEIGHTS_DIR
    cfg = read_config(os.path.join(wdir, "digits.json"))
    transformer, vae, scheduler = build_modules(cfg)
    for module, fname in ((transformer, "digits_transformer.safetensors"), (vae, "digits_vae.safetensors")):
        state = load_file(os.path.join(wdir, fname))
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        module.eval().requires_grad_(False)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                       id2label={int(k): v for k, v in cfg["id2label"].items()})
    pipe.digits_defaults = dict(cfg["defaults"])  # num_inference_steps, guidance_scale
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe


def defaults() -> dict:
    """Default sampling settings recorded with the weights: num_inference_steps, guidance_scale."""
    return dict(read_config()["defaults"])


def generate(labels, seed: int = 0, steps: int | None = None, guidance_scale: float | None = None, *,
             pipe=None, output_type: str = "pil", device="cpu", dtype: torch.dtype = torch.float32):
    """Draw one digit per label. `labels`: digit names ("3") or ids (3), a list or a single one.

    Returns what `DiTPipeline` returns for `output_type` ("pil": list of 32x32 mode-"L" images,
    "np": (N, 32, 32, 1) in [0, 1], "pt": (N, 1, 32, 32)).
    """
    pipe = pipe if pipe is not None else load_pipeline(device=device, dtype=dtype)
    d = getattr(pipe, "digits_defaults", None) or defaults()
    if not isinstance(labels, (list, tuple)):
        labels = [labels]
    ids = [int(v) if isinstance(v, int) else pipe.get_label_ids([str(v)])[0] for v in labels]
    gen = torch.Generator(device=pipe._execution_device).manual_seed(int(seed))
    out = pipe(class_labels=ids, guidance_scale=d["guidance_scale"] if guidance_scale is None else guidance_scale,
               num_inference_steps=d["num_inference_steps"] if steps is None else steps,
               generator=gen, output_type=output_type)
    return out.images


def grid(images, nrow: int = 10, pad: int = 2, scale: int = 2):
    """Tile PIL / numpy images into one PIL image (for looking at samples)."""
    import numpy as np
    from PIL import Image

    if not isinstance(images, (list, tuple)):
        images = list(images)
    arrs = [np.asarray(im, dtype=np.float32) / (255.0 if isinstance(im, Image.Image) else 1.0) for im in images]
    arrs = [a[..., 0] if a.ndim == 3 else a for a in arrs]
    h, w = arrs[0].shape
    ncol = nrow
    nr = (len(arrs) + ncol - 1) // ncol
    canvas = np.full((nr * (h + pad) + pad, ncol * (w + pad) + pad), 0.5, dtype=np.float32)
    for i, a in enumerate(arrs):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a
    img = Image.fromarray((canvas.clip(0, 1) * 255).round().astype("uint8"), mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img
