"""`ditpass generate`: run a diffusers pipeline under a plan and save what it makes.

    torchrun --nproc_per_node=2 -m ditpass generate --use_cfg_parallel --prompt 3 7
    python -m ditpass generate --model /path/to/diffusers/folder --prompt "a cat" --pipeline_kwargs use_resolution_binning=false

The flags are xDiT's. ``--model`` is ``digits`` (the built-in class-conditional DiT, the
default) or a local diffusers pipeline folder. Every rank runs the same pipeline with the same
seed; the plan splits the work (ditpass.parallelize); rank 0 shows the progress bar, saves the
pictures (named by prompt or label, plus a labelled contact sheet of all of them) and prints a
summary: the first transformer call's capture and build apart from the steady seconds per step.

The pieces are functions that ``ditpass serve`` uses too: `load_pipeline`, `call_kwargs`,
`output_stem`, `save_outputs`, `contact_sheet`, `CallTimer`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import statistics
import sys
import time

# no torch at import time: ``ditpass --help`` stays instant

__all__ = ["add_arguments", "add_plan_arguments", "run", "plan_from_args", "parse_plan", "check_args", "check_plan_args",
           "check_world", "require_positive", "load_pipeline", "call_kwargs", "steps_of", "output_stem", "save_outputs", "contact_sheet",
           "CallTimer", "GenerateError", "run_plan", "start"]


class GenerateError(ValueError):
    """A bad flag or request value: printed as one line (exit status 2), or a 4xx from ``ditpass serve``."""


# CLI flag -> Plan field, so that errors about a plan built from flags name the flag the user typed
FLAG_OF = {"ulysses": "--ulysses_degree", "ring": "--ring_degree", "cfg": "--use_cfg_parallel",
           "dp": "--data_parallel_degree", "pipefusion": "--pipefusion_parallel_degree",
           "patches": "--num_pipeline_patch", "warmup_steps": "--warmup_steps", "compile": "--use_torch_compile",
           "fastattn_threshold": "--threshold", "fastattn_window": "--window_size", "fastattn_calib": "--n_calib",
           "fastattn": "--use_fast_attn / --fast_attn_plan", "step_cache": "--cache_method",
           "vae": "--use_parallel_vae"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """All of ``generate``'s flags: what to generate, then the model and plan (`add_plan_arguments`)."""
    p.add_argument("--prompt", nargs="+", default=["3"], help="prompts (for the digits model: class names 0..9)")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_inference_steps", type=int, default=None, help="default: the model's own")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the model's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num_frames", type=int, default=None)
    p.add_argument("--pipeline_kwargs", nargs="+", default=None, metavar="KEY=VALUE",
                   help="extra keyword arguments of the pipeline call, values as JSON (true, 1.5, \"text\"), "
                        "e.g. use_resolution_binning=false; or one JSON object")
    p.add_argument("--output_dir", default="results")
    p.add_argument("--no_contact_sheet", action="store_true", help="do not write contact_sheet.png")
    add_plan_arguments(p)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The model, device and plan flags (xDiT's names), shared with ``ditpass serve``; `plan_from_args` reads them."""
    p.add_argument("--model", default="digits", help="'digits' (built-in) or a local diffusers pipeline folder")
    p.add_argument("--ulysses_degree", type=int, default=1)
    p.add_argument("--ring_degree", type=int, default=1)
    p.add_argument("--use_cfg_parallel", action="store_true", help="cond and uncond halves on two ranks")
    p.add_argument("--data_parallel_degree", type=int, default=1)
    p.add_argument("--pipefusion_parallel_degree", type=int, default=1, help="PipeFusion pipeline stages (blocks split over them)")
    p.add_argument("--num_pipeline_patch", type=int, default=None, help="PipeFusion patches of the token sequence (default: the stage count)")
    p.add_argument("--warmup_steps", type=int, default=1, help="PipeFusion steps run whole before the patch pipeline (stale K/V after)")
    p.add_argument("--use_torch_compile", action="store_true", help="Plan(compile='inductor')")
    p.add_argument("--use_parallel_vae", action="store_true",
                   help="decode with the VAE's maps in row bands over all ranks (Plan(vae=True); exact, less memory)")
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
    p.add_argument("--plan", default=None,
                   help="'k=v,...', a saved Plan (JSON file) or a last_run.json; overrides the degree flags")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a collective may wait for the other ranks before the run stops with a message "
                        "(default: DITPASS_TIMEOUT or ditpass's own)")
    p.add_argument("--verbose", action="store_true", help="show the warnings of torch.export and friends")


