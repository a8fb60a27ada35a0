"""DiTFastAttn (passes/fastattn.py, ditpass/runtime/fastattn.py) on CPU.

Each technique against a direct computation (the op with a hand-made site entry); the window kernel against
masked SDPA, and that it skips the keys outside its blocks; threshold 0 is exactly full attention; the
caches reset between generations; a plan saved and loaded gives the same pictures; 2-process Ulysses and
CFG-parallel runs equal the single-process DiTFastAttn run; the CLI, alone and under cfg=2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ditpass
from ditpass.errors import PlanError
from ditpass.runtime import fastattn as fa
from ditpass.runtime.sites import SiteTable
from ditpass.runtime.state import RunState

from cli_utils import run_generate, saved_images
from dist_utils import first_output, run_forked
from tiny_models import tiny_flux

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "weights")
needs_digits = pytest.mark.skipif(not os.path.isdir(WEIGHTS), reason="built-in digits weights not present")


def _band(S, half):
    i = torch.arange(S)
    return (i[:, None] - i[None, :]).abs() <= half


def _window_ref(q, k, v, half):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_band(q.shape[-2], half))


@pytest.mark.parametrize("S,half", [(37, 1), (37, 4), (64, 4), (130, 20), (9, 12)])
def test_window_kernel_is_the_band(S, half):
    g = torch.Generator().manual_seed(S + half)
    q, k, v = (torch.randn(2, 3, S, 8, generator=g) for _ in range(3))
    got = fa.window_attention(q, k, v, half)
    assert torch.allclose(got, _window_ref(q, k, v, half), atol=1e-5), (got - _window_ref(q, k, v, half)).abs().max()


def test_window_kernel_skips_keys_outside_its_blocks():
    # a masked full matrix multiplies the masked probabilities (0) by every value: NaN anywhere spreads
    S, half = 96, 4
    block = fa._block_size(half)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 8, generator=g) for _ in range(3))
    v_nan = v.clone()
    v_nan[:, :, -1] = float("nan")  # the last key: far outside the first block's reach
    got = fa._blocked_window(q, k, v_nan, half)
    rows = slice(0, block)
    assert torch.isfinite(got[:, :, rows]).all()
    assert torch.allclose(got[:, :, rows], _window_ref(q, k, v, half)[:, :, rows], atol=1e-5)
    assert not torch.isfinite(F.scaled_dot_product_attention(q, k, v_nan, attn_mask=_band(S, half))).all()
    assert fa.window_pairs(S, half) == int(_band(S, half).sum())


def _site(methods=("ast", "wars+asc", "wars", "asc"), plan=None, window=0.125):
    """A site entry with DiTFastAttn, as the pass makes it, and its run (state, plan)."""
    state = RunState()
    state.steps_counted = True  # as under a pipeline: the test sets state.step
    run = fa.FastAttnRun(state, 0.05, window, 2, "test")
    run.set_plan(plan)
    table = SiteTable()
    entry = table.add("sdpa", "self", "blocks.0.attn")
    fast = fa.FastAttnSite("blocks.0.attn", 0, 1, window, tuple(methods), (4, 3, 40, 40, 8), run=run)
    entry = table.refine(entry.site, fast=fast)
    return entry, run, state


def test_each_technique_against_a_direct_computation():
    plan = {"blocks.0.attn": ["full", "wars", "ast", "wars+asc", "asc", "wars", "full"]}
    entry, run, state = _site(plan=plan)
    site = torch.tensor(entry.site)
    g = torch.Generator().manual_seed(0)
    qkv = [[torch.randn(4, 3, 40, 8, generator=g) for _ in range(3)] for _ in plan["blocks.0.attn"]]
    half = fa.half_width(40, 0.125)
    outs = []
    for t, (q, k, v) in enumerate(qkv):
        state.step = t
        outs.append(torch.ops.ditpass.attention(q, k, v, site))

    def full(t, rows=slice(None)):
        q, k, v = (x[rows] for x in qkv[t])
        return F.scaled_dot_product_attention(q, k, v)

    def window(t, rows=slice(None)):
        q, k, v = (x[rows] for x in qkv[t])
        return _window_ref(q, k, v, half)

    h = slice(0, 2)
    assert torch.equal(outs[0], full(0))  # full: the plain SDPA, bit for bit
    R0 = full(0) - window(0)
    assert torch.allclose(outs[1], window(1) + R0, atol=1e-5)  # WA-RS: window + the residual of step 0
    assert torch.equal(outs[2], outs[1])  # AST: the previous step's output
    assert torch.allclose(outs[3][h], window(3, h) + R0[h], atol=1e-5)  # WA-RS + ASC: first half ...
    assert torch.equal(outs[3][2:], outs[3][h])  # ... copied to the second
    assert torch.allclose(outs[4][h], full(4, h), atol=1e-6) and torch.equal(outs[4][2:], outs[4][h])  # ASC
    R4 = (full(4, h) - window(4, h)).repeat(2, 1, 1, 1)  # ASC refreshed R from its half
    assert torch.allclose(outs[5], window(5) + R4, atol=1e-5)
    assert torch.equal(outs[6], full(6))
    assert outs[0].transpose(1, 2).is_contiguous()  # the op's layout: [B, H, S, D] in [B, S, H, D] memory
    # one transformer call per step: a second non-full call at a step is refused
    state.step = 1
    torch.ops.ditpass.attention(*qkv[1], site)
    with pytest.raises(RuntimeError, match="twice at step 1"):
        torch.ops.ditpass.attention(*qkv[1], site)
    # an odd batch has no CFG halves: ASC falls back to full attention
    entry, run, state = _site(plan={"blocks.0.attn": ["full", "asc"]})
    state.step = 1
    q, k, v = (x[:3] for x in qkv[1])
    assert torch.equal(torch.ops.ditpass.attention(q, k, v, torch.tensor(entry.site)),
                       F.scaled_dot_product_attention(q, k, v))


def test_caches_reset_between_generations():
    plan = {"blocks.0.attn": ["full", "ast"]}
    entry, run, state = _site(plan=plan)
    site = torch.tensor(entry.site)
    x = torch.randn(2, 3, 40, 8)
    state.step = 0
    first = torch.ops.ditpass.attention(x, x, x, site)
    assert [n for n in state.buffers] == [f"fastattn.{entry.site}.out"]  # only what the plan reads later
    state.reset()
    assert all(not b.any() for b in state.buffers.values())
    y = x + 1
    state.step = 0
    torch.ops.ditpass.attention(y, y, y, site)
    state.step = 1
    assert not torch.equal(torch.ops.ditpass.attention(x, x, x, site), first)  # the new generation's step 0


def test_plan_checks_and_fields():
    with pytest.raises(PlanError, match="step 0 must be 'full'"):
        fa.check_plan({"a": ["ast", "full"]})
    with pytest.raises(PlanError, match="unknown method"):
        fa.check_plan({"a": ["full", "window"]})
    with pytest.raises(PlanError, match="only matter"):
        ditpass.Plan(fastattn_threshold=0.1)
    with pytest.raises(PlanError, match="fraction"):
        ditpass.Plan(fastattn=True, fastattn_window=64)
    with pytest.raises(PlanError, match="cuda_graphs"):
        ditpass.Plan(fastattn=True, cuda_graphs=True)
    p = ditpass.Plan.parse("fastattn=true,fastattn_threshold=0.2,fastattn_window=0.25,fastattn_calib=3")
    assert (p.fastattn_threshold, p.fastattn_window, p.fastattn_calib) == (0.2, 0.25, 3)
    assert ditpass.Plan.from_json(p.to_json()) == p


# ---- the built-in digits model: calibration, threshold 0, save / load, explain --------------------


@pytest.fixture(scope="module")
def digits_pipe():
    from ditpass.models import digits

    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _digits(pipe, plan):
    """``pipe`` with its transformer re-wrapped for ``plan``: the same module, so its captures are reused."""
    return ditpass.parallelize(pipe, plan.replace(fastattn_calib=2) if plan.fastattn is True else plan)


def _generate(pipe, steps=6, seed=0):
    from ditpass.models import digits

    return digits.generate([3, 7], seed=seed, steps=steps, pipe=pipe, output_type="pt")


def _calibrate(pipe, threshold, steps=6, save=None):
    return fa.calibrate(pipe, list(range(10)), save=save, num_inference_steps=steps, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(0), output_type="pt")


@needs_digits
def test_digits_threshold_zero_exact_save_load_and_explain(tmp_path, digits_pipe):
    plain = _generate(_digits(digits_pipe, ditpass.Plan()))  # the same graph without DiTFastAttn
    exact = _digits(digits_pipe, ditpass.Plan(fastattn=True, fastattn_threshold=0.0))
    plan = _calibrate(exact, 0.0)
    assert all(m == "full" for methods in plan.values() for m in methods)
    assert torch.equal(_generate(exact), plain)  # threshold 0: full attention, bit for bit

    lossy = _digits(digits_pipe, ditpass.Plan(fastattn=True, fastattn_threshold=0.2))
    path = tmp_path / "plan.json"
    plan = _calibrate(lossy, 0.2, save=path)
    assert all(methods[0] == "full" for methods in plan.values())
    used = {m for methods in plan.values() for m in methods[1:]}
    assert used - {"full"}, plan  # something was compressed
    a, b = _generate(lossy), _generate(lossy)
    assert torch.equal(a, b)  # the caches reset: the same seed, the same pictures
    assert 0 < (a - plain).abs().max() < 0.5
    saved = json.loads(path.read_text())
    assert saved["sites"] == plan and saved["steps"] == 6 and saved["threshold"] == 0.2
    loaded = _digits(digits_pipe, ditpass.Plan(fastattn=str(path)))
    assert torch.equal(_generate(loaded), a)  # a production run from the file: no calibration, same pictures

    text = str(ditpass.explain(loaded.transformer))
    assert "compression plan, method per step" in text and "of the attention FLOPs saved" in text
    res = next(r for r in loaded.transformer.ditpass_records[0].results if r.name == "fastattn")
    assert 0 < res.details["attn_flops_saved"] < 1 and res.details["plan"] == plan

    greedy = _digits(digits_pipe, ditpass.Plan(fastattn=True, fastattn_threshold=1e9))
    plan = _calibrate(greedy, 1e9, steps=3)  # every candidate passes: the first one, AST, is kept
    assert all(methods == ["full", "ast", "ast"] for methods in plan.values()), plan
    uncalibrated = _digits(digits_pipe, ditpass.Plan(fastattn=True))
    with pytest.raises(Exception, match="no compression plan yet"):
        _generate(uncalibrated, steps=2)


# ---- two processes: Ulysses and CFG parallel equal the single-process DiTFastAttn run ------------

STEPS = 6
# every method at every site, WA-RS after an ASC refresh too
HAND_PLAN = ["full", "wars", "ast", "wars+asc", "asc", "wars"]


def _flux_batch2():
    model, inputs = tiny_flux()  # 15 image + 7 text tokens: Ulysses pads both segments
    g = torch.Generator().manual_seed(2)
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        x = inputs[name]
        inputs[name] = torch.cat([x, x + 0.1 * torch.randn(x.shape, generator=g)])
    inputs["timestep"] = inputs["timestep"].repeat(2)
    inputs["guidance"] = inputs["guidance"].repeat(2)
    return model, inputs


def _loop(pm, inputs):
    """STEPS calls, the latent moving a little each step; without a pipeline each call is a step."""
    pm.ditpass_state.reset()
    x = inputs["hidden_states"]
    outs = []
    with torch.no_grad():
        for _ in range(STEPS):
            y = first_output(pm(**{**inputs, "hidden_states": x}))
            outs.append(y)
            x = x - 0.1 * y
    return torch.stack(outs)


def _ranks(rank, world, model, inputs, ref, plan_path):
    import warnings

    warnings.filterwarnings("ignore")
    out = {}
    for name, fields in (("ulysses", dict(ulysses=2)), ("cfg", dict(cfg=2))):
        pm = ditpass.parallelize(model, ditpass.Plan(fastattn=plan_path, **fields))
        out[name] = _loop(pm, inputs)
        rec = pm.ditpass_records[0]
        out[name + "_strategies"] = [s.describe() for s in rec.sites]
    return out


def test_two_processes_ulysses_and_cfg_equal_one(tmp_path):
    model, inputs = _flux_batch2()
    keys = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    path = tmp_path / "plan.json"
    run = fa.FastAttnRun(RunState(), 0.0, 0.25, 1, "test")
    run.set_plan({k: HAND_PLAN for k in keys})
    fa.save_plan(path, run)
    one = _loop(ditpass.parallelize(model, ditpass.Plan(fastattn=str(path))), inputs)
    full = _loop(ditpass.parallelize(model, ditpass.Plan()), inputs)
    assert (one - full).abs().max() > 1e-3  # the plan changes the result ...
    _, results = run_forked(_ranks, 2, model, inputs, str(path), timeout=300)
    for r in results:
        for name in ("ulysses", "cfg"):
            assert (r[name] - one).abs().max() < 1e-4, (name, (r[name] - one).abs().max())  # ... the same on 2 ranks
        for name in ("ulysses", "cfg"):
            assert all("fastattn 1F 2W 1S 1WC 1C" in s for s in r[name + "_strategies"]), r[name + "_strategies"]


# ---- the CLI ------------------------------------------------------------------------------------


def _cli(tmp_path, name, *flags, nproc=1):
    out = tmp_path / name
    proc = run_generate(out, *flags, nproc=nproc, steps=6, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out, saved_images(out)


@needs_digits
def test_cli_use_fast_attn_alone_and_with_cfg_parallel(tmp_path):
    proc, out, one = _cli(tmp_path, "one", "--use_fast_attn", "--threshold", "0.1", "--n_calib", "2")
    assert "DiTFastAttn: calibrated" in proc.stdout
    plan = out / "fastattn_plan.json"
    assert json.loads(plan.read_text())["n_calib"] == 2
    proc, _, two = _cli(tmp_path, "cfg", "--use_cfg_parallel", "--fast_attn_plan", str(plan), nproc=2)
    assert "Plan(cfg=2, fastattn=" in proc.stdout
    assert len(one) == len(two) == 2 and all(np.abs(a - b).max() <= 1 for a, b in zip(one, two))
    bad = subprocess.run([sys.executable, "-m", "ditpass", "generate", "--fast_attn_plan", str(tmp_path / "no.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "cannot read the plan file" in bad.stderr
