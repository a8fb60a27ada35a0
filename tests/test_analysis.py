"""Analysis of the twelve zoo models against what their diffusers code says.

Per model: the transformer block groups and their sizes, the attention sites of each block (kind,
the roles of the query and key/value segments in order, mask), heads and head dim from the tiny
config, the token dims of the forward's inputs and outputs. Plus: DiT's re-entry of
``transformer_blocks.0``, the FLUX full-size trap (text width 4096 == image tokens 4096), the zoo's
dynamic_dims where they change the outcome, and matmul sites on a small module.

Roles: ``visual`` (sized by a symbol of the output), ``text`` (symbolic, not visual), ``const``
(export specialised the length to a number: HunyuanDiT's text, fixed by its config; Qwen-Image's
text, ``int()``-ed by its RoPE; Latte's frames, fixed by ``temp_pos_embed``).
"""
from __future__ import annotations

import pytest
import torch

from ditpass.analysis import analyze, token_dims
from ditpass.capture import capture
from ditpass.models import NAMES, build, config, make_inputs
from zoo_captures import zoo_capture

V, T, C = "visual", "text", "const"

# block group -> [(kind, query roles, key/value roles, has_mask)] for every block of the group,
# in graph order (from the model's attention processors).
EXPECT: dict[str, dict] = {
    # FluxAttnProcessor: cat([encoder_query, query]) in double and single blocks: text, then image
    "FluxTransformer2DModel": dict(
        groups={"transformer_blocks": 2, "single_transformer_blocks": 2},
        blocks={"transformer_blocks": [("joint", (T, V), (T, V), False)],
                "single_transformer_blocks": [("joint", (T, V), (T, V), False)]},
        inputs={"hidden_states": {1: (V,)}, "encoder_hidden_states": {1: (T,)}, "img_ids": {0: (V,)},
                "txt_ids": {0: (T,)}},
        outputs=[{1: (V,)}]),
    # JointAttnProcessor2_0: cat([query, encoder_hidden_states_query_proj]): image, then text
    "SD3Transformer2DModel": dict(
        groups={"transformer_blocks": 2},
        blocks={"transformer_blocks": [("joint", (V, T), (V, T), False)]},
        inputs={"encoder_hidden_states": {1: (T,)}}, outputs=[{}]),
    # BasicTransformerBlock: attn1 self, attn2 cross to the caption (masked)
    "PixArtTransformer2DModel": dict(
        groups={"transformer_blocks": 2},
        blocks={"transformer_blocks": [("self", (V,), (V,), False), ("cross", (V,), (T,), True)]},
        inputs={"encoder_hidden_states": {1: (T,)}, "encoder_attention_mask": {1: (T,)}}, outputs=[{}]),
    # HunyuanDiTBlock: attn1 self (RoPE), attn2 cross to cat(CLIP text, T5 text) whose lengths are
    # fixed by the config (text_len, text_len_t5); the T5 pooler (one query) in time_extra_emb
    "HunyuanDiT2DModel": dict(
        groups={"blocks": 6},
        blocks={"blocks": [("self", (V,), (V,), False), ("cross", (V,), (C, C), False)]},
        extra=[("time_extra_emb.pooler", "pooler", (C,), (C, C), 8, 4)],
        inputs={"image_rotary_emb_0": {0: (V,)}, "image_rotary_emb_1": {0: (V,)}}, outputs=[{}]),
    # CogVideoXBlock: cat([norm_encoder_hidden_states, norm_hidden_states]): text, then video
    "CogVideoXTransformer3DModel": dict(
        groups={"transformer_blocks": 2},
        blocks={"transformer_blocks": [("joint", (T, V), (T, V), False)]},
        inputs={"encoder_hidden_states": {1: (T,)}, "image_rotary_emb_0": {0: (V,)},
                "image_rotary_emb_1": {0: (V,)}}, outputs=[{}]),
    # spatial BasicTransformerBlock (self + cross, frames in the batch), temporal block: self-attention
    # over frames with the image tokens folded into the batch
    "LatteTransformer3DModel": dict(
        groups={"transformer_blocks": 2, "temporal_transformer_blocks": 2},
        blocks={"transformer_blocks": [("self", (V,), (V,), False), ("cross", (V,), (T,), False)],
                "temporal_transformer_blocks": [("temporal", (C,), (C,), False)]},
        inputs={"encoder_hidden_states": {1: (T,)}}, outputs=[{}]),
    # MochiAttnProcessor2_0: per sample, cat([query, valid_encoder_query]) (text via nonzero): video,
    # then text; the caption pooler (one query, masked) in time_embed
    "MochiTransformer3DModel": dict(
        groups={"transformer_blocks": 2},
        blocks={"transformer_blocks": [("joint", (V, T), (V, T), False)]},
        extra=[("time_embed.pooler", "pooler", (C,), (C, T), 8, 4)],
        inputs={"encoder_hidden_states": {1: (T,)}, "encoder_attention_mask": {1: (T,)}}, outputs=[{}]),
    "DiTTransformer2DModel": dict(
        groups={"transformer_blocks": 2},
        blocks={"transformer_blocks": [("self", (V,), (V,), False)]},
        inputs={}, outputs=[{}]),
    "WanTransformer3DModel": dict(
        groups={"blocks": 2},
        blocks={"blocks": [("self", (V,), (V,), False), ("cross", (V,), (T,), False)]},
        inputs={"encoder_hidden_states": {1: (T,)}}, outputs=[{}]),
    # token refiner: masked self-attention over the text; double and single blocks:
    # cat([query, encoder_query]): video, then text, masked
    "HunyuanVideoTransformer3DModel": dict(
        groups={"context_embedder.token_refiner.refiner_blocks": 2, "transformer_blocks": 2,
                "single_transformer_blocks": 2},
        blocks={"context_embedder.token_refiner.refiner_blocks": [("text", (T,), (T,), True)],
                "transformer_blocks": [("joint", (V, T), (V, T), True)],
                "single_transformer_blocks": [("joint", (V, T), (V, T), True)]},
        inputs={"encoder_hidden_states": {1: (T,)}, "encoder_attention_mask": {1: (T,)}}, outputs=[{}]),
    # QwenDoubleStreamAttnProcessor2_0: cat([txt_query, img_query]): text, then image; the text
    # length is int()-ed by QwenEmbedRope, so it is a constant
    "QwenImageTransformer2DModel": dict(
        groups={"transformer_blocks": 2},
        blocks={"transformer_blocks": [("joint", (C, V), (C, V), True)]},
        inputs={"hidden_states": {1: (V,)}}, outputs=[{1: (V,)}]),
    "LTXVideoTransformer3DModel": dict(
        groups={"transformer_blocks": 2},
        blocks={"transformer_blocks": [("self", (V,), (V,), False), ("cross", (V,), (T,), True)]},
        inputs={"hidden_states": {1: (V,)}, "encoder_hidden_states": {1: (T,)},
                "encoder_attention_mask": {1: (T,)}},
        outputs=[{1: (V,)}]),
}


