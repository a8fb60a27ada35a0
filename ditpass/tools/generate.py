"""`ditpass generate`: run a diffusers pipeline under a plan and save what it makes.

    torchrun --nproc_per_node=2 -m ditpass generate --use_cfg_parallel --prompt 3
    python -m ditpass generate --model /path/to/diffusers/folder --prompt "a cat" --ulysses_degree 1

The flags are xDiT's. ``--model`` is ``digits`` (the built-in class-conditional DiT, the
default) or a local diffusers pipeline folder. Every rank runs the same pipeline with the same
seed; the plan splits the work (ditpass.parallelize); rank 0 shows the progress bar, saves the
images and prints one summary line.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import torch

__all__ = ["add_arguments", "run", "plan_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="'digits' (built-in) or a local diffusers pipeline folder")
    p.add_argument("--prompt", nargs="+", default=["3"], help="prompts (for the digits model: class names 0..9)")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_inference_steps", type=int, default=None, help="default: the model's own")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the model's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num_frames", type=int, default=None)
    p.add_argument("--output_dir", default="results")
    p.add_argument("--ulysses_degree", type=int, default=1)
    p.add_argument("--ring_degree", type=int, default=1)
    p.add_argument("--use_cfg_parallel", action="store_true", help="cond and uncond halves on two ranks")
    p.add_argument("--data_parallel_degree", type=int, default=1)
    p.add_argument("--pipefusion_parallel_degree", type=int, default=1, help="PipeFusion pipeline stages (blocks split over them)")
    p.add_argument("--num_pipeline_patch", type=int, default=None, help="PipeFusion patches of the token sequence (default: the stage count)")
    p.add_argument("--warmup_steps", type=int, default=1, help="PipeFusion steps run whole before the patch pipeline (stale K/V after)")
    p.add_argument("--use_torch_compile", action="store_true", help="Plan(compile='inductor')")
    p.add_argument("--use_fast_attn", action="store_true",
                   help="DiTFastAttn: calibrate a compression plan first (saved as fastattn_plan.json in --output_dir)")
    p.add_argument("--threshold", type=float, default=None, help="DiTFastAttn's error bound (default: Plan's)")
    p.add_argument("--window_size", type=float, default=None,
                   help="DiTFastAttn's window, a fraction of the sequence (default: Plan's; not xDiT's tokens)")
    p.add_argument("--n_calib", type=int, default=None, help="DiTFastAttn's calibration inputs (default: Plan's)")
    p.add_argument("--fast_attn_plan", default=None, help="DiTFastAttn with a saved plan (JSON): no calibration")
    p.add_argument("--cache_method", default=None, choices=("fbcache", "taylorseer"),
                   help="step cache: reuse (fbcache) or forecast (taylorseer) the middle blocks' residual")
    p.add_argument("--cache_threshold", type=float, default=None,
                   help="step cache: recompute when the first blocks' residual changed by this much (default: Plan's)")
    p.add_argument("--cache_first_blocks", type=int, default=None, help="step cache: blocks always run first")
    p.add_argument("--cache_last_blocks", type=int, default=None, help="step cache: blocks always run last")
    p.add_argument("--cache_warmup_steps", type=int, default=None, help="step cache: first steps always computed")
    p.add_argument("--cache_max_skip", type=int, default=None, help="step cache: most cached steps in a row")
    p.add_argument("--cache_order", type=int, default=None, help="TaylorSeer's forecast order (0, 1, 2)")
    p.add_argument("--plan", default=None, help="a saved Plan (JSON file) or 'k=v,...'; overrides the degree flags")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def plan_from_args(args):
    from ditpass.plan import Plan

    from ditpass.passes.registry import check_built
    from ditpass.plan import PlanError

    fast = {name: value for name, value in (("fastattn_threshold", args.threshold), ("fastattn_window", args.window_size),
                                            ("fastattn_calib", args.n_calib)) if value is not None}
    if args.fast_attn_plan or args.use_fast_attn:
        fast["fastattn"] = args.fast_attn_plan or True
    try:
        plan = Plan.parse(args.plan) if args.plan else Plan(
            dp=args.data_parallel_degree, cfg=2 if args.use_cfg_parallel else 1, ring=args.ring_degree,
            ulysses=args.ulysses_degree, pipefusion=args.pipefusion_parallel_degree, patches=args.num_pipeline_patch,
            warmup_steps=args.warmup_steps, compile="inductor" if args.use_torch_compile else "eager")
        if fast:
            plan = plan.replace(**fast)
        cache = {name: getattr(args, name) for name in ("cache_threshold", "cache_first_blocks", "cache_last_blocks",
                                                         "cache_warmup_steps", "cache_max_skip", "cache_order")
                 if getattr(args, name) is not None}
        if args.cache_method:
            cache["step_cache"] = args.cache_method
        if cache:
            plan = plan.replace(**cache)
        if isinstance(plan.fastattn, str):
            from ditpass.runtime.fastattn import load_plan

            load_plan(plan.fastattn)  # a missing or bad file is said now, before any model load
        check_built(plan)  # before any process group or model load: plan fields with no pass yet
    except PlanError as e:
        raise SystemExit(f"ditpass generate: {e}") from None
    return plan


def _load(model: str, device, dtype):
    if model == "digits":
        from ditpass.models import digits

        return digits.load_pipeline(device=device, dtype=dtype)
    if os.path.isdir(model):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    raise SystemExit(f"ditpass generate: --model {model!r} is neither 'digits' nor a local diffusers folder "
                     "(no hub downloads)")


def _call_kwargs(pipe, args, device) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    kw: dict = {}
    if hasattr(pipe, "get_label_ids") and "class_labels" in params:  # class-conditional: prompts are labels
        kw["class_labels"] = pipe.get_label_ids(args.prompt)
    else:
        kw["prompt"] = args.prompt
        if args.negative_prompt is not None and "negative_prompt" in params:
            kw["negative_prompt"] = [args.negative_prompt] * len(args.prompt)
    for name in ("height", "width", "num_frames", "num_inference_steps"):
        v = getattr(args, name)
        if v is not None:
            if name not in params:
                raise SystemExit(f"ditpass generate: --{name} is not a parameter of {type(pipe).__name__}")
            kw[name] = v
    if args.model == "digits":  # the sampling settings recorded with the built-in weights
        from ditpass.models import digits

        for name, value in digits.defaults().items():
            if name in params and getattr(args, name, None) is None:
                kw[name] = value
    if "guidance_scale" in params and args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    kw["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
    return kw


_PLAN_FILE = "fastattn_plan.json"


def _calibrate(pipe, plan, args, kw) -> float:
    """DiTFastAttn's calibration run, before the generation: ``n_calib`` inputs (digits: the classes 0, 1, ...;
    else the prompts, cycled), the generation's steps, guidance and seed; the plan is saved to --output_dir."""
    from ditpass.runtime.fastattn import calibrate

    os.makedirs(args.output_dir, exist_ok=True)
    calib = {k: v for k, v in kw.items() if k not in ("prompt", "class_labels", "negative_prompt")}
    calib["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
    if "class_labels" in kw:
        inputs = list(range(10)) if args.model == "digits" else list(kw["class_labels"])
    else:
        inputs = list(args.prompt)
        if args.negative_prompt is not None and "negative_prompt" in kw:
            calib["negative_prompt"] = [args.negative_prompt] * plan.fastattn_calib
    t0 = time.perf_counter()
    with torch.no_grad():
        calibrate(pipe, inputs, save=os.path.join(args.output_dir, _PLAN_FILE), **calib)
    return time.perf_counter() - t0


def _step_cache_summary(pipe) -> list[str]:
    """One line per step-cached transformer: which steps computed the middle blocks and which reused them."""
    lines = []
    for name in ("transformer", "transformer_2"):
        for record in getattr(getattr(pipe, name, None), "ditpass_records", ()):
            summary = getattr(record.runner, "summary", None)
            if summary is not None and record.runner.log:
                s = summary()
                lines.append(f"step cache ({name}): {s['computed']} of {s['calls']} steps computed, {s['cached']} "
                             f"reused (steps {s['cached_steps']})")
    return lines


def run(args) -> int:
    import torch.distributed as dist

    import ditpass
    from ditpass.mesh import init_distributed

    plan = plan_from_args(args)
    rank, world = init_distributed()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = _load(args.model, device, dtype)
    pipe.set_progress_bar_config(disable=rank != 0, desc=f"rank 0 of {world}, {plan}")
    if world > 1 or plan != ditpass.Plan():
        pipe = ditpass.parallelize(pipe, plan)
    kw = _call_kwargs(pipe, args, device)
    steps = kw.get("num_inference_steps") or inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    calib_s = None
    if plan.fastattn is True:
        pipe.set_progress_bar_config(disable=rank != 0, desc=f"rank 0 of {world}, DiTFastAttn calibration")
        calib_s = _calibrate(pipe, plan, args, kw)
        pipe.set_progress_bar_config(disable=rank != 0, desc=f"rank 0 of {world}, {plan}")
    t0 = time.perf_counter()
    with torch.no_grad():
        result = pipe(**kw)
    seconds = time.perf_counter() - t0
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        saved = []
        images = getattr(result, "images", None)
        frames = getattr(result, "frames", None)
        tag = "_".join(p.replace(" ", "-")[:20] for p in args.prompt)
        for i, im in enumerate(images or []):
            path = os.path.join(args.output_dir, f"{args.model.strip('/').split('/')[-1]}_{tag}_{i}_seed{args.seed}.png")
            im.save(path)
            saved.append(path)
        for i, video in enumerate(frames or []):
            path = os.path.join(args.output_dir, f"{tag}_{i}_seed{args.seed}.gif")
            video[0].save(path, save_all=True, append_images=list(video[1:]), duration=125, loop=0)
            saved.append(path)
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "n/a (cpu)"
        print(f"{plan} on {world} process(es): {seconds / steps:.3f} s per step, {seconds:.2f} s for {steps} steps, "
              f"peak memory {mem}")
        if calib_s is not None:
            print(f"DiTFastAttn: calibrated in {calib_s:.2f} s; plan saved {os.path.join(args.output_dir, _PLAN_FILE)}")
        caches = _step_cache_summary(pipe)
        for line in caches:
            print(line)
        for path in saved:
            print(f"saved {path}")
        with open(os.path.join(args.output_dir, "last_run.json"), "w") as f:
            json.dump(dict(plan=plan.to_dict(), world=world, seconds=seconds, steps=steps, files=saved,
                           calibration_seconds=calib_s, step_cache=caches), f, indent=2)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0
