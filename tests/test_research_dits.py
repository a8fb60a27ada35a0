"""Hand-written research-style DiTs (tests/research_dits.py) under exact sequence parallelism on 2 gloo ranks.

Per model: ``ulysses=2`` and ``ring=2`` against the single-process output (15 patches, a class token, 3 frames:
nothing divides by 2, so padding is exercised), and every attention site sharded: its site-table entry has a
sequence-parallel strategy, or (attention whose sharded tokens are a batch dim, e.g. temporal attention over
the frames of each patch) runs token-wise on this rank's shard; ``ReplicatedWarning`` is not raised.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import ditpass
from ditpass.passes.sequence_parallel import ReplicatedWarning

from dist_utils import first_output, run_forked
from research_dits import RESEARCH_DITS

TOL = 1e-4
PLANS = [dict(ulysses=2), dict(ring=2)]


def _run(rank, world, model, inputs, ref, plans):
    out = []
    with torch.no_grad():
        for fields in plans:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always", ReplicatedWarning)
                pm = ditpass.parallelize(model, ditpass.Plan(**fields))
                y = first_output(pm(**inputs))
            sites = list(pm.ditpass_records[0].sites)
            out.append(dict(diff=float((y - ref).abs().max()), shape=tuple(y.shape),
                            sites=[(s.kind, s.seq is not None, s.notes) for s in sites],
                            replicated=[str(w.message) for w in seen if issubclass(w.category, ReplicatedWarning)]))
    return out


def _sharded(kind, seq, notes) -> bool:
    return seq or any("token-wise" in n for n in notes)


EXPECT_KINDS = {
    "hand_written_attention": {"self"},
    "timm_blocks": {"self"},
    "spatial_temporal_video": {"self", "temporal"},
    "class_token_odd_length": {"joint"},
    "fixed_position_table": {"self"},
}


@pytest.mark.parametrize("name", [
    "hand_written_attention", "timm_blocks", "spatial_temporal_video", "class_token_odd_length",
    "fixed_position_table",
])
def test_exact_and_sharded(name):
    build, make_inputs = RESEARCH_DITS[name]
    ref, results = run_forked(_run, 2, build(), make_inputs(), PLANS, timeout=300)
    for rank_results in results:
        for fields, r in zip(PLANS, rank_results):
            assert r["shape"] == tuple(ref.shape)
            assert r["diff"] <= TOL, f"{name} {fields}: max abs diff {r['diff']:.3g}"
    for fields, r in zip(PLANS, results[0]):
        assert {k for k, _, _ in r["sites"]} == EXPECT_KINDS[name], r["sites"]
        whole = [s for s in r["sites"] if not _sharded(*s)]
        assert not whole, f"{name} {fields}: sites left whole: {whole}"
        assert not r["replicated"], r["replicated"]


def test_hand_written_attention_is_a_site():
    """``softmax(q @ k^T * scale) @ v`` is one self-attention site (on the ``@ v``), not two matmuls."""
    build, make_inputs = RESEARCH_DITS["hand_written_attention"]
    a = ditpass.analyze(ditpass.capture(build(), **make_inputs()))
    assert [s.kind for s in a.sites] == ["self", "self"]
    assert all(s.written and s.written[3] == pytest.approx(16 ** -0.5) for s in a.sites)
    assert all(s.heads == 2 and s.head_dim == 16 for s in a.sites)


def test_video_attention_kinds():
    """Spatial attention is over the patches (the token sequence); temporal over the frames, patches in the batch."""
    build, make_inputs = RESEARCH_DITS["spatial_temporal_video"]
    a = ditpass.analyze(ditpass.capture(build(), **make_inputs()))
    assert [s.kind for s in a.sites] == ["self", "temporal"] * 2
    assert len(a.token_classes) == 1
