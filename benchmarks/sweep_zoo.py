"""Sweep the model zoo: capture, analysis and exact sequence parallelism for every zoo class (CPU, gloo).

    OMP_NUM_THREADS=1 python benchmarks/sweep_zoo.py                      # every class, writes results/sweep_zoo.md
    python benchmarks/sweep_zoo.py --models FluxTransformer2DModel AuraFlowTransformer2DModel --inductor

Per class (tiny size, ``zoo.make_inputs`` defaults), in a process of its own with a time limit
(``--timeout``; a class that fails or runs over it is a row with its error, the sweep goes on):

1. ``ditpass.capture`` with ``dynamic_shapes="auto"`` (what ``parallelize`` does): the method
   (``export-dynamic`` / ``export-static`` whole, ``dynamo`` pieces), seconds, and why the strategies
   before it failed.
2. ``ditpass.analyze``: attention sites by kind, token classes (sequences a sequence-parallel pass can
   shard) and the inputs that carry a token dim.
3. ``ulysses=2`` and ``ring=2`` on 2 gloo processes forked from the one that captured (they share the
   capture), against the single-process output: max abs diff over both ranks, and the share of attention
   sites (and of their SDPA FLOPs, ``4 * B * heads * q_len * kv_len * head_dim``) whose site-table entry
   has a sequence-parallel strategy (``SiteStrategy.seq``), or that this rank runs on a query shard against
   whole K/V (`query_sharded`: local FLOPs from the rewritten graph's shapes <= 3/4 of one process's), i.e.
   that each rank computes on its shard.
   ``ReplicatedWarning`` (sites every rank computes whole) and the pass's first note are kept.
4. With ``--inductor``: ``Plan(compile="inductor")`` on one process against the eager output (slow on CPU).

Status: ``exact+sharded`` when the capture is whole and both plans are within ``TOL`` with at least half of the
attention FLOPs sharded (``MIN_SHARDED``: each of 2 ranks computes at most 3/4 of one process's attention work);
``exact, replicated`` when exact but less is sharded; otherwise the first failure.
`equivalence` is the 2-process check, also used by tests/test_zoo_sweep.py with several models per run.
"""
from __future__ import annotations

import argparse
import math
import os
import queue
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # dist_utils

import torch  # noqa: E402

TOL = 1e-4
PLANS = [dict(ulysses=2), dict(ring=2)]
OUT = REPO / "benchmarks" / "results" / "sweep_zoo.md"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:220] if text else ''}"


def _hint(x) -> int:
    """The example value of a size; raises for an unbacked one (a length that depends on data, e.g. after
    ``nonzero``), whose value the capture does not know."""
    if isinstance(x, int):
        return x
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

    return int(guarding_hint_or_throw(x))


def site_flops(captured) -> dict[str, int | None]:
    """SDPA FLOPs (``4 * prod(q.shape[:-1]) * kv_len * head_dim``) of each attention node of the capture, by
    node name, at the example sizes (symbolic sizes read through their hints; None where a size is unbacked)."""
    from ditpass.analysis import is_sdpa

    out = {}
    for node in captured.graph.nodes:
        if not is_sdpa(node):
            continue
        try:
            q, k = node.args[0].meta["val"], node.args[1].meta["val"]
            qs = [_hint(s) for s in q.shape]
            out[node.name] = 4 * math.prod(qs[:-1]) * _hint(k.shape[-2]) * qs[-1]
        except Exception:  # noqa: BLE001 - unknown: the class then has no FLOPs share
            out[node.name] = None
    return out


