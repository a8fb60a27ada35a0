"""`ditpass run`: parallelize a zoo transformer, compare with the single-device output, explain.

Every rank builds the same model (same seed) and inputs, runs the original forward as the
reference and the parallelized one, and rank 0 prints the explanation and one summary line.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import time

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="FluxTransformer2DModel", help="zoo name (ditpass inspect --help lists them)")
    p.add_argument("--size", default="tiny", help="tiny (random weights, CPU-friendly) or full")
    p.add_argument("--plan", default="", help='e.g. "ulysses=2,ring=2" or a plan JSON file')
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--text-len", type=int)
    p.add_argument("--iters", type=int, default=3, help="timed forwards (median reported)")
    p.add_argument("--graph", action="store_true", help="also print the rewritten graph's code")
    p.add_argument("--json", help="write the summary as JSON here (rank 0)")


def _timed(fn, iters, sync):
    fn()
    ts = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return out, ts[len(ts) // 2]


def _check(args):
    """Model, size, device and plan against the processes there are: one line each, before anything loads."""
    import torch

    from ditpass.models import zoo
    from ditpass.plan import Plan, PlanError
    from ditpass.tools.generate import GenerateError, check_world, parse_plan, require_positive

    if args.model not in zoo.NAMES:
        close = difflib.get_close_matches(args.model, zoo.NAMES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise GenerateError(f"--model {args.model!r} is not in the zoo{hint}; it has: {', '.join(zoo.NAMES)}")
    if args.size not in zoo.SIZES[args.model]:
        raise GenerateError(f"--size {args.size!r}: {args.model} has {', '.join(zoo.SIZES[args.model])}")
    if args.device not in ("cpu", "cuda"):
        raise GenerateError(f"--device {args.device!r}: use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device cuda: this torch sees no CUDA device (torch {torch.__version__})")
    require_positive(args, ("iters", "height", "width", "frames", "text_len"), dashes=True)
    try:
        plan = parse_plan(args.plan) if args.plan else Plan()
    except (PlanError, OSError) as e:
        raise GenerateError(f"--plan: {e}") from None
    check_world(plan, int(os.environ.get("WORLD_SIZE", "1")), from_flags=False)
    return plan


def run(args) -> int:
    import torch
    import torch.distributed as dist

    import ditpass
    from ditpass.mesh import init_distributed
    from ditpass.models import zoo
    from ditpass.tools.generate import GenerateError

    plan = _check(args)
    rank, world = init_distributed()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dtype = getattr(torch, args.dtype)
    size_kw = {k: v for k, v in dict(height=args.height, width=args.width, frames=args.frames,
                                     text_len=args.text_len).items() if v is not None}
    model = zoo.build(args.model, args.size, device=args.device, dtype=dtype)
    try:
        inputs = zoo.make_inputs(args.model, args.size, device=args.device, dtype=dtype, **size_kw)
    except ValueError as e:  # a size the model does not take: the zoo says what to change
        raise GenerateError(str(e)) from None
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def first(o):
        return o[0] if isinstance(o, (tuple, list)) else o

    with torch.inference_mode() if args.device == "cuda" else torch.no_grad():
        ref, t_ref = _timed(lambda: first(model(**inputs)), args.iters, sync)
        t0 = time.perf_counter()
        pmodel = ditpass.parallelize(model, plan)
        pmodel(**inputs)  # the first call captures and rewrites (for this rank's batch slice under dp/cfg)
        t_build = time.perf_counter() - t0
        out, t_par = _timed(lambda: first(pmodel(**inputs)), args.iters, sync)
    diff = float((out.float() - ref.float()).abs().max())
    summary = dict(model=args.model, size=args.size, plan=str(plan), world=world, device=args.device,
                   single_ms=round(t_ref * 1e3, 2), parallel_ms=round(t_par * 1e3, 2),
                   build_s=round(t_build, 1), max_abs_diff=diff,
                   peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None)
    if rank == 0:
        print(ditpass.explain(pmodel, graph=args.graph))
        print(f"\n{plan} on {world} process(es): single {summary['single_ms']} ms, parallel {summary['parallel_ms']} ms "
              f"per forward (first call, with capture and rewrite, {summary['build_s']} s); max abs diff vs single device {diff:.3g}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0
