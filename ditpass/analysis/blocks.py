"""Transformer-block boundaries and the repeated-block structure, from module paths.

A block is a child of a module list: its path ends in ``.<index>`` (``transformer_blocks.7``,
``single_transformer_blocks.3``). Nodes carry ``meta["nn_module_stack"]`` (outer -> inner), so a
node's block is the outermost path of that form. A block may be entered again after the loop
(DiT runs ``transformer_blocks.0.norm1.emb`` for its final modulation); such a later run is
reported as a re-entry, not as a new block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.fx

__all__ = ["Block", "BlockGroup", "find_blocks", "module_path", "block_path", "ancestors_in_block"]

_INDEXED = re.compile(r"^(?P<list>.+)\.(?P<idx>\d+)$")


def _stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """[(module path, class name)] outer -> inner; export and Dynamo spell the entries differently."""
    out = []
    for key, val in (node.meta.get("nn_module_stack") or {}).items():
        path, cls = (val[0], val[1]) if isinstance(val, tuple) else (key, val)
        path = _clean(path)
        cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        if path:
            out.append((path, cls.rsplit(".", 1)[-1].rstrip("'>")))
    return out


def _clean(path: str) -> str:
    """Export paths look like ``transformer_blocks.0.attn``; Dynamo's like ``L['self'].transformer_blocks[0]``."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def module_path(node: torch.fx.Node) -> str:
    """The innermost module path of a node ('' for the root module)."""
    st = _stack(node)
    return st[-1][0] if st else ""


def _block_prefix(path: str) -> str | None:
    """``transformer_blocks.0.norm1.emb`` -> ``transformer_blocks.0``: up to the first index."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return None


def block_path(node: torch.fx.Node) -> str | None:
    """The outermost ``<list>.<index>`` module a node runs in. A submodule of a block called
    directly from outside the block (DiT: ``self.transformer_blocks[0].norm1.emb(...)`` after the
    loop) counts for that block: its path starts with the block's."""
    for path, _cls in _stack(node):
        bp = _block_prefix(path)
        if bp is not None:
            return bp
    return None


@dataclass
class Block:
    path: str  # "transformer_blocks.7"
    cls: str  # "FluxTransformerBlock"
    first: str  # name of the first node
    last: str  # name of the last node of its first run
    nodes: int  # node count of its first run
    reentries: list[tuple[str, str]] = field(default_factory=list)  # (first, last) node names of later runs


@dataclass
class BlockGroup:
    name: str  # the module list: "transformer_blocks"
    cls: str
    blocks: list[Block]

    def __len__(self) -> int:
        return len(self.blocks)


def ancestors_in_block(node: torch.fx.Node) -> set:
    """The nodes of ``node``'s block (``meta["ditpass_block"]``) that it depends on, walking only through
    that block's own nodes."""
    block, seen, todo = node.meta.get("ditpass_block"), set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen and a.meta.get("ditpass_block") == block:
                seen.add(a)
                todo.append(a)
    return seen


def find_blocks(graph: torch.fx.Graph) -> list[BlockGroup]:
    """Blocks in graph order, grouped by module list; writes ``meta["ditpass_block"]``."""
    blocks: dict[str, Block] = {}
    runs: list[tuple[str, torch.fx.Node, torch.fx.Node, int]] = []
    current: str | None = None
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        bp = block_path(node)
        if bp is None:
            current = None
            continue
        node.meta["ditpass_block"] = bp
        if bp != current:
            runs.append((bp, node, node, 1))
            current = bp
        else:
            p, f, _, n = runs[-1]
            runs[-1] = (p, f, node, n + 1)
    for bp, first, last, n in runs:
        if bp in blocks:
            blocks[bp].reentries.append((first.name, last.name))
            continue
        cls = next((c for p, c in _stack(first) if p == bp), "?")
        blocks[bp] = Block(bp, cls, first.name, last.name, n)
    groups: dict[str, BlockGroup] = {}
    for b in blocks.values():
        name = _INDEXED.match(b.path).group("list")
        g = groups.setdefault(name, BlockGroup(name, b.cls, []))
        g.blocks.append(b)
    for g in groups.values():
        g.blocks.sort(key=lambda b: int(b.path.rsplit(".", 1)[1]))
    return list(groups.values())