def query_sharded(rec, flops: dict) -> set[str]:
    """Sites without a sequence-parallel strategy whose attention this rank computes on a query shard against
    whole K/V (cross attention, or K/V gathered): the rewritten graph's local q length times k length is at
    most 3/4 of the single-process FLOPs. Read from the rewritten graph's shapes (``meta["val"]`` is this
    rank's), not from a label."""
    from ditpass.runtime.ops import OPS

    gm, out = rec.graph_module, set()
    if gm is None:
        return out
    by_id = {s.site: s for s in rec.sites}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not OPS["attention"] or n.args[3].op != "get_attr":
            continue
        s = by_id.get(int(getattr(gm, n.args[3].target)))
        if s is None or s.seq is not None or not flops.get(s.node):
            continue
        try:
            q, k = n.args[0].meta["val"], n.args[1].meta["val"]
            qs = [_hint(x) for x in q.shape]
            local = 4 * math.prod(qs[:-1]) * _hint(k.shape[-2]) * qs[-1]
        except Exception:  # noqa: BLE001 - an unbacked size: not counted
            continue
        if local <= 0.75 * flops[s.node]:
            out.add(s.node)
    return out


def _rank_worker(rank, world, entries, plans):
    """In each rank: every plan on every model; per model and plan a dict of results (errors caught, so that
    a plan that fails the same way on every rank does not stop the others)."""
    import ditpass
    from ditpass.passes.sequence_parallel import ReplicatedWarning
    from dist_utils import first_output

    warnings.filterwarnings("ignore")
    out = {}
    for name, model, inputs, ref, flops in entries:
        res = []
        for fields in plans:
            r = dict(plan=",".join(f"{k}={v}" for k, v in fields.items()))
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always", ReplicatedWarning)
                    pm = ditpass.parallelize(model, ditpass.Plan(**fields))
                    with torch.no_grad():
                        y = first_output(pm(**inputs))
                rec = pm.ditpass_records[0]
                sites = list(rec.sites)
                qs = query_sharded(rec, flops)
                seq = [s for s in sites if s.seq is not None or s.node in qs]
                res_sp = next((p for p in rec.results if p.name == "sequence_parallel"), None)
                fl = [flops.get(s.node, 0) for s in sites]
                total = None if None in fl else sum(fl)
                r.update(diff=float((y.float() - ref.float()).abs().max()), shape_ok=tuple(y.shape) == tuple(ref.shape),
                         sites=len(sites), sharded=len(seq), query_sharded=len(qs),
                         flops_share=(sum(flops.get(s.node, 0) for s in seq) / total) if total else None,
                         strategies=sorted({s.describe().split(" (")[0] for s in sites}),
                         notes=list(res_sp.notes[:2]) if res_sp else [],
                         replicated=[str(w.message) for w in seen if issubclass(w.category, ReplicatedWarning)][:1])
            except Exception as e:  # noqa: BLE001 - recorded in the table
                r["error"] = first_line(e)
            res.append(r)
        out[name] = res
    return out


def equivalence(entries, plans=PLANS, world=2, timeout=600):
    """``entries``: ``(name, model, inputs)``. Computes each reference and capture here, then runs every plan on
    every model in ``world`` ranks forked from this process (one process group for all). Returns
    ``{name: [per plan: {plan, diff (max over ranks), sites, sharded, flops_share, ...} or {error}]}``."""
    import ditpass
    from dist_utils import first_output, run_distributed

    prepared = []
    for name, model, inputs in entries:
        with torch.no_grad():
            ref = first_output(model(**inputs))
        captured = ditpass.capture(model, **inputs)
        prepared.append((name, model, inputs, ref, site_flops(captured)))

    def forked(rank, world_size):
        return _rank_worker(rank, world_size, prepared, plans)

    forked.__qualname__ = "sweep_zoo._rank_worker"
    per_rank = run_distributed(forked, world, timeout=timeout, start_method="fork")
    merged = {}
    for name in per_rank[0]:
        rows = []
        for i, r0 in enumerate(per_rank[0][name]):
            r = dict(r0)
            errs = [pr[name][i].get("error") for pr in per_rank if "error" in pr[name][i]]
            if errs:
                r["error"] = errs[0]
            elif "diff" in r:
                r["diff"] = max(pr[name][i]["diff"] for pr in per_rank)
            rows.append(r)
        merged[name] = rows
    return merged


def _innermost(err: str) -> str:
    """``PassError: pass ... failed (...): ValueError: no token sequence found: ...`` -> the innermost error, short."""
    import re

    starts = [m.start() for m in re.finditer(r"\b[A-Z]\w*(Error|Exception): ", err)]
    inner = err[starts[-1]:] if starts else err
    return inner if len(inner) <= 80 else inner[:77] + "..."