_ANALYSES: dict = {}


def _analysis(name, dynamic="auto"):
    key = (name, dynamic)
    if key not in _ANALYSES:
        _ANALYSES[key] = analyze(zoo_capture(name, dynamic).captured)
    return _ANALYSES[key]


def _roles(segs):
    return tuple(s.role for s in segs)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_analysis(name):
    exp = EXPECT[name]
    an = _analysis(name)
    cfg = config(name)

    groups = {g.name: len(g) for g in an.block_groups}
    assert groups == exp["groups"]
    for g in an.block_groups:
        assert [b.path for b in g.blocks] == [f"{g.name}.{i}" for i in range(len(g))]
    assert {g.name for g in an.transformer_blocks} == set(exp["groups"])
    # only DiT runs a block's module again after the loop (see test_dit_reenters_block_0)
    reentered = {b.path for g in an.block_groups for b in g.blocks if b.reentries}
    assert reentered == ({"transformer_blocks.0"} if name == "DiTTransformer2DModel" else set())

    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    for gname, per_block in exp["blocks"].items():
        for i in range(exp["groups"][gname]):
            block = f"{gname}.{i}"
            got = [(s.kind, _roles(s.segments), _roles(s.kv_segments), s.has_mask)
                   for s in an.sites if s.block == block]
            assert got == per_block, f"{block}: {got}"
            for s in an.sites:
                if s.block == block:
                    assert (s.heads, s.head_dim) == (heads, head_dim), s.describe()
                    assert s.module.startswith(block + ".")
                    assert s.q_shape[-1] == s.k_shape[-1] == head_dim

    extra = [s for s in an.sites if s.block is None]
    want = exp.get("extra", [])
    assert [(s.module, s.kind, _roles(s.segments), _roles(s.kv_segments), s.heads, s.head_dim)
            for s in extra] == want

    assert an.inputs == exp["inputs"]
    assert an.outputs == exp["outputs"]
    assert not [s for s in an.sites if s.kind in ("matmul", "other")]

    # token dims written on the graph agree with the site's query segments
    nodes = {n.name: n for n in an.graph_module.graph.nodes}
    checked = 0
    for s in an.sites:
        if s.kind in ("self", "joint", "text") and s.q_len.free_symbols:
            q = nodes[s.node].args[0]
            assert token_dims(q).get(len(s.q_shape) - 2) == _roles(s.segments)
            checked += 1
    assert checked, f"{name}: no self/joint/text site with a symbolic query length, nothing compared"


