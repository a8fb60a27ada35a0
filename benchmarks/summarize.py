"""Markdown tables from bench_sp.py's JSON lines.

    python benchmarks/summarize.py benchmarks/results/sp_flux_*.jsonl [--run RUN_ID]

Speed-ups are taken against the 1-GPU diffusers baseline of the same invocation (same run_id and
world size, so the same machine and cards); numbers of different runs are never mixed.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(paths, run=None):
    recs = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line.startswith("RESULT "):
                    line = line[7:]
                if line.startswith("{"):
                    r = json.loads(line)
                    if run is None or r.get("run_id") == run:
                        recs.append(r)
    return recs


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def sci(x):
    return "—" if x is None else f"{x:.1e}"


def tables(recs) -> str:
    out = []
    by_inv = defaultdict(list)  # (run_id, world) -> records
    for r in recs:
        by_inv[(r["run_id"], r["world"])].append(r)
    for (run_id, world), rs in sorted(by_inv.items()):
        e = rs[0]
        out.append(f"### run `{run_id}`, {world} processes: {e['card']} x{world}, torch {e['torch']}"
                   f" (CUDA {e.get('cuda')}, NCCL {e.get('nccl')}), diffusers {e['diffusers']},"
                   f" ditpass {e['ditpass_commit']}, {e['dtype']}, attention `{e['attn_backend']}`,"
                   f" median of {e['iters']} after {e['warmup']} warm-ups\n")
        out.append("| res (tokens) | system | plan | GPUs | median ms | min ms | host ms | vs 1 GPU | peak GiB |"
                   " max abs diff | rel diff | build s (capture s) |")
        out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        base = {r["res"]: r for r in rs if r["plan"] == "single" and "error" not in r}
        for r in sorted(rs, key=lambda r: (r["res"], r["gpus"], r["system"] != "diffusers", r["plan"])):
            tok = f"{r['res']} ({r.get('tokens', '?')})"
            if "error" in r:
                out.append(f"| {tok} | {r['system']} | {r['plan']} | {r['gpus']} | error: {r['error'][:120]} |"
                           " | | | | | | |")
                continue
            b = base.get(r["res"])
            sp = f"{b['step_ms_median'] / r['step_ms_median']:.2f}x" if b and r["plan"] != "single" else ""
            build = ""
            if r.get("build_s") is not None:
                build = f"{r['build_s']:.1f}" + (" (reused)" if r.get("capture_reused") else f" ({r['capture_s']:.1f})")
            out.append(f"| {tok} | {r['system']} | {r['plan']} | {r['gpus']} | {fmt(r['step_ms_median'])} |"
                       f" {fmt(r['step_ms_min'])} | {fmt(r.get('host_ms_median'))} | {sp} | {fmt(r.get('peak_mem_gib'), 2)} |"
                       f" {sci(r.get('max_abs_diff'))} | {sci(r.get('rel_diff'))} | {build} |")
        out.append("")
    return "\n".join(out)


def pivot(recs) -> str:
    """One row per (run, res, world): 1 GPU, diffusers Ulysses-N, ditpass plans (median ms)."""
    rows = defaultdict(dict)
    for r in recs:
        if "error" in r:
            v = "error"
        else:
            v = f"{r['step_ms_median']:.1f}"
            if r.get("rel_diff") is not None:
                v += f" ({r['rel_diff']:.0e})"
        key = (r["run_id"], r["res"], r["world"])
        col = "1 GPU" if r["plan"] == "single" else f"{r['system']} {r['plan']}"
        rows[key][col] = v
        rows[key]["_card"] = r["card"]
        rows[key]["_commit"] = r["ditpass_commit"]
    cols = []
    for k in rows.values():
        for c in k:
            if not c.startswith("_") and c not in cols:
                cols.append(c)
    order = ["1 GPU"] + sorted([c for c in cols if c.startswith("diffusers")]) + \
        sorted([c for c in cols if c.startswith("ditpass")], key=lambda c: ("ring" in c, c))
    lines = ["| res | GPUs | run (ditpass commit) | card | " + " | ".join(order) + " |",
             "| --- | ---: | --- | --- |" + " ---: |" * len(order)]
    for (run_id, res, world), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        lines.append(f"| {res} | {world} | `{run_id}` ({v['_commit']}) | {v['_card']} | "
                     + " | ".join(v.get(c, "") for c in order) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--run", default=None)
    a = p.parse_args()
    recs = load(a.files, a.run)
    print("median ms per transformer forward (relative L2 difference vs the 1-GPU output):\n")
    print(pivot(recs))
    print()
    print(tables(recs))


if __name__ == "__main__":
    main()
