"""PipeFusion vs sequence parallelism on FLUX.1-dev size: whole denoising loops, one invocation per world size.

    torchrun --nproc_per_node=4 benchmarks/bench_pipefusion.py --res 1024 2048
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_pipefusion.py --tiny     # CPU, gloo: the same flow

A loop of ``--steps`` (28) flow-matching Euler steps around the transformer (the FLUX pipeline's loop
without text encoders or VAE: ``latents = scheduler.step(model(latents, t), t, latents)``, inside
``ditpass.denoising_loop`` like a pipeline call), so the
warm-up steps and every patch step of PipeFusion are in the time. The model and inputs are bench_sp.py's
(random bf16 weights from seed 0, 512 text tokens, inputs broadcast from rank 0). Plans, for world N:
``ulysses=N`` (the sequence-parallel reference), ``pipefusion=N`` with ``patches`` in {N, 2N} and
``warmup_steps`` 1 (across steps, the default, and once with ``across_steps=false``: fill and drain in
every call), and ``--plans`` for more (``k=v,k=v;...``). Each plan: one loop to build (capture,
passes; timed apart), then ``--iters`` loops timed (CUDA events around the loop, barrier before);
``peak_gib`` is this rank's peak allocated memory (max over ranks), which is where PipeFusion's stage
cut shows. Deviation: the final latents against the ulysses=N loop's, relative L1.

Records: JSON lines to ``$OUT/pipefusion_w<N>.jsonl`` (``--out``), printed as ``RESULT {...}``; the
efficiency is ``t(ulysses=N) / t(plan)`` and the within-call ideal ``M / (M + N - 1)`` is recorded
beside it. The lead runs it in `run_pipefusion.sh`-style invocations on 2 and 4 GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_sp import build_flux, flux_inputs, git_commit, import_ditpass, setup_process  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, nargs="+", default=[1024])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--plans", default="", help="extra plans, ';'-separated Plan.parse strings")
    ap.add_argument("--compile", default="inductor", choices=["eager", "inductor"])
    ap.add_argument("--tiny", action="store_true", help="CPU, gloo, the tiny FLUX: the same flow in seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    ap.add_argument("--pg-timeout", type=float, default=600)
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    import torch
    import torch.distributed as dist

    world, rank, dev, dtype = setup_process(a.tiny, a.pg_timeout, group_for_one=True)
    ditpass = import_ditpass()
    from diffusers import FlowMatchEulerDiscreteScheduler

    if a.tiny:
        a.res, a.steps, a.iters, a.compile = [64], 4, 1, "eager"
    plans = [f"ulysses={world}"] + [f"pipefusion={world},patches={m},warmup_steps=1" for m in (world, 2 * world)]
    plans += [f"pipefusion={world},patches={world},warmup_steps=1,across_steps=false"]  # fill and drain per call
    plans += [p for p in a.plans.split(";") if p.strip()]
    out_path = Path(a.out) / f"pipefusion_w{world}{'_tiny' if a.tiny else ''}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def log(*msg):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}]", *msg, flush=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    def loop(model, kw, steps):
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(steps, device=dev)
        latents = kw["hidden_states"].clone()
        with ditpass.denoising_loop(model, sched) as lp:  # a pipeline call's hook: PipeFusion across steps
            for t in sched.timesteps:
                inputs = dict(kw, hidden_states=latents, timestep=(t / 1000).expand(latents.shape[0]).to(dtype))
                pred = model(**inputs)[0]
                latents = sched.step(pred, t, latents, return_dict=False)[0]
            return lp.finish(latents)

    for res in a.res:
        base = build_flux(dev, dtype, tiny=a.tiny)
        kw = flux_inputs(base, res, 16 if a.tiny else 512, dev, dtype)
        ref = None
        for spec in plans:
            rec = dict(model="FLUX.1-dev" if not a.tiny else "tiny", res=res, world=world, steps=a.steps,
                       plan=spec, compile=a.compile, commit=git_commit(), torch=torch.__version__,
                       device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                       date=time.strftime("%Y-%m-%d %H:%M"))
            try:
                model = build_flux(dev, dtype, tiny=a.tiny) if spec.startswith("pipefusion") else base
                plan = ditpass.Plan.parse(spec).replace(compile=a.compile)
                pm = ditpass.parallelize(model, plan)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    loop(pm, kw, a.steps)  # the first loop builds (capture, passes, compile)
                    sync()
                    rec["first_loop_s"] = round(time.perf_counter() - t0, 2)
                    times = []
                    for _ in range(a.iters):
                        sync()
                        t0 = time.perf_counter()
                        final = loop(pm, kw, a.steps)
                        sync()
                        times.append(time.perf_counter() - t0)
                rec["loop_s"] = round(sorted(times)[len(times) // 2], 4)
                rec["step_ms"] = round(1000 * rec["loop_s"] / a.steps, 2)
                if dev.type == "cuda":
                    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=dev)
                    if world > 1:
                        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                    rec["peak_gib"] = round(float(peak), 2)
                if ref is None:
                    ref, rec["role"] = (final.float(), rec["loop_s"]), "reference"
                else:
                    rec["rel_l1_vs_ulysses"] = float((final.float() - ref[0]).abs().mean() / ref[0].abs().mean())
                    rec["speed_vs_ulysses"] = round(ref[1] / rec["loop_s"], 3)
                if spec.startswith("pipefusion"):
                    n, m = plan.pipefusion, plan.num_patches
                    rec["within_call_ideal"] = round(m / (m + n - 1), 3)
                del pm
            except Exception as e:  # one plan's failure is a record, not the end of the run
                rec["error"] = f"{type(e).__name__}: {e}"[:500]
            log("RESULT", json.dumps(rec))
            if rank == 0:
                with open(out_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
