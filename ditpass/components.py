"""``ditpass.parallelize(pipe, plan)`` for a diffusers pipeline: components by role, one hook around the call.

    pipe = ditpass.parallelize(pipe, ditpass.Plan(cfg=2, ulysses=2))   # under torchrun, 4 ranks
    image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]

No per-pipeline code. The pipeline's components are taken by role (`roles`): ``transformer`` (the
denoisers: ``pipe.transformer``, and ``pipe.transformer_2`` where a pipeline has two, e.g. Wan 2.2) and
``vae``. The transformers are wrapped (`ditpass.ParallelModule`, which builds them with
``passes_for("transformer", plan)``); with ``Plan(vae=True)`` each VAE's ``decode`` is replaced by a
`ditpass.vae.ParallelDecode` (``passes_for("vae", plan)``: the decoder's maps in row bands over every
rank), else the VAE runs as it is. Every rank runs the whole pipeline (text encoders, scheduler, VAE)
with the same inputs.

**The pipeline hook.** ``pipe(...)`` runs inside `Generation`: one place that knows where a
generation starts and ends, written once for every pipeline (the pipeline's class is swapped for a
subclass of it, same name, whose ``__call__`` wraps the original). At the start it resets every
wrapped model's run state (`ditpass.runtime.state.RunState`); every scheduler step counts as a step
of that state; later passes hang their per-generation work here (PipeFusion's patch loop).

Each transformer is replaced by a `ditpass.ParallelModule` that

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
schedulers draw noise at each step). Without one, the pipeline draws from torch's global random
number generators, which torch seeds differently in each process; so during a generation every rank
draws from a copy of global rank 0's (`_same_random_draws`; each rank's own state comes back after):
every unseeded draw of the call, whoever makes it (the initial noise of pipelines without
``prepare_latents``, such as ``DiTPipeline``'s ``randn_tensor``, a stochastic scheduler's noise), is
the same on every rank and the one a single process seeded as rank 0 makes, with no knowledge of
where the pipeline draws. As a safeguard against
generators seeded per rank, the initial latents from the pipeline's ``prepare_latents`` (where it has
one) are broadcast from global rank 0; any other difference is caught by the transformer's input check
(``Plan.check_inputs``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist

from .errors import PlanError
from .module import ParallelModule
from .plan import Plan

__all__ = ["parallelize_pipeline", "is_pipeline", "roles", "Generation", "denoising_loop"]

ROLES = ("transformer", "vae")


def is_pipeline(obj: Any) -> bool:
    """True for a diffusers ``DiffusionPipeline`` (or anything shaped like one: ``components``)."""
    if isinstance(obj, torch.nn.Module):
        return False
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline) or isinstance(getattr(obj, "components", None), dict)


def roles(pipe) -> dict[str, dict[str, torch.nn.Module]]:
    """The pipeline's modules by role: ``{"transformer": {"transformer": m, "transformer_2": m2}, "vae": {...}}``."""
    out: dict[str, dict[str, torch.nn.Module]] = {role: {} for role in ROLES}
    for name, m in pipe.components.items():
        if not isinstance(m, torch.nn.Module):
            continue
        for role in ROLES:
            if name == role or name.startswith(role + "_"):
                out[role][name] = m
    return out


