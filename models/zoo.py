"""Model zoo: 12 real diffusers DiT classes, each with a tiny and a published full-size config, and every
other DiT denoiser diffusers exports at tiny size (``MORE_NAMES``).

API (others code against these names)::

    NAMES                                   the 12 diffusers class names
    MORE_NAMES, ALL_NAMES                   the tiny-only classes; NAMES + MORE_NAMES
    EXCLUDED, PENDING                       {class: why} not a denoiser / not in the zoo yet
    build(name, size="tiny", *, device="cpu", dtype=torch.float32, seed=0) -> nn.Module (eval)
    make_inputs(name, size="tiny", *, height=None, width=None, frames=None, text_len=None,
                batch=1, device="cpu", dtype=torch.float32, seed=0) -> dict of forward kwargs
    dynamic_dims(name, size="tiny", **same_kwargs_as_make_inputs) -> dynamic_shapes for torch.export
    describe(name) -> {"pipeline_class", "video", "text_kwarg", "image_kwarg", ...}

Sizes: ``"tiny"`` (random weights, 2+ blocks of every kind, 4 heads, CPU forward well under a
second) and ``"full"`` (the published config, see ``FULL_SOURCES``); Wan also has ``"full14b"``.
``build(..., size="full", device="meta")`` builds under ``torch.device("meta")`` in about a second.

``height``/``width`` are in pixels of the image the pipeline would decode; ``frames`` is the
number of video frames the pipeline would decode (``num_frames``). The builder divides by the
VAE factors (spatial 8, LTX 32; temporal: CogVideoX/Wan/HunyuanVideo 4, Mochi 6, LTX 8, Latte 1
with ``latent_frames = (frames - 1) // t + 1``) and the patch size, exactly like the diffusers
pipelines. Sizes that do not divide raise ``ValueError`` saying what to change.

Dynamic dims (``dynamic_dims``) use ``torch.export.Dim`` named ``"H"``, ``"W"`` (token-grid rows
and columns, i.e. latent size / patch size), ``"F"`` (latent frames / temporal patch) and ``"T"``
(text tokens). Inputs that hold the latent with the patch not yet applied use derived dims
``p*H``. Models whose inputs are already flattened token sequences (FLUX's packed latents) use one
Dim ``"HW"`` for the image token count, since ``H*W`` is not expressible as a derived Dim; inputs
whose length is a product such as ``F*H*W`` (precomputed RoPE tables) get ``Dim.AUTO``. Dims that
cannot be dynamic are left out and the reason is in ``STATIC_REASONS``; dims that torch.export
accepts but that the model code guards to the example size are described in ``GUARDED``
(see models/EXPORT_NOTES.md).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

__all__ = [
    "NAMES",
    "MORE_NAMES",
    "ALL_NAMES",
    "EXCLUDED",
    "PENDING",
    "SIZES",
    "FULL_SOURCES",
    "PUBLISHED_PARAMS",
    "STATIC_REASONS",
    "GUARDED",
    "build",
    "config",
    "add_size",
    "make_inputs",
    "dynamic_dims",
    "describe",
]

NAMES: list[str] = [
    "FluxTransformer2DModel",
    "SD3Transformer2DModel",
    "PixArtTransformer2DModel",
    "HunyuanDiT2DModel",
    "CogVideoXTransformer3DModel",
    "LatteTransformer3DModel",
    "MochiTransformer3DModel",
    "DiTTransformer2DModel",
    "WanTransformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "QwenImageTransformer2DModel",
    "LTXVideoTransformer3DModel",
]

# Every other DiT denoiser that diffusers exports, tiny size only (random weights; see the section
# "More diffusers DiTs" at the end). NAMES stays the first twelve: tests that run every plan on
# every model (test_sequence_parallel, test_capture, ...) are sized for those; the sweep
# (benchmarks/sweep_zoo.py) and tests/test_zoo_sweep.py cover ALL_NAMES.
MORE_NAMES: list[str] = []  # filled at the end of the file, with EXCLUDED and PENDING
ALL_NAMES: list[str] = list(NAMES)

# --------------------------------------------------------------------------------------------
# Configs. "full" values are the published transformer/config.json of the named HF repo (only
# keys that differ from the diffusers class defaults matter, but the main ones are spelled out).
# --------------------------------------------------------------------------------------------

FULL_SOURCES: dict[str, dict[str, str]] = {
    "FluxTransformer2DModel": {"full": "black-forest-labs/FLUX.1-dev"},
    "SD3Transformer2DModel": {"full": "stabilityai/stable-diffusion-3-medium-diffusers"},
    "PixArtTransformer2DModel": {"full": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"},
    "HunyuanDiT2DModel": {"full": "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"},
    "CogVideoXTransformer3DModel": {"full": "THUDM/CogVideoX-5b"},
    "LatteTransformer3DModel": {"full": "maxin-cn/Latte-1"},
    "MochiTransformer3DModel": {"full": "genmo/mochi-1-preview"},
    "DiTTransformer2DModel": {"full": "facebook/DiT-XL-2-256"},
    "WanTransformer3DModel": {
        "full": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "full14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    },
    "HunyuanVideoTransformer3DModel": {"full": "hunyuanvideo-community/HunyuanVideo"},
    "QwenImageTransformer2DModel": {"full": "Qwen/Qwen-Image"},
    "LTXVideoTransformer3DModel": {"full": "Lightricks/LTX-Video"},
}

# Published (nominal) parameter counts of the transformer, for ballpark tests (+-10%).
PUBLISHED_PARAMS: dict[tuple[str, str], float] = {
    ("FluxTransformer2DModel", "full"): 11.9e9,
    ("SD3Transformer2DModel", "full"): 2.0e9,
    ("PixArtTransformer2DModel", "full"): 0.6e9,
    ("HunyuanDiT2DModel", "full"): 1.5e9,
    ("CogVideoXTransformer3DModel", "full"): 5.6e9,
    ("LatteTransformer3DModel", "full"): 1.06e9,  # no official figure; 28 spatial + 28 temporal blocks
    ("MochiTransformer3DModel", "full"): 10.0e9,
    # paper: 675M; the diffusers layout stores the timestep/class embedder in every block's
    # AdaLayerNormZero (28 copies, +75M), which is what facebook/DiT-XL-2-256 ships.
    ("DiTTransformer2DModel", "full"): 750e6,
    ("WanTransformer3DModel", "full"): 1.4e9,
    ("WanTransformer3DModel", "full14b"): 14.0e9,
    ("HunyuanVideoTransformer3DModel", "full"): 13.0e9,
    ("QwenImageTransformer2DModel", "full"): 20.0e9,
    ("LTXVideoTransformer3DModel", "full"): 1.9e9,
}

_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "FluxTransformer2DModel": {
        "tiny": dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                     attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                     pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        "full": dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    },
    "SD3Transformer2DModel": {
        "tiny": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                     num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32),
        "full": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                     num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                     pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    },
    "PixArtTransformer2DModel": {
        "tiny": dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     cross_attention_dim=32, attention_bias=True, sample_size=16, patch_size=2,
                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
                     use_additional_conditions=False, caption_channels=32),
        "full": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
                     use_additional_conditions=False, caption_channels=4096),
    },
    "HunyuanDiT2DModel": {
        # num_layers must be even (skip connections pop what the first half pushed); 6 gives
        # 4 plain blocks and 2 skip blocks.
        "tiny": dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, patch_size=2,
                     activation_fn="gelu-approximate", sample_size=16, hidden_size=32, num_layers=6,
                     mlp_ratio=4.0, learn_sigma=True, cross_attention_dim=32, norm_type="layer_norm",
                     cross_attention_dim_t5=32, pooled_projection_dim=32, text_len=8, text_len_t5=16,
                     use_style_cond_and_image_meta_size=False),
        "full": dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
                     activation_fn="gelu-approximate", sample_size=128, hidden_size=1408, num_layers=40,
                     mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024, norm_type="layer_norm",
                     cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                     use_style_cond_and_image_meta_size=False),
    },
    "CogVideoXTransformer3DModel": {
        "tiny": dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                     time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8,
                     sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
                     use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False),
        "full": dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                     flip_sin_to_cos=True, freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=42,
                     sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                     temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
                     timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5,
                     spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
                     use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False),
    },
    "LatteTransformer3DModel": {
        "tiny": dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2,
                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=32, video_length=4),
        "full": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     cross_attention_dim=1152, attention_bias=True, sample_size=64, patch_size=2,
                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, video_length=16),
    },
    "MochiTransformer3DModel": {
        "tiny": dict(patch_size=2, num_attention_heads=4, attention_head_dim=16, num_layers=2,
                     pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm="rms_norm",
                     text_embed_dim=32, time_embed_dim=16, activation_fn="swiglu", max_sequence_length=16),
        "full": dict(patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48,
                     pooled_projection_dim=1536, in_channels=12, out_channels=None, qk_norm="rms_norm",
                     text_embed_dim=4096, time_embed_dim=256, activation_fn="swiglu", max_sequence_length=256),
    },
    "DiTTransformer2DModel": {
        "tiny": dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
        "full": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     sample_size=32, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                     norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5),
    },
    "WanTransformer3DModel": {
        "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                     out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "full": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                     out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "full14b": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    },
    "HunyuanVideoTransformer3DModel": {
        "tiny": dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
                     num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
                     rope_theta=256.0, rope_axes_dim=(4, 6, 6)),
        "full": dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                     rope_theta=256.0, rope_axes_dim=(16, 56, 56)),
    },
    "QwenImageTransformer2DModel": {
        "tiny": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                     num_attention_heads=4, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
        "full": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                     axes_dims_rope=(16, 56, 56)),
    },
    "LTXVideoTransformer3DModel": {
        "tiny": dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                     attention_head_dim=8, cross_attention_dim=32, num_layers=2, activation_fn="gelu-approximate",
                     qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6,
                     caption_channels=32, attention_bias=True, attention_out_bias=True),
        "full": dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                     attention_head_dim=64, cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate",
                     qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6,
                     caption_channels=4096, attention_bias=True, attention_out_bias=True),
    },
}

# Pipeline facts: VAE factors, default pixel size / frames / text length per size, text kwargs.
# spatial: VAE spatial factor; temporal: VAE temporal factor (None for image models, 1 for Latte's
# per-frame VAE); pack: extra 2x2 packing done by the pipeline outside the transformer (FLUX, Qwen).
_INFO: dict[str, dict[str, Any]] = {
    "FluxTransformer2DModel": dict(pipeline="FluxPipeline", spatial=8, temporal=None, pack=2, latent_ch_div=4,
                                   text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                   tiny=(128, 128, None, 16), full=(1024, 1024, None, 512)),
    "SD3Transformer2DModel": dict(pipeline="StableDiffusion3Pipeline", spatial=8, temporal=None,
                                  text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                  tiny=(128, 128, None, 16), full=(1024, 1024, None, 333)),
    "PixArtTransformer2DModel": dict(pipeline="PixArtSigmaPipeline", spatial=8, temporal=None,
                                     text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                     tiny=(128, 128, None, 16), full=(1024, 1024, None, 300)),
    "HunyuanDiT2DModel": dict(pipeline="HunyuanDiTPipeline", spatial=8, temporal=None,
                              text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                              tiny=(128, 128, None, None), full=(1024, 1024, None, None)),
    "CogVideoXTransformer3DModel": dict(pipeline="CogVideoXPipeline", spatial=8, temporal=4,
                                        text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                        tiny=(64, 64, 9, 16), full=(480, 720, 49, 226)),
    "LatteTransformer3DModel": dict(pipeline="LattePipeline", spatial=8, temporal=1,
                                    text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                    tiny=(64, 64, 4, 16), full=(512, 512, 16, 120)),
    "MochiTransformer3DModel": dict(pipeline="MochiPipeline", spatial=8, temporal=6,
                                    text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                    tiny=(64, 64, 13, 16), full=(480, 848, 19, 256)),
    "DiTTransformer2DModel": dict(pipeline="DiTPipeline", spatial=8, temporal=None,
                                  text_kwarg=None, image_kwarg="hidden_states",
                                  tiny=(128, 128, None, None), full=(256, 256, None, None)),
    "WanTransformer3DModel": dict(pipeline="WanPipeline", spatial=8, temporal=4,
                                  text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                  tiny=(64, 64, 9, 16), full=(480, 832, 81, 512), full14b=(720, 1280, 81, 512)),
    "HunyuanVideoTransformer3DModel": dict(pipeline="HunyuanVideoPipeline", spatial=8, temporal=4,
                                           text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                           tiny=(64, 64, 9, 16), full=(720, 1280, 129, 256)),
    "QwenImageTransformer2DModel": dict(pipeline="QwenImagePipeline", spatial=8, temporal=None, pack=2,
                                        latent_ch_div=4, text_kwarg="encoder_hidden_states",
                                        image_kwarg="hidden_states",
                                        tiny=(128, 128, None, 16), full=(1024, 1024, None, 512)),
    "LTXVideoTransformer3DModel": dict(pipeline="LTXPipeline", spatial=32, temporal=8,
                                       text_kwarg="encoder_hidden_states", image_kwarg="hidden_states",
                                       tiny=(128, 128, 17, 16), full=(512, 704, 161, 128)),
}

# Dims that cannot be dynamic in torch.export, and why (dynamic_dims leaves them out).
STATIC_REASONS: dict[str, dict[str, str]] = {
    "HunyuanDiT2DModel": {
        "T": "text lengths are fixed by config (text_len + text_len_t5): the learned "
             "text_embedding_padding parameter and the T5 attention pooler's positional embedding have that size",
    },
    "LatteTransformer3DModel": {
        "F": "temp_pos_embed is a buffer of length config.video_length added to the frame axis: frames must equal it",
    },
    "QwenImageTransformer2DModel": {
        "HW": "img_shapes is a Python list of ints that drives the RoPE table size, so the image token "
              "count is specialized at export",
        "T": "QwenEmbedRope.forward calls int(max_txt_seq_len) on the text length (a SymInt), which "
             "specializes it (export: 'Constraints violated (T) ... specialized it to be a constant')",
    },
    "LTXVideoTransformer3DModel": {
        "F": "num_frames/height/width are Python ints that build the RoPE grid, so F, H, W are specialized",
        "H": "see F",
        "W": "see F",
    },
    "SanaWMTransformer3DModel": {
        "F": "the GDN scan splits the frame axis into chunks with Python ints (torch_chunk_sana_gdn: "
             "`list(range(0, T, chunk_size))`), so export specializes the latent frame count",
        "H": "the camera branch builds its ray grid with torch.linspace(0, height - 1, height) (create_grid, from "
             "_process_camera_conditions_ucpe), which specializes the token grid",
        "W": "see H",
    },
}


# Dims that export *accepts* as dynamic but that the model code guards, so the exported program
# only runs at sizes that satisfy the guard (torch.export does not flag these: the guards are on
# ``size // p`` of a derived dim). Found by running the exported program at a second size.
GUARDED: dict[str, str] = {
    "PixArtTransformer2DModel": "PatchEmbed recomputes the sin-cos table only when the grid differs from "
                                "config.sample_size (`if self.height != height`): at the config size H, W are "
                                "specialized; at other sizes the program keeps guards such as H % W != 0",
    "LatteTransformer3DModel": "same PatchEmbed branch as PixArt: H, W specialized at config.sample_size, "
                               "guarded (H % W) elsewhere",
    "DiTTransformer2DModel": "unpatchify uses int(num_tokens ** 0.5) (square images only): guard "
                             "trunc(sqrt(H*W)) == example, so H, W are effectively static (the blocks still "
                             "carry symbolic token counts)",
    "MochiTransformer3DModel": "MochiRoPE builds positions with torch.linspace(..., steps=H + 1): guards H and W "
                               "to the example; F and T stay dynamic. The text mask goes through "
                               "torch.nonzero (unbacked size), which export handles",
}


def _cls(name: str):
    import diffusers

    if name not in ALL_NAMES:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {ALL_NAMES}")
    return getattr(diffusers, name)


def _sizes(name: str) -> list[str]:
    return list(_CONFIGS[name])


SIZES: dict[str, list[str]] = {n: list(_CONFIGS[n]) for n in NAMES}  # MORE_NAMES: added at the end


def add_size(name: str, size: str, cfg: dict) -> None:
    """Make a config of a zoo class usable like the zoo's own sizes (``build``, ``make_inputs``,
    ``dynamic_dims``): e.g. the config.json of a user's saved model (keys starting with ``_`` dropped).
    Its default geometry is the ``full`` size's."""
    if name not in ALL_NAMES:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {ALL_NAMES}")
    _CONFIGS[name][size] = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if size not in SIZES[name]:
        SIZES[name].append(size)


