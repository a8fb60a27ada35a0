"""The overlap pass: each Ulysses all-to-all starts before the block's work that attention does not
need (FLUX single blocks: the MLP input projection), and the output is bit-identical to the graph in
the model's own order."""
from __future__ import annotations

import pytest
import torch

import ditpass
from ditpass.runtime.ops import OPS
from dist_utils import run_forked
from tiny_models import tiny_flux

def _run(rank, world, model, inputs, ref):
    import os

    with torch.no_grad():
        pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2))
        y = pm(**inputs)[0]
        rec = pm.ditpass_records[0]
        res = next(r for r in rec.results if r.name == "overlap")
        nodes = list(rec.graph_module.graph.nodes)
        # in every block that moved work: the send comes before the first moved node's block neighbours
        order = []
        for send in (n for n in nodes if n.target is OPS["ulysses_send"]):
            block = send.meta["ditpass_block"]
            linears_after = [n for n in nodes[nodes.index(send):] if n.meta.get("ditpass_block") == block
                             and n.target is torch.ops.aten.linear.default]
            order.append((block, len(linears_after)))
        os.environ["DITPASS_SKIP_PASSES"] = "overlap"  # the same plan in the model's own order
        pm2 = ditpass.parallelize(model, ditpass.Plan(ulysses=2))
        y2 = pm2(**inputs)[0]
        skipped = next(r for r in pm2.ditpass_records[0].results if r.name == "overlap")
        assert not skipped.modified and "DITPASS_SKIP_PASSES" in skipped.notes[0]
    return dict(diff=float((y - ref).abs().max()), same=bool(torch.equal(y, y2)),
                moved=dict(res.details["moved_per_block"]), order=order, note=res.notes[0])


def test_overlap_moves_single_block_mlp_and_changes_nothing():
    model, inputs = tiny_flux()
    _, results = run_forked(_run, 2, model, inputs, timeout=300)
    n_single = len(model.single_transformer_blocks)
    for r in results:
        assert r["diff"] <= 1e-4
        assert r["same"], "reordering changed the output"
        # single blocks: proj_mlp (and its GELU) moved after the send (double blocks: only the AdaLN
        # chunks their MLP uses later)
        assert {f"single_transformer_blocks.{i}" for i in range(n_single)} <= set(r["moved"]), r["moved"]
        singles = [(block, n) for block, n in r["order"] if block.startswith("single")]
        assert len(singles) == n_single, r["order"]  # one send per single block (q/k/v together)
        for block, linears_after in singles:
            assert linears_after >= 2, (block, linears_after)  # proj_mlp and proj_out follow the send


def test_skip_passes_names_must_exist(monkeypatch):
    from ditpass.passes.registry import passes_for

    monkeypatch.setenv("DITPASS_SKIP_PASSES", "overlap,tidy")
    passes = passes_for("transformer", ditpass.Plan())
    assert [p.name for p in passes] == ["attention_sites", "batch_parallel", "pipefusion", "sequence_parallel",
                                        "fastattn", "fuse_projections", "overlap", "tidy", "step_cache"]
    assert [p.enabled(None) for p in passes[6:8]] == [False, False]
    monkeypatch.setenv("DITPASS_SKIP_PASSES", "overlapp")
    with pytest.raises(ValueError, match="unknown passes"):
        passes_for("transformer", ditpass.Plan())
    monkeypatch.setenv("DITPASS_SKIP_PASSES", "sequence_parallel")
    with pytest.raises(ValueError, match="needs it"):
        passes_for("transformer", ditpass.Plan(ulysses=2))
