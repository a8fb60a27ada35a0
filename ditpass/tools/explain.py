"""explain: what ditpass found in a model and what every pass did to it, readable.

``explain(obj)`` takes a `Captured`, a parallelized module (anything with ``ditpass_records``,
i.e. `ParallelModule`), an `Analysis`, or the output of `dry_run`; it returns an `Explanation`
that prints as text and converts to a JSON-able dict (``to_dict``). Sections, per captured
graph (one per input signature of a parallelized module):

- header: model class, capture method and seconds, node count, number of graphs;
- attention sites: node, kind, module path, heads, head dim, query and key/value segments
  (``text[s31=512] + visual[s29=4096]``: the symbol and its size at capture), mask / causal,
  and the strategy the sequence-parallel pass chose;
- token layout of the inputs and outputs (which dim is a token dim, of which role, and, after
  the passes, which inputs were sharded where and which outputs are gathered);
- block groups (module list, class, count, re-entries);
- one section per pass: its summary, its notes (fallbacks), the collectives it inserted with
  bytes per forward; with ``graph=True`` the rewritten graph's code, headed by the pass name.

Runs of rows that differ only in a block index (``transformer_blocks.0 .. 18``) print as one
row with a count; ``to_dict`` keeps every row.

`dry_run` runs the transformer passes in one process as rank 0 of the plan's world, for
display only: the inserted collectives are never executed.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import sympy
import torch
import torch.fx

from ditpass.analysis import flat

__all__ = ["explain", "Explanation", "dry_run"]


def dry_run(captured, plan, rank: int = 0):
    """Build ``captured`` for ``plan`` as ``rank`` of the plan's world, in this one process: the same
    `ditpass.build.build` that a parallelized model runs, with dry-run group names and no backend.

    Nothing runs: the result (a `ditpass.build.Record`) is for reading (`explain`,
    `ditpass.tools.render.to_svg`), not for calling."""
    from ditpass.build import build
    from ditpass.mesh import ParallelDims
    from ditpass.passes.registry import check_built

    check_built(plan)  # what parallelize refuses, the dry run refuses too
    if not captured.whole:
        raise ValueError(f"{type(captured.module).__name__} was captured in pieces ({captured.method}); "
                         "the passes need one whole graph")
    placement = ParallelDims(plan, plan.world_size).placement(rank)
    return build(captured, plan, placement, backend=False)


# ---- the explanation object -----------------------------------------------------------------


@dataclass
class Explanation:
    """Everything `explain` found, as plain data; ``str()`` gives the text, ``to_dict()`` the data."""

    header: dict[str, Any]
    parts: list[dict[str, Any]] = field(default_factory=list)  # one per captured graph / signature

    def to_dict(self) -> dict:
        return {"header": self.header, "parts": self.parts}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<Explanation of {self.header.get('model')}: {len(self.parts)} graph(s); print() it>"

    def text(self, condense: bool = True) -> str:
        """The readable report; ``condense=False`` prints one row per site and per collective."""
        h = self.header
        out = [_header_text(h)]
        for i, part in enumerate(self.parts):
            if len(self.parts) > 1:
                out.append(_rule(f"graph {i + 1} of {len(self.parts)}: {part.get('title', '')}"))
            out.append(_part_text(part, condense))
        return "\n".join(out).rstrip() + "\n"


def explain(obj, *, graph: bool = False) -> Explanation:
    """Explain a `Captured`, a parallelized module, an `Analysis` or a `Record` (see module doc)."""
    from ditpass.analysis import Analysis, analyze
    from ditpass.build import Record
    from ditpass.capture import Captured

    if isinstance(obj, Record):
        header = _captured_header(obj.captured)
        header.update(plan=str(obj.plan), rank=obj.placement.rank, world_size=obj.placement.world_size,
                      dry_run=obj.placement.dry_run)
        return Explanation(header, [_record_part(obj, graph)])
    if hasattr(obj, "ditpass_records"):
        records = obj.ditpass_records
        inner = getattr(obj, "module", obj)
        header = {"model": getattr(obj, "ditpass_name", type(inner).__name__), "plan": str(getattr(obj, "plan", "")),
                  "rank": getattr(obj, "rank", 0), "world_size": getattr(obj, "world_size", 1), "dry_run": False}
        if not records:
            header["status"] = "not built yet: call it once (or .build(**inputs)) to capture and rewrite"
            return Explanation(header)
        header.update({k: v for k, v in _captured_header(records[0].captured).items() if k != "model"})
        header["signatures"] = len(records)
        return Explanation(header, [_record_part(r, graph) for r in records])
    if isinstance(obj, Captured):
        header = _captured_header(obj)
        gms = obj.graph_modules
        parts = []
        for i, gm in enumerate(gms):
            part = _part(analyze(gm), [], gm, graph, obj.signature if i == 0 else None)
            parts.append(part)
        return Explanation(header, parts)
    if isinstance(obj, Analysis):
        gm = obj.graph_module
        header = {"model": _model_name(gm), "nodes": len(gm.graph.nodes), "graphs": 1}
        return Explanation(header, [_part(obj, [], gm, graph, None)])
    raise TypeError(f"explain() takes a Captured (ditpass.capture), a module returned by ditpass.parallelize, "
                    f"an Analysis (ditpass.analyze) or a ditpass.build.Record; got {type(obj).__name__}")


def _record_part(r, graph: bool) -> dict:
    """One input signature of a parallelized model (or a dry run): analysis, sites, passes, backend."""
    if r.analysis is None:  # captured in pieces: it runs as captured
        from ditpass.analysis import analyze

        part = _part(analyze(r.captured.graph_module), [], r.captured.graph_module, graph, r.signature)
        part["backend"] = f"{r.captured.method}: {len(r.captured.graph_modules)} graphs, run as captured (no pass)"
        return part
    part = _part(r.analysis, r.results, r.graph_module, graph, r.signature, r.sites)
    if hasattr(r.runner, "describe"):  # how the rewritten graph runs (compiled regions, if any)
        part["backend"] = r.runner.describe()
    if hasattr(r.runner, "tables"):  # what the runner did at run time (the step cache: steps computed / reused)
        part["runtime"] = [_table_dict(t) for t in r.runner.tables()]
    return part


# ---- gathering the facts --------------------------------------------------------------------


def _captured_header(cap) -> dict:
    h = {"model": type(cap.module).__name__, "method": cap.method, "seconds": round(cap.seconds, 2),
         "nodes": sum(len(g.graph.nodes) for g in cap.graph_modules), "graphs": len(cap.graph_modules)}
    if cap.errors:
        h["capture_errors"] = dict(cap.errors)
    return h


def _model_name(gm) -> str:
    for node in gm.graph.nodes:
        for val in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(val, tuple) and val[0] in ("", "L['self']"):
                cls = val[1] if isinstance(val[1], str) else getattr(val[1], "__name__", str(val[1]))
                return cls.rsplit(".", 1)[-1]
    return type(gm).__name__


def _hints(gm) -> dict:
    """Symbol -> its size at capture (the example inputs), from the shape environment."""
    for node in gm.graph.nodes:
        val = node.meta.get("val", node.meta.get("example_value"))
        vals = val if isinstance(val, (list, tuple)) else [val]
        for v in vals:
            if isinstance(v, torch.Tensor):
                for s in v.shape:
                    env = s.node.shape_env if isinstance(s, torch.SymInt) else None
                    if env is not None:
                        return dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)
    return {}


def _expr(e, hints) -> str:
    e = sympy.sympify(e)
    if not e.free_symbols:
        return str(e)
    v = e.subs(hints) if hints else e
    return f"{e}={v}" if not getattr(v, "free_symbols", True) else str(e)


def _shape(val, hints) -> str:
    if not isinstance(val, torch.Tensor):
        return type(val).__name__ if val is not None else "-"
    return "[" + ", ".join(_expr(s.node.expr, hints) if isinstance(s, torch.SymInt) else str(int(s))
                           for s in val.shape) + "]"


def _segs(segments, hints) -> str:
    return " + ".join(f"{s.role}[{_expr(s.length, hints)}]" for s in segments)


def _val(node):
    return node.meta.get("val", node.meta.get("example_value"))


def _part(analysis, results, gm, graph: bool, signature, sites=None) -> dict:
    hints = _hints(analysis.graph_module)
    by_node = sites.by_node() if sites is not None else {}
    rows = []
    for s in analysis.sites:
        entry = by_node.get(s.node)
        rows.append({"node": s.node, "kind": s.kind, "module": s.module, "block": s.block, "heads": s.heads,
                     "head_dim": s.head_dim, "q": _segs(s.segments, hints), "kv": _segs(s.kv_segments, hints),
                     "mask": s.has_mask, "causal": s.causal,
                     "site": entry.site if entry else None, "strategy": entry.describe() if entry else None})
    io: dict[str, list[str]] = {}  # "in x" / "out 0" -> what each pass did to it
    for r in results:
        for k, v in r.io.items():
            io.setdefault(k, []).append(v)
    inputs = []
    for node in analysis.graph_module.graph.nodes:
        val = _val(node)
        if node.op != "placeholder" or not isinstance(val, torch.Tensor) or isinstance(val, torch.nn.Parameter):
            continue  # Dynamo's graphs take the parameters as inputs too
        td = analysis.inputs.get(node.name, {})
        inputs.append({"name": node.name, "shape": _shape(val, hints),
                       "token_dims": {str(d): list(roles) for d, roles in td.items()},
                       "after": "; ".join(io.get(f"in {node.name}", [])) or None})
    outputs = []
    out_node = next(n for n in reversed(analysis.graph_module.graph.nodes) if n.op == "output")
    for i, a in enumerate(flat(out_node.args)):
        if not isinstance(a, torch.fx.Node):
            continue
        td = analysis.outputs[i] if i < len(analysis.outputs) else {}
        outputs.append({"index": i, "shape": _shape(_val(a), hints),
                        "token_dims": {str(d): list(roles) for d, roles in td.items()},
                        "after": "; ".join(io.get(f"out {i}", [])) or None})
    attn_blocks = {s.block for s in analysis.sites if s.block}
    blocks = []
    for g in analysis.block_groups:
        blocks.append({"name": g.name, "cls": g.cls, "count": len(g),
                       "nodes_per_block": g.blocks[0].nodes if g.blocks else 0,
                       "attention": any(b.path in attn_blocks for b in g.blocks),
                       "reentries": {b.path: len(b.reentries) for b in g.blocks if b.reentries}})
    by_name = {n.name: n for n in gm.graph.nodes} if gm is not None and results else {}
    passes = []
    for r in results:
        p = {"name": r.name, "modified": r.modified, "summary": r.summary(), "added": r.added, "removed": r.removed,
             "notes": list(r.notes), "collectives": [_collective(c, by_name) for c in r.collectives],
             "tables": [_table_dict(t) for t in r.tables],
             "details": {k: _jsonable(v) for k, v in r.details.items()}}
        if graph:
            p["graph_code"] = r.graph_code
        passes.append(p)
    part = {"title": _sig_text(signature) if signature is not None else "", "sites": rows, "inputs": inputs,
            "outputs": outputs, "blocks": blocks, "passes": passes, "kinds": analysis.kinds()}
    if graph and not any(ps.get("graph_code") and ps["modified"] for ps in passes):
        part["graph_code"] = (gm if gm is not None else analysis.graph_module).code
    return part


def _table_dict(t) -> dict:
    return {"title": t.title, "headers": list(t.headers), "rows": [[_jsonable(c) for c in row] for row in t.rows],
            "fold": t.fold}


def _collective(c, by_name: dict) -> dict:
    """A `Collective` as a dict, plus the module path of the site it serves (when that is a node)."""
    from ditpass.analysis.blocks import module_path

    d = asdict(c)
    node = by_name.get(c.site)
    d["module"] = module_path(node) if node is not None else ""
    return d


def _sig_text(sig) -> str:
    """``hidden_states[1,4096,64] bf16, ...`` from a capture signature."""
    args, kwargs = sig
    if len(args) == 2 and args[0] in ("tuple", "list"):  # (type name, items) / ("dict", items): capture._sig
        args = args[1]
    if len(kwargs) == 2 and kwargs[0] == "dict":
        kwargs = kwargs[1]

    def one(s):
        if isinstance(s, tuple) and len(s) == 4 and s[0] == "T":
            return f"[{','.join(str(x) for x in s[1])}] {str(s[2]).replace('torch.', '')}"
        return repr(s)

    items = [one(a) for a in args] + [f"{k}{one(v)}" for k, v in kwargs
                                      if isinstance(v, tuple) and len(v) == 4 and v[0] == "T"]
    return ", ".join(items)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


# ---- text -----------------------------------------------------------------------------------


def _rule(title: str) -> str:
    return f"\n== {title} " + "=" * max(3, 96 - len(title))


def _table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  " + "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                                      for i, c in enumerate(r)).rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _header_text(h: dict) -> str:
    lines = [f"ditpass explain: {h.get('model')}"]
    if "method" in h:
        lines.append(f"  capture: {h['method']} in {h['seconds']:.1f} s, {h['nodes']} nodes, "
                     f"{h['graphs']} graph{'s' if h['graphs'] != 1 else ''}"
                     + (f", {h['signatures']} input signature(s)" if "signatures" in h else ""))
    elif "nodes" in h:
        lines.append(f"  graph: {h['nodes']} nodes (an Analysis: no capture facts)")
    for method, err in (h.get("capture_errors") or {}).items():
        lines.append(f"  capture {method} failed: {err}")
    if h.get("plan"):
        if h.get("dry_run"):
            lines.append(f"  plan: {h['plan']}: DRY RUN as rank {h['rank']} of {h['world_size']} in one process; "
                         "the rewritten graph is shown, not executed")
        else:
            lines.append(f"  plan: {h['plan']}, rank {h.get('rank', 0)} of {h.get('world_size', 1)}")
    if h.get("status"):
        lines.append(f"  {h['status']}")
    if "dtype" in h:
        lines.append(f"  built: size {h.get('size')}, {h['dtype']}, on {h.get('device')}")
    lines.extend(f"  {n}" for n in h.get("notes", ()))
    return "\n".join(lines)


_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")


def _pattern(path: str):
    """(path with its block indices blanked, [indices])."""
    return _INDEX.sub("#", path or ""), [int(x) for x in _INDEX.findall(path or "")]


def _condense(rows: list[dict], key_fields: list[str], path_field: str) -> list[tuple[dict, dict, int, str]]:
    """Fold rows equal in ``key_fields`` whose paths step by +1 in one block index into runs.

    Rows of different kinds may interleave (PixArt: attn1 self, attn2 cross, per block): each
    key has its own open run. A row that does not continue its key's run starts a new one.
    Runs come out in the order of their first row, as (first, last, count, path label).
    """
    runs: list[list] = []  # [first, last, count, indices of last]
    open_run: dict[tuple, list] = {}
    for r in rows:
        pat, idx = _pattern(r.get(path_field) or "")
        key = (pat, len(idx), *(repr(r.get(f)) for f in key_fields))
        run = open_run.get(key)
        if run is not None:
            diff = [k for k in range(len(idx)) if idx[k] != run[3][k]]
            if len(diff) == 1 and idx[diff[0]] == run[3][diff[0]] + 1 and (run[2] == 1 or run[4] == diff[0]):
                run[1], run[2], run[3], run[4] = r, run[2] + 1, idx, diff[0]
                continue
        run = [r, r, 1, idx, None]
        runs.append(run)
        open_run[key] = run
    out = []
    for first, last, n, _idx, pos_k in runs:
        label = first.get(path_field) or ""
        if n > 1:
            a, b = _pattern(first[path_field])[1], _pattern(last[path_field])[1]
            parts = first[path_field].split(".")
            pos = [j for j, t in enumerate(parts) if t.isdigit()][pos_k]
            parts[pos] = f"{{{a[pos_k]}..{b[pos_k]}}}"
            label = ".".join(parts)
        out.append((first, last, n, label))
    return out


def _nodes_label(first: str, last: str, n: int) -> str:
    """``sdpa .. sdpa_18`` is written ``sdpa .. _18``."""
    if n == 1:
        return first
    base = first.rsplit("_", 1)[0] if first.rsplit("_", 1)[-1].isdigit() else first
    return f"{first} .. {last[len(base):]}" if last.startswith(base + "_") else f"{first} .. {last}"


def _pass_table(t: dict, condense: bool) -> str:
    """A pass's own `Table`; with ``fold``, rows equal but for the fold column's block index (and the
    first column, an identifier) print as one row with a count."""
    headers, fold = t["headers"], t.get("fold")
    rows = [dict(zip(headers, r)) for r in t["rows"]]
    if not (condense and fold in headers):
        return _table(headers, t["rows"])
    keys = [h for h in headers[1:] if h != fold]
    out = []
    for first, last, n, label in _condense(rows, keys, fold):
        row = [first[h] for h in headers]
        row[headers.index(fold)] = label
        if headers[0] != fold:
            row[0] = _nodes_label(str(first[headers[0]]), str(last[headers[0]]), n)
        out.append(row + [n])
    return _table(headers + ["n"], out, right={len(headers)})


def _part_text(p: dict, condense: bool) -> str:
    out = []
    if p.get("title"):
        out.append(f"  inputs at capture: {p['title']}")
    kinds = ", ".join(f"{k} x{v}" for k, v in p["kinds"].items()) or "none"
    out.append(_rule(f"attention sites ({len(p['sites'])}: {kinds})"))
    if p["sites"]:
        keys = ["kind", "heads", "head_dim", "q", "kv", "mask", "causal", "strategy"]
        with_site = any(s["site"] is not None for s in p["sites"])
        rows = []
        runs = _condense(p["sites"], keys, "module") if condense else [(s, s, 1, s["module"]) for s in p["sites"]]
        for first, last, n, label in runs:
            flags = ",".join(f for f in ("mask", "causal") if first[f]) or "-"
            kv = "= q" if first["kv"] == first["q"] else first["kv"]
            row = [_nodes_label(first["node"], last["node"], n), first["kind"], label or "<root>", n,
                   first["heads"], first["head_dim"], first["q"], kv, flags]
            if with_site:
                row.append(first["site"] if n == 1 else f"{first['site']}..{last['site']}")
                row.append(first["strategy"])
            rows.append(row)
        headers = ["node", "kind", "module", "n", "heads", "head_dim", "q segments", "kv segments", "mask/causal"]
        if with_site:
            headers += ["site", "strategy"]
        out.append(_table(headers, rows, right={3, 4, 5}))
    else:
        out.append("  none found: nothing mixes tokens through SDPA or a matmul over a symbolic length")

    out.append(_rule("token layout of inputs and outputs"))
    ran = bool(p["passes"])
    rows = []
    for i in p["inputs"]:
        td = ", ".join(f"dim {d}: {'+'.join(r)}" for d, r in i["token_dims"].items()) or "-"
        row = [f"in  {i['name']}", i["shape"], td]
        if ran:
            row.append(i["after"] or ("replicated" if i["token_dims"] else "-"))
        rows.append(row)
    for o in p["outputs"]:
        td = ", ".join(f"dim {d}: {'+'.join(r)}" for d, r in o["token_dims"].items()) or "-"
        row = [f"out {o['index']}", o["shape"], td]
        if ran:
            row.append(o["after"] or "replicated")
        rows.append(row)
    headers = ["tensor", "shape at capture", "token dims"] + (["after the passes (this rank)"] if ran else [])
    out.append(_table(headers, rows))

    out.append(_rule("block groups"))
    if p["blocks"]:
        rows = []
        for b in p["blocks"]:
            re_ = ", ".join(f"{k} x{v}" for k, v in b["reentries"].items()) or "-"
            rows.append([b["name"], b["cls"], b["count"], b["nodes_per_block"], "yes" if b["attention"] else "no", re_])
        out.append(_table(["module list", "class", "blocks", "nodes/block", "attention", "re-entries"], rows,
                          right={2, 3}))
    else:
        out.append("  none: no module list of blocks in the module paths")

    for ps in p["passes"]:
        out.append(_rule(f"pass {ps['name']}"))
        out.append(f"  {ps['summary']}")
        if ps["notes"] and ps["modified"]:
            out.append(f"  notes ({len(ps['notes'])}):")
            out.extend(f"    - {n}" for n in ps["notes"])
        cols = ps["collectives"]
        if cols:
            out.append(f"  collectives ({len(cols)}), bytes this rank sends per forward at the captured sizes:")
            runs = (_condense(cols, ["op", "axis", "bytes_per_forward"], "module") if condense
                    else [(c, c, 1, c["module"]) for c in cols])
            rows = []
            for first, last, n, label in runs:
                if first["site"] == first["node"]:
                    site = label or first["site"]
                else:
                    site = _nodes_label(first["site"], last["site"], n) + (f" ({label})" if label else "")
                rows.append([_nodes_label(first["node"], last["node"], n), first["op"], first["axis"],
                             site, n, f"{first['bytes_per_forward']:,}",
                             f"{n * first['bytes_per_forward'] / 2**20:.2f}"])
            total = sum(c["bytes_per_forward"] for c in cols)
            rows.append(["total", "", "", "", len(cols), f"{total:,}", f"{total / 2**20:.2f}"])
            out.append(_table(["node", "op", "axis", "serves", "n", "bytes each", "MiB"], rows, right={4, 5, 6}))
        for t in ps["tables"]:
            out.append(f"  {t['title']}:")
            out.append(_pass_table(t, condense))
    if p.get("backend"):
        out.append(_rule("backend: how the rewritten graph runs"))
        out.extend(f"  {line}" for line in p["backend"].splitlines())
    for t in p.get("runtime", ()):
        out.append(f"  {t['title']}:")
        out.append(_pass_table(t, condense))
    for ps in p["passes"]:
        if ps.get("graph_code") and ps["modified"]:
            out.append(_rule(f"graph after pass {ps['name']}"))
            out.append(ps["graph_code"].strip("\n"))
    if p.get("graph_code"):
        out.append(_rule("graph (no pass changed it)" if p["passes"] else "captured graph"))
        out.append(p["graph_code"].strip("\n"))
    return "\n".join(out)
