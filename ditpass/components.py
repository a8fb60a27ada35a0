"""``ditpass.parallelize(pipe, plan)`` for a diffusers pipeline: CFG, data and sequence parallel.

    pipe = ditpass.parallelize(pipe, ditpass.Plan(cfg=2, ulysses=2))   # under torchrun, 4 ranks
    image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]

No per-pipeline code. Every rank runs the whole pipeline (text encoders, scheduler, VAE) with the
same inputs; only the transformer is parallel. ``pipe.transformer`` (and ``pipe.transformer_2``
where a pipeline has two, e.g. Wan 2.2) is replaced by a `ditpass.ParallelModule` that

- runs the sequence-parallel graph when ``ring * ulysses > 1``;
- when ``dp * cfg > 1``, splits the batch of each transformer call over the ``dp x cfg`` ranks
  and all-gathers the outputs (`ditpass.runtime.batch`), so the guidance and scheduler steps
  after the call see the full batch on every rank and stay identical to the single-device run.

CFG parallel is therefore batch parallel of the guidance batch: pipelines that concatenate the
unconditional and conditional inputs into one transformer call (PixArt-alpha/Sigma, SD3, DiT,
Hunyuan-DiT, Latte, CogVideoX, Mochi, LTX-Video, Allegro, Sana, ...) get one half per cfg rank.

**Not covered by cfg=2**: pipelines that call the transformer twice per step, once conditional
and once unconditional (FLUX.1's true CFG with ``negative_prompt``, Wan, CogView4, HunyuanVideo,
Qwen-Image, Lumina 2, Chroma, Cosmos, SkyReels-V2, Kandinsky 5, ...). Each of their calls carries
only the prompt batch, and running the two calls on two ranks at once would need the second call
before the first has returned, which a wrapper of the transformer cannot see. For such a pipeline
use ``dp`` (each call's prompts split over ranks) and sequence parallelism; with ``cfg=2`` a call
whose batch is odd raises `PlanError` saying this (an even batch of prompts is split like dp,
still exact). Also not covered: pipelines whose denoiser is a UNet (no ``transformer``).

Same inputs on every rank: pass a ``generator`` seeded identically on every rank (stochastic
schedulers draw noise at each step). As a safeguard, the initial latents from the pipeline's
``prepare_latents`` (where it has one) are broadcast from global rank 0.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .plan import Plan, PlanError

__all__ = ["parallelize_pipeline", "is_pipeline", "check_supported", "transformer_components"]


def check_supported(plan: Plan) -> None:
    """Raise `PlanError` for plan fields whose pass does not exist yet."""
    if plan.pipefusion > 1:
        raise PlanError(
            f"pipefusion={plan.pipefusion}: PipeFusion is not built yet: set pipefusion=1 (and drop "
            f"patches); split the sequence with ulysses/ring and the batch with cfg/dp instead")
    if plan.fastattn:
        raise PlanError(f"fastattn={plan.fastattn!r}: DiTFastAttn is not built yet: leave fastattn unset")
    if plan.overrides:
        raise PlanError(
            f"overrides={plan.overrides!r}: per-module overrides are validated, but no pass applies them yet; "
            f"drop them and use the plan-wide fields (e.g. attention={plan.attention!r})")


def is_pipeline(obj: Any) -> bool:
    """True for a diffusers ``DiffusionPipeline`` (or anything shaped like one: ``components``)."""
    if isinstance(obj, torch.nn.Module):
        return False
    try:
        from diffusers import DiffusionPipeline

        if isinstance(obj, DiffusionPipeline):
            return True
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    return isinstance(getattr(obj, "components", None), dict)


def transformer_components(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's denoising transformers by component name (``transformer``, ``transformer_2``)."""
    return {name: m for name, m in pipe.components.items()
            if name.startswith("transformer") and isinstance(m, torch.nn.Module)}


def parallelize_pipeline(pipe, plan: Plan):
    """Replace the pipeline's transformer(s) by `ditpass.ParallelModule` for ``plan``; return ``pipe``.

    Calling it again with another plan re-wraps the original transformer (no nesting).
    """
    from .api import ParallelModule

    check_supported(plan)
    found = transformer_components(pipe)
    if not found:
        denoisers = [n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)]
        raise PlanError(
            f"{type(pipe).__name__} has no transformer component (its modules: {', '.join(denoisers) or 'none'}): "
            f"ditpass parallelizes Diffusion Transformer pipelines, whose denoiser is pipe.transformer; "
            f"UNet pipelines are not supported")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    plan.validate(world)
    for name, module in found.items():
        if isinstance(module, ParallelModule):
            module = module.module
        setattr(pipe, name, ParallelModule(module, plan))
    _same_initial_latents(pipe)
    return pipe


def _same_initial_latents(pipe) -> None:
    """Broadcast what ``pipe.prepare_latents`` returns from global rank 0 (idempotent)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    original = pipe.__dict__.get("_ditpass_prepare_latents") or getattr(pipe, "prepare_latents", None)
    if original is None:
        return
    pipe.__dict__["_ditpass_prepare_latents"] = original

    def prepare_latents(*args, **kwargs):
        out = original(*args, **kwargs)
        from torch.utils import _pytree as pytree

        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                buf = t.contiguous()
                dist.broadcast(buf, src=0)
                if buf is not t:
                    t.copy_(buf)
        return out

    pipe.__dict__["prepare_latents"] = prepare_latents
