"""Sequence-parallel benchmark: ditpass vs diffusers' own context parallelism on FLUX.1-dev size.

One invocation per world size (run under torchrun, 1, 2 or 4 processes) measures, for every
resolution, in this order:

1. ``diffusers``, plan ``single``: plain diffusers on each rank's own GPU (the 1-GPU baseline;
   every rank runs it, rank 0's numbers are recorded). Its output is the reference.
2. ``ditpass``: ``ditpass.parallelize(model, Plan(...))`` for every plan of this world size
   (2: ulysses=2, ring=2; 4: ulysses=4, ulysses=2 x ring=2). The first call captures the graph
   (torch.export) and runs the passes: reported as ``build_s`` (and ``capture_s``), not part of
   the step time.
3. ``diffusers``, plan ``ulysses=N``: ``model.enable_parallelism(ContextParallelConfig(
   ulysses_degree=N))``, last, because it mutates the model.

Each measurement: 2 warm-ups, then the median of >= 5 forwards (CUDA events, ``dist.barrier``
between iterations, ``torch.inference_mode``). Records (JSON lines) go to stdout as
``RESULT {...}`` and to ``$OUT/sp_flux_w<world>.jsonl`` (or ``--out``).

    torchrun --nproc_per_node=4 benchmarks/bench_sp.py --res 1024 2048
    torchrun --nproc_per_node=2 benchmarks/bench_sp.py --tiny      # CPU, gloo, tiny FLUX: the same flow

Weights are random (FLUX.1-dev shape, bf16, built directly on the GPU from one seed on every
rank, and checked to be identical across ranks).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_ditpass():
    """ditpass from this checkout, or from ``$BENCH_DITPASS_SRC`` (a folder holding ``ditpass/`` and
    ``passes/``, e.g. ``git archive HEAD ditpass passes`` unpacked: a fixed commit while others edit).
    ``ditpass.passes`` lives in the top-level folder ``passes/`` (setup.py's package_dir); without an
    install, it is mapped by hand."""
    root = Path(os.environ.get("BENCH_DITPASS_SRC") or REPO).resolve()
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    import ditpass

    if Path(ditpass.__file__).resolve().parent != root / "ditpass":
        raise SystemExit(f"imported ditpass from {ditpass.__file__}, wanted {root / 'ditpass'}")
    for sub in ("passes", "models"):  # top-level folders installed as ditpass.<sub> (setup.py's package_dir)
        name = f"ditpass.{sub}"
        if not (root / sub / "__init__.py").exists():
            continue
        try:
            if os.environ.get("BENCH_FORCE_SHIM") or os.environ.get("BENCH_DITPASS_SRC"):
                raise ModuleNotFoundError(name)
            importlib.import_module(name)
        except ModuleNotFoundError:
            sys.modules.pop(name, None)
            spec = importlib.util.spec_from_file_location(name, root / sub / "__init__.py",
                                                          submodule_search_locations=[str(root / sub)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            setattr(ditpass, sub, mod)
    return ditpass


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--res", type=int, nargs="+", default=None, help="pixel resolutions (default 1024 2048; tiny: 64 128)")
    p.add_argument("--txt", type=int, default=None, help="text tokens (default 512; tiny: 8)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--plans", default=None,
                   help="comma-separated ditpass plans like u4,u2r2,r2 (default: by world size)")
    p.add_argument("--systems", default="single,ditpass,diffusers", help="which of single,ditpass,diffusers to run")
    p.add_argument("--layers", type=int, default=None, help="double blocks (default 19; tiny 2)")
    p.add_argument("--single", type=int, default=None, help="single blocks (default 38; tiny 2)")
    p.add_argument("--attn-backend", default="native", help="diffusers attention backend")
    p.add_argument("--tiny", action="store_true", help="CPU, gloo, tiny FLUX config, float32")
    p.add_argument("--out", default=None, help="JSON-lines file (default $OUT/sp_flux_w<world>.jsonl)")
    p.add_argument("--run-id", default=os.environ.get("BENCH_RUN_ID"), help="shared by all records of one run")
    p.add_argument("--pg-timeout", type=float, default=300, help="process-group timeout, seconds")
    return p.parse_args()


def default_plans(world: int) -> list[str]:
    return {1: [], 2: ["u2", "r2"], 4: ["u4", "u2r2"], 8: ["u8", "u4r2"]}.get(world, [f"u{world}"])


def plan_fields(spec: str) -> dict:
    """``u2r2`` -> {ulysses: 2, ring: 2}."""
    import re

    m = re.fullmatch(r"(?:u(\d+))?(?:r(\d+))?", spec)
    if not m or not spec:
        raise SystemExit(f"bad plan {spec!r}: write u<N>, r<N> or u<N>r<M>")
    return {"ulysses": int(m.group(1) or 1), "ring": int(m.group(2) or 1)}


def plan_name(fields: dict) -> str:
    return " x ".join(f"{k}={v}" for k, v in fields.items() if v > 1) or "single"


def git_commit() -> str:
    if os.environ.get("DITPASS_COMMIT"):
        return os.environ["DITPASS_COMMIT"]
    src = os.environ.get("BENCH_DITPASS_SRC")
    if src:  # a snapshot: its COMMIT file, if it has one
        f = Path(src) / "COMMIT"
        return f.read_text().strip() if f.exists() else "snapshot"
    try:
        c = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
        d = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
        return (c + ("+dirty" if d else "")) if c else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


# ---------------------------------------------------------------- process setup (shared by the scripts)
def setup_process(tiny: bool, pg_timeout: float, group_for_one: bool = False):
    """(world, rank, device, dtype) of this torchrun process, with the process group initialised:
    tiny = CPU, gloo, float32 (threads split between the ranks); else this rank's GPU, NCCL, bf16.
    ``group_for_one``: a group even for a single process (when torchrun started it)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if tiny:
        dev, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(world, 1)))
    else:
        torch.cuda.set_device(local_rank)  # before anything probes the device (xfuser does at import)
        dev, dtype, backend = torch.device("cuda", local_rank), torch.bfloat16, "nccl"
    if world > 1 or (group_for_one and "MASTER_ADDR" in os.environ):
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=pg_timeout),
                                device_id=dev if dev.type == "cuda" else None)
    return world, rank, dev, dtype


