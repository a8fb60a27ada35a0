"""DiTFastAttn benchmark: quality on the built-in digits model (CPU), speed on full-size DiTs (GPU).

    python benchmarks/bench_fastattn.py --digits-quality            # CPU: benchmarks/results/quality_fastattn.md
    python benchmarks/bench_fastattn.py --tiny                      # CPU smoke of the GPU flow (tiny configs)
    torchrun --nproc_per_node=1 benchmarks/bench_fastattn.py        # GPU: PixArt-Sigma and FLUX.1-dev size
    torchrun --nproc_per_node=4 benchmarks/bench_fastattn.py --ulysses 4

**Quality** (``--digits-quality``): the built-in DiT (4 blocks, 4 heads x 32, 64 tokens, CFG, 20 steps) with
``Plan(fastattn=True, fastattn_threshold=T)`` for several T: one calibration run over ``--n-calib`` class
labels, then 100 images (10 per class, seed 0) against the same images with full attention (plain diffusers):
classifier accuracy and pixel deviation (`ditpass.tools.quality.digits_quality`), the attention FLOPs saved
(the fastattn pass's count at the generation's batch) and the methods chosen. Writes the Markdown table to
``--md`` (default benchmarks/results/quality_fastattn.md) and the records to ``$OUT/quality_fastattn.jsonl``.

**Speed** (default; ``--tiny`` on the CPU): whole denoising loops of the transformer alone (no text encoder,
no VAE): PixArtTransformer2DModel at PixArt-Sigma size (28 blocks, 16 x 72, CFG batch 2, 300 text tokens, 20
steps) and FluxTransformer2DModel at FLUX.1-dev size (19 + 38 blocks, 24 x 128, batch 1, 512 text tokens, 28
steps), random bf16 weights (seed 0, built on the GPU: no downloads), at ``--res`` 1024 and 2048, under
``Plan(ulysses=U, fastattn=True)``. Each step's call gets the latent of the step before (``x -= 0.1 * out``)
and the step's timestep. Random weights make a calibrated plan meaningless, so fixed schedules are timed
(every site, every step but step 0, which is full):

- ``full``: full attention everywhere (the baseline; the op then makes the plain SDPA call);
- ``wars``: WA-RS at every later step (the window kernel's speed; cross-attention sites stay full);
- ``ast+wars``: AST at odd steps, WA-RS at even ones;
- ``wars+asc`` (CFG batch only): WA-RS on one CFG half, copied to the other.

Per schedule: a warm-up loop of 3 steps (capture, passes and the window kernel's compile happen here), then
``--iters`` timed loops of all the steps (``torch.cuda.synchronize`` around each; median). Recorded: ``loop_s``,
``speedup`` (full's loop_s / this one's), ``attn_flops_saved`` (the pass's count over the loop), ``rel_dev``
(``||x_T - x_T(full)|| / ||x_T(full)||`` of the final latent) and ``step_dev`` (the mean over steps of the
same for the transformer outputs), ``window_kernel`` (which kernel ran: ``fa3`` where the ``fa3_fwd`` wheel's
sliding window works, else ``flex``; ``--window-kernel`` forces one), card and versions. JSON lines in
``$OUT/fastattn_w<world>.jsonl`` (``_tiny`` for --tiny), each printed as ``RESULT {...}``, and a Markdown
table ``$OUT/fastattn_w<world>.md``. ``--deadline`` seconds after the start, what is left is recorded as
skipped. One invocation at full size takes about 5 minutes on 1 H200 (estimate; see run_fastattn.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

T0 = time.time()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_sp import REPO, build_flux, flux_inputs, git_commit, import_ditpass, same_weights_everywhere, setup_process  # noqa: E402

SCHEDULES = ("full", "wars", "ast+wars", "wars+asc")
MODELS = {"pixart": ("PixArt-Sigma", 20), "flux": ("FLUX.1-dev", 28)}  # name, steps


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--digits-quality", action="store_true", help="CPU: the digits quality table (no GPU flow)")
    p.add_argument("--thresholds", default="0,0.025,0.05,0.1,0.2,0.4", help="digits: calibration thresholds")
    p.add_argument("--n-calib", type=int, default=10, help="digits: calibration inputs (class labels 0..9, cycled)")
    p.add_argument("--per-class", type=int, default=10, help="digits: images per class")
    p.add_argument("--md", default=str(REPO / "benchmarks" / "results" / "quality_fastattn.md"),
                   help="digits: the Markdown table written")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny configs, float32")
    p.add_argument("--models", default="pixart,flux", help="comma-separated: pixart, flux")
    p.add_argument("--res", type=int, nargs="+", default=None, help="pixel resolutions (default 1024 2048; tiny 128)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree (the world size)")
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--window", type=float, default=0.125, help="Plan.fastattn_window")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: PixArt 20, FLUX 28; tiny 6)")
    p.add_argument("--iters", type=int, default=1, help="timed loops per schedule")
    p.add_argument("--compile", default="eager", help="Plan.compile (eager or inductor)")
    p.add_argument("--window-kernel", default=None, help="DITPASS_WINDOW_KERNEL: auto, flex, fa3, blocked")
    p.add_argument("--deadline", type=float, default=540, help="seconds after the start; later work is skipped")
    p.add_argument("--out", default=None, help="JSON-lines file (default $OUT/fastattn_w<world>[_tiny].jsonl)")
    p.add_argument("--pg-timeout", type=float, default=600)
    return p.parse_args()


def schedule(name: str, keys: list[str], steps: int) -> dict[str, list[str]]:
    later = {"full": lambda t: "full", "wars": lambda t: "wars", "wars+asc": lambda t: "wars+asc",
             "ast+wars": lambda t: "ast" if t % 2 else "wars"}[name]
    return {k: ["full"] + [later(t) for t in range(1, steps)] for k in keys}


# ---------------------------------------------------------------------------------------------- digits
def digits_quality(a) -> None:
    import torch

    import diffusers

    ditpass = import_ditpass()
    from ditpass.models import digits
    from ditpass.runtime import fastattn as fa
    from ditpass.tools.quality import balanced_labels, digits_quality as quality

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    d = digits.defaults()
    labels = balanced_labels(a.per_class)
    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    ref = digits.generate(labels, seed=0, pipe=pipe, output_type="np")
    ref_s = time.time() - t
    out_dir = Path(os.environ.get("OUT") or (REPO / "benchmarks" / "results" / "raw"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, recs = [], []
    for thr in (float(x) for x in a.thresholds.split(",")):
        plan = ditpass.Plan(fastattn=True, fastattn_threshold=thr, fastattn_window=a.window, fastattn_calib=a.n_calib)
        ditpass.parallelize(pipe, plan)
        t = time.time()
        chosen = fa.calibrate(pipe, list(range(10)), num_inference_steps=d["num_inference_steps"],
                              guidance_scale=d["guidance_scale"], generator=torch.Generator().manual_seed(0),
                              output_type="np")
        calib_s = time.time() - t
        t = time.time()
        images = digits.generate(labels, seed=0, pipe=pipe, output_type="np")
        gen_s = time.time() - t
        q = quality(images, labels, reference=ref)
        res = next(r for r in pipe.transformer.ditpass_records[-1].results if r.name == "fastattn")
        counts = res.details["methods"]
        n = sum(counts.values())
        mix = " ".join(f"{fa.CODES[m]} {counts.get(m, 0) / n:.0%}" for m in fa.METHODS if counts.get(m))
        rec = dict(threshold=thr, window=a.window, n_calib=a.n_calib, steps=d["num_inference_steps"], **q,
                   attn_flops_saved=res.details["attn_flops_saved"], methods=counts, calibration_s=round(calib_s, 2),
                   generation_s=round(gen_s, 2), reference_s=round(ref_s, 2), plan=chosen)
        recs.append(rec)
        rows.append(f"| {thr:g} | {q['accuracy']:.2f} | {q['reference_accuracy']:.2f} | {q['pixel_mean_abs']:.4f} | "
                    f"{q['pixel_max_abs']:.3f} | {rec['attn_flops_saved']:.1%} | {mix} |")
        print(rows[-1], flush=True)
    with open(out_dir / "quality_fastattn.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    env = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, ditpass {git_commit()}, CPU "
           f"({os.cpu_count()} cores), float32, {time.strftime('%Y-%m-%d')}")
    text = f"""# DiTFastAttn on the built-in digits model: quality against full attention

