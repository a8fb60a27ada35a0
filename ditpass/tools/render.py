"""A condensed picture of a (rewritten) DiT graph as SVG, in pure Python (no graphviz).

One rounded box per run of a transformer block in graph order (from ``node.meta["ditpass_block"]``,
written by `ditpass.analyze`), one dashed box per stretch of non-block code (embedding, glue
between block groups, final layers). Inside a box: its notable nodes, one line each, and a
count of the other ops. Notable are attention sites (``meta["ditpass_attention"]``, coloured by
kind; a ``ditpass::attention`` site that runs sequence-parallel, as its site-table entry says, is
highlighted) and the ops a pass inserted (``torch.ops.ditpass.shard`` / ``gather`` /
``ulysses_send``, or any functional collective; one highlight colour). Hovering a line shows the node's name.
Boxes wrap into rows of ``columns`` (FLUX's 57 blocks: 8 rows), arrows follow graph order.

Nodes that a pass inserted without module metadata (length helpers, ``shard`` before the op
that needs it) belong to the box of the next original node, the one they serve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

import torch.fx

from ditpass.runtime import sites
from ditpass.runtime.ops import OPS

__all__ = ["to_svg", "KIND_COLOURS", "INSERTED_COLOUR"]

KIND_COLOURS = {"self": "#2b6cb0", "joint": "#2f855a", "cross": "#c05621", "text": "#6b46c1", "pooler": "#8d6e63",
                "matmul": "#b7791f", "other": "#718096"}
INSERTED_COLOUR = "#c51b7d"
_GROUP_TINTS = [("#eef4fb", "#7fa7d6"), ("#eef8f0", "#7dbb8c"), ("#fbf4ec", "#d9a66b"), ("#f4effb", "#a58bd6"),
                ("#fbeff2", "#d68ba0"), ("#eef9f9", "#6fb8b8")]
_REGION = ("#f7f7f7", "#9e9e9e")

# geometry, in px; the font is monospace so that text widths are predictable
_W, _PAD, _HEAD, _ITEM, _FOOT, _GX, _GY = 226, 8, 34, 18, 18, 32, 44
_CHAR = 6.6  # width of one 11px monospace character
_MAX_ITEMS = 8  # notable lines shown per box; the rest are counted
_DASH = ' stroke-dasharray="5 3"'


@dataclass
class _Item:
    label: str
    tip: str
    colour: str
    inserted: bool
    stripe: str | None = None  # kind colour on an inserted attention node


@dataclass
class _Box:
    title: str
    subtitle: str
    group: str | None  # module list name, None for non-block code
    items: list[_Item] = field(default_factory=list)
    others: int = 0
    x: float = 0
    y: float = 0
    h: float = 0


def _is_collective(node: torch.fx.Node) -> bool:
    return str(getattr(node.target, "namespace", "")) == "_c10d_functional"


def _original(node: torch.fx.Node) -> bool:
    """Captured nodes carry module metadata; nodes a pass created carry none (or copy it)."""
    return "nn_module_stack" in node.meta or "ditpass_block" in node.meta


def _short(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def _item(node: torch.fx.Node) -> _Item | None:
    site = node.meta.get("ditpass_attention")
    if node.target is OPS["attention"]:
        entry = sites.lookup(int(getattr(node.graph.owning_module, node.args[3].target)))
        if entry.seq is not None:
            return _Item(f"{entry.seq.mode} \u00b7 {entry.kind}", f"{node.name}: {entry.describe()}"
                         + (f" in {entry.module}" if entry.module else ""), INSERTED_COLOUR, True,
                         KIND_COLOURS.get(entry.kind, KIND_COLOURS["other"]))
    if node.target in (OPS["shard"], OPS["gather"]):
        src = node.args[0].name if node.args and isinstance(node.args[0], torch.fx.Node) else "?"
        dim = node.args[1] if len(node.args) > 1 else "?"
        op = "shard" if node.target is OPS["shard"] else "gather"
        label = f"shard {src} d{dim}" if op == "shard" else f"all_gather {src} d{dim}"
        return _Item(label, f"{node.name}: {op} of {src} along dim {dim}", INSERTED_COLOUR, True)
    if node.target is OPS["ulysses_send"] or _is_collective(node):
        return _Item(f"collective {node.target}", node.name, INSERTED_COLOUR, True)
    if site is not None:
        shape = f" {site.heads}\u00d7{site.head_dim}" if site.heads and site.head_dim else ""
        label = f"{site.kind} attn{shape}" if site.kind != "matmul" else f"matmul mixes tokens{shape}"
        flags = "".join(f" +{f}" for f, on in (("mask", site.has_mask), ("causal", site.causal)) if on)
        return _Item(label + flags, f"{node.name}: {site.kind} attention in {site.module}{flags}",
                     KIND_COLOURS.get(site.kind, KIND_COLOURS["other"]), False)
    return None


def _boxes(gm: torch.fx.GraphModule) -> list[_Box]:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    blocks: list[str | None] = [None] * len(nodes)
    nxt: str | None = None
    for i in range(len(nodes) - 1, -1, -1):
        if _original(nodes[i]):
            nxt = nodes[i].meta.get("ditpass_block")
        blocks[i] = nxt
    runs: list[tuple[str | None, list[torch.fx.Node]]] = []
    for n, b in zip(nodes, blocks):
        if runs and runs[-1][0] == b:
            runs[-1][1].append(n)
        else:
            runs.append((b, [n]))
    seen: set[str] = set()
    boxes: list[_Box] = []
    first_block = next((k for k, (b, _) in enumerate(runs) if b is not None), len(runs))
    last_block = max((k for k, (b, _) in enumerate(runs) if b is not None), default=-1)
    for k, (b, members) in enumerate(runs):
        if b is None:
            where = "embedding" if k < first_block else ("final layers" if k > last_block else "between blocks")
            tops: list[str] = []
            for n in members:
                stack = n.meta.get("nn_module_stack") or {}
                paths = [v[0] if isinstance(v, tuple) else "" for v in stack.values()]
                top = next((p.split(".")[0] for p in paths if p and not p.startswith("_")), None)
                if top and top not in tops:
                    tops.append(top)
            box = _Box(where, ", ".join(tops) or "root ops", None)
        else:
            cls = ""
            for n in members:
                for v in (n.meta.get("nn_module_stack") or {}).values():
                    if isinstance(v, tuple) and v[0] == b:
                        cls = v[1] if isinstance(v[1], str) else getattr(v[1], "__name__", "")
                        break
                if cls:
                    break
            cls = cls.rsplit(".", 1)[-1]
            if b in seen:  # a later run of the block (DiT's final modulation runs block 0's norm again)
                inner = members[-1].meta.get("nn_module_stack") or {}
                paths = [v[0] for v in inner.values() if isinstance(v, tuple) and v[0]]
                cls = "re-entry" + (f": {paths[-1][len(b):].lstrip('.') or cls}" if paths else "")
            seen.add(b)
            box = _Box(b, cls, b.rsplit(".", 1)[0])
        for n in members:
            it = _item(n)
            if it is None:
                box.others += 1
            else:
                box.items.append(it)
        boxes.append(box)
    return boxes


def _box_svg(box: _Box, fill: str, stroke: str, dashed: bool) -> list[str]:
    x, y, w, h = box.x, box.y, _W, box.h
    chars = int((_W - 2 * _PAD) / _CHAR)
    out = [f'<g><rect x="{x:.0f}" y="{y:.0f}" width="{w}" height="{h:.0f}" rx="10" fill="{fill}" stroke="{stroke}"'
           f' stroke-width="1.5"{_DASH if dashed else ""}/>',
           f'<text x="{x + _PAD:.0f}" y="{y + 15:.0f}" class="t">{escape(_short(box.title, chars - 2))}</text>',
           f'<text x="{x + _PAD:.0f}" y="{y + 28:.0f}" class="s">{escape(_short(box.subtitle, chars + 4))}</text>']
    yy = y + _HEAD
    shown = box.items[:_MAX_ITEMS]
    for it in shown:
        bg = "#fde7f1" if it.inserted else "#ffffff"
        out.append(f'<g><title>{escape(it.tip)}</title>'
                   f'<rect x="{x + _PAD - 2:.0f}" y="{yy:.0f}" width="{w - 2 * _PAD + 4}" height="{_ITEM - 3}" rx="4" '
                   f'fill="{bg}" stroke="{it.colour}" stroke-width="1.3"/>')
        if it.stripe:
            out.append(f'<rect x="{x + _PAD - 2:.0f}" y="{yy:.0f}" width="5" height="{_ITEM - 3}" rx="2" '
                       f'fill="{it.stripe}"/>')
        out.append(f'<text x="{x + _PAD + 5:.0f}" y="{yy + 11:.0f}" class="i" fill="{it.colour}">'
                   f'{escape(_short(it.label, chars - 2))}</text></g>')
        yy += _ITEM
    more = len(box.items) - len(shown)
    foot = f"+{box.others} other ops" + (f", +{more} more notable" if more else "")
    out.append(f'<text x="{x + _PAD:.0f}" y="{yy + 11:.0f}" class="s">{escape(foot)}</text></g>')
    return out


def to_svg(graph_module: torch.fx.GraphModule, path, *, title: str | None = None, columns: int = 8) -> str:
    """Write the condensed picture of ``graph_module`` to ``path``; returns the SVG text.

    The graph should have been analysed (`ditpass.analyze`), before or after passes rewrote it;
    an unanalysed graph is analysed here (read-only, it only adds ``node.meta`` facts).
    """
    if not any("ditpass_block" in n.meta or "ditpass_attention" in n.meta for n in graph_module.graph.nodes):
        from ditpass.analysis import analyze

        analyze(graph_module)
    boxes = _boxes(graph_module)
    cols = max(1, min(columns, len(boxes)))
    rows = math.ceil(len(boxes) / cols) if boxes else 0
    for b in boxes:
        b.h = _HEAD + _ITEM * min(len(b.items), _MAX_ITEMS) + _FOOT + 4
    top = 74
    row_y, y = [], top
    for r in range(rows):
        row_y.append(y)
        y += max(b.h for b in boxes[r * cols:(r + 1) * cols]) + _GY
    for i, b in enumerate(boxes):
        r, c = divmod(i, cols)
        b.x, b.y = 20 + c * (_W + _GX), row_y[r]
    width = 40 + cols * _W + (cols - 1) * _GX
    legend_y = y + 4
    height = legend_y + 30

    groups: list[str] = []
    for b in boxes:
        if b.group and b.group not in groups:
            groups.append(b.group)
    tint = {g: _GROUP_TINTS[i % len(_GROUP_TINTS)] for i, g in enumerate(groups)}

    n_nodes = len(graph_module.graph.nodes)
    n_sites = sum(1 for n in graph_module.graph.nodes if "ditpass_attention" in n.meta)
    n_ins = sum(1 for b in boxes for it in b.items if it.inserted)
    n_blocks = len({b.title for b in boxes if b.group})
    head = title or type(graph_module).__name__
    sub = (f"{n_nodes} nodes \u00b7 {n_blocks} blocks in {len(groups)} group(s) \u00b7 {n_sites} attention sites"
           f" \u00b7 {n_ins} inserted by passes \u00b7 boxes in graph order, left to right, row by row")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace">',
           "<style>.t{font-size:12px;font-weight:bold;fill:#1a202c}.s{font-size:10.5px;fill:#4a5568}"
           ".i{font-size:11px}.h{font-size:18px;font-weight:bold;fill:#1a202c}.a{fill:none;stroke:#718096;"
           "stroke-width:1.4}</style>",
           '<defs><marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#718096"/></marker></defs>',
           f'<rect width="100%" height="100%" fill="#ffffff"/>',
           f'<text x="20" y="30" class="h">{escape(head)}</text>',
           f'<text x="20" y="52" class="s">{escape(sub)}</text>']
    # arrows first, boxes on top
    for i in range(len(boxes) - 1):
        a, b = boxes[i], boxes[i + 1]
        if a.y == b.y:
            ym = a.y + 17
            out.append(f'<path class="a" d="M{a.x + _W:.0f},{ym:.0f} L{b.x - 2:.0f},{ym:.0f}" marker-end="url(#arr)"/>')
        else:  # wrap to the next row: down, back left under the row, down into the first box
            yg = b.y - _GY / 2
            out.append(f'<path class="a" d="M{a.x + _W / 2:.0f},{a.y + a.h:.0f} L{a.x + _W / 2:.0f},{yg:.0f} '
                       f'L{b.x + _W / 2:.0f},{yg:.0f} L{b.x + _W / 2:.0f},{b.y - 2:.0f}" marker-end="url(#arr)"/>')
    for b in boxes:
        fill, stroke = tint[b.group] if b.group else _REGION
        out.extend(_box_svg(b, fill, stroke, dashed=b.group is None))
    # legend: kinds present, inserted nodes, block groups, non-block code
    x, ly = 20.0, legend_y + 14
    out.append(f'<text x="{x:.0f}" y="{ly:.0f}" class="t">legend</text>')
    x += 70
    kinds = []
    for n in graph_module.graph.nodes:
        s = n.meta.get("ditpass_attention")
        if s is not None and s.kind not in kinds:
            kinds.append(s.kind)
    # (label, fill, border, dashed, stripe): an attention kind is the border of a site, or the
    # stripe on the inserted node that replaced it
    entries = [(f"{k} attention", "#ffffff", c, False, c) for k in kinds
               for c in [KIND_COLOURS.get(k, KIND_COLOURS["other"])]]
    entries.append(("inserted by a pass (shard / gather / collective)", "#fde7f1", INSERTED_COLOUR, False, None))
    entries += [(f"{g} block", *tint[g], False, None) for g in groups]
    entries.append(("non-block code", *_REGION, True, None))
    for label, fill, stroke, dashed, stripe in entries:
        wlab = len(label) * _CHAR + 34
        if x + wlab > width - 10:
            x, ly = 90.0, ly + 22
        out.append(f'<rect x="{x:.0f}" y="{ly - 11:.0f}" width="22" height="14" rx="3" fill="{fill}" '
                   f'stroke="{stroke}" stroke-width="1.5"{_DASH if dashed else ""}/>')
        if stripe:
            out.append(f'<rect x="{x:.0f}" y="{ly - 11:.0f}" width="5" height="14" rx="2" fill="{stripe}"/>')
        out.append(f'<text x="{x + 28:.0f}" y="{ly:.0f}" class="s">{escape(label)}</text>')
        x += wlab
    if ly + 20 > height:
        out[0] = out[0].replace(f'height="{height:.0f}"', f'height="{ly + 20:.0f}"').replace(
            f'0 0 {width:.0f} {height:.0f}', f'0 0 {width:.0f} {ly + 20:.0f}')
    out.append("</svg>")
    text = "\n".join(out) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text