def shared_run_id(run_id: str | None) -> str:
    """``run_id`` if given (``BENCH_RUN_ID``: several world sizes of one run), else a new one, the same
    on every rank."""
    import torch.distributed as dist

    if run_id is not None:
        return run_id
    ids = [time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


# ---------------------------------------------------------------- FLUX model and inputs (shared by the scripts)
TINY_FLUX = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, pooled_projection_dim=32, in_channels=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))


def build_flux(dev, dtype, tiny: bool = False, layers=None, single=None, attn_backend: str = "native"):
    """``FluxTransformer2DModel`` with the FLUX.1-dev shape (or the tiny CPU config), random weights from
    seed 0, built directly on ``dev`` in ``dtype``, in eval mode."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(TINY_FLUX) if tiny else dict(num_layers=19, num_single_layers=38, guidance_embeds=True)
    cfg.update({k: v for k, v in (("num_layers", layers), ("num_single_layers", single)) if v})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            model = FluxTransformer2DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    model.set_attention_backend(attn_backend)
    return model


def same_weights_everywhere(model, log=print) -> None:
    """The same seed gives the same weights on every rank: check it (cheap), broadcast rank 0's if not."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        sig = torch.stack([p.float().sum() for p in list(model.parameters())[::7]]).double()
    lo, hi = sig.clone(), sig.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        log("weights differ across ranks: broadcasting rank 0's")
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0)


def flux_inputs(model, res: int, n_txt: int, dev, dtype) -> dict:
    """FLUX forward inputs at ``res`` pixels (packed latents, ``res // 16`` per side), seed 1; broadcast
    from rank 0 when distributed, so every rank passes the same full inputs."""
    import torch
    import torch.distributed as dist

    c = model.config
    lat = res // 16  # vae /8, pack 2x2
    g = torch.Generator(device=dev).manual_seed(1)
    kw = dict(
        hidden_states=torch.randn(1, lat * lat, c.in_channels, device=dev, dtype=dtype, generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, c.joint_attention_dim, device=dev, dtype=dtype, generator=g),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, device=dev, dtype=dtype, generator=g),
        timestep=torch.tensor([0.5], device=dev, dtype=dtype),
        guidance=torch.tensor([3.5], device=dev, dtype=dtype),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(lat).float(), torch.arange(lat).float(),
                                           indexing="ij"), -1).reshape(-1, 3).to(dev),
        txt_ids=torch.zeros(n_txt, 3, device=dev),
        return_dict=False,
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        for v in kw.values():
            if isinstance(v, torch.Tensor):
                dist.broadcast(v, src=0)
    return kw