`python benchmarks/bench_fastattn.py --digits-quality` ({env}).

The built-in DiT (`models/digits.py`: 4 blocks, 4 heads x 32, 64 tokens, DiTPipeline with CFG 4.0,
{d['num_inference_steps']} DPM-Solver steps). For each threshold: `Plan(fastattn=True, fastattn_threshold=T,
fastattn_window={a.window}, fastattn_calib={a.n_calib})`, one calibration run over the class labels 0..9
({a.n_calib} inputs, seed 0, the generation's steps and guidance), then {len(labels)} images ({a.per_class} per
class, seed 0) compared with the same images under full attention (plain diffusers). Accuracy: the share
that scikit-learn's SVC on the real 8x8 digits labels as the class asked for (`ditpass.tools.quality`);
the reference images score the "full" column. Pixel deviation in [0, 1] units: mean over all pixels, and
the worst pixel. Attention FLOPs saved: the fastattn pass's count over the generation (QK^T and PV; the
projections are unchanged). Methods: share of (site, step) pairs: F full, S AST (the previous step's
output), W WA-RS (window + residual), WC WA-RS + ASC, C ASC (one CFG half's attention for both).

| threshold | accuracy | full | pixel mean abs | pixel max abs | attn FLOPs saved | methods |
| --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + f"""

Threshold 0 keeps full attention everywhere, and its pictures are those of full attention (the deviation is
ditpass's graph against diffusers' eager forward: 0 at this precision). The classifier's accuracy stays at the
reference's at every threshold while the pixel deviation grows with it: the digits keep their class, their
strokes move. With 64 tokens the window ({a.window} of the sequence: 4 keys each side) is a poor stand-in for
full attention, so the calibration, which tries AST first, mostly shares outputs across steps; the window's
speed is measured on full-size models on the GPU (`bench_fastattn.py`, `run_fastattn.sh`). Records with each
threshold's plan: `quality_fastattn.jsonl` (written to `$OUT`; this run's copy beside this file).
"""
    Path(a.md).write_text(text)
    print(f"wrote {a.md}")


# ---------------------------------------------------------------------------------------------- speed
def speed(a) -> int:
    import torch
    import torch.distributed as dist

    import diffusers

    if a.window_kernel:
        os.environ["DITPASS_WINDOW_KERNEL"] = a.window_kernel
    world, rank, dev, dtype = setup_process(a.tiny, a.pg_timeout)
    if world != a.ulysses:
        raise SystemExit(f"--ulysses {a.ulysses} needs that many processes, got {world}")
    ditpass = import_ditpass()
    from ditpass.models import zoo
    from ditpass.runtime import fastattn as fa

    def log(*msg):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:.0f}s]", *msg, flush=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    out_path = Path(a.out) if a.out else Path(os.environ.get("OUT") or (REPO / "benchmarks" / "results" / "raw")) / \
        f"fastattn_w{world}{'_tiny' if a.tiny else ''}.jsonl"
    if rank == 0:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(world=world, ulysses=a.ulysses, card=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               torch=torch.__version__, cuda=torch.version.cuda if dev.type == "cuda" else None,
               diffusers=diffusers.__version__, ditpass_commit=git_commit(), host=socket.gethostname(),
               dtype=str(dtype).replace("torch.", ""), compile=a.compile, window=a.window, iters=a.iters,
               config="tiny" if a.tiny else "full")
    records = []

    def emit(rec):
        rec = {**env, **rec}
        records.append(rec)
        if rank == 0:
            line = json.dumps(rec)
            print("RESULT " + line, flush=True)
            with open(out_path, "a") as f:
                f.write(line + "\n")

    res_list = a.res or ([128] if a.tiny else [1024, 2048])
    schedules = [s for s in a.schedules.split(",") if s]
    for key in [m for m in a.models.split(",") if m]:
        name, steps = MODELS[key]
        steps = a.steps or (6 if a.tiny else steps)
        if time.time() - T0 > a.deadline:
            emit(dict(model=name, skipped="deadline"))
            continue
        t = time.time()
        if key == "flux":
            model = build_flux(dev, dtype, a.tiny)
        else:
            model = zoo.build("PixArtTransformer2DModel", "tiny" if a.tiny else "full", device=dev, dtype=dtype)
        same_weights_everywhere(model, log)
        log(f"{name}: built in {time.time() - t:.1f} s")
        plan = ditpass.Plan(ulysses=a.ulysses, fastattn=True, fastattn_window=a.window, compile=a.compile)
        pm = ditpass.parallelize(model, plan)
        run = fa.run_for(pm.ditpass_state, plan)
        for res in res_list:
            if time.time() - T0 > a.deadline:
                emit(dict(model=name, res=res, skipped="deadline"))
                continue
            inputs, cfg = _inputs(key, model, res, dev, dtype, a.tiny, zoo, flux_inputs)
            base = None
            for sched in schedules:
                if sched == "wars+asc" and not cfg:
                    continue
                if time.time() - T0 > a.deadline:
                    emit(dict(model=name, res=res, schedule=sched, skipped="deadline"))
                    continue
                try:
                    rec = _measure(pm, run, inputs, key, sched, steps, a.iters, sync)
                except Exception as e:  # noqa: BLE001 - recorded, the next measurement runs
                    import traceback

                    emit(dict(model=name, res=res, schedule=sched, error=f"{type(e).__name__}: {e}"[:500],
                              traceback=traceback.format_exc()[-3000:]))
                    continue
                outs, x_final = rec.pop("outs"), rec.pop("x_final")
                if sched == "full":
                    base = (rec["loop_s"], outs, x_final)
                if base is not None:
                    rec["speedup"] = round(base[0] / rec["loop_s"], 3)
                    rec["rel_dev"] = _rel(x_final, base[2])
                    rec["step_dev"] = statistics.mean(_rel(o, b) for o, b in zip(outs, base[1]))
                rec.update(model=name, res=res, steps=steps, cfg_batch=cfg,
                           window_kernel=fa.window_kernel() if "wars" in sched else {})
                emit(rec)
                log(f"{name} {res}px {sched}: {rec['loop_s']:.2f} s per loop, x{rec.get('speedup', 1):.2f}, "
                    f"attention FLOPs -{rec['attn_flops_saved']:.0%}, rel dev {rec.get('rel_dev', 0):.2e}")
        del pm, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        _markdown(records, out_path.with_suffix(".md"))
    if world > 1:
        dist.destroy_process_group()
    return 0