class Generation:
    """The hook around one pipeline call: what starts and ends a generation (see the module doc)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def models(self) -> list[ParallelModule]:
        return [m for group in roles(self.pipe).values() for m in group.values() if isinstance(m, ParallelModule)]

    @contextlib.contextmanager
    def run(self):
        with _same_random_draws(), self._counted():
            yield

    def finish(self, out):
        """After the pipeline returned: lazy tensors in what it returns (``output_type="latent"`` under
        PipeFusion across steps) made whole, and the PipeFusion runners' outputs and sends settled (every
        rank, in the same order)."""
        from .runtime import lazy

        if lazy.any_lazy(out):
            out = _map_tensors(out, lambda t: lazy.materialize(t) if lazy.is_lazy(t) else t)
        for m in self.models():
            for rec in m.ditpass_records:
                finish = getattr(rec.runner, "finish", None)
                if finish is not None:
                    finish()
        return out

    @contextlib.contextmanager
    def _counted(self):
        models = self.models()
        for m in models:
            m.ditpass_state.reset()
        scheduler = getattr(self.pipe, "scheduler", None)
        step = getattr(scheduler, "step", None)
        for m in models:
            m.ditpass_state.steps_counted = step is not None
        if step is not None:
            def counted(*args, **kwargs):
                for m in models:
                    m.ditpass_state.step += 1
                return step(*args, **kwargs)

            scheduler.step = counted  # an instance attribute: removed again below
        try:
            yield
        finally:
            if step is not None:
                del scheduler.step


class _Parts:
    """What `Generation` needs of a pipeline, for a loop written by hand."""

    def __init__(self, models: dict, scheduler):
        self.components = dict(models, scheduler=scheduler)
        self.scheduler = scheduler


class denoising_loop:
    """The pipeline hook for a denoising loop written by hand (no diffusers pipeline around it)::

        with ditpass.denoising_loop(model, scheduler) as loop:
            for t in scheduler.timesteps:
                latents = scheduler.step(model(latents, t), t, latents).prev_sample
            latents = loop.finish(latents)      # whole, on every rank

    As in a pipeline call: the model's run state is reset, every ``scheduler.step`` counts as a diffusion
    step (warm-up steps, step caches), every rank draws the same unseeded random numbers, and PipeFusion
    pipelines across steps (the model returns lazy tensors until ``finish``, or an op that needs the values,
    makes them whole: `ditpass.runtime.lazy`). ``model``: a `ParallelModule`, or a dict of them by name."""

    def __init__(self, model, scheduler):
        models = list(model.values()) if isinstance(model, dict) else [model]
        models = {("transformer" if i == 0 else f"transformer_{i + 1}"): m for i, m in enumerate(models)}
        self._hook = Generation(_Parts(models, scheduler))
        self._run = None

    def __enter__(self):
        self._run = self._hook.run()
        self._run.__enter__()
        return self

    def finish(self, out):
        """``out`` with every lazy tensor in it made whole (collective: call it on every rank)."""
        return self._hook.finish(out)

    def __exit__(self, *exc):
        if exc[0] is None:
            self._hook.finish(None)
        return self._run.__exit__(*exc)


@contextlib.contextmanager
def _same_random_draws():
    """Every rank draws from rank 0's global generators (CPU, this GPU) during the generation: rank 0 as a
    single process would, the others from a copy of its state, their own put back after."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = [torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None]
    dist.broadcast_object_list(states, src=0)
    if dist.get_rank() == 0:
        yield
        return
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.set_rng_state(states[0])
        if cuda and states[1] is not None:
            torch.cuda.set_rng_state(states[1])
        yield


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor in it: pytrees, and the dataclass / dict outputs of
    diffusers pipelines (``ImagePipelineOutput``), whose fields are set again in place."""
    from torch.utils import _pytree as pytree

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _map_tensors(getattr(obj, f.name), fn))
        return obj
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _map_tensors(obj[k], fn)
        return obj
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, obj)


def _install_hook(pipe) -> Generation:
    """Swap the pipeline's class for a same-named subclass whose ``__call__`` runs in `Generation`
    (Python looks ``__call__`` up on the class, so an instance attribute would not do); idempotent."""
    hook = pipe.__dict__.get("_ditpass_generation")
    if hook is not None:
        return hook
    hook = pipe.__dict__["_ditpass_generation"] = Generation(pipe)
    base = type(pipe)

    @functools.wraps(base.__call__)  # the pipeline's own signature and docs (tools inspect them)
    def __call__(self, *args, **kwargs):
        hook = self._ditpass_generation
        with hook.run():
            return hook.finish(base.__call__(self, *args, **kwargs))

    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                                   "__qualname__": base.__qualname__})
    return hook


def parallelize_pipeline(pipe, plan: Plan):
    """Wrap the pipeline's components for ``plan`` by role, install the hook; return ``pipe``.

    Calling it again with another plan re-wraps the original transformer (no nesting).
    """
    by_role = roles(pipe)
    if not by_role["transformer"]:
        denoisers = [n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)]
        raise PlanError(
            f"{type(pipe).__name__} has no transformer component (its modules: {', '.join(denoisers) or 'none'}): "
            f"ditpass parallelizes Diffusion Transformer pipelines, whose denoiser is pipe.transformer; "
            f"UNet pipelines are not supported")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    plan.validate(world)
    for name, module in by_role["transformer"].items():
        if isinstance(module, ParallelModule):
            module = module.module
        setattr(pipe, name, ParallelModule(module, plan))
    for vae in by_role["vae"].values():
        _parallel_decode(vae, plan)
    _install_hook(pipe)
    _same_initial_latents(pipe)
    return pipe


def _parallel_decode(vae, plan: Plan) -> None:
    """``vae.decode`` on row bands over every rank when ``plan.vae`` (and more than one rank), else the VAE's own
    (a plan without ``vae`` after one with it puts the original back)."""
    from .vae import ParallelDecode

    original = vae.__dict__.pop("_ditpass_decode", None)
    if original is not None:
        vae.__dict__.pop("decode", None)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if plan.vae and world > 1 and hasattr(vae, "decode"):
        vae.decode = ParallelDecode(vae, plan)


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
