"""Step caching's speed: a whole FLUX.1-dev-size denoising loop, with and without the cache, beside diffusers'.

    python benchmarks/bench_step_cache.py --tiny                            # CPU smoke (tiny FLUX, 6 steps)
    torchrun --nproc_per_node=1 benchmarks/bench_step_cache.py              # GPU: 1 GPU, compiled
    torchrun --nproc_per_node=4 benchmarks/bench_step_cache.py              # GPU: Ulysses 4, compiled

``FluxTransformer2DModel`` at FLUX.1-dev size (19 + 38 blocks, 24 x 128; random bf16 weights from seed 0,
built on the GPU: no downloads), ``--res`` 1024 (4096 image + 512 text tokens), ``--steps`` 28 of a
flow-matching Euler loop around the transformer (``x += (sigma_next - sigma) * v``, the timestep = sigma,
guidance 3.5; no text encoder, no VAE). Configurations (``--configs``), each a fresh model wrapper:

- ``uncached``: ``Plan(ulysses=W, compile=C)``: the reference of every deviation;
- ``fbcache@T`` / ``taylorseer@T``: ``Plan(..., step_cache=..., cache_threshold=T)`` (defaults otherwise:
  block 0 decides, warm-up 1, at most 3 cached steps in a row). Random weights make the residual's
  change meaningless as a quality signal, so the number of steps each threshold caches is recorded, not
  assumed; the forced schedules time a known share:
- ``every2`` / ``every4``: ``fbcache`` with a threshold no step reaches and ``cache_max_skip`` 1 / 3 (every
  2nd / 4th step computes after the warm-up): the speed of a known cache rate;
- ``diffusers-fbc@T`` (one process only): the plain model with diffusers'
  ``apply_first_block_cache(FirstBlockCacheConfig(threshold=T))``, compiled with
  ``compile_repeated_blocks`` (the hook's decision is ``torch.compiler.disable``d), and ``diffusers`` (the
  plain model, same compile) as its reference;
- ``cache-dit``: not attempted (not installable on the GPU machine: no network, no wheel carried).

Per configuration: one warm-up loop of 3 steps (capture, passes, compile), then one timed loop of all steps
(``torch.cuda.synchronize`` around it). Recorded per configuration: ``loop_s``, ``speedup`` against
``uncached`` (``diffusers`` for the diffusers rows), ``computed`` / ``cached`` steps (and, under Ulysses,
whether every rank cached the same steps), ``rel_dev`` = ``||x_T - x_T(reference)|| / ||x_T(reference)||``
of the final latent, card, versions, commit. JSON lines in ``$OUT/step_cache_w<world>[_tiny].jsonl``
(printed as ``RESULT {...}``) and a Markdown table beside them. ``--deadline`` seconds after the start,
what is left is recorded as skipped (the default order puts the comparison with diffusers first). Estimate
(not measured; no GPU run yet): build ~20 s, capture + passes ~30 s per configuration, inductor ~60 s for the
first compiled configuration (later ones hit the cache), a 28-step loop ~15 s on one H200 (less when cached):
~7 minutes for the default configurations; split them over two calls (``--configs``) if the deadline cuts.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

T0 = time.time()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_sp import build_flux, flux_inputs, git_commit, import_ditpass, same_weights_everywhere, setup_process  # noqa: E402

DEFAULT_CONFIGS = "uncached,every2,diffusers,diffusers-fbc@0.1,fbcache@0.1,taylorseer@0.1,every4"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny FLUX, float32, 6 steps, 128 px")
    p.add_argument("--res", type=int, default=None, help="pixels per side (default 1024; tiny 128)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; tiny 6)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--compile", default=None, help="Plan.compile (default inductor; tiny eager)")
    p.add_argument("--deadline", type=float, default=450, help="seconds after the start; later work is skipped")
    p.add_argument("--out", default=None, help="JSON-lines file (default $OUT/step_cache_w<world>[_tiny].jsonl)")
    p.add_argument("--pg-timeout", type=float, default=600)
    return p.parse_args()


def _plan_fields(config: str, steps: int) -> dict | None:
    """Plan fields of a ditpass configuration; None for a diffusers one."""
    if config == "uncached":
        return {}
    if config == "every2":
        return dict(step_cache="fbcache", cache_threshold=1e9, cache_max_skip=1)
    if config == "every4":
        return dict(step_cache="fbcache", cache_threshold=1e9, cache_max_skip=3)
    method, _, t = config.partition("@")
    if method in ("fbcache", "taylorseer"):
        return dict(step_cache=method, cache_threshold=float(t))
    return None


def main():
    args = parse_args()
    import torch
    import torch.distributed as dist

    world, rank, dev, dtype = setup_process(args.tiny, args.pg_timeout)
    ditpass = import_ditpass()
    import diffusers

    res = args.res or (128 if args.tiny else 1024)
    steps = args.steps or (6 if args.tiny else 28)
    compile_ = args.compile or ("eager" if args.tiny else "inductor")
    out_path = Path(args.out or Path(os.environ.get("OUT", HERE / "results" / "raw")) /
                    f"step_cache_w{world}{'_tiny' if args.tiny else ''}.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def log(*msg):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:.0f}s]", *msg, flush=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base = build_flux(dev, dtype, tiny=args.tiny)
    same_weights_everywhere(base, log)
    kw = flux_inputs(base, res, 512 if not args.tiny else 8, dev, dtype)
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    common = dict(model="FLUX.1-dev" if not args.tiny else "FLUX tiny", res=res, steps=steps, world=world,
                  compile=compile_, card=card, host=socket.gethostname(), torch=torch.__version__,
                  diffusers=diffusers.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d"))

    def loop(model, n, before_step=None):
        x = kw["hidden_states"].clone()
        for i in range(n):
            if before_step is not None:
                before_step(i)
            t = torch.full((1,), sigmas[i], device=dev, dtype=dtype)
            with torch.no_grad():
                v = model(**{**kw, "hidden_states": x, "timestep": t})[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x

    def timed(model, reset=None):
        """A 3-step warm-up loop, then the timed loop of all steps; (final latent, seconds)."""
        if reset:
            reset()
        loop(model, min(3, steps))
        if reset:
            reset()
        sync()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        x = loop(model, steps)
        sync()
        return x, time.perf_counter() - t0

    records, refs = [], {}
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        rec = dict(common, config=config)
        if time.time() - T0 > args.deadline:
            rec["skipped"] = f"past the deadline ({args.deadline:.0f} s)"
            records.append(rec)
            log("skip", config)
            continue
        fields = _plan_fields(config, steps)
        try:
            if fields is not None:
                plan = ditpass.Plan(ulysses=world, compile=compile_, **fields)
                pm = ditpass.parallelize(base, plan)
                x, secs = timed(pm, reset=pm.ditpass_state.reset)
                runner = pm.ditpass_records[0].runner
                if hasattr(runner, "summary"):
                    s = runner.summary()
                    rec.update(computed=s["computed"], cached=s["cached"], cached_steps=s["cached_steps"])
                    if world > 1:
                        every = [None] * world
                        dist.all_gather_object(every, s["cached_steps"])
                        rec["ranks_agree"] = all(e == every[0] for e in every)
                rec["plan"] = str(plan)
                ref_name = "uncached"
            else:
                if world > 1:
                    rec["skipped"] = "diffusers' rows run in one process only"
                    records.append(rec)
                    continue
                x, secs, rec_extra = _diffusers_run(config, args, build_flux, dev, dtype, timed, compile_)
                rec.update(rec_extra)
                ref_name = "diffusers"
            rec["loop_s"] = round(secs, 3)
            if config in ("uncached", "diffusers"):
                refs[config] = (x, secs)
            if ref_name in refs:
                xr, sr = refs[ref_name]
                rec["speedup"] = round(sr / secs, 3)
                rec["rel_dev"] = float((x.float() - xr.float()).norm() / xr.float().norm())
        except Exception as e:  # noqa: BLE001 - recorded, the next configuration runs
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        records.append(rec)
        if rank == 0:
            print("RESULT " + json.dumps(rec), flush=True)
    if rank == 0:
        with open(out_path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        _table(records, out_path.with_suffix(".md"))
        log(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    if dist.is_initialized():
        dist.destroy_process_group()


def _diffusers_run(config, args, build, dev, dtype, timed, compile_):
    """diffusers' plain model or its FirstBlockCache hook, compiled block by block like ditpass's regions."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    model = build(dev, dtype, tiny=args.tiny)  # a fresh model: the hooks stay on it
    extra = {}
    decisions: list = []
    reset = None
    if config.startswith("diffusers-fbc"):
        threshold = float(config.partition("@")[2])
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
        head = model.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        should = head._should_compute_remaining_blocks

        def recorded(residual):
            decisions.append(should(residual))
            return decisions[-1]

        head._should_compute_remaining_blocks = recorded
        _set_cache_context(model, CacheContext("cond"))

        def reset():
            decisions.clear()
            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
            _set_cache_context(model, CacheContext("cond"))
    if compile_ == "inductor":
        model.compile_repeated_blocks(fullgraph=False)
    x, secs = timed(model, reset=reset)
    if decisions:
        cached = [i for i, c in enumerate(decisions) if not c]
        extra.update(computed=len(decisions) - len(cached), cached=len(cached), cached_steps=cached)
    del model
    return x, secs, extra


def _table(records, path):
    lines = [f"# Step caching, {records[0]['model']} at {records[0]['res']}px, {records[0]['steps']} steps, "
             f"{records[0]['world']} process(es), compile={records[0]['compile']}", "",
             f"{records[0]['card']}, torch {records[0]['torch']}, diffusers {records[0]['diffusers']}, ditpass "
             f"{records[0]['commit']}, {records[0]['date']}. Random weights: the thresholds' cache rates are what "
             "they are on this model; `every2` / `every4` time a known rate. rel_dev: final latent against "
             "`uncached` (diffusers rows: against `diffusers`).", "",
             "| config | loop s | speedup | steps computed | cached steps | rel_dev | ranks agree | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        note = r.get("skipped") or r.get("error") or ""
        lines.append(f"| {r['config']} | {r.get('loop_s', '-')} | {r.get('speedup', '-')} | "
                     f"{r.get('computed', r['steps'] if 'loop_s' in r else '-')} | "
                     f"{', '.join(map(str, r.get('cached_steps', []))) or '-'} | "
                     f"{'%.2e' % r['rel_dev'] if 'rel_dev' in r else '-'} | {r.get('ranks_agree', '-')} | {note} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
