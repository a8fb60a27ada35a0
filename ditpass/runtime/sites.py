"""The per-site attention table: how each ``ditpass::attention`` node runs.

Every attention site of a rewritten graph is one ``torch.ops.ditpass.attention(q, k, v, site_7, ...)``
node; ``site_7`` is a 0-dim CPU int64 tensor holding the site's id (a tensor, not an int constant, so
that the blocks of one kind stay one compiled template: `ditpass.backend.regional` lifts it like a
weight). The op looks the id up here and runs what the entry says. Passes compose by *refining the
entry* (`SiteTable.refine`), never by rewriting another pass's node: the sequence-parallel pass sets
``seq`` (Ulysses / ring / USP); later passes add their own fields (PipeFusion's K/V buffer,
DiTFastAttn's window or reuse).

Ids are unique in the process (two parallelized models, or two input signatures of one, never
share one), so one op finds its entry without knowing which graph it is in.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fastattn import FastAttnSite

__all__ = ["SeqAttention", "FlexSite", "SiteStrategy", "SiteTable", "lookup"]


@dataclass(frozen=True)
class SeqAttention:
    """Sequence-parallel attention over ``n = u * r`` ranks: what the op body needs at run time."""

    u: int  # Ulysses degree (heads split by all-to-all)
    r: int  # ring degree (K/V passed around)
    ulysses_rank: int
    ring_rank: int
    ulysses_group: str  # c10d group names ("" where the degree is 1)
    ring_group: str

    @property
    def n(self) -> int:
        return self.u * self.r

    @property
    def mode(self) -> str:
        return "ulysses+ring" if self.u > 1 and self.r > 1 else ("ulysses" if self.u > 1 else "ring")


@dataclass(frozen=True)
class FlexSite:
    """What a ``ditpass::flex_attention`` op needs besides its tensors: the pieces of the captured
    ``torch.ops.higher_order.flex_attention`` call that are not tensors (`ditpass.runtime.seq.flex_seq_attention`).

    ``score_mod(score, b, h, q_idx, kv_idx, *score_bufs)`` and ``mask_mod(b, h, q_idx, kv_idx, *mask_bufs)`` are
    the captured subgraphs; they read *global* indices, so the op maps this rank's local head and query indices
    to global ones before calling them, where ``reads`` says they read them. ``block_size``: the BlockMask's
    (Q, KV) block sizes; ``spt``: its ``dq_kv_order_spt`` flag; ``heads``: the query's global head count;
    ``kv_sharded``: K/V are the same sharded sequence as q (self / joint attention), else whole on every rank."""

    score_mod: Any
    mask_mod: Any
    scale: float
    kernel_options: dict
    block_size: tuple
    spt: Any
    heads: int
    kv_sharded: bool
    reads: dict  # {"score": frozenset of "b" / "h" / "q_idx" / "kv_idx", "mask": ...}


@dataclass(frozen=True)
class SiteStrategy:
    """One attention site and how it runs. ``seq`` None: local attention (plain SDPA)."""

    site: int  # process-wide id
    node: str  # the SDPA node's name in the captured graph (the analysis' `AttentionSite.node`)
    kind: str  # the analysis' kind: self, joint, cross, ...
    module: str  # module path, e.g. "transformer_blocks.3.attn"
    seq: SeqAttention | None = None
    patch: Any = None  # PipeFusion: a `ditpass.runtime.patches.PatchAttention` (patch index, K/V buffers)
    notes: tuple[str, ...] = ()  # why it runs as it does, one phrase per pass that decided
    fast: FastAttnSite | None = None  # DiTFastAttn's method per step (`ditpass.runtime.fastattn`); None: off
    flex: FlexSite | None = None  # a flex_attention site (`ditpass::flex_attention`): its mods, scale, block sizes

    def describe(self) -> str:
        """``joint: ulysses`` / ``cross: local (K/V replicated, no communication)``."""
        mode = self.seq.mode if self.seq is not None else ("local" if self.patch is None else self.patch.describe())
        if self.fast is not None:
            mode += f", {self.fast.describe()}"
        return f"{self.kind}: {mode}" + (f" ({'; '.join(self.notes)})" if self.notes else "")


_IDS = itertools.count()
_ALL: dict[int, SiteStrategy] = {}


class SiteTable:
    """The sites of one rewritten graph, by id, in graph order."""

    def __init__(self):
        self.sites: dict[int, SiteStrategy] = {}

    def add(self, node: str, kind: str, module: str) -> SiteStrategy:
        s = SiteStrategy(next(_IDS), node, kind, module)
        self.sites[s.site] = _ALL[s.site] = s
        return s

    def refine(self, site: int, note: str | None = None, **changes) -> SiteStrategy:
        """Set fields of a site's entry (and add a note saying why); the op sees it from then on."""
        s = self.sites[site]
        if note:
            changes["notes"] = s.notes + (note,)
        s = dataclasses.replace(s, **changes)
        self.sites[site] = _ALL[site] = s
        return s

    def __getitem__(self, site: int) -> SiteStrategy:
        return self.sites[site]

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def by_node(self) -> dict[str, SiteStrategy]:
        """Captured SDPA node name -> entry (how explain joins the analysis' sites)."""
        return {s.node: s for s in self.sites.values()}


def lookup(site: int) -> SiteStrategy:
    try:
        return _ALL[site]
    except KeyError:
        raise KeyError(f"ditpass::attention site {site} is in no site table of this process: the graph "
                       f"was rewritten in another process, or its table was dropped") from None
