"""The one-line API: ``ditpass.parallelize(model_or_pipeline, plan)``."""
from __future__ import annotations

from collections.abc import Mapping

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
    plan = _plan_of(plan, plan_fields)
    if isinstance(model, ParallelModule):
        raise TypeError(f"this {type(model.module).__name__} is already parallelized (with {model.plan}): pass "
                        f"the original model, model.module, to parallelize it with another plan")
    if is_pipeline(model):
        return parallelize_pipeline(model, plan)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"parallelize() takes a transformer (a torch.nn.Module, e.g. pipe.transformer) or a "
                        f"diffusers pipeline (e.g. FluxPipeline.from_pretrained(...)), got {_what(model)}")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    plan.validate(world)
    return ParallelModule(model, plan)


def _plan_of(plan, fields: dict) -> Plan:
    """``plan``, or ``Plan(**fields)``; a clear error for anything else."""
    if fields:
        if plan is not None:
            raise TypeError(f"parallelize() got a plan and plan fields ({', '.join(fields)}): give one of them, "
                            f"e.g. parallelize(model, plan.replace({', '.join(f'{k}={v!r}' for k, v in fields.items())}))")
        return Plan.from_dict(fields)  # unknown fields: an error with a did-you-mean
    if plan is None:
        return Plan()
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        hint = f"ditpass.Plan.parse({plan!r})"
    elif isinstance(plan, Mapping):
        hint = "ditpass.Plan.from_dict(d), or the fields as keywords: parallelize(model, **d)"
    else:
        hint = "ditpass.Plan(ulysses=2), or the fields as keywords: parallelize(model, ulysses=2)"
    raise TypeError(f"parallelize() takes a ditpass.Plan as its plan, got {_what(plan)}: pass {hint}")


def _what(obj) -> str:
    text = repr(obj)
    return f"{type(obj).__name__} {text[:60] + '...' if len(text) > 60 else text}"
