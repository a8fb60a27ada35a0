"""Compare run_arch_check.sh's two trees: base (the first ditpass_commit in the file) vs new (the second),
with the same measurements of the latest earlier 1-GPU run of record beside them.

    python3 benchmarks/compare_arch.py OUT/perf_arch_w1.jsonl [--out compare_arch.md] [--history 'benchmarks/results/perf_flux_*.jsonl']

One row per (res, system, plan, compile). ``new/base`` is the ratio of the two medians; the noise gauge of
a resolution is how far the diffusers rows (the same code in both invocations) moved between the two
invocations, at least ``--tol`` (default 1.5%: the spread of repeated medians in the records, e.g. compiled
diffusers 713.8 / 716.3 ms at 2048 and 131.6 / 133.0 ms at 1024 in two runs). A ditpass row is ``slower``
when new/base exceeds 1 + that gauge, ``faster`` when under 1 - gauge, else ``same``. ``rel diff`` is each
invocation's output against its own diffusers eager reference (the same code, seed and inputs, so the two
should match when the rewritten graph computes the same thing).
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(path):
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("RESULT "):
            line = line[7:]
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def key(r):
    return (r.get("model", "FLUX.1-dev"), r.get("res"), r.get("system"), r.get("plan"), r.get("compile", "eager"))


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def cell(r):
    if r is None:
        return "—"
    if "skipped" in r:
        return "skipped"
    if "error" in r:
        return "error"
    return f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.0f}–{r['step_ms_max']:.0f})"


def med(r):
    return r.get("step_ms_median") if r else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("jsonl")
    p.add_argument("--out", default=None)
    p.add_argument("--history", default=str(HERE / "results" / "perf_flux_*.jsonl"))
    p.add_argument("--tol", type=float, default=0.015)
    a = p.parse_args()

    recs = [r for r in load(a.jsonl) if "system" in r]
    labels = []
    for r in recs:
        if r.get("ditpass_commit") not in labels:
            labels.append(r.get("ditpass_commit"))
    if not recs:
        print("no records")
        return 1
    base_l = labels[0]
    new_l = labels[1] if len(labels) > 1 else None
    by = {}
    for r in recs:
        by.setdefault(r["ditpass_commit"], {})[key(r)] = r  # the last record of a key wins (after --resume)

    hist = {}
    for f in sorted(glob.glob(a.history)):
        for r in load(f):
            if r.get("world") == 1 and r.get("gpus") == 1 and r.get("step_ms_median") is not None:
                k = key(r)
                if k not in hist or r["run_id"] > hist[k]["run_id"]:
                    hist[k] = r

    keys = sorted({key(r) for r in recs},
                  key=lambda k: (k[0], k[1], {"diffusers": 0, "ditpass": 1}.get(k[2], 2),
                                 {"eager": 0, "regional": 1, "inductor": 2}.get(k[4], 3), k[3]))
    gauge = {}
    for k in keys:
        if k[2] != "diffusers" or new_l is None:
            continue
        b, n = med(by[base_l].get(k)), med(by.get(new_l, {}).get(k))
        if b and n:
            gauge[k[:2]] = max(gauge.get(k[:2], a.tol), abs(n / b - 1))
    e = recs[0]
    lines = [f"### run `{e.get('run_id')}`: base `{base_l}` vs new `{new_l}`", "",
             f"{e.get('card')}, torch {e.get('torch')} (CUDA {e.get('cuda')}), diffusers {e.get('diffusers')}, "
             f"median of {e.get('iters')} after {e.get('warmup')} warm-ups, ms per step (min–max); one invocation "
             f"per tree, base first. Noise gauge per res: how far diffusers moved between the invocations, at "
             f"least {a.tol:.1%}.", "",
             "| res | system | plan | compile | last record (run) | base | new | new/base | verdict | "
             "first call s base / new | rel diff base / new |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    verdicts = []
    for k in keys:
        rb, rn = by[base_l].get(k), by.get(new_l, {}).get(k) if new_l else None
        h = hist.get(k)
        hc = f"{h['step_ms_median']:.1f} (`{h['run_id'][-5:]}`)" if h else "—"
        ratio = med(rn) / med(rb) if med(rb) and med(rn) else None
        g = gauge.get(k[:2], a.tol)
        if k[2] == "diffusers":
            v = "(gauge)"
        elif ratio is None:
            v = "missing"
        else:
            v = "slower" if ratio > 1 + g else ("faster" if ratio < 1 - g else "same")
        if k[2] != "diffusers":
            verdicts.append(v)

        def fc(r):
            return fmt(r.get("first_call_s")) if r and "step_ms_median" in r else "—"

        def rd(r):
            return f"{r['rel_diff']:.2e}" if r and r.get("rel_diff") is not None else "—"

        lines.append(f"| {k[1]} | {k[2]} | {k[3]} | {k[4]} | {hc} | {cell(rb)} | {cell(rn)} | "
                     f"{'—' if ratio is None else f'{ratio:.3f}'} | {v} | {fc(rb)} / {fc(rn)} | {rd(rb)} / {rd(rn)} |")
    lines.append("")
    lines.append(f"Noise gauge: {', '.join(f'{res}: {g:.1%}' for (_, res), g in sorted(gauge.items())) or 'none'}. "
                 f"ditpass rows: {verdicts.count('same')} same, {verdicts.count('faster')} faster, "
                 f"{verdicts.count('slower')} slower, {verdicts.count('missing')} missing.")
    probs = [r for r in recs if "error" in r or "skipped" in r]
    if probs:
        lines += ["", "Errors and skips:"]
        for r in probs:
            why = " ".join(str(r.get("error") or "skipped: " + str(r.get("skipped"))).split())
            lines.append(f"- {r.get('ditpass_commit')} {r.get('res')} {r['system']} {r['plan']} {r['compile']}: {why[:300]}")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
