"""Model zoo: tiny forwards on CPU, full configs on meta, input builders."""

import re

import pytest
import torch

from ditpass.models import (
    NAMES,
    PUBLISHED_PARAMS,
    SIZES,
    STATIC_REASONS,
    build,
    config,
    describe,
    dynamic_dims,
    make_inputs,
)

FULL = [(n, s) for n in NAMES for s in SIZES[n] if s != "tiny"]

# where the channel dim of hidden_states / the output sits
CHANNEL_DIM = {
    "FluxTransformer2DModel": -1,
    "QwenImageTransformer2DModel": -1,
    "LTXVideoTransformer3DModel": -1,
    "CogVideoXTransformer3DModel": 2,
}


def _out_channels(name, cfg):
    if name == "HunyuanDiT2DModel":
        return cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
    out = cfg.get("out_channels") or cfg["in_channels"]
    if name == "FluxTransformer2DModel":
        return cfg["patch_size"] ** 2 * out
    if name == "QwenImageTransformer2DModel":
        return cfg["patch_size"] ** 2 * out
    return out


def _tokens(name, kw):
    """Image tokens seen by attention, from the input shapes alone."""
    x = kw["hidden_states"]
    if x.dim() == 3:  # packed tokens (FLUX, Qwen, LTX)
        return x.shape[1]
    cfg = config(name)
    p = cfg["patch_size"][-1] if isinstance(cfg["patch_size"], (tuple, list)) else cfg["patch_size"]
    n = x.shape[-1] * x.shape[-2] // p // p
    if x.dim() == 5:
        n *= x.shape[1] if name == "CogVideoXTransformer3DModel" else x.shape[2]
    return n


def test_names():
    assert len(NAMES) == 12 and len(set(NAMES)) == 12
    import diffusers

    for n in NAMES:
        assert hasattr(diffusers, n)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward(name):
    model = build(name)
    assert not model.training
    assert type(model).__name__ == name
    kw = make_inputs(name)
    assert kw["return_dict"] is False
    with torch.no_grad():
        out = model(**kw)
    assert isinstance(out, tuple)
    y = out[0]
    x = kw["hidden_states"]
    expected = list(x.shape)
    expected[CHANNEL_DIM.get(name, 1)] = _out_channels(name, config(name))
    assert list(y.shape) == expected
    assert torch.isfinite(y).all()
    assert y.abs().mean() > 1e-3  # a real signal path, not zeros
    assert _tokens(name, kw) >= 16
    # deterministic: same seed, same model and inputs
    kw2 = make_inputs(name)
    with torch.no_grad():
        y2 = build(name)(**kw2)[0]
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_config_shape(name):
    """Tiny configs keep the structure: >= 4 heads, heads divisible by 2 and 4, >= 2 of each block."""
    cfg = config(name)
    heads = cfg["num_attention_heads"]
    assert heads >= 4 and heads % 4 == 0
    model = build(name, device="meta")
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0
             and "block" in type(m[0]).__name__.lower()]
    assert lists, "no block lists found"
    for blocks in lists:
        assert len(blocks) >= 2


@pytest.mark.parametrize("name,size", FULL)
def test_full_param_count_on_meta(name, size):
    model = build(name, size, device="meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    count = sum(p.numel() for p in params)
    published = PUBLISHED_PARAMS[(name, size)]
    assert abs(count - published) <= 0.10 * published, f"{name}/{size}: {count / 1e9:.3f}B vs {published / 1e9:.3f}B"


@pytest.mark.parametrize("name,size", FULL)
def test_full_inputs_on_meta(name, size):
    kw = make_inputs(name, size, device="meta", dtype=torch.bfloat16)
    x = kw["hidden_states"]
    assert x.device.type == "meta" and x.dtype == torch.bfloat16
    assert _tokens(name, kw) >= 256  # native resolution (DiT-XL/2 256: 16x16 tokens)
    info = describe(name)
    if info["text_kwarg"]:
        assert kw[info["text_kwarg"]].dim() == 3


@pytest.mark.parametrize("name", NAMES)
def test_size_changes_token_count(name):
    info = describe(name)
    small = make_inputs(name, device="meta")
    big = make_inputs(name, height=256, width=256, device="meta")
    assert _tokens(name, big) > _tokens(name, small)
    if info["video"] and name != "LatteTransformer3DModel":
        t = info["vae_temporal"]
        more = make_inputs(name, frames=1 + 4 * t, device="meta")
        assert _tokens(name, more) > _tokens(name, small)
    tk = info["text_kwarg"]
    if tk and name != "HunyuanDiT2DModel":
        longer = make_inputs(name, text_len=40, device="meta")
        assert longer[tk].shape[1] == 40 != small[tk].shape[1]


@pytest.mark.parametrize("name", NAMES)
def test_inputs_deterministic_by_seed(name):
    a, b, c = make_inputs(name, seed=1), make_inputs(name, seed=1), make_inputs(name, seed=2)
    assert torch.equal(a["hidden_states"], b["hidden_states"])
    assert not torch.equal(a["hidden_states"], c["hidden_states"])


def test_bad_size_names_the_fix():
    with pytest.raises(ValueError, match="multiple of 16"):
        make_inputs("FluxTransformer2DModel", height=120)
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        make_inputs("WanTransformer3DModel", frames=10)
    with pytest.raises(ValueError, match="sizes"):
        build("DiTTransformer2DModel", "full14b")


@pytest.mark.parametrize("name", NAMES)
def test_dynamic_dims_structure(name):
    from torch.export import Dim

    kw = make_inputs(name)
    spec = dynamic_dims(name)
    assert set(spec) == set(kw)
    names = set()
    for v in spec.values():
        for d in (v if isinstance(v, tuple) else (v,)):
            if isinstance(d, dict):
                for dim in d.values():
                    if dim is not None and dim is not Dim.AUTO:
                        names |= set(re.findall(r"[A-Za-z]+", dim.__name__))
    assert names <= {"H", "W", "F", "T", "HW"}, names
    for missing in STATIC_REASONS.get(name, {}):
        assert missing not in names


@pytest.mark.parametrize("name", ["SD3Transformer2DModel"])
def test_dynamic_export_runs_second_size(name):
    """One cheap end-to-end check that dynamic_dims feeds torch.export (the full table is in EXPORT_NOTES)."""
    model = build(name)
    kw = make_inputs(name)
    ep = torch.export.export(model, (), kw, dynamic_shapes=dynamic_dims(name), strict=False)
    kw2 = make_inputs(name, height=192, width=96, text_len=24)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**kw2)[0], model(**kw2)[0])


def test_describe():
    for n in NAMES:
        d = describe(n)
        assert {"pipeline_class", "video", "text_kwarg", "image_kwarg"} <= set(d)
    assert describe("DiTTransformer2DModel")["text_kwarg"] is None
    assert describe("WanTransformer3DModel")["video"] is True
    assert describe("FluxTransformer2DModel")["video"] is False