def config(name: str, size: str = "tiny") -> dict:
    """The full init config (class defaults overlaid with the zoo's values) without building."""
    cls = _cls(name)
    if size not in _CONFIGS[name]:
        raise ValueError(f"{name} has sizes {_sizes(name)}, not {size!r}")
    sig = inspect.signature(cls.__init__)
    cfg = {k: p.default for k, p in sig.parameters.items()
           if k != "self" and p.default is not inspect.Parameter.empty}
    cfg.update(_CONFIGS[name][size])
    return cfg


def build(name: str, size: str = "tiny", *, device="cpu", dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    """Instantiate the real diffusers class with the zoo config, in eval mode.

    Weights are random (seeded) on real devices; ``device="meta"`` builds without memory.
    """
    cls = _cls(name)
    if size not in _CONFIGS[name]:
        raise ValueError(f"{name} has sizes {_sizes(name)}, not {size!r}")
    kwargs = dict(_CONFIGS[name][size])
    dev = torch.device(device)
    if dev.type == "meta":
        with torch.device("meta"):
            model = cls(**kwargs)
        return _cast(model, dtype).eval()
    devices = [dev] if dev.type == "cuda" and dev.index is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = cls(**kwargs)
        # Re-initialise every parameter from a seeded generator (fan-in scaled), so outputs are
        # well scaled and independent of each class's init code (some start at zeros or ones).
        _reinit_(model, seed)
    model = _cast(model.to(device=dev), dtype).eval()
    warm = _INFO.get(name, {}).get("warm")  # fills a model-side cache the first forward would build slowly
    if warm is not None:
        warm(model, name, size)
    return model


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters and buffers to ``dtype``, keeping the class's
    ``_keep_in_fp32_modules`` in float32 as ``from_pretrained(torch_dtype=...)`` does."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            parts = mod_name.split(".") if mod_name else []
            target = torch.float32 if keep and any(k in parts for k in keep) else dtype
            for pname, prm in mod.named_parameters(recurse=False):
                if prm.is_floating_point() and prm.dtype != target:
                    prm.data = prm.data.to(target)
            for bname, buf in mod.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point() and buf.dtype != target:
                    mod._buffers[bname] = buf.to(target)
    return model


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for pname, p in model.named_parameters():
        if p.numel() == 0:  # e.g. an unused expert slot (NucleusMoE's dense blocks)
            continue
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        elif "norm" in pname and pname.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


class _Gen:
    """Deterministic tensor source; produces empty tensors on the meta device."""

    def __init__(self, seed: int, device, dtype):
        self.g = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self.meta = self.device.type == "meta"

    def randn(self, *shape, dtype=None):
        dtype = dtype or self.dtype
        if self.meta:
            return torch.empty(shape, device="meta", dtype=dtype)
        return torch.randn(shape, generator=self.g).to(device=self.device, dtype=dtype)

    def rand(self, *shape, scale=1.0, dtype=None):
        dtype = dtype or self.dtype
        if self.meta:
            return torch.empty(shape, device="meta", dtype=dtype)
        return (torch.rand(shape, generator=self.g) * scale).to(device=self.device, dtype=dtype)

    def randint(self, high, *shape):
        if self.meta:
            return torch.empty(shape, device="meta", dtype=torch.long)
        return torch.randint(0, high, shape, generator=self.g).to(self.device)

    def full(self, shape, value, dtype=None):
        return torch.full(shape, value, device=self.device, dtype=dtype or self.dtype)

    def mask(self, batch, length, dtype):
        """Text attention mask: the last quarter is padding (realistic, exercises masking)."""
        if self.meta:
            return torch.empty((batch, length), device="meta", dtype=dtype)
        valid = max(1, length - length // 4)
        m = torch.zeros(batch, length, dtype=dtype)
        m[:, :valid] = 1
        return m.to(self.device)

    def const(self, t: torch.Tensor):
        return t.to(device=self.device)


def _div(value: int, factor: int, what: str, name: str) -> int:
    if value % factor:
        raise ValueError(f"{name}: {what}={value} must be a multiple of {factor}")
    return value // factor


def _geometry(name: str, size: str, height, width, frames, text_len) -> dict:
    """Pixel sizes -> latent and token-grid sizes, like the pipeline does."""
    info = _INFO[name]
    cfg = config(name, size)
    key = size if size in info else ("tiny" if size == "tiny" else "full")
    dh, dw, df, dt = info[key]
    height = dh if height is None else height
    width = dw if width is None else width
    frames = df if frames is None else frames
    text_len = dt if text_len is None else text_len

    if "patch" in info:  # MORE_NAMES: (temporal, spatial) patch, whatever the config calls them
        pt, p = info["patch"]
    elif name == "WanTransformer3DModel":
        pt, p, _ = cfg["patch_size"]
    else:
        p = cfg.get("patch_size") or 1
        pt = cfg.get("patch_size_t") or 1
    p_space = info.get("pack", p)  # FLUX/Qwen: the pipeline packs 2x2, the transformer's patch is 1
    s = info["spatial"]
    lat_h = _div(height, s * p_space, "height", name) * p_space
    lat_w = _div(width, s * p_space, "width", name) * p_space
    geo = dict(height=height, width=width, lat_h=lat_h, lat_w=lat_w, H=lat_h // p_space, W=lat_w // p_space,
               p=p_space, text_len=text_len, frames=None, lat_f=None, F=None, pt=pt)
    if info["temporal"] is not None:
        t = info["temporal"]
        if frames is None:
            raise ValueError(f"{name} is a video model: pass frames")
        if t > 1 and (frames - 1) % t:
            raise ValueError(f"{name}: frames={frames} must be 1 + a multiple of {t}")
        lat_f = (frames - 1) // t + 1 if t > 1 else frames
        geo.update(frames=frames, lat_f=lat_f, F=_div(lat_f, pt, "latent frames", name))
    if name == "HunyuanDiT2DModel":
        fixed = cfg["text_len"] + cfg["text_len_t5"]
        if text_len not in (None, fixed):
            raise ValueError(f"{name}: text length is fixed by config to text_len + text_len_t5 = {fixed}")
        geo["text_len"] = fixed
    if name == "LatteTransformer3DModel" and geo["lat_f"] not in (1, cfg["video_length"]):
        raise ValueError(f"{name}: frames must equal config video_length={cfg['video_length']} (or 1)")
    return geo


def make_inputs(name: str, size: str = "tiny", *, height=None, width=None, frames=None, text_len=None,
                batch: int = 1, device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """Keyword inputs of ``model.forward`` as the diffusers pipeline would pass them (return_dict=False)."""
    cfg = config(name, size)
    geo = _geometry(name, size, height, width, frames, text_len)
    gen = _Gen(seed, device, dtype)
    return _BUILDERS[name](cfg, geo, gen, batch)


def _flux(cfg, geo, gen, B):
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    ids = torch.zeros(H, W, 3)
    ids[..., 1] = torch.arange(H)[:, None]
    ids[..., 2] = torch.arange(W)[None, :]
    return dict(
        hidden_states=gen.randn(B, H * W, cfg["in_channels"]),
        encoder_hidden_states=gen.randn(B, T, cfg["joint_attention_dim"]),
        pooled_projections=gen.randn(B, cfg["pooled_projection_dim"]),
        timestep=gen.rand(B),  # the pipeline passes t / 1000
        img_ids=gen.const(ids.reshape(H * W, 3).to(gen.dtype)),
        txt_ids=gen.const(torch.zeros(T, 3, dtype=gen.dtype)),
        guidance=gen.full((B,), 3.5) if cfg["guidance_embeds"] else None,
        return_dict=False,
    )


def _sd3(cfg, geo, gen, B):
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
        encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["joint_attention_dim"]),
        pooled_projections=gen.randn(B, cfg["pooled_projection_dim"]),
        timestep=gen.rand(B, scale=1000.0),
        return_dict=False,
    )


def _pixart(cfg, geo, gen, B):
    T = geo["text_len"]
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
        encoder_hidden_states=gen.randn(B, T, cfg["caption_channels"]),
        encoder_attention_mask=gen.mask(B, T, torch.long),
        timestep=gen.rand(B, scale=1000.0),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def _crop_region(src, tgt_width, tgt_height, square_base=False):
    """``get_resize_crop_region_for_grid`` of the HunyuanDiT / CogVideoX pipelines (same math;
    HunyuanDiT compares the aspect ratio with 1, CogVideoX with the base grid's). Reimplemented to
    avoid importing the pipeline modules (they pull in transformers)."""
    tw, th = tgt_width, tgt_height
    h, w = src
    r = h / w
    if r > (1.0 if square_base else th / tw):
        resize_height = th
        resize_width = int(round(th / h * w))
    else:
        resize_width = tw
        resize_height = int(round(tw / w * h))
    crop_top = int(round((th - resize_height) / 2.0))
    crop_left = int(round((tw - resize_width) / 2.0))
    return (crop_top, crop_left), (crop_top + resize_height, crop_left + resize_width)


def _hunyuandit(cfg, geo, gen, B):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    H, W = geo["H"], geo["W"]
    base = 512 // 8 // cfg["patch_size"]
    crops = _crop_region((H, W), base, base, square_base=True)
    cos, sin = get_2d_rotary_pos_embed(cfg["attention_head_dim"], crops, (H, W), output_type="pt")
    L1, L2 = cfg["text_len"], cfg["text_len_t5"]
    meta = torch.tensor([[geo["height"], geo["width"], geo["height"], geo["width"], 0, 0]] * B, dtype=gen.dtype)
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
        timestep=gen.rand(B, scale=1000.0),
        encoder_hidden_states=gen.randn(B, L1, cfg["cross_attention_dim"]),
        text_embedding_mask=gen.mask(B, L1, torch.long),
        encoder_hidden_states_t5=gen.randn(B, L2, cfg["cross_attention_dim_t5"]),
        text_embedding_mask_t5=gen.mask(B, L2, torch.long),
        image_meta_size=gen.const(meta),
        style=gen.const(torch.zeros(B, dtype=torch.long)),
        image_rotary_emb=(gen.const(cos), gen.const(sin)),  # float32, as the pipeline passes it
        return_dict=False,
    )


