"""The zoo sweep in CI: every zoo class builds and runs at tiny size, every DiT class diffusers exports is in
the zoo or says why not, and the classes beyond the first twelve that the sweep found exact run ulysses=2 and
ring=2 exactly with attention sharded (several models per forked 2-process run: benchmarks/sweep_zoo.py's
`equivalence`). The full table: benchmarks/results/sweep_zoo.md."""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from ditpass.models import zoo

_spec = importlib.util.spec_from_file_location("sweep_zoo", Path(__file__).resolve().parents[1] / "benchmarks" /
                                               "sweep_zoo.py")
sweep_zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_zoo)

# New classes that benchmarks/results/sweep_zoo.md shows exact with attention sharded under both plans, in
# groups that share one forked 2-process run (grouped to keep each run under a minute on 2 cores).
SP_EXACT = [
    ["ChromaTransformer2DModel", "BriaTransformer2DModel", "LongCatImageTransformer2DModel", "Flux2Transformer2DModel",
     "OvisImageTransformer2DModel", "Flux3Transformer2DModel", "BriaFiboTransformer2DModel",
     "Krea2Transformer2DModel", "Ideogram4Transformer2DModel"],
    ["CogView3PlusTransformer2DModel", "CogView4Transformer2DModel", "GlmImageTransformer2DModel",
     "ErnieImageTransformer2DModel", "JoyImageEditTransformer3DModel", "JoyImageEditPlusTransformer3DModel",
     "BriaFibo2Transformer2DModel"],
    ["SkyReelsV2Transformer3DModel", "ChronoEditTransformer3DModel", "WanVACETransformer3DModel",
     "AnyFlowTransformer3DModel", "WanAnimateTransformer3DModel", "SanaWMLTX2RefinerTransformer3DModel"],
    ["AllegroTransformer3DModel", "EasyAnimateTransformer3DModel", "ConsisIDTransformer3DModel",
     "MotifVideoTransformer3DModel", "LTX2VideoTransformer3DModel", "Kandinsky5Transformer3DModel"],
    ["StableAudioDiTModel", "LongCatAudioDiTTransformer", "MiniMaxMusic3Transformer1DModel",
     "StableAudio3DiTModel", "MiniMaxH3Transformer3DModel"],
    # exact and sharded since the capture (export-values, opaque token-wise modules) and analysis fixes
    ["AuraFlowTransformer2DModel", "Lumina2Transformer2DModel", "LuminaNextDiT2DModel", "PRXTransformer2DModel",
     "NucleusMoEImageTransformer2DModel", "OmniGenTransformer2DModel"],
    ["SanaTransformer2DModel", "SanaVideoTransformer3DModel", "HeliosTransformer3DModel", "CosmosTransformer3DModel",
     "AceStepTransformer1DModel"],
    ["HiDreamImageTransformer2DModel", "HunyuanImageTransformer2DModel", "HunyuanVideo15Transformer3DModel",
     "HunyuanVideoFramepackTransformer3DModel"],
    ["RFD4ProteinaTransformer", "Kandinsky6SRTransformer3DModel", "Kandinsky6Transformer3DModel"],  # residues as tokens (pair-biased attention); flex_attention
]


def _first_tensor(out):
    out = out[0] if isinstance(out, (tuple, list)) else out
    while isinstance(out, (tuple, list)):  # Z-Image returns a list of per-sample tensors
        out = out[0]
    return out


@pytest.mark.parametrize("name", zoo.ALL_NAMES)
def test_tiny_forward(name):
    """Every zoo class builds from its tiny config, and the pipeline-shaped inputs run a finite forward."""
    model = zoo.build(name)
    assert type(model).__name__ == name and not model.training
    kw = zoo.make_inputs(name)
    with torch.no_grad():
        y = _first_tensor(model(**kw))
    assert isinstance(y, torch.Tensor) and y.numel() > 0
    assert torch.isfinite(y).all()
    assert y.abs().mean() > 1e-3  # a real signal path, not zeros
    meta = zoo.make_inputs(name, device="meta")
    assert set(meta) == set(kw)


@pytest.mark.parametrize("name", [n for n in zoo.MORE_NAMES if n in zoo._DYN])
def test_dynamic_dims_cover_inputs(name):
    assert set(zoo.dynamic_dims(name)) == set(zoo.make_inputs(name, device="meta"))


def test_every_diffusers_dit_is_accounted_for():
    """Each DiT-named class diffusers exports is in the zoo, PENDING (why it is not yet) or EXCLUDED (why it is
    not a denoiser): a diffusers upgrade that adds one fails here until it is placed."""
    import diffusers

    named = {n for n in dir(diffusers) if ("Transformer" in n or "DiT" in n) and not n.endswith("Pipeline")
             and inspect.isclass(getattr(diffusers, n))}
    placed = set(zoo.ALL_NAMES) | set(zoo.PENDING) | set(zoo.EXCLUDED)
    assert not named - placed, sorted(named - placed)
    assert not set(zoo.ALL_NAMES) & (set(zoo.PENDING) | set(zoo.EXCLUDED))
    assert all(zoo.PENDING.values()) and all(zoo.EXCLUDED.values())


@pytest.mark.parametrize("group", SP_EXACT, ids=[g[0].replace("Transformer", "") for g in SP_EXACT])
def test_sequence_parallel_exact_and_sharded(group):
    entries = []
    for name in group:
        torch.manual_seed(0)
        entries.append((name, zoo.build(name), zoo.make_inputs(name)))
    results = sweep_zoo.equivalence(entries, timeout=300)
    bad = {}
    for name in group:
        for r in results[name]:
            if not sweep_zoo.exact_and_sharded(r):
                bad[f"{name} {r['plan']}"] = r.get("error") or (r.get("diff"), f"{r.get('sharded')}/{r.get('sites')}")
    assert not bad, bad