MIN_SHARDED = 0.5  # of the attention FLOPs (of the sites where no FLOP count is known): at 2 ranks, each rank
# then computes at most 3/4 of one process's attention work


def sharded_share(r: dict) -> float:
    """The share of the attention work that each rank computes on its shard only."""
    if r.get("flops_share") is not None:
        return r["flops_share"]
    return r["sharded"] / r["sites"] if r.get("sites") else 0.0


def exact_and_sharded(r: dict) -> bool:
    return ("error" not in r and r.get("shape_ok") and r["diff"] <= TOL and r["sharded"] > 0
            and sharded_share(r) >= MIN_SHARDED)


# --------------------------------------------------------------------------------------------
# one class
# --------------------------------------------------------------------------------------------


def sweep_one(name: str, inductor: bool = False, timeout: float = 300) -> dict:
    """Everything the table needs for one zoo class; exceptions end up in ``row["error"]``."""
    import ditpass
    from ditpass.models import zoo

    row = dict(name=name, new=name in zoo.MORE_NAMES)
    t0 = time.perf_counter()
    stage = "build"
    try:
        torch.manual_seed(0)
        model = zoo.build(name)
        inputs = zoo.make_inputs(name)
        stage = "forward"
        t = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        row["forward_s"] = time.perf_counter() - t
        stage = "capture"
        cap = ditpass.capture(model, **inputs)
        row.update(method=cap.method, capture_s=cap.seconds, whole=cap.whole, graphs=len(cap.graph_modules),
                   capture_errors={m: e.splitlines()[0][:200] for m, e in cap.errors.items()})
        if not cap.whole:
            row["status"] = "capture in pieces"
            return row
        stage = "analysis"
        a = ditpass.analyze(cap.graph_module)
        row.update(kinds=a.kinds(), token_classes=[", ".join(r) for r in a.token_classes.values()],
                   token_inputs=sorted(a.inputs), const_sites=len(a.const_segments))
        stage = "sequence parallel"
        res = equivalence([(name, model, inputs)], timeout=max(30.0, timeout - (time.perf_counter() - t0) - 5))
        row["sp"] = res[name]
        if inductor:  # its own column: a failure here is reported there, the status stays the plans'
            from dist_utils import first_output

            try:
                pm = ditpass.parallelize(model, ditpass.Plan(compile="inductor"))
                with torch.no_grad():
                    ref = first_output(model(**inputs))
                    y = first_output(pm(**inputs))
                row["inductor_diff"] = float((y - ref).abs().max())
            except Exception as e:  # noqa: BLE001
                row["inductor_error"] = first_line(e)
        sp = row["sp"]
        if all(exact_and_sharded(r) for r in sp):
            row["status"] = "exact+sharded"
        elif all("error" not in r and r.get("shape_ok") and r["diff"] <= TOL for r in sp):
            share = min(sharded_share(r) for r in sp)
            row["status"] = f"exact, {100 * share:.0f}% sharded" if share else "exact, replicated"
        else:
            bad = next(r for r in sp if not exact_and_sharded(r))
            row["status"] = f"{bad['plan']}: " + (_innermost(bad["error"]) if "error" in bad else
                                                  "no site sharded" if bad["diff"] <= TOL and not bad["sharded"] else
                                                  f"{100 * sharded_share(bad):.0f}% of the attention sharded"
                                                  if bad["diff"] <= TOL else f"diff {bad['diff']:.2g}")
    except Exception as e:  # noqa: BLE001 - one row per class, whatever happened
        row["status"] = f"{stage} failed"
        row["error"] = first_line(e)
        row["trace"] = traceback.format_exc()[-2000:]
    finally:
        row["seconds"] = time.perf_counter() - t0
    return row


def _child(name, inductor, timeout, q):
    os.setpgrp()  # the parent kills the whole group (this process and its ranks) at the time limit
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    q.put(sweep_one(name, inductor, timeout))