def _cogvideox(cfg, geo, gen, B):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    out = dict(
        hidden_states=gen.randn(B, geo["lat_f"], cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
        encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_embed_dim"]),
        timestep=gen.rand(B, scale=1000.0),
    )
    if cfg["use_rotary_positional_embeddings"]:
        p = cfg["patch_size"]
        H, W = geo["H"], geo["W"]
        if cfg.get("patch_size_t") is None:
            crops = _crop_region((H, W), cfg["sample_width"] // p, cfg["sample_height"] // p)
            cos, sin = get_3d_rotary_pos_embed(cfg["attention_head_dim"], crops, (H, W), geo["F"])
        else:
            cos, sin = get_3d_rotary_pos_embed(cfg["attention_head_dim"], None, (H, W), geo["F"], grid_type="slice",
                                               max_size=(cfg["sample_height"] // p, cfg["sample_width"] // p))
        out["image_rotary_emb"] = (gen.const(cos), gen.const(sin))
    out["return_dict"] = False
    return out


def _latte(cfg, geo, gen, B):
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]),
        timestep=gen.rand(B, scale=1000.0),
        encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["caption_channels"]),
        enable_temporal_attentions=True,
        return_dict=False,
    )


def _mochi(cfg, geo, gen, B):
    T = geo["text_len"]
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]),
        encoder_hidden_states=gen.randn(B, T, cfg["text_embed_dim"]),
        timestep=gen.rand(B, scale=1000.0),
        encoder_attention_mask=gen.mask(B, T, torch.bool),
        return_dict=False,
    )


def _dit(cfg, geo, gen, B):
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
        timestep=gen.rand(B, scale=1000.0),
        class_labels=gen.randint(cfg["num_embeds_ada_norm"], B),
        return_dict=False,
    )


def _wan(cfg, geo, gen, B):
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]),
        timestep=gen.rand(B, scale=1000.0),
        encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_dim"]),
        return_dict=False,
    )


def _hunyuanvideo(cfg, geo, gen, B):
    T = geo["text_len"]
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]),
        timestep=gen.rand(B, scale=1000.0),
        encoder_hidden_states=gen.randn(B, T, cfg["text_embed_dim"]),
        encoder_attention_mask=gen.mask(B, T, torch.long),
        pooled_projections=gen.randn(B, cfg["pooled_projection_dim"]),
        guidance=gen.full((B,), 6000.0) if cfg["guidance_embeds"] else None,  # guidance_scale * 1000
        return_dict=False,
    )


def _qwenimage(cfg, geo, gen, B):
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    return dict(
        hidden_states=gen.randn(B, H * W, cfg["in_channels"]),
        encoder_hidden_states=gen.randn(B, T, cfg["joint_attention_dim"]),
        encoder_hidden_states_mask=gen.mask(B, T, torch.long),
        timestep=gen.rand(B),  # the pipeline passes t / 1000
        img_shapes=[(1, H, W)] * B,
        return_dict=False,
    )


def _ltx(cfg, geo, gen, B):
    F, H, W, T = geo["F"], geo["H"], geo["W"], geo["text_len"]
    frame_rate = 25
    return dict(
        hidden_states=gen.randn(B, F * H * W, cfg["in_channels"]),
        encoder_hidden_states=gen.randn(B, T, cfg["caption_channels"]),
        timestep=gen.rand(B, scale=1000.0),
        encoder_attention_mask=gen.mask(B, T, torch.bool),
        num_frames=F,
        height=H,
        width=W,
        rope_interpolation_scale=(_INFO["LTXVideoTransformer3DModel"]["temporal"] / frame_rate,
                                  _INFO["LTXVideoTransformer3DModel"]["spatial"],
                                  _INFO["LTXVideoTransformer3DModel"]["spatial"]),
        return_dict=False,
    )


_BUILDERS: dict[str, Callable] = {
    "FluxTransformer2DModel": _flux,
    "SD3Transformer2DModel": _sd3,
    "PixArtTransformer2DModel": _pixart,
    "HunyuanDiT2DModel": _hunyuandit,
    "CogVideoXTransformer3DModel": _cogvideox,
    "LatteTransformer3DModel": _latte,
    "MochiTransformer3DModel": _mochi,
    "DiTTransformer2DModel": _dit,
    "WanTransformer3DModel": _wan,
    "HunyuanVideoTransformer3DModel": _hunyuanvideo,
    "QwenImageTransformer2DModel": _qwenimage,
    "LTXVideoTransformer3DModel": _ltx,
}


# --------------------------------------------------------------------------------------------
# dynamic shapes
# --------------------------------------------------------------------------------------------


def dynamic_dims(name: str, size: str = "tiny", *, height=None, width=None, frames=None, text_len=None,
                 batch: int = 1, **_ignored) -> dict:
    """``dynamic_shapes`` for ``torch.export.export(model, (), make_inputs(...), dynamic_shapes=...)``.

    Every forward kwarg of ``make_inputs`` gets an entry (``None`` where nothing varies), so the
    result can be passed as is. Dims: ``H``/``W`` token-grid rows/cols, ``F`` latent frames,
    ``T`` text tokens, ``HW`` flattened image tokens (FLUX); derived ``p*H`` for unpatched latents;
    ``Dim.AUTO`` for precomputed RoPE tables of length ``H*W`` / ``F*H*W``. Dims that cannot be
    dynamic are left out (``STATIC_REASONS``); dims that export accepts but the model code guards
    to the example size are listed in ``GUARDED``. The batch dim is static.
    """
    from torch.export import Dim

    inputs = make_inputs(name, size, height=height, width=width, frames=frames, text_len=text_len, batch=batch,
                         device="meta")
    cfg = config(name, size)
    geo = _geometry(name, size, height, width, frames, text_len)
    p, pt = geo["p"], geo["pt"]

    big = 1 << 16
    Hmax, Wmax = big, big
    if name == "SD3Transformer2DModel":
        Hmax = Wmax = cfg["pos_embed_max_size"]
    if name == "WanTransformer3DModel":
        Hmax = Wmax = cfg["rope_max_seq_len"]
    H = Dim("H", min=2, max=Hmax)
    W = Dim("W", min=2, max=Wmax)
    F = Dim("F", min=2, max=cfg["rope_max_seq_len"] if name == "WanTransformer3DModel" else big)
    T = Dim("T", min=2, max=big)
    AUTO = Dim.AUTO

    spec: dict[str, Any] = {k: None for k in inputs}
    if name == "FluxTransformer2DModel":
        HW = Dim("HW", min=4, max=big)
        spec.update(hidden_states={1: HW}, img_ids={0: HW}, encoder_hidden_states={1: T}, txt_ids={0: T})
    elif name == "SD3Transformer2DModel":
        spec.update(hidden_states={2: p * H, 3: p * W}, encoder_hidden_states={1: T})
    elif name == "PixArtTransformer2DModel":
        spec.update(hidden_states={2: p * H, 3: p * W}, encoder_hidden_states={1: T}, encoder_attention_mask={1: T})
    elif name == "HunyuanDiT2DModel":
        spec.update(hidden_states={2: p * H, 3: p * W}, image_rotary_emb=({0: AUTO}, {0: AUTO}))
    elif name == "CogVideoXTransformer3DModel":
        spec.update(hidden_states={1: F if pt == 1 else pt * F, 3: p * H, 4: p * W}, encoder_hidden_states={1: T})
        if "image_rotary_emb" in inputs:
            spec["image_rotary_emb"] = ({0: AUTO}, {0: AUTO})
    elif name == "LatteTransformer3DModel":
        spec.update(hidden_states={3: p * H, 4: p * W}, encoder_hidden_states={1: T})
    elif name == "MochiTransformer3DModel":
        spec.update(hidden_states={2: F, 3: p * H, 4: p * W}, encoder_hidden_states={1: T},
                    encoder_attention_mask={1: T})
    elif name == "DiTTransformer2DModel":
        spec.update(hidden_states={2: p * H, 3: p * W})
    elif name == "WanTransformer3DModel":
        spec.update(hidden_states={2: F, 3: p * H, 4: p * W}, encoder_hidden_states={1: T})
    elif name == "HunyuanVideoTransformer3DModel":
        spec.update(hidden_states={2: F, 3: p * H, 4: p * W}, encoder_hidden_states={1: T},
                    encoder_attention_mask={1: T})
    elif name == "QwenImageTransformer2DModel":
        pass  # nothing can be dynamic: see STATIC_REASONS
    elif name == "LTXVideoTransformer3DModel":
        spec.update(encoder_hidden_states={1: T}, encoder_attention_mask={1: T})
    elif name in _DYN:
        dims = _Dims(H=H, W=W, F=F, T=T, HW=Dim("HW", min=4, max=big), p=p, pt=pt, AUTO=AUTO)
        spec.update(_DYN[name](dims))
    # every other input: None for each leaf, mirroring its pytree structure (dicts, lists of tuples)
    import torch.utils._pytree as pytree

    for k, v in inputs.items():
        if spec[k] is None and v is not None and not isinstance(v, torch.Tensor):
            spec[k] = pytree.tree_map(lambda _: None, v)
    return spec


def describe(name: str) -> dict:
    info = _INFO[name]
    _cls(name)
    return {
        "pipeline_class": info["pipeline"],
        "video": info["temporal"] is not None,
        "text_kwarg": info["text_kwarg"],
        "image_kwarg": info["image_kwarg"],
        "sizes": list(_CONFIGS[name]),
        "full_source": dict(FULL_SOURCES.get(name, {})),
        "vae_spatial": info["spatial"],
        "vae_temporal": info["temporal"],
        "static_dims": dict(STATIC_REASONS.get(name, {})),
        "guarded_dims": GUARDED.get(name),
    }


# --------------------------------------------------------------------------------------------
# More diffusers DiTs (tiny size only). Configs follow the structure of the published models at a
# toy width: 4 heads (or kv-heads that divide them), 2 blocks of every kind. Inputs are what the
# diffusers pipeline passes (read from its __call__), at the geometry of `_INFO[name]["tiny"]`.
# `_INFO[name]["patch"]` is (temporal, spatial) patch, so `_geometry` needs no config key names.
# --------------------------------------------------------------------------------------------


