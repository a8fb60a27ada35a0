"""Model zoo: 12 real diffusers DiT classes, each with a tiny and a published full-size config.

API (others code against these names)::

    NAMES                                   the 12 diffusers class names
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

    if name not in NAMES:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {NAMES}")
    return getattr(diffusers, name)


def _sizes(name: str) -> list[str]:
    return list(_CONFIGS[name])


SIZES: dict[str, list[str]] = {n: list(_CONFIGS[n]) for n in NAMES}


def add_size(name: str, size: str, cfg: dict) -> None:
    """Make a config of a zoo class usable like the zoo's own sizes (``build``, ``make_inputs``,
    ``dynamic_dims``): e.g. the config.json of a user's saved model (keys starting with ``_`` dropped).
    Its default geometry is the ``full`` size's."""
    if name not in NAMES:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {NAMES}")
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
    return _cast(model.to(device=dev), dtype).eval()


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

    if name == "WanTransformer3DModel":
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
        "full_source": dict(FULL_SOURCES[name]),
        "vae_spatial": info["spatial"],
        "vae_temporal": info["temporal"],
        "static_dims": dict(STATIC_REASONS.get(name, {})),
        "guarded_dims": GUARDED.get(name),
    }
