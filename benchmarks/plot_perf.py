"""Table and plot from bench_perf.py's JSON lines.

    python benchmarks/plot_perf.py OUT/perf_w*.jsonl [--out-dir DIR] [--run RUN_ID]

Writes ``perf_flux.md`` (one Markdown table per run_id and model, one row per (resolution, system, plan,
compile), then the errors and skipped measurements with their reasons) and ``perf_flux.png`` (step time
vs GPUs, one line per system + compile, one panel per FLUX resolution, plus a Wan panel when the run has
Wan records, with the compute floor dashed) into ``--out-dir`` (default: the first file's folder).

Numbers of different runs are never mixed: the tables are per run_id and the plot shows one run (``--run``,
default the latest run_id). The 1-GPU diffusers eager row is taken from the smallest world size of the run
(world 1 when it ran); every invocation times its own copy, and those are listed under the table. The
speed-up column divides the 1-GPU eager time of the same invocation (same machine) by the row's time.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

SYSTEM_ORDER = {"diffusers": 0, "ditpass": 1, "xdit": 2}
COMPILE_ORDER = {"eager": 0, "regional": 1, "inductor": 2}


def load(paths, run=None) -> list[dict]:
    recs = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("perf_w*.jsonl")) if p.is_dir() else [p]
        for f in files:
            for line in f.read_text().splitlines():
                line = line.strip()
                if line.startswith("RESULT "):
                    line = line[7:]
                if not line.startswith("{"):
                    continue
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if "system" not in r or (run is not None and r.get("run_id") != run):
                    continue
                r.setdefault("model", "FLUX.1-dev")
                r.setdefault("compile", "eager")
                recs.append(r)
    return recs


def short_plan(plan: str) -> str:
    """'ulysses=2 x ring=2' -> 'u2r2'; 'single' -> '1'; plan flags kept: 'ulysses=2 +cuda_graphs' -> 'u2+cg',
    'ulysses=2 -overlap' (a pass skipped) -> 'u2-ov'."""
    plan, flags = _flags(plan)
    short = {"+cuda_graphs": "+cg", "+fuse_projections": "+fp", "-overlap": "-ov"}
    tail = "".join(short.get(f, f) for f in flags)
    if plan == "single":
        return "1" + tail
    out = ""
    for part in plan.split(" x "):
        k, _, v = part.partition("=")
        out += {"ulysses": "u", "ring": "r"}.get(k, k) + v
    return out + tail


def _flags(plan: str) -> tuple[str, list[str]]:
    """'ulysses=2 x ring=2 +cuda_graphs -overlap' -> ('ulysses=2 x ring=2', ['+cuda_graphs', '-overlap'])."""
    words = plan.split(" ")
    flags = [w for w in words if w[:1] in "+-"]
    return " ".join(w for w in words if w not in flags), flags


def series(r) -> tuple:
    """A plot line: system and compile, and the plan flags (CUDA graphs, fused projections, skipped passes)."""
    return (r["system"], " ".join([r["compile"], *_flags(r["plan"])[1]]))


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def frac(x):
    return "—" if x is None else (f"{x:.2f}" if x >= 0.01 else f"{x:.0e}")


def sci(x):
    return "—" if x is None else f"{x:.1e}"


def row_key(r):
    return (r["model"], r["res"], r["system"], r["plan"], r["compile"])


def sort_key(r):
    return (r["res"], r["gpus"], SYSTEM_ORDER.get(r["system"], 9), COMPILE_ORDER.get(r["compile"], 5), r["plan"])


def dedupe(rs):
    """One record per (res, system, plan, compile): the smallest world's (the 1-GPU baseline is timed in every
    invocation), else the last one written. Returns (kept, others by key)."""
    by = defaultdict(list)
    for r in rs:
        by[row_key(r)].append(r)
    kept, others = [], {}
    for k, group in by.items():
        ok = [r for r in group if "error" not in r and "skipped" not in r] or group
        best = min(ok, key=lambda r: (r.get("world", 1), -ok.index(r)))
        kept.append(best)
        rest = [r for r in group if r is not best]
        if rest:
            others[k] = rest
    return kept, others


def refs_by_invocation(rs):
    """(world, res) -> the 1-GPU eager median of that invocation."""
    out = {}
    for r in rs:
        if r["system"] == "diffusers" and r["plan"] == "single" and r["compile"] == "eager" and \
                r.get("step_ms_median") is not None:
            out[(r.get("world"), r["res"])] = r["step_ms_median"]
    return out


def tables(recs) -> str:
    out = []
    groups = defaultdict(list)
    for r in recs:
        groups[(r["run_id"], r["model"])].append(r)
    for (run_id, model), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "FLUX.1-dev", kv[0][1])):
        e = next((r for r in rs if "step_ms_median" in r), rs[0])
        worlds = sorted({r.get("world") for r in rs})
        cards = sorted({r.get("card") for r in rs})
        out.append(f"### run `{run_id}`: {model}" + (" (tiny config)" if e.get("config") == "tiny" else ""))
        out.append("")
        out.append(f"{', '.join(cards)}; invocations with {', '.join(str(w) for w in worlds)} processes; torch "
                   f"{e.get('torch')} (CUDA {e.get('cuda')}, NCCL {e.get('nccl')}), diffusers {e.get('diffusers')}, "
                   f"ditpass {e.get('ditpass_commit')}, {e.get('dtype')}, attention `{e.get('attn_backend')}`, median "
                   f"of {e.get('iters')} after {e.get('warmup')} warm-ups; one step = one transformer forward; floor "
                   f"= FLOPs / ({e.get('peak_tflops')} TFLOP/s x GPUs).")
        out.append("")
        out.append("| res (tokens) | system | plan | compile | GPUs | median ms | 28-step s | speed-up | tokens/s |"
                   " peak GiB | floor fraction | max diff | rel diff | first-call s |")
        out.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        refs = refs_by_invocation(rs)
        kept, others = dedupe(rs)
        problems = []
        for r in sorted(kept, key=sort_key):
            res = f"{r['res']}" if model.startswith("FLUX") else f"{r.get('height')}x{r.get('width')}x{r.get('frames')}"
            tok = f"{res} ({r.get('tokens', '?')})"
            head = f"| {tok} | {r['system']} | {r['plan']} | {r['compile']} | {r['gpus']} |"
            if "error" in r or "skipped" in r:
                what = "error" if "error" in r else "skipped"
                out.append(head + f" {what} | | | | | | | | |")
                problems.append(r)
                continue
            base = refs.get((r.get("world"), r["res"]))
            sp = f"{base / r['step_ms_median']:.2f}x" if base else "—"
            fc = r.get("first_call_s")
            if r.get("build_s") is not None:
                fc = f"{fmt(fc)} (+{fmt(r['build_s'])} build)"
            else:
                fc = fmt(fc)
            out.append(head + f" {fmt(r['step_ms_median'])} | {fmt(r.get('steps_28_s'), 2)} | {sp} |"
                       f" {fmt(r.get('tokens_per_s'), 0)} | {fmt(r.get('peak_mem_gib'), 2)} |"
                       f" {frac(r.get('floor_fraction'))} | {sci(r.get('max_abs_diff'))} | {sci(r.get('rel_diff'))} |"
                       f" {fc} |")
        out.append("")
        # the other invocations' own 1-GPU eager timings (same model, another world size)
        notes = []
        for k, rest in sorted(others.items()):
            if k[2:] == ("diffusers", "single", "eager"):
                ms = [f"{r.get('world')} processes: {fmt(r.get('step_ms_median'))} ms" for r in rest
                      if r.get("step_ms_median") is not None]
                if ms:
                    notes.append(f"- 1-GPU eager at {k[1]} timed in the other invocations: {'; '.join(ms)}.")
            else:
                notes.append(f"- {k[1]} {k[2]} {k[3]} {k[4]}: {len(rest)} more record(s) not shown "
                             f"(worlds {sorted({r.get('world') for r in rest})}).")
        problems += [r for rest in others.values() for r in rest if "error" in r and r["system"] != "diffusers"]
        if notes:
            out += notes + [""]
        if problems:
            out.append("Errors and skipped measurements:")
            out.append("")
            for r in sorted(problems, key=sort_key):
                why = r.get("error") or f"skipped: {r.get('skipped')}"
                why = " ".join(str(why).split())
                g, w = r["gpus"], r.get("world")
                out.append(f"- {r['res']} {r['system']} {r['plan']} {r['compile']} ({g} GPU{'s' * (g != 1)}, "
                           f"{w} process{'es' * (w != 1)}): {why[:300]}")
            out.append("")
    return "\n".join(out)


def plot(recs, path: Path, run=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    runs = sorted({r["run_id"] for r in recs if r["model"] == "FLUX.1-dev" and "step_ms_median" in r})
    if run is None:
        if not runs:
            print("no FLUX timings to plot")
            return None
        run = runs[-1]
    rs = [r for r in recs if r["run_id"] == run and "step_ms_median" in r]
    kept, _ = dedupe(rs)
    panels = [("FLUX.1-dev", res) for res in sorted({r["res"] for r in kept if r["model"] == "FLUX.1-dev"})]
    panels += sorted({(r["model"], r["res"]) for r in kept if r["model"] != "FLUX.1-dev"})
    if not panels:
        return None
    series_names = sorted({series(r) for r in kept},
                          key=lambda s: (SYSTEM_ORDER.get(s[0], 9), COMPILE_ORDER.get(s[1], 5), s[1]))
    cmap = plt.get_cmap("tab10")
    colors = {s: cmap(i % 10) for i, s in enumerate(series_names)}
    markers = {"eager": "o", "regional": "s", "inductor": "D"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    e = kept[0]
    for ax, (model, res) in zip(axes[0], panels):
        prs = [r for r in kept if r["model"] == model and r["res"] == res]
        gpus_all = sorted({r["gpus"] for r in prs})
        for i, s in enumerate(series_names):
            pts = [r for r in prs if series(r) == s]
            jit = 1 + 0.025 * (i - (len(series_names) - 1) / 2)  # side by side, not on top of each other
            if not pts:
                continue
            best = {}
            for r in pts:
                if r["gpus"] not in best or r["step_ms_median"] < best[r["gpus"]]["step_ms_median"]:
                    best[r["gpus"]] = r
            xs = sorted(best)
            ax.plot([g * jit for g in xs], [best[g]["step_ms_median"] for g in xs], marker=markers.get(s[1], "o"), color=colors[s],
                    label=f"{s[0]} {s[1]}", linewidth=1.6, markersize=6)
            for g in xs:  # the best plan's name where there is a choice
                if len([r for r in pts if r["gpus"] == g]) > 1 or g > 1:
                    ax.annotate(short_plan(best[g]["plan"]), (g * jit, best[g]["step_ms_median"]), textcoords="offset points",
                                xytext=(5, 3), fontsize=7, color=colors[s])
            others = [r for r in pts if best.get(r["gpus"]) is not r]
            if others:  # slower plans at the same GPU count: hollow markers
                ax.scatter([r["gpus"] * jit for r in others], [r["step_ms_median"] for r in others],
                           facecolors="none", edgecolors=[colors[s]], marker=markers.get(s[1], "o"), s=36)
                for r in others:
                    ax.annotate(short_plan(r["plan"]), (r["gpus"] * jit, r["step_ms_median"]), textcoords="offset points",
                                xytext=(5, -9), fontsize=7, color=colors[s])
        fl = [r for r in prs if r.get("floor_ms")]
        if fl and max(r["floor_ms"] * r["gpus"] for r in fl) > 1e-2 * min(r["step_ms_median"] for r in prs):
            f1 = fl[0]["floor_ms"] * fl[0]["gpus"]
            gs = gpus_all or [1]
            ax.plot(gs, [f1 / g for g in gs], "k--", linewidth=1, marker="_", markersize=14, label="compute floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        dense = hi / lo < 10  # less than a decade shown: label every minor tick, or none would be labelled
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if dense or f"{y:g}"[0] in "25" else ""))
        ax.set_xticks(gpus_all)
        ax.set_xticklabels([str(g) for g in gpus_all])
        ax.set_xlabel("GPUs")
        ax.set_ylabel("ms per step (one transformer forward)")
        tok = prs[0].get("tokens")
        if model == "FLUX.1-dev":
            title = f"FLUX.1-dev {res}x{res} ({tok} tokens)"
        else:
            title = f"{model} {prs[0].get('height')}x{prs[0].get('width')}x{prs[0].get('frames')} ({tok} tokens)"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    tiny = " (tiny config, CPU)" if e.get("config") == "tiny" else ""
    fig.suptitle(f"run {run}{tiny}\n{e.get('card')}, torch {e.get('torch')}, diffusers {e.get('diffusers')}, "
                 f"ditpass {e.get('ditpass_commit')}; median of {e.get('iters')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="JSON-lines files (or folders holding perf_w*.jsonl)")
    p.add_argument("--out-dir", default=None, help="default: the first file's folder")
    p.add_argument("--run", default=None, help="only this run_id (the plot's default: the latest)")
    a = p.parse_args()
    recs = load(a.files, a.run)
    if not recs:
        raise SystemExit("no records")
    first = Path(a.files[0])
    out_dir = Path(a.out_dir) if a.out_dir else (first if first.is_dir() else first.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = "# Performance: ditpass vs diffusers vs xDiT\n\n" + tables(recs)
    (out_dir / "perf_flux.md").write_text(md)
    print(md)
    try:
        run = plot(recs, out_dir / "perf_flux.png", a.run)
        if run:
            print(f"wrote {out_dir / 'perf_flux.md'} and {out_dir / 'perf_flux.png'} (run {run})")
    except ImportError as exc:
        print(f"no plot: {exc} (pip install matplotlib)")


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