class _Dims:
    """The Dims of `dynamic_dims`, for the per-class `_DYN` functions: ``H W F T HW p pt AUTO``."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


_MORE: dict[str, tuple[dict, dict, Callable, Callable | None]] = {}  # name -> (tiny cfg, info, builder, dyn)


def _more(name, cfg, builder, dyn=None, **info):
    _MORE[name] = (cfg, info, builder, dyn)


def _tree_const(gen, tree):
    import torch.utils._pytree as pytree

    return pytree.tree_map(gen.const, tree)


def _ids_grid(F, H, W, n=3):
    """Position ids ``[F*H*W, n]`` (frame, row, col), as FLUX-style pipelines build them."""
    f, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    cols = [f, h, w] + [torch.zeros_like(f)] * (n - 3)
    return torch.stack(cols, -1).reshape(F * H * W, n)


# ---- image models with packed tokens (FLUX family): pipeline packs 2x2, transformer patch 1 ----

def _chroma(cfg, geo, gen, B):
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    mask = gen.mask(B, T, torch.bool)
    return dict(
        hidden_states=gen.randn(B, H * W, cfg["in_channels"]),
        encoder_hidden_states=gen.randn(B, T, cfg["joint_attention_dim"]),
        timestep=gen.rand(B),
        img_ids=gen.const(_ids_grid(1, H, W).to(gen.dtype)),
        txt_ids=gen.const(torch.zeros(T, 3, dtype=gen.dtype)),
        # ChromaPipeline._prepare_attention_mask: text mask then ones for the image tokens
        attention_mask=torch.cat([mask, gen.const(torch.ones(B, H * W, dtype=torch.bool))], 1),
        return_dict=False,
    )


def _dyn_packed(d):
    return dict(hidden_states={1: d.HW}, img_ids={0: d.HW}, encoder_hidden_states={1: d.T}, txt_ids={0: d.T})


_more("ChromaTransformer2DModel",
      dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
           approximator_hidden_dim=32, approximator_layers=2),
      _chroma, None, pipeline="ChromaPipeline", spatial=8, temporal=None, pack=2, patch=(1, 1),
      tiny=(128, 128, None, 16))


def _flux_like(cfg, geo, gen, B, *, pooled=None, guidance=None, ids_dims=3, batched_ids=False):
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    img = _ids_grid(1, H, W, ids_dims).to(gen.dtype)
    txt = torch.zeros(T, ids_dims, dtype=gen.dtype)
    if ids_dims == 4:  # Flux2: (t, h, w, l); text tokens count along l
        txt[:, 3] = torch.arange(T)
    if batched_ids:
        img, txt = img.expand(B, -1, -1), txt.expand(B, -1, -1)
    out = dict(
        hidden_states=gen.randn(B, H * W, cfg["in_channels"]),
        encoder_hidden_states=gen.randn(B, T, cfg["joint_attention_dim"]),
        timestep=gen.rand(B),
        img_ids=gen.const(img),
        txt_ids=gen.const(txt),
    )
    if pooled:
        out["pooled_projections"] = gen.randn(B, pooled)
    if guidance is not None:
        out["guidance"] = gen.full((B,), guidance)
    out["return_dict"] = False
    return out


_more("BriaTransformer2DModel",
      dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=(0, 8, 8)),
      _flux_like, _dyn_packed, pipeline="BriaPipeline", spatial=8, temporal=None, pack=2, patch=(1, 1),
      tiny=(128, 128, None, 16))
_more("LongCatImageTransformer2DModel",
      dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
      lambda c, g, gen, B: _flux_like(c, g, gen, B, guidance=4.5), _dyn_packed,
      pipeline="LongCatImagePipeline", spatial=8, temporal=None, pack=2, patch=(1, 1), tiny=(128, 128, None, 16))
_more("Flux2Transformer2DModel",
      dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=32, timestep_guidance_channels=32,
           axes_dims_rope=(4, 4, 4, 4)),
      lambda c, g, gen, B: _flux_like(c, g, gen, B, guidance=4.0, ids_dims=4, batched_ids=True),
      lambda d: dict(hidden_states={1: d.HW}, img_ids={1: d.HW}, encoder_hidden_states={1: d.T}, txt_ids={1: d.T}),
      pipeline="Flux2Pipeline", spatial=8, temporal=None, pack=2, patch=(1, 1), tiny=(128, 128, None, 16))


# ---- image models with unpatched latents [B, C, h, w] ----

def _auraflow(cfg, geo, gen, B):
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
        encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["joint_attention_dim"]),
        timestep=gen.rand(B),  # AuraFlowPipeline: t / 1000
        return_dict=False,
    )


def _dyn_latent2d(d):
    return dict(hidden_states={2: d.p * d.H, 3: d.p * d.W}, encoder_hidden_states={1: d.T})


_more("AuraFlowTransformer2DModel",
      dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
           attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
           out_channels=4, pos_embed_max_size=256),
      _auraflow, _dyn_latent2d, pipeline="AuraFlowPipeline", spatial=8, temporal=None, patch=(1, 2),
      tiny=(128, 128, None, 16))


def _cogview(cfg, geo, gen, B):
    size = torch.tensor([[geo["height"], geo["width"]]] * B, dtype=gen.dtype)
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
        encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_embed_dim"]),
        timestep=gen.rand(B, scale=1000.0),
        original_size=gen.const(size),
        target_size=gen.const(size.clone()),
        crop_coords=gen.const(torch.zeros(B, 2, dtype=gen.dtype)),
        return_dict=False,
    )


_more("CogView3PlusTransformer2DModel",
      dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4, out_channels=4,
           text_embed_dim=32, time_embed_dim=16, condition_dim=4, pos_embed_max_size=32, sample_size=16),
      _cogview, _dyn_latent2d, pipeline="CogView3PlusPipeline", spatial=8, temporal=None, patch=(1, 2),
      tiny=(128, 128, None, 16))
_more("CogView4Transformer2DModel",
      dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
           text_embed_dim=32, time_embed_dim=16, condition_dim=4, pos_embed_max_size=32, sample_size=16,
           rope_axes_dim=(32, 32)),
      _cogview, _dyn_latent2d, pipeline="CogView4Pipeline", spatial=8, temporal=None, patch=(1, 2),
      tiny=(128, 128, None, 16))


# ---- video models with unpatched latents [B, C, F, h, w] ----

def _allegro(cfg, geo, gen, B):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    F, H, W, T = geo["lat_f"], geo["H"], geo["W"], geo["text_len"]
    # AllegroPipeline._prepare_rotary_positional_embeddings
    ft, fh, fw, gt, gh, gw = get_3d_rotary_pos_embed_allegro(
        embed_dim=cfg["attention_head_dim"], crops_coords=((0, 0), (H, W)), grid_size=(H, W), temporal_size=F,
        interpolation_scale=(cfg["interpolation_scale_t"], cfg["interpolation_scale_h"], cfg["interpolation_scale_w"]))
    pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
    return dict(
        hidden_states=gen.randn(B, cfg["in_channels"], F, geo["lat_h"], geo["lat_w"]),
        encoder_hidden_states=gen.randn(B, T, cfg["caption_channels"]),
        timestep=gen.rand(B, scale=1000.0),
        encoder_attention_mask=gen.mask(B, T, torch.long),
        image_rotary_emb=_tree_const(gen, ((ft, fh, fw), tuple(pos))),
        return_dict=False,
    )


_more("AllegroTransformer3DModel",
      dict(patch_size=2, patch_size_t=1, num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
           num_layers=2, cross_attention_dim=48, sample_width=8, sample_height=8, sample_frames=3, caption_channels=32),
      _allegro, None, pipeline="AllegroPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _wan_like(cfg, geo, gen, B, extra=None):
    out = dict(
        hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]),
        timestep=gen.rand(B, scale=1000.0),
        encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_dim"]),
    )
    out.update(extra or {})
    out["return_dict"] = False
    return out


def _dyn_video5(d):
    return dict(hidden_states={2: d.F, 3: d.p * d.H, 4: d.p * d.W}, encoder_hidden_states={1: d.T})


_WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_more("SkyReelsV2Transformer3DModel", dict(_WAN_TINY), _wan_like, _dyn_video5, pipeline="SkyReelsV2Pipeline",
      spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))
_more("ChronoEditTransformer3DModel", dict(_WAN_TINY, rope_temporal_skip_len=8), _wan_like, _dyn_video5,
      pipeline="ChronoEditPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _wan_vace(cfg, geo, gen, B):
    ctrl = gen.randn(B, cfg["vace_in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"])
    return _wan_like(cfg, geo, gen, B, dict(control_hidden_states=ctrl,
                                             control_hidden_states_scale=gen.full((len(cfg["vace_layers"]),), 1.0)))


_more("WanVACETransformer3DModel", dict(_WAN_TINY, num_layers=4, vace_layers=[0, 2], vace_in_channels=8), _wan_vace,
      lambda d: dict(_dyn_video5(d), control_hidden_states={2: d.F, 3: d.p * d.H, 4: d.p * d.W}),
      pipeline="WanVACEPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


# ---- batch 2: more image and video DiTs ----

def _sana(cfg, geo, gen, B):
    T = geo["text_len"]
    x = (gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]) if geo["lat_f"]
         else gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]))
    return dict(hidden_states=x, encoder_hidden_states=gen.randn(B, T, cfg["caption_channels"]),
                encoder_attention_mask=gen.mask(B, T, torch.long), timestep=gen.rand(B, scale=1000.0),
                return_dict=False)


_more("SanaTransformer2DModel",
      dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=4, attention_head_dim=8,
           num_cross_attention_heads=4, cross_attention_head_dim=8, cross_attention_dim=32, caption_channels=32,
           sample_size=8),
      _sana, lambda d: dict(hidden_states={2: d.p * d.H, 3: d.p * d.W}, encoder_hidden_states={1: d.T},
                            encoder_attention_mask={1: d.T}),
      pipeline="SanaPipeline", spatial=32, temporal=None, patch=(1, 1), tiny=(256, 256, None, 16))
_more("SanaVideoTransformer3DModel",
      dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=2,
           num_cross_attention_heads=4, cross_attention_head_dim=8, cross_attention_dim=32, caption_channels=32,
           sample_size=8, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
      _sana, lambda d: dict(hidden_states={2: d.F, 3: d.p * d.H, 4: d.p * d.W}, encoder_hidden_states={1: d.T},
                            encoder_attention_mask={1: d.T}),
      pipeline="SanaVideoPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _lumina2(cfg, geo, gen, B):
    T = geo["text_len"]
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
                timestep=gen.rand(B),  # Lumina2Pipeline: 1 - t / 1000
                encoder_hidden_states=gen.randn(B, T, cfg["cap_feat_dim"]),
                encoder_attention_mask=gen.mask(B, T, torch.bool), return_dict=False)


_more("Lumina2Transformer2DModel",
      dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=2,
           num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128),
           cap_feat_dim=32),
      _lumina2, lambda d: dict(hidden_states={2: d.p * d.H, 3: d.p * d.W}, encoder_hidden_states={1: d.T},
                               encoder_attention_mask={1: d.T}),
      pipeline="Lumina2Pipeline", spatial=8, temporal=None, patch=(1, 2), tiny=(128, 128, None, 16))


def _lumina_next(cfg, geo, gen, B):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    T = geo["text_len"]
    rope = get_2d_rotary_pos_embed_lumina(cfg["hidden_size"] // cfg["num_attention_heads"], 384, 384)
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
                timestep=gen.rand(B), encoder_hidden_states=gen.randn(B, T, cfg["cross_attention_dim"]),
                encoder_mask=gen.mask(B, T, torch.long), image_rotary_emb=gen.const(rope), cross_attention_kwargs={}, return_dict=False)


_more("LuminaNextDiT2DModel",
      dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=4,
           num_kv_heads=2, multiple_of=16, learn_sigma=True, qk_norm=True, cross_attention_dim=32),
      _lumina_next, lambda d: dict(hidden_states={2: d.p * d.H, 3: d.p * d.W}, encoder_hidden_states={1: d.T},
                                   encoder_mask={1: d.T}),
      pipeline="LuminaPipeline", spatial=8, temporal=None, patch=(1, 2), tiny=(128, 128, None, 16))


def _hidream(cfg, geo, gen, B):
    T = geo["text_len"]
    t5, llama = cfg["caption_channels"]
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
                timesteps=gen.rand(B, scale=1000.0),
                encoder_hidden_states_t5=gen.randn(B, T, t5),
                encoder_hidden_states_llama3=gen.randn(len(cfg["llama_layers"]), B, T, llama),
                pooled_embeds=gen.randn(B, cfg["text_emb_dim"]), return_dict=False)


_more("HiDreamImageTransformer2DModel",
      dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
           num_attention_heads=4, caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
           num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=[0, 1, 2, 3],
           force_inference_output=True),
      _hidream, lambda d: dict(hidden_states={2: d.p * d.H, 3: d.p * d.W}, encoder_hidden_states_t5={1: d.T},
                               encoder_hidden_states_llama3={2: d.T}),
      pipeline="HiDreamImagePipeline", spatial=8, temporal=None, patch=(1, 2), text_kwarg="encoder_hidden_states_t5",
      tiny=(128, 128, None, 16))


def _easyanimate(cfg, geo, gen, B):
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]),
                timestep=gen.rand(B, scale=1000.0),
                encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_embed_dim"]), return_dict=False)


_more("EasyAnimateTransformer3DModel",
      dict(attention_head_dim=16, num_attention_heads=4, in_channels=4, out_channels=4, mmdit_layers=2, num_layers=2,
           patch_size=2, sample_height=60, sample_width=90, text_embed_dim=32, time_embed_dim=16,
           time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
      _easyanimate, _dyn_video5, pipeline="EasyAnimatePipeline", spatial=8, temporal=4, patch=(1, 2),
      tiny=(64, 64, 9, 16))


def _cosmos(cfg, geo, gen, B):
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]),
                timestep=gen.rand(B), encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_embed_dim"]),
                fps=30, padding_mask=gen.const(torch.zeros(1, 1, geo["height"], geo["width"], dtype=gen.dtype)),
                return_dict=False)


_more("CosmosTransformer3DModel",
      dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
           text_embed_dim=32, adaln_lora_dim=4, max_size=(8, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
           concat_padding_mask=False, extra_pos_embed_type="learnable"),
      _cosmos, _dyn_video5, pipeline="Cosmos2VideoToWorldPipeline", spatial=8, temporal=4, patch=(1, 2),
      tiny=(64, 64, 9, 16))

_more("ConsisIDTransformer3DModel",
      dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
           text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
           temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
           use_learned_positional_embeddings=False, is_train_face=False),
      _cogvideox, lambda d: dict(hidden_states={1: d.F, 3: d.p * d.H, 4: d.p * d.W}, encoder_hidden_states={1: d.T},
                                 image_rotary_emb=({0: d.AUTO}, {0: d.AUTO})),
      pipeline="ConsisIDPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _hunyuan15(cfg, geo, gen, B):
    T, T2 = geo["text_len"], max(2, geo["text_len"] // 2)
    out = dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"] or 1, geo["lat_h"], geo["lat_w"])
               if geo["lat_f"] else gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
               timestep=gen.rand(B, scale=1000.0),
               encoder_hidden_states=gen.randn(B, T, cfg["text_embed_dim"]),
               encoder_attention_mask=gen.mask(B, T, torch.long),
               encoder_hidden_states_2=gen.randn(B, T2, cfg["text_embed_2_dim"]),
               encoder_attention_mask_2=gen.mask(B, T2, torch.long))
    if "image_embed_dim" in cfg:  # t2v passes zeros (no reference image)
        out["image_embeds"] = gen.const(torch.zeros(B, 4, cfg["image_embed_dim"], dtype=gen.dtype))
    out["return_dict"] = False
    return out


_more("HunyuanVideo15Transformer3DModel",
      dict(in_channels=9, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
           num_refiner_layers=2, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16,
           image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v"),
      _hunyuan15, lambda d: dict(hidden_states={2: d.F, 3: d.p * d.H, 4: d.p * d.W}, encoder_hidden_states={1: d.T},
                                 encoder_attention_mask={1: d.T}),
      pipeline="HunyuanVideo15Pipeline", spatial=16, temporal=4, patch=(1, 1), tiny=(128, 128, 9, 16))
_more("HunyuanImageTransformer2DModel",
      dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
           num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=(1, 1), text_embed_dim=32,
           text_embed_2_dim=16, rope_axes_dim=(8, 8)),
      _hunyuan15, lambda d: dict(hidden_states={2: d.p * d.H, 3: d.p * d.W}, encoder_hidden_states={1: d.T},
                                 encoder_attention_mask={1: d.T}),
      pipeline="HunyuanImagePipeline", spatial=32, temporal=None, patch=(1, 1), tiny=(256, 256, None, 16))


def _framepack(cfg, geo, gen, B):
    F, T, C = geo["lat_f"], geo["text_len"], cfg["in_channels"]
    h, w = geo["lat_h"], geo["lat_w"]
    ar = lambda n, s=0: gen.const(torch.arange(s, s + n))  # noqa: E731
    # HunyuanVideoFramepackPipeline: 1 clean-latent frame before and after the section, 2 frames of 2x
    # history, 16 of 4x; their indices come from one arange split in the pipeline's order
    return dict(hidden_states=gen.randn(B, C, F, h, w), timestep=gen.rand(B, scale=1000.0),
                encoder_hidden_states=gen.randn(B, T, cfg["text_embed_dim"]),
                encoder_attention_mask=gen.mask(B, T, torch.long),
                pooled_projections=gen.randn(B, cfg["pooled_projection_dim"]),
                image_embeds=gen.randn(B, 4, cfg["image_proj_dim"]), indices_latents=ar(F, 1),
                guidance=gen.full((B,), 10000.0),
                latents_clean=gen.randn(B, C, 2, h, w), indices_latents_clean=gen.const(torch.tensor([0, F + 1])),
                latents_history_2x=gen.randn(B, C, 2, h, w), indices_latents_history_2x=ar(2, F + 2),
                latents_history_4x=gen.randn(B, C, 16, h, w), indices_latents_history_4x=ar(16, F + 4),
                return_dict=False)


_more("HunyuanVideoFramepackTransformer3DModel",
      dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
           num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
           text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), image_condition_type=None,
           has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
      _framepack, None, pipeline="HunyuanVideoFramepackPipeline", spatial=8, temporal=4, patch=(1, 2),
      tiny=(64, 64, 9, 16))


# ---- batch 3 ----

_more("OvisImageTransformer2DModel",
      dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
      _flux_like, _dyn_packed, pipeline="OvisImagePipeline", spatial=8, temporal=None, pack=2, patch=(1, 1),
      tiny=(128, 128, None, 16))


def _qwen_like(cfg, geo, gen, B, text_dim_key="joint_attention_dim"):
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    return dict(hidden_states=gen.randn(B, H * W, cfg["in_channels"]),
                encoder_hidden_states=gen.randn(B, T, cfg[text_dim_key]),
                encoder_hidden_states_mask=gen.mask(B, T, torch.long), timestep=gen.rand(B),
                img_shapes=[(1, H, W)] * B, return_dict=False)


_more("NucleusMoEImageTransformer2DModel",
      dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=4,
           num_key_value_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), mlp_ratio=2.0, moe_enabled=True,
           dense_moe_strategy="leave_first_three_and_last_block_dense", num_experts=4, moe_intermediate_dim=16,
           capacity_factors=8.0),
      _qwen_like, None, pipeline="NucleusMoEImagePipeline", spatial=8, temporal=None, pack=2, patch=(1, 1),
      tiny=(128, 128, None, 16))


def _qwen21(cfg, geo, gen, B):
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    img_mask = torch.zeros(B, T + H * W // 4, dtype=torch.bool)
    img_mask[:, T:] = True  # the VLM's image slots, one per 2x2 latent tokens (text to image: the target only)
    return dict(hidden_states=gen.randn(B, H * W, cfg["in_channels"]),
                encoder_hidden_states=gen.randn(B, T, cfg["context_in_dim"]), timestep=gen.rand(B),
                img_shapes=[[(1, H, W)]] * B, img_mask=gen.const(img_mask),
                encoder_hidden_states_mask=gen.mask(B, T, torch.bool), return_dict=False)


_more("QwenImage21Transformer2DModel",
      dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
           context_in_dim=32, mlp_ratio=2, axes_dims_rope=(4, 6, 6)),
      _qwen21, None, pipeline="QwenImage21Pipeline", spatial=8, temporal=None, pack=2, patch=(1, 1),
      tiny=(128, 128, None, 16))


def _prx(cfg, geo, gen, B):
    T = geo["text_len"]
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]), timestep=gen.rand(B),
                encoder_hidden_states=gen.randn(B, T, cfg["context_in_dim"]),
                attention_mask=gen.mask(B, T, torch.bool), return_dict=False)


_more("PRXTransformer2DModel",
      dict(in_channels=4, patch_size=2, context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=4, depth=2,
           axes_dim=[8, 8]),
      _prx, lambda d: dict(hidden_states={2: d.p * d.H, 3: d.p * d.W}, encoder_hidden_states={1: d.T},
                           attention_mask={1: d.T}),
      pipeline="PRXPipeline", spatial=8, temporal=None, patch=(1, 2), tiny=(128, 128, None, 16))


def _helios(cfg, geo, gen, B):
    F, C, h, w = geo["lat_f"], cfg["in_channels"], geo["lat_h"], geo["lat_w"]
    ar = lambda n, s=0: gen.const(torch.arange(s, s + n).expand(B, -1))  # noqa: E731
    return _wan_like(cfg, geo, gen, B, dict(
        indices_hidden_states=ar(F, 3), indices_latents_history_short=ar(1, 2), indices_latents_history_mid=ar(1, 1),
        indices_latents_history_long=ar(4), latents_history_short=gen.randn(B, C, 1, h, w),
        latents_history_mid=gen.randn(B, C, 1, h, w), latents_history_long=gen.randn(B, C, 4, h, w)))


_more("HeliosTransformer3DModel",
      dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_dim=(4, 4, 4), has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True,
           is_amplify_history=False),
      _helios, None, pipeline="HeliosPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _motif(cfg, geo, gen, B):
    T = geo["text_len"]
    out = dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]),
               timestep=gen.rand(B, scale=1000.0), encoder_hidden_states=gen.randn(B, T, cfg["text_embed_dim"]),
               encoder_attention_mask=gen.mask(B, T, torch.long))
    out["return_dict"] = False
    return out


_more("MotifVideoTransformer3DModel",
      dict(in_channels=9, out_channels=4, num_attention_heads=4, attention_head_dim=12, num_layers=2,
           num_single_layers=2, num_decoder_layers=0, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
           text_embed_dim=32, rope_axes_dim=(4, 4, 4)),
      _motif, lambda d: dict(hidden_states={2: d.F, 3: d.p * d.H, 4: d.p * d.W}, encoder_hidden_states={1: d.T},
                             encoder_attention_mask={1: d.T}),
      pipeline="MotifVideoPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _glm(cfg, geo, gen, B):
    size = torch.tensor([[geo["height"], geo["width"]]] * B, dtype=gen.dtype)
    n = geo["H"] * geo["W"]
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
                encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_embed_dim"]),
                prior_token_id=gen.randint(cfg["prior_vq_quantizer_codebook_size"], B, n),
                prior_token_drop=gen.const(torch.zeros(B, n, dtype=torch.bool)),
                timestep=gen.rand(B, scale=1000.0), target_size=gen.const(size),
                crop_coords=gen.const(torch.zeros(B, 2, dtype=gen.dtype)), return_dict=False)


_more("GlmImageTransformer2DModel",
      dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
           text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
      _glm, None, pipeline="GlmImagePipeline", spatial=8, temporal=None, patch=(1, 2), tiny=(128, 128, None, 16))


def _zimage(cfg, geo, gen, B):
    T = geo["text_len"]
    return dict(x=[gen.randn(cfg["in_channels"], 1, geo["lat_h"], geo["lat_w"]) for _ in range(B)],
                t=gen.rand(B), cap_feats=[gen.randn(T, cfg["cap_feat_dim"]) for _ in range(B)], return_dict=False)


_more("ZImageTransformer2DModel",
      dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=2,
           n_heads=4, n_kv_heads=4, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
           axes_dims=[4, 2, 2], axes_lens=[256, 32, 32]),
      _zimage, None, pipeline="ZImagePipeline", spatial=8, temporal=None, patch=(1, 2), text_kwarg="cap_feats",
      image_kwarg="x", tiny=(128, 128, None, 16))


def _ernie(cfg, geo, gen, B):
    T = geo["text_len"]
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]), timestep=gen.rand(B),
                text_bth=gen.randn(B, T, cfg["text_in_dim"]),
                text_lens=gen.const(torch.full((B,), max(1, T - T // 4), dtype=torch.long)), return_dict=False)


_more("ErnieImageTransformer2DModel",
      dict(hidden_size=32, num_attention_heads=4, num_layers=2, ffn_hidden_size=64, in_channels=16, out_channels=16,
           patch_size=1, text_in_dim=32, rope_theta=256, rope_axes_dim=(4, 2, 2), qk_layernorm=True),
      _ernie, lambda d: dict(hidden_states={2: d.H, 3: d.W}, text_bth={1: d.T}),
      pipeline="ErnieImagePipeline", spatial=16, temporal=None, patch=(1, 1), text_kwarg="text_bth",
      tiny=(128, 128, None, 16))


def _kandinsky5(cfg, geo, gen, B):
    F, H, W, T = geo["lat_f"], geo["H"], geo["W"], geo["text_len"]
    return dict(hidden_states=gen.randn(B, F, geo["lat_h"], geo["lat_w"], cfg["in_visual_dim"]),
                encoder_hidden_states=gen.randn(B, T, cfg["in_text_dim"]),
                pooled_projections=gen.randn(B, cfg["in_text_dim2"]), timestep=gen.rand(B, scale=1000.0),
                visual_rope_pos=[gen.const(torch.arange(F)), gen.const(torch.arange(H)), gen.const(torch.arange(W))],
                text_rope_pos=gen.const(torch.arange(T)), scale_factor=(1.0, 2.0, 2.0), return_dict=False)


_more("Kandinsky5Transformer3DModel",
      dict(in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
           model_dim=64, ff_dim=128, num_text_blocks=2, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False),
      _kandinsky5, None, pipeline="Kandinsky5T2VPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


# ---- audio denoisers: "height" is the latent length (frames of the audio VAE), "width" 1 ----

def _stable_audio(cfg, geo, gen, B):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    L, T = geo["H"], geo["text_len"]
    rope = get_1d_rotary_pos_embed(cfg["attention_head_dim"] // 2, L + 1, use_real=True, repeat_interleave_real=False)
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], L), timestep=gen.rand(B, scale=1000.0),
                encoder_hidden_states=gen.randn(B, T, cfg["cross_attention_input_dim"]),
                global_hidden_states=gen.randn(B, 1, cfg["global_states_input_dim"]),
                rotary_embedding=_tree_const(gen, rope), return_dict=False)


_AUDIO = dict(spatial=1, temporal=None, patch=(1, 1))
_more("StableAudioDiTModel",
      dict(sample_size=32, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
           num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=32, time_proj_dim=16,
           global_states_input_dim=32, cross_attention_input_dim=32),
      _stable_audio, None, pipeline="StableAudioPipeline", tiny=(32, 1, None, 16), **_AUDIO)


def _ace_step(cfg, geo, gen, B):
    L, T, a = geo["H"], geo["text_len"], cfg["audio_acoustic_hidden_dim"]
    return dict(hidden_states=gen.randn(B, L, a), timestep=gen.rand(B), timestep_r=gen.rand(B),
                encoder_hidden_states=gen.randn(B, T, cfg["hidden_size"]),
                context_latents=gen.randn(B, L, 2 * a), return_dict=False)


_more("AceStepTransformer1DModel",
      dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, rope_theta=10000.0,
           sliding_window=16),
      _ace_step, lambda d: dict(hidden_states={1: 2 * d.H}, encoder_hidden_states={1: d.T},
                                context_latents={1: 2 * d.H}),
      pipeline="AceStepPipeline", tiny=(64, 1, None, 16), **_AUDIO)


def _longcat_audio(cfg, geo, gen, B):
    L, T = geo["H"], geo["text_len"]
    return dict(hidden_states=gen.randn(B, L, cfg["latent_dim"]),
                encoder_hidden_states=gen.randn(B, T, cfg["dit_text_dim"]),
                encoder_attention_mask=gen.mask(B, T, torch.bool), timestep=gen.rand(B), return_dict=False)


_more("LongCatAudioDiTTransformer",
      dict(dit_dim=32, dit_depth=2, dit_heads=4, dit_text_dim=32, latent_dim=8, text_conv=False),
      _longcat_audio, lambda d: dict(hidden_states={1: d.H}, encoder_hidden_states={1: d.T},
                                     encoder_attention_mask={1: d.T}),
      pipeline="LongCatAudioDiTPipeline", tiny=(32, 1, None, 16), **_AUDIO)


def _minimax_music(cfg, geo, gen, B):
    L = geo["H"]
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], L),
                encoder_hidden_states=gen.randn(B, L, cfg["condition_dim"]), timestep=gen.rand(B), return_dict=False)


_more("MiniMaxMusic3Transformer1DModel",
      dict(in_channels=8, condition_dim=16, num_layers=2, num_attention_heads=4, attention_head_dim=8,
           ff_inner_dim=64, rotary_dim=4, fourier_embedding_dim=8),
      _minimax_music, lambda d: dict(hidden_states={2: d.H}, encoder_hidden_states={1: d.H}),
      pipeline="MiniMaxMusic3Pipeline", text_kwarg=None, tiny=(32, 1, None, None), **_AUDIO)


# ---- batch 4: more video / image ----

def _ltx2(cfg, geo, gen, B):
    F, H, W, T = geo["F"], geo["H"], geo["W"], geo["text_len"]
    A = 2 * F + 1  # audio latent frames for the clip (LTX2Pipeline: duration * rate / hop / 4)
    return dict(hidden_states=gen.randn(B, F * H * W, cfg["in_channels"]),
                audio_hidden_states=gen.randn(B, A, cfg["audio_in_channels"]),
                encoder_hidden_states=gen.randn(B, T, cfg["caption_channels"]),
                audio_encoder_hidden_states=gen.randn(B, T, cfg["caption_channels"]),
                timestep=gen.rand(B, scale=1000.0), encoder_attention_mask=gen.mask(B, T, torch.bool),
                audio_encoder_attention_mask=gen.mask(B, T, torch.bool),
                num_frames=F, height=H, width=W, fps=25.0, audio_num_frames=A, return_dict=False)


_more("LTX2VideoTransformer3DModel",
      dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
           cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=4,
           audio_attention_head_dim=8, audio_cross_attention_dim=32, num_layers=2, caption_channels=32,
           rope_double_precision=False),
      _ltx2, lambda d: dict(encoder_hidden_states={1: d.T}, encoder_attention_mask={1: d.T},
                            audio_encoder_hidden_states={1: d.T}, audio_encoder_attention_mask={1: d.T}),
      pipeline="LTX2Pipeline", spatial=32, temporal=8, patch=(1, 1), tiny=(128, 128, 17, 16))


def _anyflow(cfg, geo, gen, B):
    F = geo["lat_f"]
    return dict(hidden_states=gen.randn(B, F, cfg["in_channels"], geo["lat_h"], geo["lat_w"]),
                timestep=gen.full((B, F), 500.0), r_timestep=gen.full((B, F), 250.0),
                encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_dim"]), return_dict=False)


_more("AnyFlowTransformer3DModel",
      dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32),
      _anyflow, lambda d: dict(hidden_states={3: d.p * d.H, 4: d.p * d.W}, encoder_hidden_states={1: d.T}),
      pipeline="AnyFlowPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _wan_animate(cfg, geo, gen, B):
    C, F, h, w = cfg["latent_channels"], geo["lat_f"], geo["lat_h"], geo["lat_w"]
    s = cfg["motion_encoder_size"]
    return _wan_like(cfg, geo, gen, B, dict(
        encoder_hidden_states_image=gen.randn(B, 4, cfg["image_dim"]),
        pose_hidden_states=gen.randn(B, C, F - 1, h, w),
        face_pixel_values=gen.randn(B, 3, 4 * (F - 1) + 1, s, s)))


_more("WanAnimateTransformer3DModel",
      dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=12, latent_channels=4,
           out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", image_dim=16, rope_max_seq_len=32,
           motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
           motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
           inject_face_latents_blocks=2),
      _wan_animate, None, pipeline="WanAnimatePipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _joyimage(cfg, geo, gen, B):
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], 1, geo["lat_h"], geo["lat_w"]), timestep=gen.rand(B),
                encoder_hidden_states=gen.randn(B, geo["text_len"], cfg["text_dim"]), return_dict=False)


_more("JoyImageEditTransformer3DModel",
      dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=64, num_attention_heads=4, text_dim=32, num_layers=2,
           rope_dim_list=[4, 6, 6], theta=256),
      _joyimage, lambda d: dict(hidden_states={3: d.p * d.H, 4: d.p * d.W}, encoder_hidden_states={1: d.T}),
      pipeline="JoyImageEditPipeline", spatial=8, temporal=None, patch=(1, 2), tiny=(128, 128, None, 16))


def _krea2(cfg, geo, gen, B):
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    pos = torch.zeros(T + H * W, 3)
    pos[T:, 1:] = _ids_grid(1, H, W)[:, 1:].to(pos.dtype)
    return dict(hidden_states=gen.randn(B, H * W, cfg["in_channels"]),
                encoder_hidden_states=gen.randn(B, T, cfg["num_text_layers"], cfg["text_hidden_dim"]),
                timestep=gen.rand(B), position_ids=gen.const(pos.to(gen.dtype)),
                encoder_attention_mask=gen.mask(B, T, torch.bool), return_dict=False)


_more("Krea2Transformer2DModel",
      dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=64, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
           text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=32,
           num_layerwise_text_blocks=2, num_refiner_text_blocks=2, axes_dims_rope=(4, 2, 2)),
      _krea2, None, pipeline="Krea2Pipeline", spatial=8, temporal=None, pack=2, patch=(1, 1),
      tiny=(128, 128, None, 16))


def _bria_fibo(cfg, geo, gen, B):
    out = _flux_like(cfg, geo, gen, B)
    # BriaFiboPipeline: one text-encoder hidden state per transformer block
    out["text_encoder_layers"] = [gen.randn(B, geo["text_len"], cfg["text_encoder_dim"])
                                  for _ in range(cfg["num_layers"] + cfg["num_single_layers"])]
    return out


_more("BriaFiboTransformer2DModel",
      dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None,
           axes_dims_rope=(0, 8, 8)),
      _bria_fibo, None, pipeline="BriaFiboPipeline", spatial=8, temporal=None, pack=2, patch=(1, 1),
      tiny=(128, 128, None, 16))


_more("Flux3Transformer2DModel",
      dict(in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=32, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4)),
      lambda c, g, gen, B: _flux_like(c, g, gen, B, ids_dims=4), _dyn_packed,
      pipeline="Flux3Pipeline", spatial=8, temporal=None, pack=2, patch=(1, 1), tiny=(128, 128, None, 16))


# ---- batch 5 ----

def _ideogram4(cfg, geo, gen, B):
    from diffusers.models.transformers import transformer_ideogram4 as m

    H, W, T = geo["H"], geo["W"], geo["text_len"]
    L, C, D = T + H * W, cfg["in_channels"], cfg["llm_features_dim"]
    # Ideogram4Pipeline: one sequence of [text slots | image tokens]; the latent lives in the image slots and
    # the LLM features in the text slots (zeros elsewhere); 3-axis positions, image ones offset
    x = gen.randn(B, L, C)
    enc = gen.randn(B, L, D)
    if not gen.meta:
        x[:, :T] = 0
        enc[:, T:] = 0
    pos = torch.zeros(B, L, 3, dtype=torch.long)
    pos[:, :T] = torch.arange(T)[:, None]
    grid = _ids_grid(1, H, W)
    pos[:, T:, 0] = m.IMAGE_POSITION_OFFSET
    pos[:, T:, 1:] = grid[:, 1:] + m.IMAGE_POSITION_OFFSET
    ind = torch.full((B, L), m.OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    ind[:, :T] = m.LLM_TOKEN_INDICATOR
    return dict(hidden_states=x, encoder_hidden_states=enc, timestep=gen.rand(B), position_ids=gen.const(pos),
                segment_ids=gen.const(torch.ones(B, L, dtype=torch.long)), indicator=gen.const(ind),
                return_dict=False)


_more("Ideogram4Transformer2DModel",
      dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=64,
           adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1)),
      _ideogram4, None, pipeline="Ideogram4Pipeline", spatial=8, temporal=None, pack=2, patch=(1, 1),
      tiny=(128, 128, None, 16))


def _stable_audio3(cfg, geo, gen, B):
    L, T = geo["H"], geo["text_len"]
    return dict(hidden_states=gen.randn(B, cfg["io_channels"], L), timestep=gen.rand(B),
                encoder_hidden_states=gen.randn(B, T, cfg["cond_token_dim"]),
                global_hidden_states=gen.randn(B, cfg["global_cond_dim"]),
                encoder_attention_mask=gen.mask(B, T, torch.bool), return_dict=False)


_more("StableAudio3DiTModel",
      dict(io_channels=8, patch_size=1, embed_dim=32, depth=2, num_heads=4, cond_token_dim=16, global_cond_dim=12,
           local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
           use_differential_attention=True),
      _stable_audio3, lambda d: dict(hidden_states={2: d.H}, encoder_hidden_states={1: d.T},
                                     encoder_attention_mask={1: d.T}),
      pipeline="StableAudio3Pipeline", tiny=(32, 1, None, 16), **_AUDIO)


def _omnigen(cfg, geo, gen, B):
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    L = T + 1 + H * W  # text, the time token, the image tokens (OmniGenMultiModalProcessor's layout)
    mask = torch.tril(torch.ones(L, L))
    mask[T:, :] = 1  # the time and image tokens attend to everything (causal text, bidirectional image)
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]), timestep=gen.rand(B),
                input_ids=gen.randint(cfg["vocab_size"], B, T), input_img_latents=[], input_image_sizes={},
                attention_mask=gen.const(mask.expand(B, L, L).to(gen.dtype)),
                position_ids=gen.const(torch.arange(L).expand(B, L)), return_dict=False)


_more("OmniGenTransformer2DModel",
      dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64, num_layers=2,
           pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=16, pos_embed_max_size=32,
           rope_scaling={"long_factor": [1.0, 1.0, 1.0, 1.0], "short_factor": [1.0, 1.0, 1.0, 1.0]}),
      _omnigen, None, pipeline="OmniGenPipeline", spatial=8, temporal=None, patch=(1, 2), text_kwarg="input_ids",
      tiny=(128, 128, None, 16))


def _kandinsky6(cfg, geo, gen, B):
    F, T = geo["lat_f"], geo["text_len"]
    return dict(hidden_states=gen.randn(B, F, geo["lat_h"], geo["lat_w"], cfg["in_visual_dim"]),
                encoder_hidden_states=gen.randn(B, T, cfg["in_text_dim"]),
                pooled_projections=gen.randn(B, cfg["in_text_dim2"]), timestep=gen.rand(B, scale=1000.0),
                encoder_attention_mask=gen.mask(B, T, torch.bool), return_dict=False)


_more("Kandinsky6Transformer3DModel",
      dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=16, patch_size=(1, 2, 2),
           model_dim=64, ff_dim=128, num_text_blocks=2, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False,
           in_audio_dim=4, out_audio_dim=4),
      _kandinsky6, None, pipeline="Kandinsky6TI2VAPipeline", spatial=8, temporal=4, patch=(1, 2),
      tiny=(64, 64, 9, 16))


def _kandinsky6_sr(cfg, geo, gen, B):
    # Kandinsky6SRPipeline: [noisy latent | upsampled low-res latent | mask], channels last
    return dict(hidden_states=gen.randn(B, geo["lat_f"], geo["lat_h"], geo["lat_w"], cfg["in_visual_dim"] * 2 + 1),
                timestep=gen.rand(B, scale=1000.0), return_dict=False)


_more("Kandinsky6SRTransformer3DModel",
      dict(in_visual_dim=8, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=64, ff_dim=128,
           num_visual_blocks=2, axes_dims=(4, 6, 6)),
      _kandinsky6_sr, lambda d: dict(hidden_states={1: d.F, 2: d.H, 3: d.W}),
      pipeline="Kandinsky6SRPipeline", spatial=8, temporal=4, patch=(1, 1), text_kwarg=None, tiny=(128, 128, 9, None))


def _prior(cfg, geo, gen, B):
    # the denoised "sample" is one CLIP image embedding; the sequence is the text tokens plus a few slots
    d = cfg["embedding_dim"]
    return dict(hidden_states=gen.randn(B, d), timestep=gen.rand(B, scale=1000.0), proj_embedding=gen.randn(B, d),
                encoder_hidden_states=gen.randn(B, cfg["num_embeddings"], d),
                attention_mask=gen.mask(B, cfg["num_embeddings"], torch.bool), return_dict=False)


_more("PriorTransformer",
      dict(num_attention_heads=4, attention_head_dim=8, num_layers=2, embedding_dim=32, num_embeddings=16,
           additional_embeddings=4),
      _prior, None, pipeline="KandinskyPriorPipeline", spatial=1, temporal=None, patch=(1, 1), image_kwarg=None,
      tiny=(1, 1, None, 16))


def _bria_fibo2(cfg, geo, gen, B):
    T = geo["text_len"]
    # the text encoder's bundles: the Perceiver's first, then one per injection block
    bundles = 1 + len(cfg["injection_layer_ids"])
    return dict(hidden_states=gen.randn(B, cfg["in_channels"], geo["lat_h"], geo["lat_w"]), timestep=gen.rand(B),
                encoder_hidden_states=gen.randn(B, bundles, T, cfg["cap_feat_dim"]), return_dict=False)


_more("BriaFibo2Transformer2DModel",
      dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=2, n_heads=4, cap_feat_dim=16,
           injection_layer_ids=(0, 1), perceiver_num_layers=2, min_num_gist_tokens=4, max_num_gist_tokens=8,
           gist_step=4, gist_min_text_len=4, gist_max_text_len=32, axes_dims=(4, 2, 2), axes_lens=(64, 32, 32)),
      _bria_fibo2, lambda d: dict(hidden_states={2: d.p * d.H, 3: d.p * d.W}),
      pipeline="BriaFibo2Pipeline", spatial=8, temporal=None, patch=(1, 2), tiny=(128, 128, None, 16))


def _minimax_h3(cfg, geo, gen, B):
    F, H, W, T = geo["F"], geo["H"], geo["W"], geo["text_len"]
    A, V = 2 * F + 2, F * H * W  # audio latent frames for the clip; video tokens
    L = T + A + V
    pt, ph, pw = cfg["patch_size"]
    # one packed sequence [text | audio | video] (MiniMaxH3Pipeline's order); tags 0 video, 1 text, 2 audio;
    # timestep row 0 for text and video, row 1 for audio (its own schedule)
    tags = torch.zeros(L, dtype=torch.long)
    tags[:T], tags[T:T + A] = 1, 2
    t_idx = torch.zeros(L, dtype=torch.long)
    t_idx[T:T + A] = 1
    pos = torch.zeros(L, 3)
    pos[:T + A, 0] = torch.arange(T + A, dtype=torch.float32)
    grid = _ids_grid(F, H, W).float()
    pos[T + A:] = grid + torch.tensor([T + A, 0.0, 0.0])
    return dict(hidden_states=gen.randn(B, V, cfg["in_channels"] * pt * ph * pw),
                audio_hidden_states=gen.randn(B, A, cfg["audio_in_channels"]),
                encoder_hidden_states=gen.randn(B, T, cfg["text_dim"]), timestep=gen.rand(2),
                timestep_indices=gen.const(t_idx), token_tags=gen.const(tags), position_ids=gen.const(pos.to(gen.dtype)),
                video_indices=gen.const(torch.arange(T + A, L)), audio_indices=gen.const(torch.arange(T, T + A)),
                text_indices=gen.const(torch.arange(T)), return_dict=False)


_more("MiniMaxH3Transformer3DModel",
      dict(num_attention_heads=4, attention_head_dim=16, hidden_size=48, num_layers=2, num_refiner_layers=2,
           ffn_dim=64, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=16, freq_dim=16,
           time_embed_hidden_dim=48, time_embed_dim=16, rope_freq_dim=2),
      _minimax_h3, None, pipeline="MiniMaxH3Pipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _joy_plus(cfg, geo, gen, B):
    # JoyImageEditPlusPipeline patchifies outside: [B, tokens, C, pt, ph, pw]; shape_list is the (t, h, w) token
    # grid of each image (text to image: the target only)
    H, W, T = geo["H"], geo["W"], geo["text_len"]
    pt, ph, pw = cfg["patch_size"]
    return dict(hidden_states=gen.randn(B, H * W, cfg["in_channels"], pt, ph, pw), timestep=gen.rand(B),
                encoder_hidden_states=gen.randn(B, T, cfg["text_dim"]),
                encoder_hidden_states_mask=gen.mask(B, T, torch.long), shape_list=[[(1, H, W)]] * B,
                return_dict=False)


_more("JoyImageEditPlusTransformer3DModel",
      dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=64, num_attention_heads=4, text_dim=32, num_layers=2,
           rope_dim_list=[4, 6, 6], theta=256),
      _joy_plus, None, pipeline="JoyImageEditPlusPipeline", spatial=8, temporal=None, patch=(1, 2),
      tiny=(128, 128, None, 16))


def _anyflow_far(cfg, geo, gen, B):
    out = _anyflow(cfg, geo, gen, B)
    F = geo["lat_f"]
    out["chunk_partition"] = [1, F - 1] if F > 1 else [1]  # first frame, then the rest (the model builds the mask)
    out["return_dict"] = out.pop("return_dict")
    return out


_more("AnyFlowFARTransformer3DModel",
      dict(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=4,
           attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
           cross_attn_norm=True, rope_max_seq_len=32),
      _anyflow_far, None, pipeline="AnyFlowFARPipeline", spatial=8, temporal=4, patch=(1, 2), tiny=(64, 64, 9, 16))


def _sana_wm_refiner(cfg, geo, gen, B):
    F, H, W, T = geo["F"], geo["H"], geo["W"], geo["text_len"]
    # SanaWMLTX2Refiner builds the RoPE of the window's absolute frames with the model's own method; the module
    # has no weights there, so a throwaway instance of the tiny config computes it
    import diffusers

    with torch.random.fork_rng():
        rope_model = diffusers.SanaWMLTX2RefinerTransformer3DModel(**_CONFIGS["SanaWMLTX2RefinerTransformer3DModel"]
                                                                  ["tiny"])
    cos, sin = rope_model.build_rotary_emb_for_absolute_positions(B, list(range(F)), H, W, "cpu", 24.0)
    return dict(hidden_states=gen.randn(B, F * H * W, cfg["in_channels"]),
                encoder_hidden_states=gen.randn(B, T, cfg["caption_channels"]),
                timestep=gen.rand(B, F * H * W, scale=1000.0), video_rotary_emb=(gen.const(cos), gen.const(sin)),
                encoder_attention_mask=gen.mask(B, T, torch.long), return_dict=False)


_more("SanaWMLTX2RefinerTransformer3DModel",
      dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
           cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=4,
           audio_attention_head_dim=8, audio_cross_attention_dim=32, num_layers=2, caption_channels=32,
           rope_double_precision=False),
      _sana_wm_refiner, None, pipeline="SanaWMLTX2Refiner", spatial=32, temporal=8, patch=(1, 1),
      tiny=(128, 128, 17, 16))


# ---- batch 6: the last denoisers (in-context K/V cache, unified LLM, world model, protein) ----

def _kv_cache_pytree():
    """Make `WanAnimate2KVCache` a pytree of its layers' (key, value) tensors, so that ``torch.export`` takes the
    filled cache as a graph input (it rejects objects it cannot flatten) and rebuilds it for the forward, like
    transformers registers its ``DynamicCache``. Idempotent."""
    import torch.utils._pytree as pytree
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    if WanAnimate2KVCache in pytree.SUPPORTED_NODES:
        return

    def flatten(c):
        return [t for lc in c.layer_caches for t in (lc.key, lc.value)], len(c.layer_caches)

    def unflatten(leaves, n):
        c = WanAnimate2KVCache(n)
        for i, lc in enumerate(c.layer_caches):
            lc.key, lc.value = leaves[2 * i], leaves[2 * i + 1]
        return c

    def flatten_with_keys(c):
        leaves, n = flatten(c)
        return [(pytree.SequenceKey(i), t) for i, t in enumerate(leaves)], n

    pytree.register_pytree_node(WanAnimate2KVCache, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys,
                                serialized_type_name="diffusers.WanAnimate2KVCache")


def _wan_animate2(cfg, geo, gen, B):
    """The denoising call of WanAnimate2's segment loop (`WanAnimate2SegmentDenoiseInner`, first segment):
    ``kv_cache_mode="cached"`` over [reference-image slot | segment frames], attending to the K/V cache that the
    reference-extraction pass (`WanAnimate2RefExtractStep`, ``"extract"`` over the driving-video segment) filled.
    The builder runs that extract pass itself, on a throwaway model of the same config and seed 0 (what ``build``
    gives), so the cache holds real reference K/V; on the meta device the cache holds empty tensors."""
    import diffusers
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    _kv_cache_pytree()
    F, H, W, T = geo["lat_f"], geo["H"], geo["W"], geo["text_len"]
    h, w, C = geo["lat_h"], geo["lat_w"], cfg["out_dim"]
    if cfg["in_dim"] != 2 * C + 4:
        raise ValueError("WanAnimate2Transformer3DModel: in_dim must be 2 * out_dim + 4 (noise, i2v mask, latents)")
    if geo["height"] * geo["width"] // 256 != H * W:
        raise ValueError("WanAnimate2Transformer3DModel: the model derives the token grid as height * width / 256 "
                         "(VAE 8, patch 2)")
    heads, L = cfg["num_heads"], cfg["num_layers"]

    def prompt():  # get_t5_prompt_embeds: trimmed to the prompt's length, zero-padded to max_sequence_length
        e = gen.randn(T, cfg["text_dim"])
        if not gen.meta:
            e[T - T // 4:] = 0
        return e

    def ones(*shape):
        return gen.full(shape, 1.0)

    grid_ref = gen.const(torch.tensor([[F, H, W]] * B, dtype=torch.long))
    clip = gen.randn(B, 5, 1280)  # CLIP ViT-H hidden_states[-2] of the reference image (257 tokens at 224 px)
    cache = WanAnimate2KVCache(L)
    if gen.meta:
        for i in range(L):
            cache.get(i).store(gen.randn(B, F * H * W, heads, cfg["dim"] // heads),
                               gen.randn(B, F * H * W, heads, cfg["dim"] // heads))
    else:
        # the extract pass: driving-video latents, conditioned on [i2v mask (all frames kept) | the same latents]
        driving = [gen.randn(C, F, h, w) for _ in range(B)]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            ref_model = diffusers.WanAnimate2Transformer3DModel(**cfg)
            _reinit_(ref_model, 0)
        ref_model = _cast(ref_model.to(device=gen.device), gen.dtype).eval()
        with torch.no_grad():
            ref_model(driving, timestep=gen.rand(B, scale=1000.0), encoder_hidden_states=[prompt() for _ in range(B)],
                      encoder_hidden_states_image=gen.randn(B, 5, 1280),
                      condition_latents=[torch.cat([ones(4, F, h, w), d]) for d in driving], kv_cache=cache,
                      kv_cache_mode="extract", seq_len=F * H * W, offset_grid_sizes=grid_ref)
    # the generation side: noise over 1 + F latent frames; condition = [reference image: mask 1 | its latents]
    # then [previous segment's tail: mask 0 on the first segment | VAE latents of zero frames]
    cond = []
    for _ in range(B):
        mask = torch.cat([ones(4, 1, h, w), gen.full((4, F, h, w), 0.0)], 1)
        cond.append(torch.cat([mask, gen.randn(C, 1 + F, h, w)]))
    return dict(hidden_states=[gen.randn(C, 1 + F, h, w) for _ in range(B)], timestep=gen.rand(B, scale=1000.0),
                encoder_hidden_states=[prompt() for _ in range(B)], condition_latents=cond, kv_cache=cache,
                kv_cache_mode="cached", seq_len=(1 + F) * H * W, encoder_hidden_states_image=clip,
                reference_grid_sizes=grid_ref, origin_len=geo["frames"], origin_area=[geo["height"], geo["width"]],
                is_uncondtion=False, return_dict=False)


def _wan_animate2_warm(model, name, size):
    """Build the in-context BlockMask of the default geometry into ``model.block_masks`` with
    ``create_block_mask(_compile=False)``: the model's ``create_mask`` compiles it (``_compile=True``), which takes
    8-17 s on 2 CPU cores before the first forward; the eager mask is the same (``to_dense()`` equal) and takes
    ~10 ms. Other geometries are left to the model."""
    from diffusers.models.transformers import transformer_wan_animate_2 as wa2

    if size != "tiny":
        return
    geo = _geometry(name, size, None, None, None, None)
    key = (geo["frames"] // 4 + 1, geo["height"] * geo["width"] // 256)  # forward's (origin_len, origin_area) key
    compiled = wa2.create_block_mask
    wa2.create_block_mask = lambda *a, **k: compiled(*a, **dict(k, _compile=False))
    try:
        model.block_masks[key] = model.create_mask(*key, model.patch_embedding.weight.device)
    finally:
        wa2.create_block_mask = compiled


_more("WanAnimate2Transformer3DModel",
      dict(patch_size=(1, 2, 2), text_len=16, in_dim=12, dim=64, ffn_dim=128, freq_dim=32, text_dim=32, out_dim=4,
           num_heads=4, num_layers=2, cross_attn_norm=True, use_img_emb=True),
      _wan_animate2, None, pipeline="WanAnimate2ModularPipeline", spatial=8, temporal=4, patch=(1, 2),
      tiny=(64, 64, 9, 16), warm=_wan_animate2_warm)


def _cosmos3(cfg, geo, gen, B):
    """Cosmos3OmniPipeline's text-to-video denoising call (the conditional pass): one packed sequence without a batch
    dim, [prompt tokens (causal "understanding" prefix) | vision tokens (generation)], 3-axis mRoPE positions built
    with the pipeline's own helpers (float positions: fps modulation on), every latent frame noisy."""
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (get_3d_mrope_ids_text_tokens,
                                                                   get_3d_mrope_ids_vae_tokens)

    if B != 1:
        raise ValueError("Cosmos3OmniTransformer: Cosmos3OmniPipeline runs one sample at a time (the joint sequence "
                         "is packed without a batch dim); use batch=1")
    F, H, W, T = geo["lat_f"], geo["H"], geo["W"], geo["text_len"]
    N = F * H * W
    text_pos, offset = get_3d_mrope_ids_text_tokens(T, 0, use_float_positions=cfg["enable_fps_modulation"])
    vis_pos, _ = get_3d_mrope_ids_vae_tokens(
        F, H, W, offset + cfg["unified_3d_mrope_temporal_modality_margin"],
        reset_spatial_indices=cfg["unified_3d_mrope_reset_spatial_ids"],
        fps=24.0 if cfg["enable_fps_modulation"] else None, base_fps=float(cfg["base_fps"]),
        temporal_compression_factor=_INFO["Cosmos3OmniTransformer"]["temporal"])
    pos = torch.cat([text_pos.to(vis_pos.dtype), vis_pos], 1)
    if pos.is_floating_point():
        pos = pos.to(gen.dtype)
    return dict(input_ids=gen.randint(cfg["vocab_size"], T), text_indexes=gen.const(torch.arange(T)),
                position_ids=gen.const(pos), und_len=T, sequence_length=T + N,
                vision_tokens=[gen.randn(1, cfg["latent_channel"], F, geo["lat_h"], geo["lat_w"])],
                vision_token_shapes=[(F, H, W)], vision_sequence_indexes=gen.const(torch.arange(T, T + N)),
                vision_mse_loss_indexes=gen.const(torch.arange(T, T + N)),
                vision_timesteps=gen.full((N,), 937.5),  # torch.full((noisy tokens,), t)
                vision_noisy_frame_indexes=[gen.const(torch.arange(F))], return_dict=False)


