"""PipeFusion: the stage cut, the patch attention against a direct computation, exactness with full
warm-up on several zoo models and the digits pipeline (2 gloo ranks), each rank running only its
stage with only its stage's weights, stale K/V moving the output when warm-up is short, and the
errors for what it does not cover."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ditpass
from ditpass.analysis.stages import split_balanced
from ditpass.errors import PlanError
from ditpass.models import zoo
from ditpass.runtime.patches import PatchAttention, assemble, patch_attention, patch_of
from ditpass.runtime.sites import SiteStrategy

from dist_utils import run_forked


def test_split_balanced_minimises_the_largest_stage():
    assert split_balanced([1, 1, 1, 1], 2) == [2, 2]
    assert split_balanced([4, 1, 1, 1, 1], 2) == [1, 4]
    costs = [2, 2, 1, 1, 1, 1]
    sizes = split_balanced(costs, 3)
    starts = [sum(sizes[:i]) for i in range(3)]
    assert max(sum(costs[a:a + n]) for a, n in zip(starts, sizes)) == 3  # [2] [2, 1] [1, 1, 1]
    assert sum(split_balanced([3] * 7, 3)) == 7 and max(split_balanced([3] * 7, 3)) == 3
    with pytest.raises(ValueError, match="at least 5 blocks"):
        split_balanced([1] * 4, 5)


def test_patches_assemble_back_to_the_whole_tensor():
    x = torch.randn(2, 5 + 11, 3)
    for n in (1, 2, 3, 4):
        chunks = [patch_of(x, 1, [5, 11], n, p) for p in range(n)]
        assert torch.equal(assemble(chunks, 1, [5, 11], n), x)


def test_patch_attention_against_a_direct_computation():
    """Full step: exact attention, buffer filled. Patch p later: its own K/V fresh, the others' from the
    buffer (earlier patches: this step's, later ones: the previous step's)."""
    torch.manual_seed(0)
    lengths, n, B, H, D = [5, 11], 3, 2, 2, 8
    S = sum(lengths)
    q0, k0, v0 = (torch.randn(B, H, S, D) for _ in range(3))
    pa = PatchAttention(n)
    site = SiteStrategy(-1, "sdpa", "self", "blocks.0.attn")
    out = patch_attention(q0, k0, v0, None, [], pa, site)
    assert torch.equal(out, F.scaled_dot_product_attention(q0, k0, v0))
    q1, k1, v1 = (torch.randn(B, H, S, D) for _ in range(3))  # the next step's values
    kk, vv = k0.clone(), v0.clone()
    pa.mode = "patch"
    for p in range(n):
        pa.index.fill_(p)
        local = [patch_of(t, 2, lengths, n, p) for t in (q1, k1, v1)]
        got = patch_attention(*local, None, lengths, pa, site)
        # reference: patches 0..p hold step 1's K/V, the rest step 0's
        own = torch.zeros(S, dtype=torch.bool)
        own[patch_of(torch.arange(S), 0, lengths, n, p)] = True
        kk[:, :, own], vv[:, :, own] = k1[:, :, own], v1[:, :, own]
        want = F.scaled_dot_product_attention(local[0], kk, vv)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a first step without warm-up: patch 0 sees only its own keys
    fresh = PatchAttention(n)
    fresh.partial, fresh.mode = True, "patch"
    local = [patch_of(t, 2, lengths, n, 0) for t in (q1, k1, v1)]
    keys = [patch_of(t, 2, lengths, n, 0)[:, :, [0, 1, 2, 3, 4, 5]] for t in (k1, v1)]  # 2 + 4 real tokens
    got = patch_attention(*local, None, lengths, fresh, site)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(local[0], *keys), rtol=1e-5, atol=1e-6)


def _zoo_worker(rank, world, model, inputs, ref, fields):
    total = sum(p.numel() for p in model.parameters())
    pm = ditpass.parallelize(model, ditpass.Plan(**fields))
    with torch.no_grad():
        full = pm(**inputs)[0]  # step 0: warm-up (whole sequence, exact)
        patched = pm(**inputs)[0]  # step 1: patch by patch (same inputs: stale K/V equal fresh ones)
        # a pipeline that calls the transformer twice in one step (true CFG) is refused, not served stale K/V
        pm.ditpass_state.steps_counted, pm.ditpass_state.step = True, 5
        pm(**inputs)
        try:
            pm(**inputs)
            refused = False
        except PlanError as e:
            refused = "twice in diffusion step 5" in str(e)
    record = pm.ditpass_records[0]
    runner = record.runner
    stages = record.results[[r.name for r in record.results].index("pipefusion")].details["stages"]
    ran = {n.meta.get("ditpass_block") for n in runner.part.graph.nodes if n.op == "call_function"} - {None}
    kept = sum(p.numel() for p in model.parameters())
    assert refused
    return (float((full - ref).abs().max()), float((patched - ref).abs().max()), runner.last_mode,
            stages, sorted(ran), kept, total)


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel",
                                  "HunyuanVideoTransformer3DModel"])
def test_zoo_exact_and_each_rank_runs_its_stage(name):
    model = zoo.build(name, "tiny").eval()
    inputs = zoo.make_inputs(name, "tiny")
    _, results = run_forked(_zoo_worker, 2, model, inputs, dict(pipefusion=2, patches=3, warmup_steps=1),
                            timeout=300)
    stages = results[0][3]
    assert len(stages) == 2 and all(stages) and not set(stages[0]) & set(stages[1])
    for rank, (full_diff, patch_diff, mode, st, ran, kept, total) in enumerate(results):
        assert st == stages
        assert full_diff <= 1e-5 and patch_diff <= 1e-4, (full_diff, patch_diff)
        assert mode == "pipelined"  # the last call counted steps like a pipeline: across steps (lazy outputs)
        # this rank's patch graph runs its own stage's blocks, nothing of the other stage's
        own, other = set(stages[rank]), set(stages[1 - rank])
        assert own & set(ran) and not other & set(ran)
        assert kept < total  # the other stage's weights are gone
    # every weight is kept somewhere; only glue both stages need (embeddings) is kept twice
    assert results[0][5] + results[1][5] >= results[0][6]


def _calls(rank, world, model, inputs, ref, fields):
    pm = ditpass.parallelize(model, ditpass.Plan(**fields))
    with torch.no_grad():
        outs = [pm(**inputs)[0] for _ in range(3)]
    return [float((o - ref).abs().max()) for o in outs], outs, pm.ditpass_records[0].runner.last_mode


def test_pipefusion_times_ulysses_or_ring_equals_pipefusion_alone():
    """pipefusion=2 x ulysses=2 (and x ring=2) on 4 ranks: each patch split over two sequence ranks of its stage. Without
    warm-up (the first step attends to the patches computed so far, later ones to stale K/V) it gives the
    same outputs as pipefusion=2 on 2 ranks, call by call; with one warm-up step the first call is exact."""
    model = zoo.build("FluxTransformer2DModel", "tiny").eval()
    inputs = zoo.make_inputs("FluxTransformer2DModel", "tiny")  # 16 text + 64 image tokens: 4 chunks each
    _, alone = run_forked(_calls, 2, model, inputs, dict(pipefusion=2, patches=2, warmup_steps=0), timeout=300)
    _, hybrid = run_forked(_calls, 4, model, inputs, dict(pipefusion=2, ulysses=2, patches=2, warmup_steps=0),
                           timeout=300)
    diffs, ref_outs, mode = alone[0]
    assert mode == "patches" and diffs[0] > 1e-2  # stale / partial K/V were used: not the exact output
    for _, outs, mode in hybrid:
        assert mode == "patches"
        for a, b in zip(ref_outs, outs):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    _, ring = run_forked(_calls, 4, model, inputs, dict(pipefusion=2, ring=2, patches=2, warmup_steps=0),
                         timeout=300)  # ring inside each patch: K/V all-gathered over the ring into the buffer
    for _, outs, mode in ring:
        for a, b in zip(ref_outs, outs):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    _, warm = run_forked(_calls, 4, model, inputs, dict(pipefusion=2, ulysses=2, patches=2, warmup_steps=1),
                         timeout=300)
    for diffs, _, mode in warm:
        assert max(diffs) <= 1e-4  # call 0 exact; calls 1-2 patch by patch with K/V equal to fresh ones


def _digits_worker(rank, world, fields, labels):
    from ditpass.models import digits

    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ref = digits.generate(labels, seed=0, pipe=pipe, output_type="np", steps=8)
    pipe = ditpass.parallelize(pipe, ditpass.Plan(**fields))
    a = digits.generate(labels, seed=0, pipe=pipe, output_type="np", steps=8)
    b = digits.generate(labels, seed=0, pipe=pipe, output_type="np", steps=8)  # state reset in between
    runner = pipe.transformer.ditpass_records[0].runner
    return float(abs(a - ref).max()), float(abs(a - b).max()), runner.last_mode, float(abs(a - ref).mean())


def test_digits_pipeline_full_warmup_exact_short_warmup_close():
    from dist_utils import run_distributed

    labels = [3, 7]
    exact = run_distributed(_digits_worker, 2, dict(pipefusion=2, patches=4, warmup_steps=8), labels, timeout=300)
    stale = run_distributed(_digits_worker, 2, dict(pipefusion=2, patches=4, warmup_steps=1), labels, timeout=300)
    for diff, again, mode, _ in exact:
        assert diff == 0.0 and again == 0.0 and mode == "full"
    for diff, again, mode, mean in stale:
        assert mode == "pipelined" and again == 0.0  # across steps; the same seed twice: the same pictures
        assert 0.0 < mean < 0.02 and diff < 0.2  # stale K/V moved the pixels, a little


def test_cfg_times_pipefusion_on_four_ranks():
    from dist_utils import run_distributed

    results = run_distributed(_digits_worker, 4, dict(cfg=2, pipefusion=2, patches=2, warmup_steps=8), [1, 4],
                              timeout=600)
    for diff, again, mode, _ in results:
        assert diff <= 1e-5 and again == 0.0 and mode == "full"


def test_unsupported_plans_and_models_say_why():
    from ditpass.tools.explain import dry_run

    from ditpass.passes.registry import check_built

    with pytest.raises(PlanError, match="cuda_graphs=True is not built yet"):
        check_built(ditpass.Plan(pipefusion=2, cuda_graphs=True))
    name = "CogVideoXTransformer3DModel"  # splits the token sequence inside attention
    model = zoo.build(name, "tiny").eval()
    captured = ditpass.capture(model, **zoo.make_inputs(name, "tiny"))
    with pytest.raises(Exception, match=r"transformer_blocks\.0\.attn1.*patch by patch"):
        dry_run(captured, ditpass.Plan(pipefusion=2))


def test_explain_shows_the_stage_cut_and_the_schedule():
    from ditpass.tools.explain import dry_run, explain

    name = "PixArtTransformer2DModel"
    model = zoo.build(name, "tiny").eval()
    captured = ditpass.capture(model, **zoo.make_inputs(name, "tiny"))
    record = dry_run(captured, ditpass.Plan(pipefusion=2, patches=4))
    text = str(explain(record))
    assert "stage cut: 2 stages, 4 patches" in text
    assert "patch schedule" in text and "p3" in text
    blocks = sum(len(b) for b in next(r for r in record.results if r.name == "pipefusion").details["stages"])
    # blocks per stage given by the user instead of the balance
    record = dry_run(captured, ditpass.Plan(pipefusion=2, stage_blocks=(1, blocks - 1)))
    stages = next(r for r in record.results if r.name == "pipefusion").details["stages"]
    assert [len(s) for s in stages] == [1, blocks - 1]
    with pytest.raises(Exception, match=f"sum to the {blocks} blocks"):
        dry_run(captured, ditpass.Plan(pipefusion=2, stage_blocks=(1, blocks)))
