"""Performance benchmark: ditpass (eager and inductor) vs diffusers (eager, regional compile, context
parallel) vs xDiT on FLUX.1-dev size, one ``torchrun`` invocation per world size (1, 2 or 4).

    torchrun --nproc_per_node=4 benchmarks/bench_perf.py --res 1024 2048 --deadline 540
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_perf.py --tiny        # CPU, gloo: the same flow

The model: ``FluxTransformer2DModel`` with 19 double and 38 single blocks, 24 heads x 128, guidance
embeddings, random bf16 weights built on the GPU from seed 0 on every rank (checked identical), 512
text tokens and ``(res // 16)^2`` image tokens, inputs broadcast from rank 0 (bench_sp.py's model and
inputs). ``--video`` adds Wan2.1-1.3B (``WanTransformer3DModel``, the zoo's ``full`` size: 480x832,
81 frames, 512 text tokens) after FLUX.

Measurements, in priority order. By default (``--order kind``) each kind runs at every resolution before
the next kind starts, so that the deadline cuts the least important ones and xfuser is imported (by the
xdit measurement) only after everything else has run; ``--order res`` runs every kind at one resolution,
then the next. The names are those of ``--measure``:

1. ``ref``: plain diffusers, eager, on every rank's own GPU (rank 0 recorded). Its output is the
   reference for ``max_abs_diff`` / ``rel_diff``. Always run; in world > 1 it is recorded with
   ``role: "reference"`` (the world-1 invocation has the 1-GPU number of record).
2. ``ditpass-inductor``: ``ditpass.parallelize(model, Plan(<plan>, compile="inductor"))`` for every
   plan (``--plans``; world 1: ``Plan()``). The headline.
3. ``diffusers-compiled``: world 1: diffusers single GPU with ``compile_repeated_blocks(fullgraph=True)``
   (diffusers' regional compile); world > 1: the same after ``enable_parallelism(ContextParallelConfig(
   ulysses_degree=world))``.
4. ``ditpass-eager``: the same plans with ``compile="eager"``.
5. ``diffusers-cp``: diffusers' context parallelism (Ulysses = world), eager (world > 1 only).
6. ``xdit``: xDiT / xfuser via ``peers/xdit_flux.py`` for every plan of ``--xdit-plans`` (default: the
   ditpass plans; world 1: ulysses=1, a single-GPU xfuser run). Errors (xfuser missing, refused shapes)
   become error records.

diffusers' ``enable_parallelism`` and ``compile_repeated_blocks`` mutate a model, so they are applied to
*views* of the model: ``FluxTransformer2DModel`` instances built on the meta device and filled with
``load_state_dict(..., assign=True)`` from the base model, which share its weight tensors (no copy).
The base model that ditpass captures and xDiT wraps is never modified. After a compiled measurement
the view's modules are un-compiled (``_compiled_call_impl = None``, what ``nn.Module.compile`` sets)
and ``torch._dynamo.reset()`` is called, so every compiled variant starts cold and static-shaped.

Each measurement: one first call, timed apart (``first_call_s``: for compiled variants, the compile;
for ditpass also ``build_s``, the capture and passes before it), then ``--warmup`` warm-ups and the
median of ``--iters`` forwards (CUDA events, ``dist.barrier`` between iterations,
``torch.inference_mode``), peak memory measured over the warm-ups and timed forwards only.

``--deadline`` seconds after the start (or at ``--deadline-at``, a Unix time), the remaining measurements
are not started and are recorded as ``skipped``; a measurement starts only if the time left covers a
rough estimate of what it needs (``EST_S``, scaled by ``--est-scale``, 0 with ``--tiny``); ranks agree
on every decision. A measurement that is still running after ``--task-timeout`` seconds, or ``--grace``
seconds past the deadline (a hang in a collective, or a compile that is too slow), cannot be interrupted:
a watchdog thread records it as an error (``watchdog: true``) and ends the process (exit code 3), and
``--resume`` (run_perf.sh does it once) starts again after the measurements that the file already holds
for this run_id and world size, skipping the hung measurement at the other resolutions too. ``--inductor-plans`` limits the inductor compiles (regional: about 30-50 s each at
full size) to some plans, e.g. ``--plans u4,u2r2 --inductor-plans u4``; plans of other world sizes in
these lists are ignored, so one list serves every world size of run_perf.sh. Records: JSON lines in ``$OUT/perf_w<world>.jsonl`` (``--out``; tiny:
``perf_w<world>_tiny.jsonl``), each also printed as ``RESULT {...}``. Fields:

- identity: ``run_id`` (``BENCH_RUN_ID``: shared by the world sizes of one run), ``world`` (processes of
  the invocation), ``model`` (``FLUX.1-dev`` / ``Wan2.1-1.3B``; ``config`` ``full`` or ``tiny``),
  ``measurement`` (the kind above), ``system`` (``diffusers`` / ``ditpass`` / ``xdit``), ``plan``
  (``single``, ``ulysses=4``, ``ulysses=2 x ring=2``, ...), ``compile`` (``eager`` / ``inductor`` /
  ``regional``), ``gpus`` (GPUs the measurement used), ``res``, ``height``, ``width`` (``frames``),
  ``tokens`` (FLUX: image + text; Wan: video tokens), ``img_tokens``, ``txt_tokens``, ``role``.
- time: ``steps`` (always 1: one transformer forward = one denoising step), ``step_ms_median``,
  ``step_ms_min``, ``step_ms_max``, ``step_ms_all`` (rank 0), ``step_ms_median_slowest_rank``,
  ``steps_28_s`` (median x 28 / 1000: FLUX.1-dev's 28 steps), ``host_ms_median`` (until the Python call
  returns), ``first_call_s``, ditpass: ``build_s`` (capture + passes), ``capture_s``, ``capture_reused``,
  ``graph_nodes``, ``collectives``, ``pass_notes``; ``wall_s`` (the whole measurement).
- rates: ``tokens_per_s``, ``flops`` (one forward), ``tflops`` (achieved, all GPUs), ``tflops_per_gpu``,
  ``floor_ms`` (FLOPs / (``peak_tflops`` x gpus)), ``floor_fraction`` (floor / median).
- memory: ``peak_mem_gib`` (max over ranks of ``max_memory_allocated`` during warm-ups and timed calls,
  weights included), ``mem_before_gib``.
- accuracy: ``max_abs_diff``, ``rel_diff`` (``||out - ref|| / ||ref||``), ``ref_max_abs``, ``out_std``,
  ``out_finite``, against the 1-GPU eager output of the same invocation.
- environment: ``card``, ``torch``, ``cuda``, ``nccl``, ``diffusers``, ``ditpass_commit``, ``host``,
  ``dtype``, ``attn_backend``, ``iters``, ``warmup``; xdit: ``xfuser``, ``xdit_packages``,
  ``xdit_versions``, ``xdit_attention_backend``, ``xdit_notes``.
- failures: ``error``, ``traceback``, ``failed_ranks`` (``watchdog: true`` for a hang); skips: ``skipped``.

Compute floor (FLUX, ``flux_flops``): see that function. The floor is FLOPs / (``--peak-tflops`` x GPUs),
790 TFLOP/s being the dense bf16 rate quoted in the performance issue.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

T0 = time.time()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_sp import (REPO, build_flux, default_plans, flux_inputs, git_commit, import_ditpass,  # noqa: E402
                      plan_fields, plan_name, same_weights_everywhere, setup_process, shared_run_id)

KINDS = ("ref", "ditpass-inductor", "diffusers-compiled", "ditpass-eager", "diffusers-cp", "xdit")
VIDEO_KINDS = ("ref", "ditpass-inductor", "ditpass-eager", "diffusers-cp")
# rough seconds each measurement needs at full size on an H100/H200 host, at 1024 / per extra 1000 tokens
# (compile times dominate); a measurement is started only if the deadline leaves this much, x --est-scale
EST_S = {"ref": (8, 0.4), "ditpass-inductor": (50, 0.8), "diffusers-compiled": (35, 0.6),
         "ditpass-eager": (20, 0.5), "diffusers-cp": (10, 0.3), "xdit": (20, 0.4), "build": (30, 0.0)}
RING_BACKEND = "_native_cudnn"  # diffusers' ring attention needs the log-sum-exp; cuDNN SDPA returns it
FLUX_STEPS = 28  # FLUX.1-dev's default number of denoising steps


# ------------------------------------------------------------------------------------------------ FLOPs
def flux_flops(img_tokens: int, txt_tokens: int = 512, d: int = 3072, n_double: int = 19, n_single: int = 38,
               mlp_ratio: float = 4.0, in_channels: int = 64, joint_dim: int = 4096) -> float:
    """FLOPs of one FLUX transformer forward (batch 1), counting multiply-adds as 2.

    Every token (image or text, S = img + txt) goes through each of the 57 blocks' token-wise linears:
    - double block, per stream: q, k, v (3 d^2), attention out (d^2), MLP (2 * mlp_ratio * d^2) = 12 d^2;
    - single block: q, k, v (3 d^2), proj_mlp (mlp_ratio d^2), proj_out ((1 + mlp_ratio) d^2) = 12 d^2,
    so 12 d^2 = 113.2e6 parameters per token per block, linear FLOPs = 2 * 57 * 113.2e6 * S.
    Attention over the joint sequence: QK^T and PV, 2 * S^2 * d each, so 4 * S^2 * d per block.
    Plus the embedders (x_embedder in_channels -> d on image tokens, context_embedder joint_dim -> d on
    text tokens) and proj_out (d -> in_channels): ~0.02 TFLOP. The adaLN modulations act once per sample,
    not per token, and are left out (~0.1 GFLOP). Result: 74.4 TFLOP at 1024x1024 (S = 4608) and
    417.9 TFLOP at 2048x2048 (S = 16896), the issue's ~74 and ~418.
    """
    s = img_tokens + txt_tokens
    per_tok = (4 + 2 * mlp_ratio) * d * d  # 12 d^2 for mlp_ratio 4, in both block kinds
    blocks = n_double + n_single
    linear = 2 * blocks * per_tok * s
    attention = 4 * blocks * s * s * d
    embed = 2 * (img_tokens * in_channels * d + txt_tokens * joint_dim * d + img_tokens * d * in_channels)
    return float(linear + attention + embed)


def wan_flops(video_tokens: int, txt_tokens: int, d: int, ffn: int, layers: int) -> float:
    """FLOPs of one Wan 2.1 transformer forward (batch 1). Per block, per video token: self-attention
    q, k, v, o (4 d^2), cross-attention q and o (2 d^2), FFN (2 d ffn); per text token the cross-attention
    k and v (2 d^2); attention 4 S^2 d (self) + 4 S T d (cross). 1.3B at 480x832x81 (S = 32760):
    ~283 TFLOP."""
    s, t = video_tokens, txt_tokens
    linear = 2 * layers * ((6 * d * d + 2 * d * ffn) * s + 2 * d * d * t)
    attention = 4 * layers * (s * s * d + s * t * d)
    return float(linear + attention)


# ------------------------------------------------------------------------------------------------ args
def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--res", type=int, nargs="+", default=None, help="pixel resolutions (default 1024 2048; tiny 64 128)")
    p.add_argument("--txt", type=int, default=None, help="text tokens (default 512; tiny 8)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--plans", default=None,
                   help="ditpass plans, e.g. u4,u2r2 (default by world size; world 1: single); plans for other "
                        "world sizes are ignored, so one list can serve several, e.g. u4,u2r2,u2,r2")
    p.add_argument("--inductor-plans", default=None,
                   help="the plans measured with compile=inductor (default: --plans), e.g. u4 to time u2r2 eager only")
    p.add_argument("--ditpass-compile", default="eager,inductor", help="ditpass backends to measure")
    p.add_argument("--xdit-plans", default=None,
                   help="xDiT plans (default: the ditpass plans; world 1: u1); 'none' to skip xDiT")
    p.add_argument("--measure", default=None,
                   help=f"comma-separated subset of {','.join(KINDS)} (default: all that apply; ref always runs)")
    p.add_argument("--order", choices=("res", "kind"), default="kind",
                   help="kind (default): each kind at every resolution, in the priority order, before the next "
                        "kind; res: every kind at one resolution, then the next resolution")
    p.add_argument("--diffusers-modes", default="default",
                   help="torch.compile modes for diffusers' compile_repeated_blocks, e.g. default,reduce-overhead "
                        "(CUDA graphs per block)")
    p.add_argument("--diffusers-cp", default="ulysses",
                   help="diffusers context-parallel kinds (world > 1), eager and compiled: ulysses, ring or both "
                        f"(ring runs with the {RING_BACKEND!r} attention backend, which returns the log-sum-exp)")
    p.add_argument("--single-compiled", action="store_true",
                   help="world > 1: also diffusers single GPU regional compile (default: world 1 only)")
    p.add_argument("--video", action="store_true", help="also Wan2.1-1.3B (WanTransformer3DModel, zoo 'full')")
    p.add_argument("--video-measure", default=",".join(VIDEO_KINDS), help="kinds for the video model")
    p.add_argument("--deadline", type=float, default=float(os.environ.get("BENCH_DEADLINE_S", "1e9")),
                   help="seconds after the start; later measurements are recorded as skipped")
    p.add_argument("--deadline-at", type=float, default=None,
                   help="the same as an absolute Unix time (run_perf.sh passes it); the earlier of the two counts")
    p.add_argument("--task-timeout", type=float, default=240,
                   help="a measurement still running after this many seconds (or --grace after --deadline) is "
                        "recorded as an error and the invocation exits with code 3 (a hang cannot be undone)")
    p.add_argument("--grace", type=float, default=30, help="seconds a measurement may run past --deadline")
    p.add_argument("--resume", action="store_true",
                   help="skip measurements that the output file already holds for this run_id and world "
                        "(the reference is run again, not recorded again): rerun after a watchdog exit")
    p.add_argument("--est-scale", type=float, default=None,
                   help="scale of the per-measurement time estimates used with --deadline (default 1; tiny 0)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 TFLOP/s per GPU for the floor")
    p.add_argument("--layers", type=int, default=None, help="double blocks (default 19; tiny 2)")
    p.add_argument("--single", type=int, default=None, help="single blocks (default 38; tiny 2)")
    p.add_argument("--attn-backend", default="native", help="diffusers attention backend")
    p.add_argument("--tiny", action="store_true", help="CPU, gloo, tiny FLUX (and Wan) config, float32")
    p.add_argument("--out", default=None, help="JSON-lines file (default $OUT/perf_w<world>.jsonl)")
    p.add_argument("--run-id", default=os.environ.get("BENCH_RUN_ID"), help="shared by all records of one run")
    p.add_argument("--pg-timeout", type=float, default=600, help="process-group timeout, seconds")
    return p.parse_args()


PLAN_FLAGS = {"g": "cuda_graphs", "f": "fuse_projections"}
SKIP_FLAGS = {"n": "overlap"}  # passes turned off for the build (DITPASS_SKIP_PASSES), to time what they do
ATTN_FLAGS = {"3": "fa3", "c": "cudnn"}  # Plan.attention: FlashAttention-3 (fa3_fwd) or SDPA's cuDNN kernel


def plan_spec_fields(spec: str) -> dict:
    """The ``Plan`` fields of a plan spec: ``single`` / ``1`` / ``u1`` -> Plan(); else bench_sp's ``u2r2``
    syntax. A ``+`` suffix turns on plan flags: ``g`` cuda_graphs, ``f`` fuse_projections (``u2+fg``,
    ``single+g``); ``3`` / ``c`` set the attention kernel to FlashAttention-3 / cuDNN (``single+g3``);
    ``n`` skips the overlap pass (``u2+n``: the graph in the model's order, see `plan_spec_skips`)."""
    spec, _, flags = spec.partition("+")
    fields = {"ulysses": 1, "ring": 1} if spec in ("single", "1", "u1", "r1", "u1r1") else plan_fields(spec)
    for ch in flags:
        if ch in PLAN_FLAGS:
            fields[PLAN_FLAGS[ch]] = True
        elif ch in ATTN_FLAGS:
            fields["attention"] = ATTN_FLAGS[ch]
        elif ch not in SKIP_FLAGS:
            raise SystemExit(f"bad plan flag {ch!r} in {spec}+{flags}: use {PLAN_FLAGS}, {ATTN_FLAGS} or {SKIP_FLAGS}")
    return fields


def plan_spec_skips(spec: str) -> str:
    """The passes a plan spec builds without, as ``DITPASS_SKIP_PASSES`` takes them: ``u2+n`` -> ``overlap``."""
    return ",".join(SKIP_FLAGS[ch] for ch in spec.partition("+")[2] if ch in SKIP_FLAGS)


def plan_label(spec: str) -> str:
    """``ulysses=2``, ``ulysses=2 +cuda_graphs``, ``ulysses=2 -overlap``: the record's plan name."""
    fields = plan_spec_fields(spec)
    degrees = {k: fields[k] for k in ("ulysses", "ring")}
    skipped = [f"-{p}" for p in plan_spec_skips(spec).split(",") if p]
    attn = [f"attention={fields['attention']}"] if "attention" in fields else []
    return " ".join([plan_name(degrees)] + [f"+{f}" for f in PLAN_FLAGS.values() if fields.get(f)] + attn + skipped)


def load_zoo():
    """models/zoo.py from ``$BENCH_DITPASS_SRC`` if that snapshot has it, else from this checkout
    (a snapshot made with ``git archive HEAD ditpass passes`` has no ``models/``)."""
    src = os.environ.get("BENCH_DITPASS_SRC")
    path = Path(src) / "models" / "zoo.py" if src else None
    if path is None or not path.exists():
        path = REPO / "models" / "zoo.py"
    spec = importlib.util.spec_from_file_location("_bench_zoo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sig4(x: float) -> float:
    return float(f"{x:.4g}")


def pkg_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ main
def main():
    a = parse_args()
    import torch
    import torch.distributed as dist

    # a group even for one process: ditpass and xfuser then see the same world as everything else
    world, rank, dev, dtype = setup_process(a.tiny, a.pg_timeout, group_for_one=True)
    tiny = a.tiny
    distributed = dist.is_initialized()
    est_scale = a.est_scale if a.est_scale is not None else (0.0 if tiny else 1.0)
    deadline_abs = min(T0 + a.deadline, a.deadline_at or float("inf"))

    def barrier():
        if distributed and world > 1:
            dist.barrier()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def reduce_max(x: float) -> float:
        if not distributed or world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather_str(s: str | None) -> list:
        if not distributed or world == 1:
            return [s]
        out = [None] * world
        dist.all_gather_object(out, s)
        return out

    def log(*msg):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:.0f}s]", *msg, flush=True)

    run_id = shared_run_id(a.run_id)

    import diffusers

    ditpass = import_ditpass()

    res_list = a.res or ([64, 128] if tiny else [1024, 2048])
    n_txt = a.txt or (8 if tiny else 512)
    def for_world(arg, default):
        """The plans of a comma list whose degrees multiply to this world size (run_perf.sh passes the same
        arguments to every world size); the default when none does."""
        if not arg:
            return default
        specs = [x for x in arg.split(",") if x]
        mine = [x for x in specs if (lambda f: f["ulysses"] * f["ring"])(plan_spec_fields(x)) == world]
        return mine or default

    plans = for_world(a.plans, default_plans(world) or ["single"])
    inductor_plans = for_world(a.inductor_plans, plans)
    backends = [b for b in a.ditpass_compile.split(",") if b]
    if a.xdit_plans in ("", "none"):
        xdit_plans = []
    else:
        xdit_plans = for_world(a.xdit_plans, plans if world > 1 else ["u1"])
    default_kinds = [k for k in KINDS if not (k == "diffusers-cp" and world == 1)]
    kinds = a.measure.split(",") if a.measure else default_kinds
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"unknown --measure {bad}: choose from {KINDS}")
    out_path = Path(a.out) if a.out else Path(os.environ.get("OUT") or (REPO / "benchmarks" / "results" / "raw")) / \
        f"perf_w{world}{'_tiny' if tiny else ''}.jsonl"
    if rank == 0:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    done: set = set()  # --resume: (model, res, system, plan, compile) already recorded in this run and world
    hung: dict = {}  # --resume: (model, system, plan, compile) -> res where the watchdog ended it
    if a.resume and out_path.exists() and a.run_id:
        for line in out_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("run_id") == a.run_id and r.get("world") == world and "skipped" not in r:
                done.add((r.get("model"), r.get("res"), r.get("system"), r.get("plan"), r.get("compile")))
                if r.get("watchdog"):
                    hung[(r.get("model"), r.get("system"), r.get("plan"), r.get("compile"))] = r.get("res")

    env = dict(
        run_id=run_id, world=world, card=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda if dev.type == "cuda" else None,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if dev.type == "cuda" else None,
        diffusers=diffusers.__version__, ditpass_commit=git_commit(), host=socket.gethostname(),
        dtype=str(dtype).replace("torch.", ""), attn_backend=a.attn_backend, iters=a.iters, warmup=a.warmup,
        config="tiny" if tiny else "full", peak_tflops=a.peak_tflops, steps=1,
    )

    def emit(rec: dict):
        rec = {**env, **rec, "t_since_start_s": round(time.time() - T0, 1)}
        if rank == 0:
            line = json.dumps(rec)
            print("RESULT " + line, flush=True)
            with open(out_path, "a") as f:
                f.write(line + "\n")

    # -------------------------------------------------------------------------------- helpers
    def free():
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def first_call(step):
        """One call, synchronized; seconds (the slowest rank)."""
        barrier()
        t = time.perf_counter()
        with torch.inference_mode():
            out = step()
        sync()
        return out, reduce_max(time.perf_counter() - t)

    def timed(step):
        """--warmup warm-ups, then --iters timed calls: (output, times_ms, peak_gib, host_ms)."""
        free()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            for _ in range(a.warmup):
                out = step()
            sync()
            ts, host = [], []
            for _ in range(a.iters):
                barrier()
                if dev.type == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    t = time.perf_counter()
                    out = step()
                    host.append((time.perf_counter() - t) * 1e3)
                    e.record()
                    torch.cuda.synchronize()
                    ts.append(s.elapsed_time(e))
                else:
                    t = time.perf_counter()
                    out = step()
                    ts.append((time.perf_counter() - t) * 1e3)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        return out, ts, peak, host

    def uncompile(m):
        """Undo ``nn.Module.compile`` (what ``compile_repeated_blocks`` calls on each block)."""
        n = 0
        for sub in m.modules():
            if sub.__dict__.get("_compiled_call_impl") is not None:
                sub._compiled_call_impl = None
                n += 1
        return n

    def view_of(base):
        """A second instance of ``base``'s class sharing its weights (meta build, assign=True)."""
        with torch.device("meta"):
            v = type(base).from_config(base.config)
        v.load_state_dict(base.state_dict(), strict=True, assign=True)
        bufs = dict(base.named_buffers())
        for name, b in list(v.named_buffers()):
            if b.is_meta:  # non-persistent buffers are not in the state dict
                mod_name, _, leaf = name.rpartition(".")
                v.get_submodule(mod_name)._buffers[leaf] = bufs[name]
        left = [n for n, t in list(v.named_parameters()) + list(v.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"view of {type(base).__name__}: tensors left on meta: {left[:5]}")
        v.eval()
        v.set_attention_backend(a.attn_backend)
        return v

    def enable_cp(m, cp_kind="ulysses"):
        from diffusers import ContextParallelConfig, ParallelConfig

        degree = {"ulysses_degree": world} if cp_kind == "ulysses" else {"ring_degree": world}
        if cp_kind == "ring":  # diffusers' ring needs a backend that returns the log-sum-exp
            m.set_attention_backend(RING_BACKEND)
        cp = ParallelConfig(context_parallel_config=ContextParallelConfig(**degree))
        if dev.type == "cpu":  # diffusers takes `rank % accelerator count` as the device: 0 on CPU
            count = torch.accelerator.device_count
            torch.accelerator.device_count = lambda: 1
            try:
                m.enable_parallelism(config=cp)
            finally:
                torch.accelerator.device_count = count
        else:
            m.enable_parallelism(config=cp)
        return m

    def skip_reason(kind: str, tokens: int) -> str | None:
        """Agreed on all ranks: None to go on, else why the measurement is skipped."""
        base, per_k = EST_S.get(kind, (20, 0.5))
        need = est_scale * (base + per_k * max(0, tokens - 4608) / 1000)
        left = deadline_abs - time.time()
        late = reduce_max(1.0 if left < need else 0.0) > 0
        if late:
            return f"deadline: {max(left, 0):.0f} s left (of {deadline_abs - T0:.0f} s), needs ~{need:.0f} s"
        return None

    def watchdog(label, limit):
        """A measurement that does not come back (a collective hang, or a compile past the deadline)
        cannot be interrupted: record it and end this process (exit code 3; the other ranks' watchdogs
        fire too, and torchrun ends the rest). ``--resume`` continues after it."""
        why = f"watchdog: no result after {limit:.0f} s (--task-timeout {a.task_timeout:.0f}, or the deadline " \
              f"+ --grace {a.grace:.0f}); hung or too slow; the invocation was ended"
        if rank == 0:
            try:
                emit({**label, "error": why, "watchdog": True})
            finally:
                print(f"[{time.strftime('%H:%M:%S')}] {why}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)

    # -------------------------------------------------------------------------------- one measurement
    ctx = {}  # the current model's: refs, flops, model name, ...

    def measure_task(system, plan, compile_, gpus, res, kw, geo, fn, role=None, err_extra=None):
        """Run ``fn()`` -> dict(out, ts, peak, host, extra); record it, or its error on any rank
        (``err_extra``: fields that error records carry too)."""
        label = dict(system=system, plan=plan, compile=compile_, gpus=gpus, res=res, height=geo["height"],
                     width=geo["width"], model=ctx["model"], tokens=geo["tokens"], measurement=ctx["kind"])
        if geo.get("frames"):
            label["frames"] = geo["frames"]
        if role:
            label["role"] = role
        recorded = (ctx["model"], res, system, plan, compile_) in done
        if recorded and ctx["kind"] != "ref":
            log(f"{ctx['model']} {res}: {system} {plan} {compile_}: already recorded (--resume)")
            return None
        why = skip_reason(ctx["kind"], geo["tokens"])
        if (ctx["model"], system, plan, compile_) in hung:  # it would most likely hang again
            why = f"the same measurement hung at res {hung[(ctx['model'], system, plan, compile_)]} (watchdog)"
        if why:
            log(f"{ctx['model']} {res}: {system} {plan} {compile_}: skipped ({why})")
            emit({**label, "skipped": why})
            return None
        log(f"{ctx['model']} {res}: {system} {plan} {compile_} ...")
        t_start = time.time()
        mem_base = torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        err, tb, r = None, None, None
        limit = min(a.task_timeout, deadline_abs + a.grace - t_start)
        dog = threading.Timer(max(limit, 1.0), watchdog, args=(label, limit))
        dog.daemon = True
        dog.start()
        try:
            r = fn()
        except Exception as exc:  # noqa: BLE001
            err, tb = f"{type(exc).__name__}: {exc}"[:2000], traceback.format_exc()
        finally:
            dog.cancel()
        errs = gather_str(err)
        if any(e is not None for e in errs):
            failed = [i for i, e in enumerate(errs) if e is not None]
            if rank == 0 and tb:
                print(tb, file=sys.stderr, flush=True)
            msg = err if err is not None else f"on rank {failed[0]}: {errs[failed[0]]}"
            emit({**label, **(err_extra or {}), "error": msg, "traceback": (tb or "")[-4000:],
                  "failed_ranks": failed, "wall_s": round(time.time() - t_start, 1)})
            log(f"  error: {msg[:300]}")
            return None
        out, ts = r["out"], r["ts"]
        med = statistics.median(ts)
        rec = dict(label, img_tokens=geo["img_tokens"], txt_tokens=geo["txt_tokens"],
                   step_ms_median=round(med, 2), step_ms_min=round(min(ts), 2), step_ms_max=round(max(ts), 2),
                   step_ms_all=[round(t, 2) for t in ts], step_ms_median_slowest_rank=round(reduce_max(med), 2),
                   steps_28_s=round(med * FLUX_STEPS / 1000, 2),
                   host_ms_median=round(statistics.median(r["host"]), 2) if r.get("host") else None)
        peak = r.get("peak")
        rec["peak_mem_gib"] = round(reduce_max(peak), 2) if peak is not None else None
        rec["mem_before_gib"] = round(reduce_max(mem_base), 2) if mem_base is not None else None
        rec["tokens_per_s"] = round(geo["tokens"] / (med / 1e3), 1)
        flops = ctx["flops"](geo)
        rec["flops"] = flops
        tflops = flops / (med / 1e3) / 1e12
        floor_ms = flops / (a.peak_tflops * 1e12) / gpus * 1e3
        rec["tflops"] = sig4(tflops)  # achieved, all GPUs together
        rec["tflops_per_gpu"] = sig4(tflops / gpus)
        rec["floor_ms"] = sig4(floor_ms)
        rec["floor_fraction"] = sig4(floor_ms / med)
        o = out.float()
        rec["out_std"] = float(o.std())
        rec["out_finite"] = bool(reduce_max(0.0 if torch.isfinite(o).all() else 1.0) == 0.0)
        ref = ctx["refs"].get(res)
        if ref is not None and tuple(ref.shape) == tuple(o.shape):
            d = o - ref
            rec["max_abs_diff"] = float(f"{reduce_max(float(d.abs().max())):.4g}")
            rec["rel_diff"] = float(f"{reduce_max(float(d.norm() / ref.norm())):.4g}")  # ||out-ref|| / ||ref||
            rec["ref_max_abs"] = float(f"{float(ref.abs().max()):.4g}")
        elif ref is not None:
            rec["diff_note"] = f"output shape {tuple(o.shape)} != reference {tuple(ref.shape)}"
        rec.update(r.get("extra") or {})
        rec["wall_s"] = round(time.time() - t_start, 1)
        if not recorded:
            emit(rec)
        log(f"  median {med:.2f} ms, first call {rec.get('first_call_s')} s, peak {rec['peak_mem_gib']} GiB, "
            f"rel diff {rec.get('rel_diff')}")
        return out

    # -------------------------------------------------------------------------------- measurement kinds
    captures: set = set()

    def run_ref(res, kw, geo):
        model = ctx["base"]

        def fn():
            out, fc = first_call(lambda: model(**kw)[0])
            out, ts, peak, host = timed(lambda: model(**kw)[0])
            return dict(out=out, ts=ts, peak=peak, host=host, extra=dict(first_call_s=round(fc, 2)))

        out = measure_task("diffusers", "single", "eager", 1, res, kw, geo, fn,
                           role="reference" if world > 1 else None)
        if out is not None:
            ctx["refs"][res] = out.float().clone()

    def run_ditpass(res, kw, geo, spec, backend, video=False):
        fields = plan_spec_fields(spec)
        name = plan_label(spec)
        gpus = fields["ulysses"] * fields["ring"]
        holder = {}

        def fn():
            plan = ditpass.Plan(**fields, compile=backend)
            pm = ditpass.parallelize(ctx["base"], plan)
            holder["pm"] = pm
            barrier()
            t0 = time.time()
            os.environ["DITPASS_SKIP_PASSES"] = plan_spec_skips(spec)
            try:
                rec_ = pm.build(**kw)
            finally:
                os.environ.pop("DITPASS_SKIP_PASSES")
            build_s = reduce_max(time.time() - t0)
            cached = id(rec_.captured) in captures
            captures.add(id(rec_.captured))
            sp = [r for r in rec_.results if r.modified]
            extra = dict(build_s=round(build_s, 1),
                         capture_s=0.0 if cached else round(reduce_max(rec_.captured.seconds), 1),
                         capture_method=rec_.captured.method, capture_reused=cached,
                         graph_nodes=len(rec_.graph_module.graph.nodes),
                         collectives=sum(len(r.collectives) for r in sp),
                         pass_notes=[n for r in rec_.results for n in r.notes][:10],
                         ditpass_plan=str(plan))
            holder["extra"] = extra
            out, fc = first_call(lambda: pm(**kw)[0])
            extra["first_call_s"] = round(fc, 2)
            out, ts, peak, host = timed(lambda: pm(**kw)[0])
            return dict(out=out, ts=ts, peak=peak, host=host, extra=extra)

        try:
            measure_task("ditpass", name, backend, gpus, res, kw, geo, fn)
        finally:
            holder.clear()
            if backend != "eager":
                torch._dynamo.reset()
            free()

    def get_view(key, make):
        if key not in ctx["views"]:
            try:
                ctx["views"][key] = make()
            except Exception as exc:  # noqa: BLE001  remembered: every later use reports it
                ctx["views"][key] = exc
        v = ctx["views"][key]
        if isinstance(v, Exception):
            raise RuntimeError(f"could not prepare the model ({key}): {type(v).__name__}: {v}") from v
        return v

    def cp_view(cp_kind="ulysses"):
        return get_view(f"cp-{cp_kind}", lambda: enable_cp(view_of(ctx["base"]), cp_kind))

    def run_diffusers_compiled(res, kw, geo, single: bool, mode: str = "default", cp_kind: str = "ulysses"):
        name = "single" if single else f"{cp_kind}={world}"
        compile_ = "regional" if mode == "default" else f"regional-{mode}"
        holder = {}

        def fn():
            m = get_view("single", lambda: view_of(ctx["base"])) if single else cp_view(cp_kind)
            holder["m"] = m
            torch._dynamo.reset()
            mode_kw = {} if mode == "default" else {"mode": mode}
            m.compile_repeated_blocks(fullgraph=True, **mode_kw)
            out, fc = first_call(lambda: m(**kw)[0])
            out, ts, peak, host = timed(lambda: m(**kw)[0])
            return dict(out=out, ts=ts, peak=peak, host=host,
                        extra=dict(first_call_s=round(fc, 2),
                                   compile_note=f"compile_repeated_blocks(fullgraph=True{f', mode={mode!r}' if mode_kw else ''})"))

        try:
            measure_task("diffusers", name, compile_, 1 if single else world, res, kw, geo, fn)
        finally:
            if "m" in holder:
                uncompile(holder["m"])
            holder.clear()
            torch._dynamo.reset()
            free()

    def run_diffusers_cp(res, kw, geo, cp_kind="ulysses"):
        def fn():
            m = cp_view(cp_kind)
            out, fc = first_call(lambda: m(**kw)[0])
            out, ts, peak, host = timed(lambda: m(**kw)[0])
            extra = dict(first_call_s=round(fc, 2))
            if cp_kind == "ring":
                extra["attn_backend"] = RING_BACKEND
            return dict(out=out, ts=ts, peak=peak, host=host, extra=extra)

        measure_task("diffusers", f"{cp_kind}={world}", "eager", world, res, kw, geo, fn)
        free()

    xdit_state = {}

    def xdit_pkgs():
        return {k: pkg_version(k) for k in ("xfuser", "yunchang", "distvae")}

    def run_xdit(res, kw, geo, spec):
        fields = plan_spec_fields(spec)
        name = plan_name({k: fields[k] for k in ("ulysses", "ring")})
        gpus = fields["ulysses"] * fields["ring"]
        extra = dict(xdit_packages=xdit_pkgs())
        extra["xfuser"] = extra["xdit_packages"]["xfuser"]

        def fn():
            if "fatal" in xdit_state:  # xfuser did not import: do not import it again
                raise RuntimeError(xdit_state["fatal"])
            from peers.xdit_flux import run_xdit_flux, xdit_versions

            holder = {}
            t0 = time.time()

            def time_fn(step):
                holder["setup_s"] = time.time() - t0  # xfuser's setup + one untimed forward
                holder["r"] = timed(step)
                _, ts, _, _ = holder["r"]
                return {"median_ms": statistics.median(ts), "all_ms": ts}

            try:
                res_ = run_xdit_flux(ctx["base"], hidden_states=kw["hidden_states"],
                                     encoder_hidden_states=kw["encoder_hidden_states"],
                                     pooled_projections=kw["pooled_projections"], timestep=kw["timestep"],
                                     img_ids=kw["img_ids"], txt_ids=kw["txt_ids"], guidance=kw["guidance"],
                                     ulysses=fields["ulysses"], ring=fields["ring"], iters=a.iters,
                                     warmup=a.warmup, time_fn=time_fn)
            except RuntimeError as exc:
                s = str(exc)
                if s.startswith("xfuser cannot be imported") or "has no sequence-parallel support" in s:
                    xdit_state["fatal"] = s
                raise
            out, ts, peak, host = holder["r"]
            extra.update(first_call_s=round(reduce_max(holder["setup_s"]), 2), xfuser=res_["xfuser"],
                         xdit_attention_backend=res_["attention_backend"], xdit_notes=res_["notes"])
            try:
                extra["xdit_versions"] = xdit_versions()
            except Exception as exc:  # noqa: BLE001
                extra["xdit_versions"] = {"error": str(exc)}
            return dict(out=res_["output"], ts=ts, peak=peak, host=host, extra=extra)

        # error records carry the package versions too
        measure_task("xdit", name, "eager", gpus, res, kw, geo, fn, err_extra=extra)
        free()

    # -------------------------------------------------------------------------------- FLUX
    def build_base_flux():
        t0 = time.time()
        model = build_flux(dev, dtype, tiny, a.layers, a.single, a.attn_backend)
        same_weights_everywhere(model, log)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"run {run_id}: world={world} {env['card']} torch {env['torch']} diffusers {env['diffusers']} "
            f"ditpass {env['ditpass_commit']}; FLUX {n_params / 1e9:.2f} B params built in {time.time() - t0:.1f} s")
        return model

    def flux_inputs_geo(model, res):
        kw = flux_inputs(model, res, n_txt, dev, dtype)
        n_img = kw["hidden_states"].shape[1]
        return kw, dict(height=res, width=res, img_tokens=n_img, txt_tokens=n_txt, tokens=n_img + n_txt)

    def flux_tasks():
        """(kind, res, callable) in priority order."""
        per_res = []
        for res in res_list:
            t = [("ref", res, lambda r: run_ref(r, *ctx["inputs"](r)))]
            if "ditpass-inductor" in kinds and "inductor" in backends:
                for spec in inductor_plans:
                    t.append(("ditpass-inductor", res, lambda r, s=spec: run_ditpass(r, *ctx["inputs"](r), s, "inductor")))
            for b in backends:  # other compile backends (onediff, ...) rank with inductor
                if b not in ("eager", "inductor") and "ditpass-inductor" in kinds:
                    for spec in inductor_plans:
                        t.append(("ditpass-inductor", res, lambda r, s=spec, b=b: run_ditpass(r, *ctx["inputs"](r), s, b)))
            if "diffusers-compiled" in kinds:
                for mode in a.diffusers_modes.split(","):
                    if world == 1 or a.single_compiled:
                        t.append(("diffusers-compiled", res,
                                  lambda r, m=mode: run_diffusers_compiled(r, *ctx["inputs"](r), single=True, mode=m)))
                    if world > 1:
                        for cpk in a.diffusers_cp.split(","):
                            t.append(("diffusers-compiled", res,
                                      lambda r, m=mode, c=cpk: run_diffusers_compiled(r, *ctx["inputs"](r), single=False,
                                                                                      mode=m, cp_kind=c)))
            if "ditpass-eager" in kinds and "eager" in backends:
                for spec in plans:
                    t.append(("ditpass-eager", res, lambda r, s=spec: run_ditpass(r, *ctx["inputs"](r), s, "eager")))
            if "diffusers-cp" in kinds and world > 1:
                for cpk in a.diffusers_cp.split(","):
                    t.append(("diffusers-cp", res, lambda r, c=cpk: run_diffusers_cp(r, *ctx["inputs"](r), c)))
            if "xdit" in kinds:
                for spec in xdit_plans:
                    t.append(("xdit", res, lambda r, s=spec: run_xdit(r, *ctx["inputs"](r), s)))
            per_res.append(t)
        if a.order == "res":
            return [x for t in per_res for x in t]
        # kind-major: the references first (every later diff needs them), then each kind at every res
        order = {k: i for i, k in enumerate(KINDS)}
        flat = [(i, j, x) for i, t in enumerate(per_res) for j, x in enumerate(t)]
        flat.sort(key=lambda ijx: (order[ijx[2][0]], ijx[0], ijx[1]))
        return [x for _, _, x in flat]

    def run_tasks(tasks):
        for kind, res, fn in tasks:
            ctx["kind"] = kind
            fn(res)
            barrier()

    why = skip_reason("build", 0)
    if why:
        log(f"FLUX: nothing run ({why})")
    else:
        base = build_base_flux()
        ctx.update(model="FLUX.1-dev", base=base, refs={}, views={},
                   inputs=lambda r: flux_inputs_geo(base, r),
                   flops=lambda geo: flux_flops(geo["img_tokens"], geo["txt_tokens"],
                                                d=base.config.num_attention_heads * base.config.attention_head_dim,
                                                n_double=base.config.num_layers,
                                                n_single=base.config.num_single_layers,
                                                in_channels=base.config.in_channels,
                                                joint_dim=base.config.joint_attention_dim))
        run_tasks(flux_tasks())
        ctx.clear()
        del base
        captures.clear()
        torch._dynamo.reset()
        free()

    # -------------------------------------------------------------------------------- video: Wan2.1-1.3B
    if a.video:
        vkinds = a.video_measure.split(",")
        name = "WanTransformer3DModel"
        size = "tiny" if tiny else "full"
        ctx["kind"] = "build"
        why = skip_reason("build", 0)
        if why:
            log(f"Wan: nothing run ({why})")
        else:
            zoo = load_zoo()
            t0 = time.time()
            wan = zoo.build(name, size=size, device=dev, dtype=dtype)
            wan.set_attention_backend(a.attn_backend)
            log(f"Wan2.1-1.3B ({size}) {sum(p.numel() for p in wan.parameters()) / 1e9:.2f} B params built in "
                f"{time.time() - t0:.1f} s")
            kw = zoo.make_inputs(name, size=size, device=dev, dtype=dtype)
            if distributed and world > 1:
                for v in kw.values():
                    if isinstance(v, torch.Tensor):
                        dist.broadcast(v, src=0)
            geo_ = zoo._geometry(name, size, None, None, None, None)
            cfg = wan.config
            s_tok = geo_["F"] * geo_["H"] * geo_["W"]
            geo = dict(height=geo_["height"], width=geo_["width"], frames=geo_["frames"], img_tokens=s_tok,
                       txt_tokens=geo_["text_len"], tokens=s_tok)
            ctx.update(model="Wan2.1-1.3B", base=wan, refs={}, views={}, inputs=lambda r: (kw, geo),
                       flops=lambda g: wan_flops(g["img_tokens"], g["txt_tokens"],
                                                 cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim,
                                                 cfg.num_layers))
            vres = geo["height"]
            spec = f"u{world}" if world > 1 else "single"
            tasks = [("ref", vres, lambda r: run_ref(r, kw, geo))]
            if "ditpass-inductor" in vkinds:
                tasks.append(("ditpass-inductor", vres, lambda r: run_ditpass(r, kw, geo, spec, "inductor")))
            if "ditpass-eager" in vkinds:
                tasks.append(("ditpass-eager", vres, lambda r: run_ditpass(r, kw, geo, spec, "eager")))
            if "diffusers-cp" in vkinds and world > 1:
                tasks.append(("diffusers-cp", vres, lambda r: run_diffusers_cp(r, kw, geo)))
            if "diffusers-compiled" in vkinds and world == 1:
                tasks.append(("diffusers-compiled", vres, lambda r: run_diffusers_compiled(r, kw, geo, single=True)))
            run_tasks(tasks)
            ctx.clear()
            del wan, kw
            free()

    log(f"done after {time.time() - T0:.0f} s: records in {out_path}")
    if distributed:
        barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
