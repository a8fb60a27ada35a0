"""PipeFusion's quality on the built-in digits model: classifier accuracy and pixel deviation.

    torchrun --nproc_per_node=2 benchmarks/quality_pipefusion.py     # N = 2: M in {2, 4}, W in {0, 1, 2}
    torchrun --nproc_per_node=4 benchmarks/quality_pipefusion.py     # N = 4: M in {4, 8}
    python benchmarks/quality_pipefusion.py --table                 # the Markdown table from the JSON

Every rank generates the same digits (``--per_class`` of each class, seed 0, the model's 20 steps,
guidance 4) with a fresh pipeline parallelized as ``Plan(pipefusion=N, patches=M, warmup_steps=W)``
and compares them with the single-device images (`ditpass.tools.quality.digits_quality`). Warm-up
steps equal to the step count use no stale K/V: that row must be exact. Results are appended to
``benchmarks/results/quality_pipefusion.jsonl`` (one line per configuration) by rank 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
JSONL = os.path.join(HERE, "results", "quality_pipefusion.jsonl")
TABLE = os.path.join(HERE, "results", "quality_pipefusion.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per_class", type=int, default=3)
    ap.add_argument("--warmup", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--table", action="store_true", help="only write the Markdown table from the JSON lines")
    args = ap.parse_args(argv)
    if args.table:
        return write_table()

    import ditpass
    from ditpass.mesh import init_distributed
    from ditpass.models import digits
    from ditpass.tools.quality import digits_quality, digits_reference, quiet_pipeline

    torch.set_num_threads(1)
    rank, world = init_distributed()
    labels, ref, ref_s, steps = digits_reference(args.per_class)
    make = quiet_pipeline
    rows = []
    for M in (world, 2 * world):
        for W in sorted(set(args.warmup) | {steps}):
            pipe = ditpass.parallelize(make(), ditpass.Plan(pipefusion=world, patches=M, warmup_steps=W))
            t = time.perf_counter()
            out = digits.generate(labels, seed=0, pipe=pipe, output_type="np")
            secs = time.perf_counter() - t
            q = digits_quality(out, labels, reference=ref)
            mode = pipe.transformer.ditpass_records[0].runner.last_mode  # pipelined: across steps
            row = dict(q, pipefusion=world, patches=M, warmup_steps=W, steps=steps, seconds=round(secs, 2),
                       schedule={"pipelined": "across steps", "patches": "per call"}.get(mode, "whole"),
                       single_seconds=round(ref_s, 2), torch=torch.__version__, machine=platform.processor() or "cpu",
                       date=time.strftime("%Y-%m-%d"))
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        with open(JSONL, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        write_table()


def write_table():
    rows = [json.loads(line) for line in open(JSONL)] if os.path.exists(JSONL) else []
    latest: dict = {}
    for r in rows:  # the newest run of each configuration
        latest[(r["pipefusion"], r["patches"], r["warmup_steps"])] = r
    lines = ["# PipeFusion on the digits model: quality against the single-device images", "",
             "`torchrun --nproc_per_node=N benchmarks/quality_pipefusion.py` (CPU, gloo; "
             f"{rows[-1]['n'] if rows else '?'} digits, balanced over the classes, seed 0, "
             f"{rows[-1]['steps'] if rows else '?'} DPM-Solver++ steps, guidance 4). Accuracy: an SVC trained on "
             "scikit-learn's real digits labels the image as the class asked for (single device: "
             + (f"{rows[-1]['reference_accuracy']:.1%}" if rows else "?") + "). Pixel deviation: |image - single-device image| "
             "in [0, 1] units, mean over pixels and worst pixel. Warm-up steps = all steps: no stale K/V, exact.",
             "",
             "The deviation depends on M and W only, not on N: every patch sees the same mix of fresh and stale "
             "K/V whatever the stage count and whatever the schedule (the N=2 and N=4 rows with M=4 agree to the "
             "last digit, which is also a check that the stage cut is exact). `schedule`: *across steps* (the "
             "default in a pipeline: stage 0 starts step t+1 before the last stage ends step t; "
             "`ditpass/runtime/lazy.py`) gives the same images as *per call* (fill and drain in every call; "
             "`tests/test_pipefusion_steps.py` checks that on four pipelines).", "",
             f"| stages N | patches M | warm-up W | schedule | accuracy | pixel mean abs | pixel max abs | "
             f"seconds ({rows[-1]['n'] if rows else '?'} images) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(latest):
        r = latest[key]
        lines.append(f"| {r['pipefusion']} | {r['patches']} | {r['warmup_steps']}"
                     f"{' (all)' if r['warmup_steps'] >= r['steps'] else ''} | {r.get('schedule', 'whole' if r['warmup_steps'] >= r['steps'] else 'per call')} | "
                     f"{r['accuracy']:.1%} | "
                     f"{r['pixel_mean_abs']:.2e} | {r['pixel_max_abs']:.2e} | {r['seconds']} |")
    if rows:
        lines += ["", f"torch {rows[-1]['torch']}, {rows[-1]['date']}. CPU timings are for orientation only "
                  "(2 cores shared by the ranks); speed is measured on GPUs in `benchmarks/`."]
    with open(TABLE, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
