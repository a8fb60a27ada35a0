"""Step caching: threshold 0 exact (every step computed), a positive threshold skipping steps and saying
which, TaylorSeer's forecast against a direct computation, 2-rank Ulysses and CFG runs deciding alike on
every rank and as one process does, the digits pipeline through ``ditpass generate``, the refusals."""
from __future__ import annotations

import os

import pytest
import torch

import ditpass
from ditpass.errors import PlanError
from ditpass.models import zoo
from ditpass.runtime.step_cache import forecast

from cli_utils import run_generate, saved_images
from dist_utils import run_forked

FLUX = "FluxTransformer2DModel"  # tiny: 2 + 2 blocks, image and text streams


def _trajectory(inputs: dict, n: int) -> list[dict]:
    """``n`` calls along a made-up denoising path: the latent moves towards noise, less at each step, and
    the timestep by half a unit of FLUX's ``1000 t`` (the random model's residual follows the timestep's
    sinusoids closely). Metrics against the last computed step: 0.13, 0.24, 0.11, 0.20, 0.09, 0.18."""
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(inputs["hidden_states"].shape, generator=g)
    out = []
    for t in range(n):
        a = 1.0 - 0.3 * (1 - 0.7 ** t)
        out.append({**inputs, "hidden_states": a * inputs["hidden_states"] + (1 - a) * noise,
                    "timestep": inputs["timestep"] - 0.0005 * t})
    return out


def _run(pm, calls, generations=1):
    outs = []
    with torch.no_grad():
        for _ in range(generations):
            pm.ditpass_state.reset()
            outs.append([pm(**kw)[0] for kw in calls])
    return outs


@pytest.fixture(scope="module")
def flux():
    model = zoo.build(FLUX, "tiny").eval()
    inputs = zoo.make_inputs(FLUX, "tiny", batch=2)
    return model, inputs


def test_threshold_zero_is_exact_every_step_computed(flux):
    model, inputs = flux
    calls = _trajectory(inputs, 5)
    with torch.no_grad():
        ref = [model(**kw)[0] for kw in calls]
    pm = ditpass.parallelize(model, ditpass.Plan(step_cache="fbcache", cache_threshold=0.0))
    for outs in _run(pm, calls, generations=3):  # the state reset by hand between generations
        for a, b in zip(outs, ref):
            assert torch.equal(a, b)
    runner = pm.ditpass_records[0].runner
    assert len(runner.log) == 3
    for gen in range(3):
        assert runner.summary(gen) == {"calls": 5, "computed": 5, "cached": 0, "cached_steps": []}
    assert all(c["metric"] > 0 for c in runner.log[-1][1:])  # measured, never below 0


def test_positive_threshold_skips_steps_and_says_which(flux):
    model, inputs = flux
    calls = [inputs] * 7  # the same inputs at every step: the residual does not change
    with torch.no_grad():
        ref = model(**inputs)[0]
    plan = ditpass.Plan(step_cache="fbcache", cache_threshold=0.05, cache_warmup_steps=2, cache_max_skip=2)
    pm = ditpass.parallelize(model, plan)
    (outs,) = _run(pm, calls)
    runner = pm.ditpass_records[0].runner
    # steps 0, 1 warm-up; then two cached, one computed (max_skip), two cached, ...
    assert [c["action"] for c in runner.log[-1]] == ["computed", "computed", "cached", "cached", "computed",
                                                     "cached", "cached"]
    assert runner.summary() == {"calls": 7, "computed": 3, "cached": 4, "cached_steps": [2, 3, 5, 6]}
    for out in outs:  # head output + (middle output - head output): the same values, within rounding
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    text = ditpass.explain(pm).text()
    assert "step cache cut" in text and "3 of 7 calls computed the middle blocks, 4 reused them" in text
    assert "transformer_blocks.1 .. single_transformer_blocks.1 (3)" in text  # the middle part
    # a new generation starts a new record (the hook, or a reset by hand)
    _run(pm, calls[:3])
    assert len(runner.log) == 2 and runner.summary()["calls"] == 3