def run_isolated(name: str, inductor: bool, timeout: float) -> dict:
    """`sweep_one` in a forked process, killed (with its ranks) after ``timeout`` seconds."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(name, inductor, timeout, q), daemon=False)
    t0 = time.perf_counter()
    p.start()
    try:
        row = q.get(timeout=timeout)
    except queue.Empty:
        row = dict(name=name, status="timeout", error=f"over the {timeout:.0f} s limit",
                   seconds=time.perf_counter() - t0)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.join(5)
    if p.exitcode not in (0, None, -signal.SIGKILL) and "status" not in row:
        row = dict(name=name, status="crashed", error=f"exit code {p.exitcode}")
    return row


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------


def _fmt_plan(r: dict) -> str:
    if "error" in r:
        return "error"
    share = f"{r['sharded']}/{r['sites']} sharded"
    if r.get("query_sharded"):
        share += f", {r['query_sharded']} of them on a query shard"
    fl = f", {100 * r['flops_share']:.0f}% FLOPs" if r.get("flops_share") is not None else ""
    return f"{r['diff']:.1e} ({share}{fl})"


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


# what the classes that are not exact+sharded need (kept with the table: the status column says what failed)
REMAINING = {
    "QwenImage21Transformer2DModel": "the repeat counts of its image/text layout come from `image_pad_mask`'s "
    "values (`.tolist()`); fixed at the example's values (export-values) the whole sequence is a constant, so no "
    "symbolic token count is left. Needs a value that only sizes tensors kept symbolic (an unbacked size) through "
    "the layout, or the analysis' token dims from two captures at different sizes",
    "ZImageTransformer2DModel": "pads each sequence to a multiple of 32 with Python ints computed from list "
    "lengths, so export keeps the padded lengths as constants (64 + 32). Needs those lengths made symbolic (the "
    "per-sample lists traced as sizes) or the pad recognised as a segment of its own",
    "AnyFlowFARTransformer3DModel": "flex_attention too (a site now), but its `create_block_mask` mask function "
    "indexes frame ids by q_idx / kv_idx (transformer_anyflow_far.py:947 `frame_idx[q_idx] >= frame_idx[kv_idx]`), "
    "which fails to trace with symbolic sizes (`mul expected 2 arguments, got 4`), so it is captured static. Needs "
    "that mask traced with symbolic lengths (or built once outside the capture and passed in)",
    "WanAnimate2Transformer3DModel": "its denoising call takes the reference K/V cache (`WanAnimate2KVCache`, filled "
    "by the builder's own 'extract' pass); the zoo registers it as a pytree of its layers' key/value tensors so that "
    "export takes it as an input, but `auto_dynamic_shapes` (ditpass/capture.py) gives `None` for a registered custom "
    "node and torch.export wants a per-leaf list there (`ValueError: Node type mismatch; expected <class 'list'>, but "
    "got <class 'NoneType'>`, export-dynamic and export-values), so only dynamo captures it, in pieces. Fix 1: recurse "
    "into `pytree.SUPPORTED_NODES[type(v)].flatten_fn(v)[0]` there. Tried with fix 1 patched in a scratch script: "
    "export-values then fails in `create_mask` (transformer_wan_animate_2.py:738 `q_frame = q_idx // hw`, `vmap: ... "
    ".item()`): the int inputs `origin_len` / `origin_area` are Dim.AUTO, so the block-mask cache key is symbolic, "
    "misses the eagerly filled `model.block_masks`, and `create_block_mask(_compile=True)` gets traced. Fix 2: keep "
    "ints static that only key a Python-side cache. With both: captured whole (export-values), but `rope_apply`'s (:49) "
    "`grid_sizes.tolist()` (grid from `torch.tensor(u.shape[2:])`) fixes every token count to the example, and the "
    "generation self-attention is `flex_attention` with a BlockMask (a site now, but over fixed lengths): only the 4 "
    "text / CLIP cross-attention SDPAs are sites, `no token sequence found`. Needs flex_attention sites with block "
    "masks in global positions and token dims without symbolic sizes (as QwenImage21)",
    "Cosmos3OmniTransformer": "exact (ulysses 0.0, ring 7e-7), but only the 2 causal text ('understanding') sites "
    "are sharded, 8% of the attention FLOPs; the 2 generation sites (vision queries against `cat([k_und, k_gen], "
    "dim=0)`, transformer_cosmos3.py:106) run replicated: `gather before cat_10 (aten.cat.default) in "
    "layers.0.self_attn: cat mixes or reshapes the token dim`. The joint sequence is packed without a batch dim and "
    "the vision tokens are index_put into a `sequence_length` buffer; the analysis finds only the 'text' token class. "
    "Needs the [und | gen] K/V concat of the generation pathway recognised as a joint sequence",
    "SanaWMTransformer3DModel": "ulysses=2 is exact (5.5e-5), ring=2 is 9.5e-4 off: the softmax blocks "
    "(`_SoftmaxUCPESinglePathLiteLA`, every `softmax_every_n`-th block; block 1 of the tiny config, as every 4th of "
    "the released one) cast fp32 q/k/v to bfloat16 before `F.scaled_dot_product_attention` "
    "(transformer_sana_wm.py:2104 `SanaWMSoftmaxAttention`, :2178 `SanaWMSoftmaxCamAttention`), so ring's per-chunk "
    "results are merged at bf16 precision (the 1-process fp32 model is itself 7e-4 from fp64). Checked: with "
    "`softmax_every_n=0` (GDN blocks only) both plans are exact (8e-7, 20/22 sites sharded). Not a sharding error: "
    "needs ring's partial outputs / LSE merged in fp32 for bf16 sites (bf16 rounding of the result remains) or a bf16 "
    "tolerance for this class. The 2 cross-attention sites run replicated (`reshape` / `einsum` mix the token dim, 2% "
    "of the FLOPs)",
    "PriorTransformer": "a CLIP-prior denoiser over a fixed 20-token sequence (16 text + 4 slots, a causal mask "
    "buffer of that size) whose output is one token: there is no sequence that grows with the image to shard, "
    "and sharding 20 tokens would not pay",
}


def table(rows: list[dict], header: str = "") -> str:
    n = len(rows)
    whole = [r for r in rows if r.get("whole")]
    dyn = sum(r.get("method") == "export-dynamic" for r in rows)
    values = sum(r.get("method") == "export-values" for r in rows)
    static = sum(r.get("method") == "export-static" for r in rows)
    pieces = sum(r.get("method") == "dynamo" for r in rows)

    def ok(r, i):
        return len(r.get("sp", [])) > i and exact_and_sharded(r["sp"][i])

    u = sum(ok(r, 0) for r in rows)
    g = sum(ok(r, 1) for r in rows)
    both = sum(r.get("status") == "exact+sharded" for r in rows)
    new = [r for r in rows if r.get("new")]
    new_both = sum(r.get("status") == "exact+sharded" for r in new)
    ind = [r["inductor_diff"] for r in rows if "inductor_diff" in r]
    ind_err = sum("inductor_error" in r for r in rows)
    lines = [
        "# Zoo sweep: capture, analysis, exact sequence parallelism (CPU, gloo, tiny configs)",
        "",
        f"**{n} classes: {len(whole)} capture whole ({dyn} export-dynamic, {values} export-values, {static} "
        f"export-static), {pieces} in "
        f"pieces, {n - len(whole) - pieces} fail before or at capture; ulysses=2 exact with attention sharded: {u}; "
        f"ring=2: {g}; both: {both}** (of the {len(new)} classes beyond the first twelve: {new_both} both)."
        + (f" `compile=\"inductor\"` on one process: {len(ind)} run, {sum(d <= TOL for d in ind)} within {TOL:g} of "
           f"eager, largest diff {max(ind):.1e}; {ind_err} failed." if ind or ind_err else ""),
        "",
        header,
        "",
        f"Exact: max abs diff to the 1-process output <= {TOL:g} on both ranks. `k/n sharded`: attention sites "
        "whose site-table entry has a sequence-parallel strategy (each rank computes its shard), or that run on "
        "this rank's query shard against whole K/V (\"on a query shard\": the rewritten graph's local q length "
        "times k length is at most 3/4 of one process's), and their share of the SDPA FLOPs; exact+sharded needs "
        f"at least {100 * MIN_SHARDED:.0f}% of the FLOPs sharded under both plans. Token classes: the "
        "sequences the analysis found (roles of their segments).",
        "",
        "| class | status | capture | attention sites | token classes | ulysses=2 | ring=2 | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cap = f"{r['method']} {r['capture_s']:.1f}s" if "method" in r else "-"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.get("kinds", {}).items())) or "-"
        tc = "; ".join(r.get("token_classes", [])) or "-"
        sp = r.get("sp", [])
        cells = [_fmt_plan(sp[i]) if len(sp) > i else "-" for i in range(2)]
        notes = []
        if r.get("error"):
            notes.append(r["error"])
        if r.get("capture_errors") and r.get("method") != "export-dynamic":
            m, e = next(iter(r["capture_errors"].items()))
            notes.append(f"{m}: {e}")
        by_why: dict[str, list[str]] = {}  # the same reason for both plans is written once
        for p in sp:
            if "error" in p:
                by_why.setdefault(p["error"], []).append(p["plan"])
            elif p.get("sharded", 0) < p.get("sites", 0):
                why = (p.get("replicated") or p.get("notes") or [""])[0]
                if why:  # the ReplicatedWarning names the sites, then says why: keep the count and the why
                    count = why.split(" (replicated")[0]
                    why = count + ", why: " + why.split("why: ", 1)[1] if "why: " in why else why
                    by_why.setdefault(why[:300], []).append(p["plan"])
        notes += [f"{', '.join(plans)}: {why}" for why, plans in by_why.items()]
        if r.get("const_sites"):
            notes.append(f"{r['const_sites']} sites with a constant-length segment")
        if "inductor_diff" in r:
            notes.append(f"inductor diff {r['inductor_diff']:.1e}")
        if "inductor_error" in r:
            notes.append(f"inductor failed: {r['inductor_error'][:160]}")
        name = r["name"] + (" (new)" if r.get("new") else "")
        lines.append("| " + " | ".join(_cell(c) for c in [name, r.get("status", "?"), cap, kinds, tc, *cells,
                                                             " / ".join(dict.fromkeys(notes))[:700] or "-"]) + " |")
    rest = [r["name"] for r in rows if r.get("status") != "exact+sharded"]
    if rest:
        lines += ["", "## The classes that are not exact+sharded, and what they need", ""]
        lines += [f"- **{name}**: {REMAINING.get(name, 'not analysed yet')}" for name in rest]
    return "\n".join(lines) + "\n"


def main(argv=None):
    from ditpass.models import zoo

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="zoo class names (default: all)")
    ap.add_argument("--new", action="store_true", help="only the classes beyond the first twelve (MORE_NAMES)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per class (default 300)")
    ap.add_argument("--inductor", action="store_true", help="also compile='inductor' on one process (slow)")
    ap.add_argument("--jobs", type=int, default=1, help="classes swept at once, each in its own processes (default 1)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    names = args.models or (zoo.MORE_NAMES if args.new else zoo.ALL_NAMES)
    t0 = time.time()

    def one(name):
        row = run_isolated(name, args.inductor, args.timeout)
        print(f"{name}: {row.get('status')} ({row.get('seconds', 0):.0f}s) {row.get('error', '')}", flush=True)
        return row

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads that each wait on one forked class
        rows = list(pool.map(one, names))
    import diffusers

    header = (f"torch {torch.__version__}, diffusers {diffusers.__version__}; {len(names)} classes in "
              f"{(time.time() - t0) / 60:.1f} min, per-class limit {args.timeout:.0f} s; "
              f"`python benchmarks/sweep_zoo.py{' --inductor' if args.inductor else ''}`"
              f"{f' ({args.jobs} at once)' if args.jobs > 1 else ''}. Not in the zoo: "
              f"{len(zoo.PENDING)} pending classes (`zoo.PENDING`, why each), {len(zoo.EXCLUDED)} excluded as not "
              f"denoisers (`zoo.EXCLUDED`).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, header))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