def test_flux_segments_share_symbols_with_inputs():
    """The joint sequence is [text | image] and each segment's class is the input's token dim."""
    an = _analysis("FluxTransformer2DModel")
    ph = {n.name: n for n in an.graph_module.graph.nodes if n.op == "placeholder"}
    s = an.sites[0]
    txt, img = s.segments
    e_txt = ph["encoder_hidden_states"].meta["val"].shape[1].node.expr
    e_img = ph["hidden_states"].meta["val"].shape[1].node.expr
    e_ids = ph["img_ids"].meta["val"].shape[0].node.expr
    assert an.classes.same(txt.length, e_txt) and an.classes.same(img.length, e_img)
    assert an.classes.same(e_img, e_ids) and e_img != e_ids  # two AUTO symbols, proven equal
    assert not an.classes.same(e_txt, e_img)


def test_latte_temporal_attention_folds_tokens_into_batch():
    an = _analysis("LatteTransformer3DModel")
    temporal = an.sites_of("temporal")
    assert [s.block for s in temporal] == ["temporal_transformer_blocks.0", "temporal_transformer_blocks.1"]
    cfg = config("LatteTransformer3DModel")
    for s in temporal:
        assert s.q_len == cfg["video_length"]  # frames, specialised by temp_pos_embed
        assert s.folded is not None and s.folded.free_symbols <= an.visual and an.classes.same(
            s.folded, an.sites_of("self")[0].q_len)
    # frames are not a token class; the spatial sequence is
    assert an.classes.find(temporal[0].q_len) not in an.token_classes
    assert an.classes.find(an.sites_of("self")[0].q_len) in an.token_classes