# ---- checks before anything loads ---------------------------------------------------------------


def require_positive(args, names, dashes: bool = False) -> None:
    """Each of the flags ``names`` that is set is >= 1, else a `GenerateError` naming it (``dashes``: the flag is
    spelt ``--text-len`` for the attribute ``text_len``)."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise GenerateError(f"--{name.replace('_', '-') if dashes else name} {v}: must be >= 1")


def check_args(args) -> None:
    """Every flag's value, before a process group or a model exists; a `GenerateError` names the flag."""
    require_positive(args, ("num_inference_steps", "height", "width", "num_frames"))
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise GenerateError(f"--guidance_scale {args.guidance_scale}: must be a finite number")
    if args.seed < 0:
        raise GenerateError(f"--seed {args.seed}: must be >= 0")
    if not any(p.strip() for p in args.prompt):
        raise GenerateError("--prompt: give at least one non-empty prompt")
    check_plan_args(args)
    check_output_dir(args.output_dir)
    pipeline_kwargs(args.pipeline_kwargs)


def check_plan_args(args) -> None:
    """The flags of `add_plan_arguments`: degrees, thresholds, device, model, timeout."""
    require_positive(args, ("num_pipeline_patch", "n_calib", "ulysses_degree", "ring_degree", "data_parallel_degree",
                            "pipefusion_parallel_degree"))
    for name in ("threshold", "window_size", "cache_threshold", "timeout"):
        v = getattr(args, name, None)
        if v is not None and not math.isfinite(v):
            raise GenerateError(f"--{name} {v}: must be a finite number")
    if args.timeout is not None and args.timeout <= 0:
        raise GenerateError(f"--timeout {args.timeout}: must be > 0 seconds")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise GenerateError(f"--warmup_steps {args.warmup_steps}: must be >= 0")
    device = args.device
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise GenerateError(f"--device {device!r}: use cpu or cuda")
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise GenerateError(f"--device {device}: this torch sees no CUDA device (torch {torch.__version__})")
    if args.model != "digits" and not os.path.isdir(args.model):
        raise GenerateError(f"--model {args.model!r} is neither 'digits' nor a local diffusers pipeline folder "
                            "(no hub downloads)")


