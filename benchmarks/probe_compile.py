"""Probe: what torch.compile does for diffusers and for ditpass's rewritten graph (FLUX.1-dev size).

    torchrun --nproc_per_node=1 benchmarks/probe_compile.py --res 1024 --variants d-eager,d-compile,x-eager,x-inductor
    torchrun --nproc_per_node=2 benchmarks/probe_compile.py --res 1024 --variants x-inductor,x-cudagraphs

Variants (``d-`` diffusers, ``x-`` ditpass with ``Plan(ulysses=world)``):
``d-eager``, ``d-compile`` (``torch.compile(model, fullgraph=True)``; with diffusers' Ulysses on
several GPUs), ``d-regional`` (``compile_repeated_blocks(fullgraph=True)``), ``x-eager``,
``x-inductor`` (``torch.compile(graph, fullgraph=True)``), ``x-cudagraphs`` (the same with
``mode="reduce-overhead"``). Per variant: first-call seconds (compile), median step ms of
``--iters`` (CUDA events), peak memory, max abs diff vs the first variant's output. Prints
``PROBE {json}`` lines and appends them to ``$OUT/probe_compile.jsonl``. ``--deadline`` seconds
after the start, remaining variants are skipped (recorded as skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sp import build_flux, flux_inputs, import_ditpass, same_weights_everywhere  # noqa: E402

T0 = time.time()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--txt", type=int, default=512)
    p.add_argument("--variants", default="d-eager,d-compile,x-eager,x-inductor,x-cudagraphs")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--deadline", type=float, default=1e9)
    a = p.parse_args()

    import diffusers
    import torch
    import torch.distributed as dist

    world, rank, lr = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), \
        int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", lr)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    ditpass = import_ditpass()
    out_path = Path(os.environ.get("OUT") or "benchmarks/results/raw") / "probe_compile.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    model = build_flux(dev, torch.bfloat16)
    same_weights_everywhere(model)
    kw = flux_inputs(model, a.res, a.txt, dev, torch.bfloat16)

    ref = None
    for var in a.variants.split(","):
        rec = dict(variant=var, world=world, res=a.res, card=torch.cuda.get_device_name(dev), torch=torch.__version__,
                   diffusers=diffusers.__version__)
        if time.time() - T0 > a.deadline:
            rec["skipped"] = "deadline"
        else:
            try:
                torch._dynamo.reset()
                if var == "d-eager":
                    fn = model
                elif var in ("d-compile", "d-regional"):
                    if world > 1 and not getattr(model, "_ditpass_probe_cp", False):
                        from diffusers import ContextParallelConfig, ParallelConfig
                        model.enable_parallelism(config=ParallelConfig(
                            context_parallel_config=ContextParallelConfig(ulysses_degree=world)))
                        model._ditpass_probe_cp = True
                    if var == "d-compile":
                        fn = torch.compile(model, fullgraph=True)
                    else:
                        model.compile_repeated_blocks(fullgraph=True)
                        fn = model
                else:
                    plan = ditpass.Plan(ulysses=world) if world > 1 else ditpass.Plan()
                    pm = ditpass.parallelize(model, plan)
                    gm = pm.build(**kw).graph_module
                    if var == "x-eager":
                        fn = pm
                    elif var == "x-inductor":
                        fn = torch.compile(gm, fullgraph=True, dynamic=False)
                    elif var == "x-cudagraphs":
                        fn = torch.compile(gm, fullgraph=True, dynamic=False, mode="reduce-overhead")
                    else:
                        raise SystemExit(f"unknown variant {var}")
                torch.cuda.reset_peak_memory_stats(dev)
                with torch.inference_mode():
                    dist.barrier()
                    t = time.time()
                    out = fn(**kw)[0]
                    torch.cuda.synchronize()
                    rec["first_call_s"] = round(time.time() - t, 1)
                    for _ in range(2):
                        out = fn(**kw)[0]
                    ts = []
                    for _ in range(a.iters):
                        dist.barrier()
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        out = fn(**kw)[0]
                        e.record()
                        torch.cuda.synchronize()
                        ts.append(s.elapsed_time(e))
                    out = out.float().clone()
                rec.update(step_ms_median=round(statistics.median(ts), 2), step_ms_min=round(min(ts), 2),
                           peak_mem_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2))
                if ref is None:
                    ref = out
                else:
                    rec["max_abs_diff"] = float(f"{float((out - ref).abs().max()):.4g}")
                    rec["rel_diff"] = float(f"{float((out - ref).norm() / ref.norm()):.4g}")
                del fn
            except Exception as exc:  # noqa: BLE001
                rec["error"] = f"{type(exc).__name__}: {exc}"[:1500]
                if rank == 0:
                    traceback.print_exc()
        rec["t_since_start_s"] = round(time.time() - T0)
        if rank == 0:
            print("PROBE " + json.dumps(rec), flush=True)
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