def test_latte_batch2_symbolic_frames():
    """Batch 2 (CFG): export keeps the batch and the frames symbolic, each input with its own batch
    symbol, mixed into other sizes by reshapes. Batch symbols are not visual; the frames are, and
    the temporal blocks are still told from the spatial ones (whose sequence cross attention uses)."""
    import diffusers

    from ditpass.models.zoo import _CONFIGS

    name = "LatteTransformer3DModel"
    torch.manual_seed(0)  # one spatial + one temporal block: the tiny config, half the export time
    model = diffusers.LatteTransformer3DModel(**dict(_CONFIGS[name]["tiny"], num_layers=1)).eval()
    inputs = make_inputs(name, batch=2)
    with torch.no_grad():
        cap = capture(model, **inputs)
    an = analyze(cap)
    ph = {n.name: n.meta["val"] for n in an.graph_module.graph.nodes if n.op == "placeholder"}
    b, _, f, h, w = (s.node.expr if isinstance(s, torch.SymInt) else s for s in ph["hidden_states"].shape)
    assert b.is_Symbol and f.is_Symbol  # kept symbolic by export at batch 2
    assert b not in an.visual and f in an.visual
    assert [s.kind for s in an.sites] == ["self", "cross", "temporal"]
    for s in an.sites_of("temporal"):
        assert s.q_len.free_symbols & an.visual == {f}
    assert an.inputs == {"encoder_hidden_states": {1: (T,)}} and an.outputs == [{}]


def test_dit_reenters_block_0():
    """DiT runs ``transformer_blocks[0].norm1.emb`` again after the loop for its final modulation."""
    an = _analysis("DiTTransformer2DModel")
    (g,) = an.block_groups
    b0, b1 = g.blocks
    assert len(b0.reentries) == 1 and not b1.reentries
    nodes = {n.name: i for i, n in enumerate(an.graph_module.graph.nodes)}
    first, last = b0.reentries[0]
    assert nodes[first] > nodes[b1.last]  # after the last block
    n = next(x for x in an.graph_module.graph.nodes if x.name == first)
    assert n.meta["ditpass_block"] == "transformer_blocks.0"
    assert any("transformer_blocks.0.norm1.emb" in str(v) for v in n.meta["nn_module_stack"].values())


def test_masks():
    an = _analysis("PixArtTransformer2DModel")
    cross = an.sites_of("cross")[0]
    assert cross.has_mask and an.classes.same(cross.mask_shape[-1], cross.kv_len)
    an = _analysis("HunyuanVideoTransformer3DModel")
    joint = an.sites_of("joint")[0]
    assert joint.has_mask and an.classes.same(joint.mask_shape[-1], joint.kv_len)
    refiner = an.sites_of("text")[0]
    assert refiner.mask_shape[-2:] == (refiner.q_len, refiner.kv_len)


def test_specialised_text_reported_as_const():
    """Where export turns the text length into a number, the analysis says so (role const) instead
    of guessing: HunyuanDiT (text_len fixed by config), Qwen-Image (int() in its RoPE)."""
    for name in ("HunyuanDiT2DModel", "QwenImageTransformer2DModel"):
        an = _analysis(name)
        assert an.const_segments
    an = _analysis("QwenImageTransformer2DModel")
    s = an.sites_of("joint")[0]
    assert s.segments[0].length == 16 and s.segments[1].length.free_symbols


# ---- the zoo's dynamic_dims, where the outcome differs from "auto" ---------------------------

def test_zoo_dims_static_visual_tokens_are_not_guessed():
    """LTX and Qwen-Image: the zoo's dynamic_dims leave the image token count static (it comes from
    Python ints); "auto" makes those ints symbolic. With the zoo dims nothing tells image from text
    by symbols, and the analysis says 'other' rather than misreading it."""
    an = _analysis("LTXVideoTransformer3DModel", "zoo")
    assert not an.visual and not an.token_classes
    assert [s.kind for s in an.sites] == ["other"] * 4
    assert an.inputs == {"encoder_hidden_states": {1: (T,)}, "encoder_attention_mask": {1: (T,)}}
    an = _analysis("QwenImageTransformer2DModel", "zoo")
    assert not an.visual and not an.token_classes and not an.inputs
    assert [s.kind for s in an.sites] == ["other"] * 2
    assert all(_roles(s.segments) == (C, C) for s in an.sites)


# ---- the symbolic trap: FLUX full size, 1024x1024, 512 text tokens ---------------------------

