"""The one-line API: ``ditpass.parallelize(model_or_pipeline, plan)``."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .components import is_pipeline, parallelize_pipeline
from .module import ParallelModule
from .plan import Plan

__all__ = ["parallelize"]


def parallelize(model, plan: Plan | None = None, **plan_fields):
    """Return ``model`` rewritten for ``plan`` (or ``Plan(**plan_fields)``).

    ``model``: a transformer (an ``nn.Module``; a `ParallelModule` comes back) or a diffusers pipeline
    (its components are wrapped by role and the pipeline comes back; `ditpass.components`).
    Under ``torchrun``: uses the default process group if one is initialised, else initialises it
    from torchrun's environment. Every rank passes the same full inputs and gets the full output.
    """
    plan = plan or Plan(**plan_fields)
    if is_pipeline(model):
        return parallelize_pipeline(model, plan)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"parallelize() takes a transformer (torch.nn.Module) or a diffusers pipeline, "
                        f"got {type(model).__name__}")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    plan.validate(world)
    return ParallelModule(model, plan)