def test_forecast_is_the_polynomial_through_the_points():
    r0, r1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(forecast([(4, r1)], 9), r1)
    # first order: r1 + (r1 - r0) * (t - t1) / (t1 - t0)
    torch.testing.assert_close(forecast([(2, r0), (5, r1)], 7), r1 + (r1 - r0) * 2 / 3)
    # second order reproduces a quadratic exactly
    f = lambda t: torch.tensor([t * t - 3.0 * t + 1, 0.5 * t * t + 2])  # noqa: E731
    torch.testing.assert_close(forecast([(1, f(1)), (3, f(3)), (4, f(4))], 7), f(7))


def test_taylorseer_cached_step_is_the_forecast_against_a_direct_computation(flux):
    """Steps 0, 1 computed; step 2 cached: the tail on head(step 2) + 2 r1 - r0 (r: middle output - input)."""
    model, inputs = flux
    calls = _trajectory(inputs, 3)
    plan = ditpass.Plan(step_cache="taylorseer", cache_threshold=10.0, cache_warmup_steps=2, cache_order=1)
    pm = ditpass.parallelize(model, plan)
    (outs,) = _run(pm, calls)
    runner = pm.ditpass_records[0].runner
    assert [c["action"] for c in runner.log[-1]] == ["computed", "computed", "cached"]
    p = runner.parts
    (j, (kind, i)), = [(j, s) for j, s in enumerate(p.streams) if s[0] == "residual"]
    res, heads = [], []
    with torch.no_grad():
        for kw in calls:
            flat = list(runner.inputs(**kw))
            head = list(p.head(*flat))
            h, em, et = head[:p.n_middle_in], [head[k] for k in p.middle_extra], [head[k] for k in p.tail_extra]
            res.append(list(p.middle(*flat, *h, *em))[j] - h[i])
            heads.append((flat, h, em, et))
        flat, h, em, et = heads[2]
        m = list(p.middle(*flat, *h, *em))
        m[j] = h[i] + res[1] + (res[1] - res[0])  # first order, equal gaps
        want = p.tail(*flat, *m, *et)[0]
    torch.testing.assert_close(outs[2], want, rtol=1e-5, atol=1e-6)
    # and the forecast is not the plain reuse
    assert not torch.allclose(want, outs[1])


def _ranks_worker(rank, world, model, inputs, ref, fields, calls):
    pm = ditpass.parallelize(model, ditpass.Plan(**fields))
    (outs,) = _run(pm, calls)
    runner = pm.ditpass_records[0].runner
    return [c["action"] for c in runner.log[-1]], [c["metric"] for c in runner.log[-1]], outs


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(cfg=2)])
def test_two_ranks_decide_alike_and_as_one_process(flux, degrees):
    model, inputs = flux
    calls = _trajectory(inputs, 7)
    cache = dict(step_cache="fbcache", cache_threshold=0.15, cache_max_skip=3)
    single = ditpass.parallelize(model, ditpass.Plan(**cache))
    (want,) = _run(single, calls)
    log = single.ditpass_records[0].runner.log[-1]
    actions = [c["action"] for c in log]
    assert "cached" in actions and actions.count("computed") > 1, [c["metric"] for c in log]
    _, results = run_forked(_ranks_worker, 2, model, inputs, {**cache, **degrees}, calls, timeout=240)
    for got_actions, metrics, outs in results:
        assert got_actions == actions  # every rank, and as one process
        for m, c in zip(metrics, log):
            assert (m is None) == (c["metric"] is None) and (m is None or abs(m - c["metric"]) < 1e-4)
        for a, b in zip(outs, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert results[0][1] == results[1][1]  # one all-reduced number on both ranks


def test_cut_with_last_blocks_and_more_first_blocks(flux):
    model, inputs = flux
    calls = [inputs] * 3
    with torch.no_grad():
        ref = model(**inputs)[0]
    plan = ditpass.Plan(step_cache="fbcache", cache_threshold=0.5, cache_first_blocks=2, cache_last_blocks=1)
    pm = ditpass.parallelize(model, plan)
    (outs,) = _run(pm, calls)
    record = pm.ditpass_records[0]
    blocks = record.results[-1].details["blocks"]
    assert blocks == [["transformer_blocks.0", "transformer_blocks.1"], ["single_transformer_blocks.0"],
                      ["single_transformer_blocks.1"]]
    assert record.runner.summary()["cached"] == 2
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_refusals():
    with pytest.raises(PlanError, match="only matter.* to the step cache"):
        ditpass.Plan(cache_threshold=0.2)
    with pytest.raises(PlanError, match="cuda_graphs=False"):
        ditpass.Plan(step_cache="fbcache", cuda_graphs=True)
    with pytest.raises(PlanError, match="TaylorSeer's forecast order"):
        ditpass.Plan(step_cache="fbcache", cache_order=2)
    with pytest.raises(PlanError, match="choose one of 'fbcache', 'taylorseer'"):
        ditpass.Plan(step_cache="magcache")
    from ditpass.passes.registry import check_built

    with pytest.raises(PlanError, match="pipefusion=2 is not built"):
        check_built(ditpass.Plan(step_cache="fbcache", pipefusion=2))
    with pytest.raises(PlanError, match="calibrate without step_cache"):
        check_built(ditpass.Plan(step_cache="fbcache", fastattn=True))
    check_built(ditpass.Plan(step_cache="fbcache", fastattn="plan.json"))  # a saved DiTFastAttn plan: fine
    with pytest.raises(PlanError, match="leave no block to cache"):
        ditpass.Plan(step_cache="fbcache", cache_first_blocks=3, cache_last_blocks=1).validate(num_blocks=4)
    assert ditpass.Plan.parse("step_cache=taylorseer,cache_order=2,cache_threshold=0.1") == ditpass.Plan(
        step_cache="taylorseer", cache_order=2, cache_threshold=0.1)


WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "weights")
def _generate(tmp_path, name, *flags, nproc=1):
    return run_generate(tmp_path / name, *flags, nproc=nproc)