def _inputs(key, model, res, dev, dtype, tiny, zoo, flux_inputs):
    """(forward inputs at ``res``, whether the batch is a CFG pair); the same on every rank."""
    import torch
    import torch.distributed as dist

    if key == "flux":
        return flux_inputs(model, res, 8 if tiny else 512, dev, dtype), False
    kw = zoo.make_inputs("PixArtTransformer2DModel", "tiny" if tiny else "full", height=res, width=res, batch=2,
                         device=dev, dtype=dtype)
    kw["hidden_states"] = kw["hidden_states"][:1].repeat(2, 1, 1, 1)  # one latent, two text conditions (CFG)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for v in kw.values():
            if isinstance(v, torch.Tensor):
                dist.broadcast(v, src=0)
    return kw, True


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _measure(pm, run, inputs, key, sched, steps, iters, sync):
    """Warm-up (3 steps), then ``iters`` timed loops of ``steps`` steps under schedule ``sched``."""
    import torch

    record = pm.build(**inputs)  # capture and passes (once per input signature); the sites' names come with it
    run.set_plan(schedule(sched, run.keys, steps))
    res = next(r for r in record.results if r.name == "fastattn")
    channels = inputs["hidden_states"].shape[1 if key == "pixart" else 2]

    def loop(n):
        pm.ditpass_state.reset()  # without a pipeline each call is a step
        x = inputs["hidden_states"]
        outs = []
        with torch.inference_mode():
            for t in range(n):
                ts = (1 - t / steps) * (1000.0 if key == "pixart" else 1.0)
                timestep = torch.full_like(inputs["timestep"], ts)
                out = pm(**{**inputs, "hidden_states": x, "timestep": timestep})[0]
                out = out[:, :channels] if key == "pixart" else out
                outs.append(out)
                x = x - 0.1 * out
        return x, outs

    loop(min(3, steps))
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        x, outs = loop(steps)
        sync()
        times.append(time.perf_counter() - t)
    return dict(schedule=sched, loop_s=statistics.median(times), loop_s_all=[round(x, 4) for x in times],
                attn_flops_saved=res.details["attn_flops_saved"], attn_flops_full=res.details["attn_flops_full"],
                methods=res.details["methods"], tokens=int(inputs["hidden_states"].shape[1]) if key == "flux" else
                int(inputs["hidden_states"].shape[-1] * inputs["hidden_states"].shape[-2] // 4),
                outs=outs, x_final=x)


def _markdown(records, path):
    lines = ["| model | res | GPUs | schedule | loop s | speed-up | attn FLOPs saved | rel dev (final) | "
             "step dev | window kernel |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if "loop_s" not in r:
            lines.append(f"| {r.get('model')} | {r.get('res', '')} | {r['world']} | {r.get('schedule', '')} | "
                         f"{r.get('skipped') or r.get('error', '')[:60]} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['res']} | {r['world']} | {r['schedule']} | {r['loop_s']:.2f} | "
                     f"{r.get('speedup', float('nan')):.2f} | {r['attn_flops_saved']:.1%} | {r.get('rel_dev', 0):.2e} | "
                     f"{r.get('step_dev', 0):.2e} | {r['window_kernel'].get('cuda') or r['window_kernel'].get('cpu', '-')} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main():
    a = parse_args()
    if a.digits_quality:
        digits_quality(a)
        return 0
    return speed(a)


if __name__ == "__main__":
    sys.exit(main())