def test_flux_full_text_width_equals_image_tokens():
    """At 1024x1024 FLUX has 4096 image tokens and a 4096-wide T5 embedding: the width is not a
    token dim, the text length is."""
    name = "FluxTransformer2DModel"
    model = build(name, "full", device="meta")
    inputs = make_inputs(name, "full", device="meta", text_len=512)
    assert inputs["hidden_states"].shape[1] == 4096 == inputs["encoder_hidden_states"].shape[2]
    with torch.no_grad():
        cap = capture(model, **inputs)
    assert cap.method == "export-dynamic", cap.errors
    an = analyze(cap)
    assert an.inputs["encoder_hidden_states"] == {1: (T,)}  # dim 2 (width 4096) is not a token dim
    assert an.inputs["hidden_states"] == {1: (V,)}
    assert an.inputs["img_ids"] == {0: (V,)} and an.inputs["txt_ids"] == {0: (T,)}
    cfg = config(name, "full")
    sites = an.sites
    assert len(sites) == cfg["num_layers"] + cfg["num_single_layers"] == 57
    assert all(s.kind == "joint" and _roles(s.segments) == (T, V) for s in sites)
    assert all((s.heads, s.head_dim) == (24, 128) for s in sites)
    assert {g.name: len(g) for g in an.block_groups} == {"transformer_blocks": 19, "single_transformer_blocks": 38}
    # no 4096-sized dim anywhere in the graph is mistaken for tokens unless it is symbolic
    checked = 0
    for n in an.graph_module.graph.nodes:
        for d, roles in token_dims(n).items():
            v = n.meta["val"]
            v = v[0] if isinstance(v, (list, tuple)) else v
            assert isinstance(v.shape[d], torch.SymInt)
            checked += 1
    assert checked >= len(an.inputs), checked  # at least the inputs' token dims were looked at


# ---- matmul sites ---------------------------------------------------------------------------

class _MatmulMixer(torch.nn.Module):
    """Linear attention and plain attention written as matmuls/einsums, next to matmuls that do
    not mix tokens: a projection ``x @ W``, RoPE angles as an outer-product einsum, a RoPE
    rotation as a matmul of per-token 2x2 matrices."""

    def __init__(self, c=16, h=2):
        super().__init__()
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.w = torch.nn.Parameter(torch.randn(c, c) / 4)
        self.inv = torch.nn.Parameter(torch.randn(c // h // 2), requires_grad=False)
        self.h = h

    def forward(self, x):
        b, n, c = x.shape
        pos = torch.arange(n, dtype=x.dtype)
        ang = torch.einsum("n,d->nd", pos, self.inv)  # RoPE angles: not a site
        cos, sin = ang.cos(), ang.sin()
        q, k, v = (t.view(b, n, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        rot = torch.stack([cos, -sin, sin, cos], -1).view(n, -1, 2, 2)
        pairs = q.reshape(b, self.h, n, -1, 2, 1)
        q = torch.matmul(rot, pairs).reshape(b, self.h, n, -1)  # RoPE rotation: not a site
        q, k = torch.relu(q), torch.relu(k)
        kv = torch.matmul(k.transpose(-1, -2), v)  # linear attention: contracts tokens (site)
        lin = torch.matmul(q, kv) / n  # not a site
        scores = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)  # q k^T (site)
        att = torch.einsum("bhij,bhjd->bhid", scores, v)  # attn @ v (site)
        o = (lin + att).transpose(1, 2).reshape(b, n, c)
        return o @ self.w  # projection: not a site


def test_matmul_sites():
    torch.manual_seed(0)
    m = _MatmulMixer().eval()
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        cap = capture(m, x)
    an = analyze(cap)
    mats = an.sites_of("matmul")
    assert len(mats) == 3, [s.node for s in mats]
    assert len(an.sites) == 3
    n = cap.graph_module.graph
    targets = {x.name: str(x.target) for x in n.nodes}
    assert sorted(targets[s.node].split(".")[1] for s in mats) == ["einsum", "einsum", "matmul"]
    seq = next(iter(an.visual))
    assert all(s.q_len.free_symbols == {seq} for s in mats)