@pytest.mark.skipif(not os.path.isdir(WEIGHTS), reason="built-in digits weights not present")
def test_digits_generate_with_the_cache_alone_and_with_cfg_parallel(tmp_path):
    import numpy as np

    flags = ["--cache_method", "taylorseer", "--cache_threshold", "0.2"]
    one = _generate(tmp_path, "one", *flags)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "Plan(step_cache='taylorseer', cache_threshold=0.2) on 1 process(es)" in one.stdout
    assert "step cache (transformer): 6 of 8 steps computed, 2 reused (steps [1, 4])" in one.stdout
    two = _generate(tmp_path, "cfg", *flags, "--use_cfg_parallel", nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "step cache (transformer): 6 of 8 steps computed, 2 reused (steps [1, 4])" in two.stdout
    images = [saved_images(tmp_path / name) for name in ("one", "cfg")]
    for a, b in zip(*images):
        assert np.abs(a - b).max() <= 1  # PNG rounding of float noise



def test_generate_flags_make_the_plan_and_refuse_pipefusion():
    import argparse

    from ditpass.tools.generate import GenerateError, add_arguments, plan_from_args

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    plan = plan_from_args(ap.parse_args(["--cache_method", "taylorseer", "--cache_threshold", "0.1",
                                         "--cache_last_blocks", "1", "--cache_order", "2", "--ulysses_degree", "2"]))
    assert plan == ditpass.Plan(ulysses=2, step_cache="taylorseer", cache_threshold=0.1, cache_last_blocks=1,
                                cache_order=2)
    with pytest.raises(GenerateError, match="pipefusion=2 is not built"):  # (the CLI prints it as one line)
        plan_from_args(ap.parse_args(["--cache_method", "fbcache", "--pipefusion_parallel_degree", "2"]))
    with pytest.raises(GenerateError, match="only matter"):
        plan_from_args(ap.parse_args(["--cache_threshold", "0.1"]))


def test_compiled_parts_with_the_decision_outside(flux):
    """compile='inductor': each part compiled on its own (regions), the decision between them, on the host."""
    model, inputs = flux
    calls = [inputs] * 3
    with torch.no_grad():
        ref = model(**inputs)[0]
    pm = ditpass.parallelize(model, ditpass.Plan(step_cache="taylorseer", cache_threshold=0.5, compile="inductor"))
    (outs,) = _run(pm, calls)
    runner = pm.ditpass_records[0].runner
    assert runner.summary()["cached"] == 2
    assert "compiled" in runner._middle.describe()
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
