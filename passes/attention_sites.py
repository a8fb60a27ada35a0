"""Attention sites: every SDPA of the captured graph becomes one ``ditpass::attention`` op with a site.

Before::

    o = torch.ops.aten.scaled_dot_product_attention.default(q, k, v, None, 0.0, False, scale=0.088)

After (the site's entry in the table: ``joint: local``)::

    site_3 = self.site_3                                     # 0-dim CPU int64 tensor: the site id
    o = torch.ops.ditpass.attention.default(q, k, v, site_3, scale=0.088)

Every later pass that changes how attention runs (sequence parallel, PipeFusion's K/V buffer,
DiTFastAttn) refines the site's entry (`ditpass.runtime.sites.SiteTable.refine`) instead of replacing
the node, so the passes compose. Same numbers: the op calls the same SDPA with the same arguments.
Always on; a graph without SDPA is left as it is.
"""
from __future__ import annotations

import torch
import torch.fx

from ditpass.analysis.attention import is_sdpa
from ditpass.pass_base import GraphPass, PassContext, PassResult
from ditpass.runtime.ops import OPS

__all__ = ["AttentionSites"]

# SDPA's arguments after q, k, v, by position, with their defaults
_SDPA_ARGS = (("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False))


class AttentionSites(GraphPass):
    name = "attention_sites"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        info = {s.node: s for s in ctx.analysis.sites}
        made = 0
        # the site ids sit with the parameters, at the top: no block's code is interrupted by them
        top = next(n for n in gm.graph.nodes if n.op != "placeholder")
        for node in [n for n in gm.graph.nodes if is_sdpa(n)]:
            site = info.get(node.name)
            entry = ctx.sites.add(node.name, site.kind if site else "other", site.module if site else "")
            site_t = site_id_node(gm, entry.site, top)
            kwargs = {}
            for i, (key, default) in enumerate(_SDPA_ARGS):
                value = node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(key, default)
                if value is not default and value != default:
                    kwargs[key] = value
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(OPS["attention"], (*node.args[:3], site_t), kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            made += 1
        note = (f"{made} SDPA calls became ditpass::attention sites (their ids: the sites table above)" if made
                else "no SDPA in the graph")
        return PassResult(self.name, made > 0, notes=[note])


def site_id_node(gm: torch.fx.GraphModule, site: int, top: torch.fx.Node) -> torch.fx.Node:
    """The ``get_attr`` node of site ``site``'s id tensor (``site_<id>``, a non-persistent buffer of ``gm``),
    inserted before ``top`` (the first node after the placeholders: no block's code is interrupted by it)."""
    attr = f"site_{site}"
    gm.register_buffer(attr, torch.tensor(site), persistent=False)
    with gm.graph.inserting_before(top):
        site_t = gm.graph.get_attr(attr)
    site_t.meta["val"] = getattr(gm, attr)
    return site_t
