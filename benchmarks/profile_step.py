"""Where a forward's GPU time goes: torch.profiler of one FLUX.1-dev-size forward per system.

    torchrun --nproc_per_node=2 benchmarks/profile_step.py --res 2048 --plan u2 [--systems ditpass,diffusers]
    torchrun --nproc_per_node=1 benchmarks/profile_step.py --res 1024 --plan single+f --compile inductor \
        [--mode max-autotune-no-cudagraphs]

``--compile inductor``: ditpass ``Plan(compile="inductor")`` and diffusers ``compile_repeated_blocks
(fullgraph=True)``, ``--mode`` passed to both compiles. Plan flags as in bench_perf (``+f`` fused
projections, ``+g`` CUDA graphs).

For each system (ditpass with ``--plan``, then diffusers' ``ContextParallelConfig`` with the same
Ulysses degree, last because it mutates the model), after warm-ups: one profiled forward. Rank 0
writes ``$OUT/prof_<system>_<plan>_<res>.txt``: the CUDA kernels grouped by name (count, total ms,
share), the same grouped into categories (gemm, attention, nccl, copy, elementwise, norm, other),
and the GPU's busy time vs the forward's wall time. Comparing the two files shows which kernels
differ. Weights random (seed 0), bf16, on every rank's GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_perf import plan_label, plan_spec_fields, plan_spec_skips  # noqa: E402
from bench_sp import build_flux, flux_inputs, import_ditpass, same_weights_everywhere  # noqa: E402

CATEGORIES = [  # first match wins
    ("nccl", r"nccl"),
    ("fused (triton)", r"^triton_"),  # inductor's kernels: names list the ops fused (incl. "sdpa" prologues)
    ("attention", r"flash|fmha|cudnn|attention|sdpa|sm90_fmha|softmax"),
    ("gemm", r"gemm|sm90_xmma|cutlass|wgmma|cublas|splitK|nvjet"),
    ("copy", r"copy|Memcpy|memcpy|cat|index|gather|CatArray|elementwise_kernel_manual_unroll.*direct_copy"),
    ("norm", r"norm|welford|reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.I):
            return cat
    return "other"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--res", type=int, default=2048)
    p.add_argument("--plan", default="u2")
    p.add_argument("--txt", type=int, default=512)
    p.add_argument("--systems", default="ditpass,diffusers")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", default="eager", choices=("eager", "inductor"))
    p.add_argument("--mode", default=None, help="torch.compile mode for both systems (inductor only)")
    p.add_argument("--iters", type=int, default=5, help="unprofiled timed forwards (median reported)")
    a = p.parse_args()

    import torch
    import torch.distributed as dist
    from diffusers import ContextParallelConfig, ParallelConfig

    world, rank, lr = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    dev = torch.device("cuda", lr)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    ditpass = import_ditpass()
    out_dir = Path(os.environ.get("OUT") or "benchmarks/results/raw")
    out_dir.mkdir(parents=True, exist_ok=True)

    model = build_flux(dev, torch.bfloat16)
    same_weights_everywhere(model)
    kw = flux_inputs(model, a.res, a.txt, dev, torch.bfloat16)

    fields = plan_spec_fields(a.plan)
    mode_kw = {"mode": a.mode} if a.mode else {}
    if a.mode and a.compile == "inductor":  # ditpass's regional compile with this mode too
        import ditpass.backend.regional as regional

        plain = regional.compile_regions
        regional.compile_regions = lambda gm: plain(gm, **mode_kw)
    for system in a.systems.split(","):
        if system == "ditpass":
            os.environ["DITPASS_SKIP_PASSES"] = plan_spec_skips(a.plan)  # read when the graph is built
            fn = ditpass.parallelize(model, ditpass.Plan(**fields, compile=a.compile))
        elif system == "diffusers":
            if fields["ulysses"] * fields["ring"] > 1:
                model.enable_parallelism(config=ParallelConfig(
                    context_parallel_config=ContextParallelConfig(ulysses_degree=fields["ulysses"],
                                                                  ring_degree=fields["ring"])))
            if a.compile == "inductor":
                torch._dynamo.reset()
                model.compile_repeated_blocks(fullgraph=True, **mode_kw)
            fn = model
        else:
            raise SystemExit(f"unknown system {system}")
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(a.warmup):
                fn(**kw)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t
            dist.barrier()
            times = []
            for _ in range(a.iters):
                t = time.perf_counter()
                fn(**kw)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            wall_plain = sorted(times)[len(times) // 2]
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                t = time.perf_counter()
                fn(**kw)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t) * 1e3
        if rank == 0:
            by_name = defaultdict(lambda: [0, 0.0])
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    by_name[ev.name][0] += 1
                    by_name[ev.name][1] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") \
                        else ev.cuda_time_total / 1e3
            busy = sum(v[1] for v in by_name.values())
            cats = defaultdict(lambda: [0, 0.0])
            for name, (c, ms) in by_name.items():
                cats[category(name)][0] += c
                cats[category(name)][1] += ms
            lines = [f"{system} plan={plan_label(a.plan)} compile={a.compile} mode={a.mode} res={a.res} world={world} "
                     f"{torch.cuda.get_device_name(dev)} torch {torch.__version__}: warm-up {warm_s:.1f} s; wall "
                     f"{wall:.1f} ms profiled, {wall_plain:.1f} ms unprofiled (median of {a.iters}); kernel time (sum over streams) {busy:.1f} ms, "
                     f"{sum(v[0] for v in by_name.values())} kernels", "", "category  kernels  ms  share"]
            for cat, (c, ms) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
                lines.append(f"{cat:12s} {c:6d} {ms:9.2f} {ms / busy:6.1%}")
            lines += ["", "kernel  count  ms  share"]
            for name, (c, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:60]:
                lines.append(f"{ms:9.2f} {c:6d} {ms / busy:6.1%}  {name[:200]}")
            text = "\n".join(lines)
            print(text, flush=True)
            tag = f"{a.plan.replace('+', '_')}_{a.compile}{'_' + a.mode if a.mode else ''}"
            (out_dir / f"prof_{system}_{tag}_{a.res}.txt").write_text(text + "\n")
        del fn
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