def main():
    a = parse_args()
    import torch
    import torch.distributed as dist

    world, rank, dev, dtype = setup_process(a.tiny, a.pg_timeout)
    tiny = a.tiny

    def barrier():
        if world > 1:
            dist.barrier()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def reduce_max(x: float) -> float:
        if world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def log(*msg):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}]", *msg, flush=True)

    # run id shared by all ranks (and, through BENCH_RUN_ID, by several world sizes of one run)
    run_id = shared_run_id(a.run_id)

    import diffusers

    ditpass = import_ditpass()

    res_list = a.res or ([64, 128] if tiny else [1024, 2048])
    n_txt = a.txt or (8 if tiny else 512)
    plans = a.plans.split(",") if a.plans else default_plans(world)
    systems = set(a.systems.split(","))
    out_path = Path(a.out) if a.out else Path(os.environ.get("OUT") or (REPO / "benchmarks" / "results" / "raw")) / \
        f"sp_flux_w{world}{'_tiny' if tiny else ''}.jsonl"
    if rank == 0:
        out_path.parent.mkdir(parents=True, exist_ok=True)

    env = dict(
        run_id=run_id, world=world, card=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda if dev.type == "cuda" else None,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if dev.type == "cuda" else None,
        diffusers=diffusers.__version__, ditpass_commit=git_commit(), host=socket.gethostname(),
        dtype=str(dtype).replace("torch.", ""), attn_backend=a.attn_backend, iters=a.iters, warmup=a.warmup,
        config="tiny" if tiny else "FLUX.1-dev",
    )

    def emit(rec: dict):
        rec = {**env, **rec}
        if rank == 0:
            line = json.dumps(rec)
            print("RESULT " + line, flush=True)
            with open(out_path, "a") as f:
                f.write(line + "\n")

    # ---------------------------------------------------------------- model (random weights)
    t0 = time.time()
    model = build_flux(dev, dtype, tiny, a.layers, a.single, a.attn_backend)
    init_s = time.time() - t0
    n_params = sum(p.numel() for p in model.parameters())
    same_weights_everywhere(model, log)
    log(f"run {run_id}: world={world} {env['card']} torch {env['torch']} diffusers {env['diffusers']} "
        f"ditpass {env['ditpass_commit']}; model {n_params / 1e9:.2f} B params built in {init_s:.1f} s")

    def make_inputs(res: int) -> dict:
        return flux_inputs(model, res, n_txt, dev, dtype)

    def measure(fn, kw):
        """2 warm-ups, then a.iters timed forwards; returns (output, times_ms, peak_gib)."""
        if dev.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            for _ in range(a.warmup):
                out = fn(**kw)[0]
            sync()
            ts, host = [], []
            for _ in range(a.iters):
                barrier()
                if dev.type == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    t = time.perf_counter()
                    out = fn(**kw)[0]
                    host.append((time.perf_counter() - t) * 1e3)  # until Python returns: the launch cost
                    e.record()
                    torch.cuda.synchronize()
                    ts.append(s.elapsed_time(e))
                else:
                    t = time.perf_counter()
                    out = fn(**kw)[0]
                    ts.append((time.perf_counter() - t) * 1e3)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        return out, ts, peak, host

    refs: dict[int, torch.Tensor] = {}

    def record(system, plan, gpus, res, kw, out, ts, peak, host, extra=None):
        n_img = kw["hidden_states"].shape[1]
        med = statistics.median(ts)
        rec = dict(system=system, plan=plan, gpus=gpus, res=res, tokens=n_img + n_txt, img_tokens=n_img,
                   txt_tokens=n_txt, step_ms_median=round(med, 2), step_ms_min=round(min(ts), 2),
                   step_ms_max=round(max(ts), 2), step_ms_all=[round(t, 2) for t in ts],
                   step_ms_median_slowest_rank=round(reduce_max(med), 2),
                   peak_mem_gib=round(reduce_max(peak), 2) if peak == peak else None,
                   host_ms_median=round(statistics.median(host), 2) if host else None)
        o = out.float()
        rec["out_std"] = float(o.std())
        rec["out_finite"] = bool(reduce_max(0.0 if torch.isfinite(o).all() else 1.0) == 0.0)
        ref = refs.get(res)
        if ref is not None:
            d = o - ref
            rec["max_abs_diff"] = float(f"{reduce_max(float(d.abs().max())):.4g}")
            rec["rel_diff"] = float(f"{reduce_max(float(d.norm() / ref.norm())):.4g}")  # ||out-ref|| / ||ref||
            rec["ref_max_abs"] = float(f"{float(ref.abs().max()):.4g}")
        rec.update(extra or {})
        emit(rec)

    def error(system, plan, gpus, res, exc):
        tb = traceback.format_exc()
        if rank == 0:
            print(tb, file=sys.stderr, flush=True)
        emit(dict(system=system, plan=plan, gpus=gpus, res=res, error=f"{type(exc).__name__}: {exc}"[:2000],
                  traceback=tb[-4000:]))

    def ok_everywhere(ok: bool) -> bool:
        return reduce_max(0.0 if ok else 1.0) == 0.0

    # ---------------------------------------------------------------- 1. plain diffusers, one GPU per rank
    for res in res_list:
        kw = make_inputs(res)
        if "single" in systems or "ditpass" in systems or "diffusers" in systems:
            log(f"res {res}: diffusers single GPU")
            try:
                out, ts, peak, host = measure(model, kw)
                record("diffusers", "single", 1, res, kw, out, ts, peak, host, {"init_s": round(init_s, 1)})
                refs[res] = out.float()
            except Exception as exc:  # noqa: BLE001
                error("diffusers", "single", 1, res, exc)
        del kw

        # ------------------------------------------------------------ 2. ditpass plans
        if "ditpass" in systems and world > 1:
            captures = set()  # ids of Captured objects seen at this resolution: the capture is cached
            for spec in plans:
                fields = plan_fields(spec)
                name = plan_name(fields)
                kw = make_inputs(res)
                pm = None
                ok = True
                try:
                    plan = ditpass.Plan(**fields)
                    pm = ditpass.parallelize(model, plan)
                    barrier()
                    t0 = time.time()
                    rec_ = pm.build(**kw)
                    build_s = time.time() - t0
                    cached = id(rec_.captured) in captures
                    captures.add(id(rec_.captured))
                    sp = [r for r in rec_.results if r.modified]
                    extra = dict(build_s=round(reduce_max(build_s), 1),
                                 capture_s=0.0 if cached else round(reduce_max(rec_.captured.seconds), 1),
                                 capture_method=rec_.captured.method, capture_reused=cached,
                                 graph_nodes=len(rec_.graph_module.graph.nodes),
                                 collectives=sum(len(r.collectives) for r in sp),
                                 mib_sent_per_forward=round(sum(c.bytes_per_forward for r in sp
                                                                for c in r.collectives) / 2**20, 1),
                                 pass_notes=[n for r in rec_.results for n in r.notes][:20])
                    log(f"res {res}: ditpass {name}: built in {build_s:.1f} s "
                        f"({'capture reused' if cached else f'capture {rec_.captured.seconds:.1f} s'})")
                except Exception as exc:  # noqa: BLE001
                    ok = False
                    error("ditpass", name, world, res, exc)
                if ok_everywhere(ok):
                    try:
                        out, ts, peak, host = measure(pm, kw)
                        record("ditpass", name, fields["ulysses"] * fields["ring"], res, kw, out, ts, peak, host, extra)
                    except Exception as exc:  # noqa: BLE001
                        error("ditpass", name, world, res, exc)
                del pm, kw
                out = None
                gc.collect()
                barrier()

    # ---------------------------------------------------------------- 3. diffusers' context parallelism
    if "diffusers" in systems and world > 1:
        from diffusers import ContextParallelConfig, ParallelConfig

        name = f"ulysses={world}"
        try:
            cp = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=world))
            if dev.type == "cpu":  # diffusers takes `rank % accelerator count` as the device: 0 on CPU
                count = torch.accelerator.device_count
                torch.accelerator.device_count = lambda: 1
                try:
                    model.enable_parallelism(config=cp)
                finally:
                    torch.accelerator.device_count = count
            else:
                model.enable_parallelism(config=cp)
            enabled = True
        except Exception as exc:  # noqa: BLE001
            enabled = False
            for res in res_list:
                error("diffusers", name, world, res, exc)
        if enabled:
            for res in res_list:
                kw = make_inputs(res)
                log(f"res {res}: diffusers ContextParallelConfig({name})")
                try:
                    out, ts, peak, host = measure(model, kw)
                    record("diffusers", name, world, res, kw, out, ts, peak, host)
                except Exception as exc:  # noqa: BLE001
                    error("diffusers", name, world, res, exc)
                del kw
                barrier()

    log(f"done: records in {out_path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