_more("Cosmos3OmniTransformer",
      dict(head_dim=16, hidden_size=64, intermediate_size=128, latent_channel=4, latent_patch_size=2,
           num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2, patch_latent_dim=16, vocab_size=1000,
           rope_axes_dim=(4, 2, 2)),
      _cosmos3, None, pipeline="Cosmos3OmniPipeline", spatial=16, temporal=4, patch=(1, 2), text_kwarg="input_ids",
      image_kwarg="vision_tokens", tiny=(128, 128, 9, 16))


def _sana_wm(cfg, geo, gen, B):
    """SanaWMPipeline's denoising call: LTX-2 latents whose first frame is the clean image anchor (timestep 0), a
    camera trajectory from the pipeline's WASD action DSL (forward, then right while yawing) turned into the
    per-latent-frame raymap [F, 20] and the chunked Plücker rays [48, F, h, w] by its own `prepare_camera`, Gemma
    embeddings [B, 1, L, D] with their padding mask, and ``data_info`` = the image size."""
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import action_string_to_c2w, prepare_camera

    F, T, h, w = geo["lat_f"], geo["text_len"], geo["lat_h"], geo["lat_w"]
    frames, height, width = geo["frames"], geo["height"], geo["width"]
    n1 = (frames - 1) // 2
    steps = ",".join(s for s in (f"w-{n1}" if n1 else "", f"dl-{frames - 1 - n1}" if frames - 1 - n1 else "") if s)
    c2w = action_string_to_c2w(steps)[:frames] if steps else np.eye(4, dtype=np.float32)[None]
    fx = 0.5 * width / math.tan(math.radians(30))  # a 60 degree horizontal field of view
    intr = np.array([[fx, fx, width / 2, height / 2]] * frames, dtype=np.float32)
    cam = prepare_camera(c2w, intr, target_size=(height, width),
                         vae_stride=(_INFO["SanaWMTransformer3DModel"]["temporal"],) + (_INFO["SanaWMTransformer3DModel"]
                                                                                        ["spatial"],) * 2)
    x = gen.randn(B, cfg["in_channels"], F, h, w)
    t = torch.full((B, 1, F), 937.0)
    t[:, :, 0] = 0.0  # torch.min(t, (1 - condition_mask) * 1000): the anchor frame stays clean
    return dict(hidden_states=x, timestep=gen.const(t.to(gen.dtype)),
                encoder_hidden_states=gen.randn(B, 1, T, cfg["caption_channels"]), return_dict=False,
                data_info={"img_hw": gen.const(torch.tensor([[height, width]], dtype=torch.float32))},
                mask=gen.mask(B, T, torch.long),
                camera_conditions=gen.const(cam["raymap"].expand(B, -1, -1).to(gen.dtype)),
                chunk_plucker=gen.const(cam["chunk_plucker"].expand(B, -1, -1, -1, -1).to(gen.dtype)))