def check_output_dir(path: str) -> None:
    """Make the output folder now and check it takes a file: a bad folder fails before the generation."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".ditpass-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise GenerateError(f"--output_dir {path!r} is not a writable folder: {e.strerror or e}") from None


def pipeline_kwargs(items: list[str] | None) -> dict:
    """``--pipeline_kwargs a=1 b=true c=text`` (values parsed as JSON, else kept as text) or one JSON object."""
    if not items:
        return {}
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            d = json.loads(items[0])
        except json.JSONDecodeError as e:
            raise GenerateError(f"--pipeline_kwargs: the JSON object does not parse: {e}") from None
        if not isinstance(d, dict):
            raise GenerateError("--pipeline_kwargs: give KEY=VALUE items or one JSON object")
        return d
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise GenerateError(f"--pipeline_kwargs {item!r}: write KEY=VALUE, e.g. use_resolution_binning=false")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_plan(text: str):
    """`Plan.parse`, and also the ``last_run.json`` that ``generate`` writes (its ``"plan"`` entry)."""
    from ditpass.plan import Plan

    if os.path.isfile(text):
        with open(text) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError:
                d = None
        if isinstance(d, dict) and isinstance(d.get("plan"), dict) and "world" in d:
            return Plan.from_dict(d["plan"])
    return Plan.parse(text)


def plan_from_args(args):
    from ditpass.passes.registry import check_built
    from ditpass.plan import Plan, PlanError

    fast = {name: value for name, value in (("fastattn_threshold", args.threshold), ("fastattn_window", args.window_size),
                                            ("fastattn_calib", args.n_calib)) if value is not None}
    if args.fast_attn_plan or args.use_fast_attn:
        fast["fastattn"] = args.fast_attn_plan or True
    try:
        plan = parse_plan(args.plan) if args.plan else Plan(
            dp=args.data_parallel_degree, cfg=2 if args.use_cfg_parallel else 1, ring=args.ring_degree,
            ulysses=args.ulysses_degree, pipefusion=args.pipefusion_parallel_degree, patches=args.num_pipeline_patch,
            warmup_steps=args.warmup_steps, compile="inductor" if args.use_torch_compile else "eager",
            vae=args.use_parallel_vae)
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
    except (PlanError, OSError) as e:
        raise GenerateError(_with_flags(str(e), from_flags=not args.plan)) from None
    return plan


def _with_flags(message: str, from_flags: bool) -> str:
    """A plan error in the user's words: the flags that set the fields it names."""
    if not from_flags:
        return f"--plan: {message}"
    said = re.sub(r"Plan\([^)]*\)|\([^)]*\*[^)]*\)", "", message)  # not the whole plan echoed back, only the fields named
    named = [f"{field} is {flag}" for field, flag in FLAG_OF.items() if re.search(rf"\b{field}\b", said)]
    return message + (f" (flags: {'; '.join(named)})" if named else "")


def check_world(plan, world: int, from_flags: bool = True) -> None:
    """The plan against the processes there are, with the launcher's command when they are too few."""
    from ditpass.plan import PlanError

    if world == 1 and plan.world_size > 1:
        raise GenerateError(f"{plan} needs {plan.world_size} processes but this is one process: run it under "
                            f"torchrun --nproc_per_node={plan.world_size} -m ditpass ...")
    try:
        plan.validate(world)
    except PlanError as e:
        raise GenerateError(_with_flags(str(e), from_flags)) from None


# ---- the pipeline and its call ------------------------------------------------------------------


def load_pipeline(model: str, device, dtype):
    if model == "digits":
        from ditpass.models import digits

        return digits.load_pipeline(device=device, dtype=dtype)
    if os.path.isdir(model):
        from diffusers import DiffusionPipeline
        from diffusers.pipelines import pipeline_utils

        # diffusers 0.42 renamed torch_dtype to dtype (the old name warns); older ones know only torch_dtype
        key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
        return DiffusionPipeline.from_pretrained(model, **{key: dtype}).to(device)
    raise GenerateError(f"--model {model!r} is neither 'digits' nor a local diffusers pipeline folder (no hub downloads)")


