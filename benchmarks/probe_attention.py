"""One-GPU probes behind bench_sp.py's numbers (FLUX.1-dev shapes, bf16).

1. Attention kernels at the shapes each plan runs (full sequence on 1 GPU, Ulysses-N local heads,
   one ring step): ``F.scaled_dot_product_attention`` as dispatched, each SDPA backend forced,
   and the two kernels that return the log-sum-exp that ring attention needs
   (``aten._scaled_dot_product_flash_attention``, ``aten._scaled_dot_product_cudnn_attention``),
   with the kernel that the default dispatch launches.
2. Host overhead: the same forward as eager diffusers and as ditpass's captured (exported) graph,
   one GPU: device time (CUDA events) and host time (until the Python call returns, before the
   synchronize). Host time close to device time means the GPU waits on Python.

    python benchmarks/probe_attention.py [--res 1024 2048] [--skip-model]
Prints ``PROBE {json}`` lines, and writes them to $OUT/probe_attention.jsonl when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def emit(rec):
    line = json.dumps(rec)
    print("PROBE " + line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "probe_attention.jsonl", "a") as f:
            f.write(line + "\n")


def cuda_time(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def kernels_of(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [(e.key, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]
    names.sort(key=lambda x: -x[1])
    return [n[:90] for n, _ in names[:3]]


def probe_attention(res_list):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    aten = torch.ops.aten
    card = torch.cuda.get_device_name()
    for res in res_list:
        S = 512 + (res // 16) ** 2
        cases = {"1gpu": (24, S, S), "ulysses2": (12, S, S), "ulysses4": (6, S, S),
                 "ring2_step": (24, S // 2, S // 2), "usp2x2_step": (12, S // 2, S // 2)}
        for case, (H, Sq, Sk) in cases.items():
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, H, Sq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, H, Sk, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, H, Sk, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            flop = 4 * H * Sq * Sk * 128
            ref = F.scaled_dot_product_attention(q, k, v)
            fns = {"sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v)}
            for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                             ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
                def f(be=be):
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(q, k, v)
                fns[name] = f
            fns["aten_flash_lse"] = lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
            fns["aten_cudnn_lse"] = lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False,
                                                                                      False)
            rec = dict(probe="attention", card=card, torch=torch.__version__, res=res, case=case, heads=H, sq=Sq,
                       sk=Sk)
            for name, fn in fns.items():
                try:
                    ms = cuda_time(fn)
                    o = fn()
                    o = o[0] if isinstance(o, (tuple, list)) else o
                    rec[name] = dict(ms=round(ms, 3), tflops=round(flop / ms / 1e9, 1),
                                     max_diff=float(f"{(o.float() - ref.float()).abs().max():.3g}"))
                except Exception as exc:  # noqa: BLE001
                    rec[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
            try:
                fl = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[1]
                cu = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[1]
                rec["lse_shapes"] = [list(fl.shape), list(cu.shape)]
                rec["lse_max_diff"] = float((fl.float() - cu.float().reshape(fl.shape)).abs().max())
            except Exception as exc:  # noqa: BLE001
                rec["lse_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            try:
                rec["default_kernels"] = kernels_of(fns["sdpa_default"])
            except Exception as exc:  # noqa: BLE001
                rec["default_kernels"] = [f"{type(exc).__name__}: {str(exc)[:200]}"]
            emit(rec)
            del q, k, v, ref


def probe_host(res_list):
    from bench_sp import build_flux, flux_inputs, import_ditpass

    ditpass = import_ditpass()
    model = build_flux(torch.device("cuda"), torch.bfloat16)
    for res in res_list:
        kw = flux_inputs(model, res, 512, "cuda", torch.bfloat16)
        t0 = time.time()
        cap = ditpass.capture(model, **kw)
        cap_s = time.time() - t0
        for name, fn in (("eager_diffusers", model), ("ditpass_captured_graph", cap.graph_module)):
            with torch.inference_mode():
                for _ in range(2):
                    fn(**kw)
                torch.cuda.synchronize()
                dev_ms, host_ms = [], []
                for _ in range(5):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    t = time.perf_counter()
                    fn(**kw)
                    host_ms.append((time.perf_counter() - t) * 1e3)
                    e.record()
                    torch.cuda.synchronize()
                    dev_ms.append(s.elapsed_time(e))
            emit(dict(probe="host", card=torch.cuda.get_device_name(), torch=torch.__version__, res=res, system=name,
                      device_ms=round(statistics.median(dev_ms), 2), host_ms=round(statistics.median(host_ms), 2),
                      graph_nodes=len(cap.graph_module.graph.nodes) if name.startswith("ditpass") else None,
                      capture_s=round(cap_s, 1) if name.startswith("ditpass") else None))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--res", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--skip-model", action="store_true")
    a = p.parse_args()
    probe_attention(a.res)
    if not a.skip_model:
        probe_host(a.res)


if __name__ == "__main__":
    main()