_more("SanaWMTransformer3DModel",
      dict(in_channels=8, num_layers=2, hidden_size=64, num_attention_heads=4, softmax_every_n=2, linear_head_dim=16,
           chunk_plucker_post_attn_blocks=2, caption_channels=32, mlp_ratio=2.0),
      _sana_wm, lambda d: dict(encoder_hidden_states={2: d.T}, mask={1: d.T}),  # F, H, W: STATIC_REASONS
      pipeline="SanaWMPipeline", spatial=32, temporal=8, patch=(1, 1), tiny=(192, 256, 17, 16))


def _rfd4_proteina(cfg, geo, gen, B):
    """One RFD4ProteinaPipeline denoising step for an unconditional design of one protein chain: the tokens are its
    residues ("height" is the residue count). The pipeline's state (zero-centred backbone CA noise in nm, local
    latents, the two modality times, one trunk recycle pass more than the last steps of the released schedule) plus
    the prepared tensors the model reads: masks, token types (0: protein), backbone atom37 slots, the required
    atom-level interaction annotations (all unset: nothing conditioned), the sequence condition (0: designed),
    molecule / entity ids and the token bond-path lengths |i - j| along the chain."""
    from diffusers.models.transformers.transformer_rfd4_proteina import CONDITION_KEYS

    N = geo["H"]
    real = torch.ones(B, N, dtype=torch.bool)
    atoms = torch.zeros(B, N, 37, dtype=torch.bool)
    atoms[..., :5] = True  # N, CA, C, CB, O
    bb = gen.randn(B, N, 3)
    if not gen.meta:
        bb = bb - bb.mean(1, keepdim=True)  # RFD4ProteinaPipeline._sample_noise(zero_com=True)
    idx = torch.arange(N)
    zeros_atom = torch.zeros(B, N, 37, dtype=torch.long)
    conditioning = {CONDITION_KEYS[k]: gen.const(zeros_atom.clone())
                    for k in ("hbond", "pistack", "pication", "saltbridge", "hydrophobic", "metal_coord")}
    conditioning.update({
        CONDITION_KEYS["sequence"]: gen.const(torch.zeros(B, N, dtype=torch.long)),
        CONDITION_KEYS["index_group"]: gen.const(torch.zeros(B, N, dtype=torch.long)),
        "molecule_iid": gen.const(torch.zeros(B, N, dtype=torch.long)),
        "molecule_entity_id": gen.const(torch.zeros(B, N, dtype=torch.long)),
        "token_bond_path_length": gen.const((idx[:, None] - idx[None, :]).abs().expand(B, N, N).clone()),
        # added by the pipeline before the denoising loop
        "is_in_context_conditioning": gen.const(torch.zeros(B, N, dtype=torch.bool)),
        "supports_local_latent": gen.const(real.clone()),
    })
    return dict(bb_ca=bb, local_latents=gen.randn(B, N, cfg["latent_dim"]), bb_ca_time=gen.full((B,), 0.5),
                local_latents_time=gen.full((B,), 0.5), padding_mask=gen.const(real),
                token_type=gen.const(torch.zeros(B, N, dtype=torch.long)), atom37_mask=gen.const(atoms),
                conditioning=conditioning, recycle_depth=2, return_dict=False)