def call_kwargs(pipe, model: str, prompts: list[str], *, negative_prompt: str | None = None, height: int | None = None,
                width: int | None = None, num_frames: int | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, seed: int = 0, extra: dict | None = None) -> dict:
    """The keyword arguments of ``pipe(...)`` for one generation; a `GenerateError` for what the pipeline lacks."""
    import torch

    params = inspect.signature(pipe.__call__).parameters
    kw: dict = {}
    if hasattr(pipe, "get_label_ids") and "class_labels" in params:  # class-conditional: prompts are labels
        labels = getattr(pipe, "labels", None) or {}
        if not labels and all(str(p).strip().isdigit() for p in prompts):  # a saved folder keeps no label names
            kw["class_labels"] = [int(p) for p in prompts]
        else:
            try:
                kw["class_labels"] = pipe.get_label_ids(list(prompts))
            except (ValueError, KeyError):
                known = ", ".join(sorted(labels)) or "none: give class ids (0, 1, ...)"
                raise GenerateError(f"prompt(s) {list(prompts)}: this model draws class labels; known labels: "
                                    f"{known}") from None
    else:
        kw["prompt"] = list(prompts)
        if negative_prompt is not None and "negative_prompt" in params:
            kw["negative_prompt"] = [negative_prompt] * len(prompts)
    for name, v in (("height", height), ("width", width), ("num_frames", num_frames),
                    ("num_inference_steps", num_inference_steps)):
        if v is not None:
            if name not in params:
                raise GenerateError(f"{name} is not a parameter of {type(pipe).__name__}")
            kw[name] = v
    if model == "digits":  # the sampling settings recorded with the built-in weights
        from ditpass.models import digits

        for name, value in digits.defaults().items():
            if name in params and kw.get(name) is None:
                kw[name] = value  # (a guidance_scale given wins: set below)
    if "guidance_scale" in params and guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    for key, value in (extra or {}).items():
        if key in ("generator", "output_type", "return_dict", "callback", "callback_on_step_end") or key in kw:
            raise GenerateError(f"pipeline argument {key!r} is set by ditpass (or by its own flag), not by extra kwargs")
        if key not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            close = [p for p in params if p not in kw][:12]
            raise GenerateError(f"{key!r} is not a parameter of {type(pipe).__name__}.__call__ "
                                f"(it has: {', '.join(close)}, ...)")
        kw[key] = value
    kw["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    return kw


def steps_of(pipe, kw: dict) -> int:
    return kw.get("num_inference_steps") or inspect.signature(pipe.__call__).parameters["num_inference_steps"].default


class CallTimer:
    """Wall time of every transformer call of a pipeline run (forward hooks): the first call captures and
    builds the graph, so the summary gives it apart from the steady calls. CUDA is synchronized per call."""

    def __init__(self, pipe, on_first=None):
        import torch

        self.calls: list[float] = []
        self._t0 = 0.0
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._on_first = on_first
        self._handles = []
        for name in ("transformer", "transformer_2"):
            mod = getattr(pipe, name, None)
            if isinstance(mod, torch.nn.Module):
                self._handles.append(mod.register_forward_pre_hook(self._pre))
                self._handles.append(mod.register_forward_hook(self._post))

    def _pre(self, *_):
        if self._sync:
            self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        if self._sync:
            self._sync()
        self.calls.append(time.perf_counter() - self._t0)
        if len(self.calls) == 1 and self._on_first is not None:
            self._on_first(self.calls[0])

    def remove(self):
        for h in self._handles:
            h.remove()

    def summary(self, total: float, steps: int) -> dict:
        """``first_call_s`` (capture + build + one call), ``steady_step_s`` (a step without the capture: the
        total less the first call's excess over the median call, per step), ``steps``, ``total_s``."""
        first = self.calls[0] if self.calls else 0.0
        median = statistics.median(self.calls[1:]) if len(self.calls) > 1 else first
        capture = max(first - median, 0.0)
        return dict(total_s=total, steps=steps, transformer_calls=len(self.calls), first_call_s=first,
                    capture_s=capture, steady_step_s=(total - capture) / max(steps, 1))


# ---- what is written ----------------------------------------------------------------------------


def slug(text: str, limit: int = 40) -> str:
    """A file-name piece from a prompt or label: lower-case letters, digits and dashes only (no path)."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:limit].strip("-")
    return s or "prompt"


def output_stem(model: str, prompt: str, index: int, seed: int) -> str:
    """``<model>_<prompt slug>_<index>_seed<seed>``: which prompt or label a file shows, never a path."""
    name = "digits" if model == "digits" else slug(os.path.basename(os.path.normpath(model)), 24)
    return f"{name}_{slug(prompt)}_{index}_seed{seed}"


def _inside(folder: str, path: str) -> str:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise GenerateError(f"refusing to write {path!r}: it is outside the output folder {folder!r}")
    return path


def save_outputs(result, out_dir: str, model: str, prompts: list[str], seed: int) -> tuple[list[str], list]:
    """Save a pipeline's images (PNG) or videos (GIF) under ``out_dir``; returns the paths and, per file, the
    labelled picture for the contact sheet (a video's first frame)."""
    images = getattr(result, "images", None)
    frames = getattr(result, "frames", None)
    per_prompt = max(1, len(images if images is not None else frames if frames is not None else []) // max(len(prompts), 1))
    saved, shown = [], []
    for i, im in enumerate(images if images is not None else []):
        prompt = prompts[min(i // per_prompt, len(prompts) - 1)]
        path = _inside(out_dir, os.path.join(out_dir, output_stem(model, prompt, i, seed) + ".png"))
        im.save(path)
        saved.append(path)
        shown.append((prompt, im))
    for i, video in enumerate(frames if frames is not None else []):
        prompt = prompts[min(i // per_prompt, len(prompts) - 1)]
        video = [_as_pil(f) for f in video]
        path = _inside(out_dir, os.path.join(out_dir, output_stem(model, prompt, i, seed) + ".gif"))
        video[0].save(path, save_all=True, append_images=video[1:], duration=125, loop=0)
        saved.append(path)
        shown.append((prompt, video[0]))
    return saved, shown


def _as_pil(frame):
    from PIL import Image

    if isinstance(frame, Image.Image):
        return frame
    import numpy as np

    a = np.asarray(frame)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a.squeeze())


def contact_sheet(shown: list, path: str, cell: int = 160, columns: int = 6) -> str:
    """All pictures of a run on one PNG: each scaled to ``cell`` pixels (nearest, so small pictures stay sharp)
    under its label."""
    from PIL import Image, ImageDraw

    rows = (len(shown) + columns - 1) // columns
    cols = min(columns, len(shown))
    label_h, pad = 18, 6
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (label, im) in enumerate(shown):
        r, c = divmod(k, columns)
        x, y = pad + c * (cell + pad), pad + r * (cell + label_h + pad)
        im = im.convert("RGB")
        scale = cell / max(im.size)
        size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
        resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
        sheet.paste(im.resize(size, resample), (x + (cell - size[0]) // 2, y + label_h + (cell - size[1]) // 2))
        text = str(label) if len(str(label)) <= 24 else str(label)[:23] + "…"
        draw.text((x + 2, y + 3), f"{k}: {text}", fill="black")
    sheet.save(path)
    return path


# ---- the command --------------------------------------------------------------------------------


def run(args) -> int:
    import torch
    import torch.distributed as dist

    check_args(args)
    plan = run_plan(args)
    rank, world, device, pipe, parallel = start(args, plan)
    pipe.set_progress_bar_config(disable=rank != 0, desc=f"rank 0 of {world}, {plan}")
    kw = call_kwargs(pipe, args.model, args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                     width=args.width, num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
                     guidance_scale=args.guidance_scale, seed=args.seed, extra=pipeline_kwargs(args.pipeline_kwargs))
    steps = steps_of(pipe, kw)
    calib_s = None
    if plan.fastattn is True:
        pipe.set_progress_bar_config(disable=rank != 0, desc=f"rank 0 of {world}, DiTFastAttn calibration")
        calib_s = _calibrate(pipe, plan, args, kw)
        pipe.set_progress_bar_config(disable=rank != 0, desc=f"rank 0 of {world}, {plan}")
    say = _say if rank == 0 else (lambda *_: None)
    if parallel and plan.fastattn is not True:  # (a calibration run captured already)
        say("the first transformer call captures and builds the graph (seconds to a minute); the steps follow")
    timer = CallTimer(pipe, on_first=(lambda s: say(f"first transformer call (capture, build, run): {s:.2f} s"))
                      if parallel and plan.fastattn is not True else None)
    t0 = time.perf_counter()
    with torch.no_grad():
        result = pipe(**kw)
    seconds = time.perf_counter() - t0
    timer.remove()
    timing = timer.summary(seconds, steps)
    if rank == 0:
        saved, shown = save_outputs(result, args.output_dir, args.model, args.prompt, args.seed)
        sheet = None
        if shown and not args.no_contact_sheet:
            sheet = contact_sheet(shown, _inside(args.output_dir, os.path.join(args.output_dir, "contact_sheet.png")))
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.startswith("cuda") else "n/a (cpu)"
        first = f" of which {timing['capture_s']:.2f} s first-call capture and build" if parallel else ""
        print(f"{plan} on {world} process(es): {timing['steady_step_s']:.3f} s per step steady, "
              f"{steps} steps in {seconds:.2f} s{first}; peak memory {mem}")
        if calib_s is not None:
            print(f"DiTFastAttn: calibrated in {calib_s:.2f} s; plan saved {os.path.join(args.output_dir, _PLAN_FILE)}")
        caches = _step_cache_summary(pipe)
        for line in caches:
            print(line)
        vae = _vae_summary(pipe)
        if vae:
            print(f"parallel VAE: latent rows per rank {vae['rows'][0]}, {vae['halos']} halo exchanges, "
                  f"{vae['norms']} group norms all-reduced, {vae['whole']} op(s) on the whole map")
        for path in saved:
            print(f"saved {path}")
        if sheet:
            print(f"saved {sheet} (all pictures, labelled)")
        with open(os.path.join(args.output_dir, "last_run.json"), "w") as f:
            json.dump(dict(plan=plan.to_dict(), world=world, seconds=seconds, steps=steps, timing=timing,
                           prompts=list(args.prompt), files=saved, contact_sheet=sheet, calibration_seconds=calib_s,
                           step_cache=caches, vae=vae), f, indent=2)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def run_plan(args):
    """``--timeout`` and ``--verbose`` into the environment, the plan, checked against the processes torchrun
    started: all before a process group or a model exists (no waiting for a mistake)."""
    if args.timeout is not None:
        os.environ["DITPASS_TIMEOUT"] = str(args.timeout)
    if args.verbose:
        os.environ["DITPASS_VERBOSE"] = "1"
    else:  # diffusers' advice (install accelerate, ...) is not news to a user of ditpass
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    plan = plan_from_args(args)
    check_world(plan, int(os.environ.get("WORLD_SIZE", "1")), from_flags=not args.plan)
    return plan


def start(args, plan):
    """The process group, the device, the pipeline loaded and parallelized (unless the plan is empty on one
    process): ``(rank, world, device, pipe, parallelized)``."""
    import torch

    import ditpass
    from ditpass.mesh import init_distributed

    rank, world = init_distributed()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.model, device, dtype)
    parallel = world > 1 or plan != ditpass.Plan()
    if parallel:
        pipe = ditpass.parallelize(pipe, plan)
    return rank, world, device, pipe, parallel


def _say(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"ditpass: {text}", file=sys.stderr)


_PLAN_FILE = "fastattn_plan.json"


def _calibrate(pipe, plan, args, kw) -> float:
    """DiTFastAttn's calibration run, before the generation: ``n_calib`` inputs (digits: the classes 0, 1, ...;
    else the prompts, cycled), the generation's steps, guidance and seed; the plan is saved to --output_dir."""
    import torch

    from ditpass.runtime.fastattn import calibrate

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


def _vae_summary(pipe) -> dict | None:
    """What the parallel VAE did in this run (`passes/parallel_vae.py`'s details), or None."""
    decode = getattr(getattr(pipe, "vae", None), "decode", None)
    for record in getattr(decode, "ditpass_records", ()):
        for r in record.results:
            if r.name == "parallel_vae" and r.modified:
                d = r.details
                return dict(rows=list(d["heights"].values())[:1], halos=d["halos"], norms=d["norms"], whole=d["whole"])
    return None


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
