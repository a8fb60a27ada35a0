"""Step caching's quality on the built-in digits model, beside diffusers' own FirstBlockCache.

    python benchmarks/quality_step_cache.py            # all thresholds x policies, then the table
    python benchmarks/quality_step_cache.py --table    # only the Markdown table from the JSON lines

The same digits (``--per_class`` of each class, seed 0, the model's 20 DPM-Solver++ steps, guidance 4)
drawn by the uncached pipeline (the reference) and by

- ditpass ``Plan(step_cache="fbcache" | "taylorseer", cache_threshold=t)`` with the defaults (first block
  decides, warm-up 1 step, at most 3 cached steps in a row, TaylorSeer order 1);
- ditpass ``fbcache`` with diffusers' semantics (``cache_warmup_steps=0``, no limit on cached steps in a
  row): the same rule as diffusers' FirstBlockCache (the first block's residual, relative L1 against the
  last computed step, the remaining blocks' residual reused);
- diffusers' ``apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=t))``.
  ``DiTTransformer2DModel`` has no ``CacheMixin`` (no ``enable_cache``), but its blocks are
  ``BasicTransformerBlock``s, which the hook registry knows; ``DiTPipeline`` sets no cache context, so the
  script sets one (``"cond"``: one call per step carries both CFG halves) and resets the hooks per generation.

Accuracy: the SVC on scikit-learn's real digits (`ditpass.tools.quality`); pixel deviation against the
uncached images. Rows are appended to ``benchmarks/results/quality_step_cache.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
JSONL = os.path.join(HERE, "results", "quality_step_cache.jsonl")
TABLE = os.path.join(HERE, "results", "quality_step_cache.md")
METHODS = ("ditpass fbcache", "ditpass taylorseer", "ditpass fbcache, diffusers' rule", "diffusers FirstBlockCache")


def _diffusers_fbc(pipe, threshold):
    """Apply diffusers' FirstBlockCache; returns a function that runs one generation and the decisions."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    t = pipe.transformer
    apply_first_block_cache(t, FirstBlockCacheConfig(threshold=threshold))
    head = t.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    decisions: list[bool] = []
    should = head._should_compute_remaining_blocks

    def recorded(residual):
        decisions.append(should(residual))
        return decisions[-1]

    head._should_compute_remaining_blocks = recorded

    def run(generate):
        decisions.clear()
        HookRegistry.check_if_exists_or_initialize(t).reset_stateful_hooks()
        _set_cache_context(t, CacheContext("cond"))
        try:
            return generate(), list(decisions)
        finally:
            _set_cache_context(t, None)

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per_class", type=int, default=3)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--table", action="store_true", help="only write the Markdown table from the JSON lines")
    args = ap.parse_args(argv)
    if args.table:
        return write_table()

    import ditpass
    from ditpass.models import digits
    from ditpass.tools.quality import digits_quality, digits_reference, quiet_pipeline

    torch.set_num_threads(1)
    labels, ref, ref_s, steps = digits_reference(args.per_class)
    make = quiet_pipeline
    plans = {"ditpass fbcache": dict(step_cache="fbcache"),
             "ditpass taylorseer": dict(step_cache="taylorseer"),
             "ditpass fbcache, diffusers' rule": dict(step_cache="fbcache", cache_warmup_steps=0, cache_max_skip=steps)}
    rows = []
    for th in args.thresholds:
        for method in METHODS:
            pipe = make()
            t = time.perf_counter()
            if method in plans:
                pipe = ditpass.parallelize(pipe, ditpass.Plan(**plans[method], cache_threshold=th))
                out = digits.generate(labels, seed=0, pipe=pipe, output_type="np")
                s = pipe.transformer.ditpass_records[0].runner.summary()
                cached = s["cached_steps"]
            else:
                run = _diffusers_fbc(pipe, th)
                out, decisions = run(lambda: digits.generate(labels, seed=0, pipe=pipe, output_type="np"))
                cached = [i for i, compute in enumerate(decisions) if not compute]
            secs = time.perf_counter() - t
            q = digits_quality(out, labels, reference=ref)
            row = dict(q, method=method, threshold=th, steps=steps, computed=steps - len(cached), cached=len(cached),
                       cached_steps=cached, seconds=round(secs, 2), uncached_seconds=round(ref_s, 2),
                       torch=torch.__version__, diffusers=_diffusers_version(), machine=platform.processor() or "cpu",
                       date=time.strftime("%Y-%m-%d"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(JSONL, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    write_table()


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def write_table():
    rows = [json.loads(line) for line in open(JSONL)] if os.path.exists(JSONL) else []
    latest: dict = {}
    for r in rows:  # the newest run of each configuration
        latest[(r["threshold"], METHODS.index(r["method"]))] = r
    last = rows[-1] if rows else {}
    lines = ["# Step caching on the digits model: quality against the uncached images", "",
             f"`python benchmarks/quality_step_cache.py` (CPU; {last.get('n', '?')} digits, balanced over the classes, "
             f"seed 0, {last.get('steps', '?')} DPM-Solver++ steps, guidance 4, CFG in one batch). The model has 4 "
             "blocks: block 0 always runs and decides, blocks 1-3 are cached. Accuracy: an SVC trained on "
             "scikit-learn's real digits labels the image as the class asked for (uncached: "
             + (f"{last['reference_accuracy']:.1%}" if rows else "?") + "). Pixel deviation: |image - uncached "
             "image| in [0, 1] units, mean over pixels and worst pixel. Threshold: the relative L1 change of the "
             "first block's residual (output - input) against the last computed step below which a step reuses "
             "the cache; 0 computes every step (exact).", "",
             "- *ditpass fbcache / taylorseer*: the defaults (warm-up 1 step, at most 3 cached steps in a row; "
             "TaylorSeer: first-order forecast of the middle blocks' residual from the last two computed steps).",
             "- *ditpass fbcache, diffusers' rule*: `cache_warmup_steps=0`, no limit on cached steps in a row: "
             "the rule of diffusers' FirstBlockCache.",
             "- *diffusers FirstBlockCache*: `apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig("
             "threshold=t))`. `DiTTransformer2DModel` has no `CacheMixin` (`enable_cache` does not exist for it), "
             "but the hook applies to its `BasicTransformerBlock`s; the script sets the cache context "
             "`DiTPipeline` does not set, and resets the hooks per generation.", "",
             "| threshold | method | steps computed | cached steps | accuracy | pixel mean abs | pixel max abs | "
             "seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(latest):
        r = latest[key]
        lines.append(f"| {r['threshold']} | {r['method']} | {r['computed']} / {r['steps']} | "
                     f"{', '.join(map(str, r['cached_steps'])) or '-'} | {r['accuracy']:.1%} | "
                     f"{r['pixel_mean_abs']:.2e} | {r['pixel_max_abs']:.2e} | {r['seconds']} |")
    if rows:
        lines += ["", f"torch {last['torch']}, diffusers {last['diffusers']}, {last['date']}; uncached: "
                  f"{last['uncached_seconds']} s (the first pipeline built in the process). CPU timings are for "
                  "orientation only: ditpass's include the capture (export) at the first call, and the model is "
                  "tiny (the head, tail and VAE weigh as much as the cached blocks); speed is measured on GPUs by "
                  "`benchmarks/bench_step_cache.py`."]
    with open(TABLE, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