def _dyn_rfd4(d):
    from diffusers.models.transformers.transformer_rfd4_proteina import CONDITION_KEYS

    tok, atom = {1: d.H}, {1: d.H}
    cond = {CONDITION_KEYS[k]: atom for k in ("hbond", "pistack", "pication", "saltbridge", "hydrophobic",
                                              "metal_coord")}
    cond.update({CONDITION_KEYS["sequence"]: tok, CONDITION_KEYS["index_group"]: tok, "molecule_iid": tok,
                 "molecule_entity_id": tok, "token_bond_path_length": {1: d.H, 2: d.H},
                 "is_in_context_conditioning": tok, "supports_local_latent": tok})
    return dict(bb_ca=tok, local_latents=tok, padding_mask=tok, token_type=tok, atom37_mask=atom, conditioning=cond)


_more("RFD4ProteinaTransformer",
      dict(nlayers=2, token_dim=32, nheads=4, dim_cond=16, pair_repr_dim=16, latent_dim=8, token_type_emb_dim=8,
           cath_emb_dim=4, t_emb_dim=16, seq_sep_dim=16, xt_pair_dist_dim=8, update_pair_repr_every_n=2,
           tri_mult_c=16),
      _rfd4_proteina, _dyn_rfd4, pipeline="RFD4ProteinaPipeline", spatial=1, temporal=None, patch=(1, 1),
      text_kwarg=None, image_kwarg="bb_ca", tiny=(20, 1, None, None))


