"""`ditpass generate` as a user runs it: the real command, one process and two (torchrun, gloo)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cli_utils import run_generate, saved_images

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "weights")


def _generate(tmp_path, name, *flags, nproc=1):
    out = tmp_path / name
    return run_generate(out, *flags, nproc=nproc), out


@pytest.mark.skipif(not os.path.isdir(WEIGHTS), reason="built-in digits weights not present")
def test_generate_one_and_two_processes_same_pictures(tmp_path):
    single, out1 = _generate(tmp_path, "one")
    assert single.returncode == 0, single.stderr[-2000:]
    assert "saved" in single.stdout and "s per step steady" in single.stdout
    out2 = tmp_path / "cfg"
    cfg = run_generate(out2, "--use_cfg_parallel", nproc=2, warnings=True)
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    assert "Plan(cfg=2) on 2 process(es)" in cfg.stdout
    # what the user's terminal shows: the capture said apart from the steps, and no warnings
    assert "the first transformer call captures" in cfg.stderr and "first transformer call (capture" in cfg.stderr
    assert "Warning" not in cfg.stderr and "warn(" not in cfg.stderr, cfg.stderr[-3000:]
    run = json.loads((out2 / "last_run.json").read_text())
    t = run["timing"]
    assert t["transformer_calls"] == 8 and t["steps"] == 8
    assert 0 < t["steady_step_s"] * t["steps"] < t["total_s"] and t["capture_s"] > 0  # the capture is not in the steps
    # files say which label they show; the contact sheet holds both pictures, labelled and upscaled
    assert [os.path.basename(f) for f in run["files"]] == ["digits_3_0_seed0.png", "digits_7_1_seed0.png"]
    sheet = Image.open(run["contact_sheet"])
    assert sheet.size[0] >= 2 * 160 and sheet.size[1] >= 160
    # PipeFusion with warm-up over all 8 steps: two stages, four patches, no stale K/V: the same pictures
    pf, out3 = _generate(tmp_path, "pf", "--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "4",
                         "--warmup_steps", "8", nproc=2)
    assert pf.returncode == 0, pf.stderr[-2000:]
    assert "Plan(pipefusion=2, patches=4, warmup_steps=8) on 2 process(es)" in pf.stdout
    a, b, c = saved_images(out1), saved_images(out2), saved_images(out3)
    assert len(a) == len(b) == len(c) == 2
    for x, y, z in zip(a, b, c):
        assert x.shape == y.shape == z.shape and np.abs(x - y).max() <= 1  # PNG rounding of float noise
        assert np.abs(x - z).max() <= 1


def test_pipefusion_with_cuda_graphs_says_not_built(tmp_path):
    proc, _ = _generate(tmp_path, "pf", "--plan", "pipefusion=2,cuda_graphs=true")
    assert proc.returncode != 0
    assert "cuda_graphs=True is not built yet" in proc.stderr + proc.stdout