# ---- registry ------------------------------------------------------------------------------

def _register_more():
    for name, (cfg, info, builder, dyn) in _MORE.items():
        MORE_NAMES.append(name)
        ALL_NAMES.append(name)
        _CONFIGS[name] = {"tiny": cfg}
        info = dict(info)
        info.setdefault("text_kwarg", "encoder_hidden_states")
        info.setdefault("image_kwarg", "hidden_states")
        _INFO[name] = info
        _BUILDERS[name] = builder
        if dyn is not None:
            _DYN[name] = dyn
        SIZES[name] = ["tiny"]


_DYN: dict[str, Callable] = {}
_register_more()

# Classes diffusers exports under a DiT-like name that are not a diffusion denoiser, and why.
EXCLUDED: dict[str, str] = {
    "Transformer2DModel": "generic transformer block (the cross-attention blocks of UNets); the DiT and PixArt "
                          "checkpoints that used it load as DiTTransformer2DModel / PixArtTransformer2DModel (in NAMES)",
    "TransformerTemporalModel": "temporal-attention block inside video UNets (AnimateDiff, VideoLDM), not a denoiser",
    "DreamLiteTransformer2DModel": "transformer block inside DreamLiteUNetModel (the DreamLite denoiser is the UNet)",
    "HunyuanDiT2DControlNetModel": "ControlNet: returns residuals for HunyuanDiT2DModel's blocks, not a prediction",
    "HunyuanDiT2DMultiControlNetModel": "a list of HunyuanDiT2DControlNetModel (ControlNet), not a denoiser",
    "LongCatAudioDiTVae": "the audio VAE of LongCat-AudioDiT (its denoiser, LongCatAudioDiTTransformer, is in the zoo)",
    "MiniMaxMusic3RVQDepthDecoder": "decodes residual-VQ codes of MiniMax-Music-3 (autoregressive), not a denoiser",
    "T5FilmDecoder": "not a DiT: the T5 decoder with FiLM of the deprecated SpectrogramDiffusionPipeline (MIDI to "
                     "spectrogram frames); outside the *Transformer*/DiT classes this zoo covers",
}

# Denoisers not yet in the zoo: what failed when building or running the tiny forward.
PENDING: dict[str, str] = {
}
