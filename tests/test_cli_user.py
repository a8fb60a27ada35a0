"""The ``ditpass`` command as a new user meets it: instant help, one-line errors before any model loads,
file names from a sanitised slug inside the output folder, extra pipeline arguments, ``inspect`` of a user's
own model (a saved diffusers folder, ``module:Class``), and a dry run that refuses what ``parallelize`` refuses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from ditpass.tools import cli, generate


def _main(capsys, *argv):
    """``ditpass <argv>`` in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_help_is_instant_and_lists_the_zoo():
    code = ("import sys, time; t = time.perf_counter(); from ditpass.tools.cli import build_parser; "
            "build_parser().format_help(); assert 'torch' not in sys.modules, 'help imported torch'; "
            "print(time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 1.0
    helptext = subprocess.run([sys.executable, "-m", "ditpass", "inspect", "--help"], capture_output=True,
                              text=True, timeout=120).stdout
    assert "FluxTransformer2DModel" in helptext and "WanTransformer3DModel" in helptext


@pytest.mark.parametrize("flags, says", [
    (["--num_inference_steps", "0"], "--num_inference_steps 0: must be >= 1"),
    (["--num_inference_steps", "-1"], "--num_inference_steps -1: must be >= 1"),
    (["--guidance_scale", "nan"], "--guidance_scale nan: must be a finite number"),
    (["--num_pipeline_patch", "0"], "--num_pipeline_patch 0: must be >= 1"),
    (["--ulysses_degree", "0"], "--ulysses_degree 0: must be >= 1"),
    (["--device", "tpu"], "--device 'tpu': use cpu or cuda"),
    (["--model", "no/such/folder"], "neither 'digits' nor a local diffusers pipeline folder"),
    (["--seed", "-3"], "--seed -3: must be >= 0"),
    (["--timeout", "0"], "--timeout 0.0: must be > 0 seconds"),
    (["--pipeline_kwargs", "not-a-pair"], "write KEY=VALUE"),
    (["--ulysses_degree", "2"], "run it under torchrun --nproc_per_node=2"),
    (["--plan", "cfg=3"], "--plan: cfg=3"),
    (["--use_cfg_parallel", "--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "1"],
     "(flags: pipefusion is --pipefusion_parallel_degree; patches is --num_pipeline_patch)"),
])
def test_generate_bad_flags_are_one_line_before_any_model_loads(tmp_path, capsys, flags, says):
    t = time.perf_counter()
    status, out, err = _main(capsys, "generate", "--output_dir", str(tmp_path / "out"), *flags)
    assert status == 2 and says in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert time.perf_counter() - t < 5  # no pipeline was loaded, no process group waited for


def test_generate_unknown_label_unwritable_folder_and_unknown_pipeline_argument(tmp_path, capsys):
    status, _, err = _main(capsys, "generate", "--prompt", "11", "--output_dir", str(tmp_path / "a"))
    assert status == 2 and "this model draws class labels; known labels: 0, 1" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, _, err = _main(capsys, "generate", "--output_dir", str(blocker / "sub"))
    assert status == 2 and "is not a writable folder" in err
    status, _, err = _main(capsys, "generate", "--output_dir", str(tmp_path / "b"),
                           "--pipeline_kwargs", "use_resolution_binning=false")
    assert status == 2 and "'use_resolution_binning' is not a parameter of DiTPipeline.__call__" in err


def test_run_unknown_model_and_too_few_processes_are_one_line(capsys):
    status, _, err = _main(capsys, "run", "--model", "FluxTransformer2D")
    assert status == 2 and "did you mean FluxTransformer2DModel?" in err
    status, _, err = _main(capsys, "run", "--plan", "ring=2")
    assert status == 2 and "torchrun --nproc_per_node=2" in err
    status, _, err = _main(capsys, "run", "--height", "-8")
    assert status == 2 and "--height -8: must be >= 1" in err


def test_pipeline_kwargs_parse_and_reach_the_call():
    assert generate.pipeline_kwargs(["use_resolution_binning=false", "max_sequence_length=256", "mode=fast"]) == \
        dict(use_resolution_binning=False, max_sequence_length=256, mode="fast")
    assert generate.pipeline_kwargs(['{"a": [1, 2]}']) == {"a": [1, 2]}

    class Pipe:
        def __call__(self, prompt, num_inference_steps=20, guidance_scale=4.5, use_resolution_binning=True,
                     generator=None):
            pass

    kw = generate.call_kwargs(Pipe(), "folder", ["a cat"], num_inference_steps=3,
                              extra=dict(use_resolution_binning=False))
    assert kw["use_resolution_binning"] is False and kw["prompt"] == ["a cat"] and kw["num_inference_steps"] == 3
    with pytest.raises(generate.GenerateError, match="set by ditpass"):
        generate.call_kwargs(Pipe(), "folder", ["a"], extra=dict(generator=None))


def test_output_names_are_slugs_inside_the_folder(tmp_path):
    from PIL import Image

    assert generate.output_stem("digits", "3", 0, 0) == "digits_3_0_seed0"
    assert generate.output_stem("/models/PixArt-Sigma/", "A cat, on a MAT!", 1, 7) == "pixart-sigma_a-cat-on-a-mat_1_seed7"
    prompts = ["../../x", "/etc/passwd", "a/b", ""]
    images = types.SimpleNamespace(images=[Image.new("L", (8, 8), 40 * i) for i in range(4)], frames=None)
    saved, shown = generate.save_outputs(images, str(tmp_path), "digits", prompts, 0)
    video = types.SimpleNamespace(images=None, frames=[[Image.new("RGB", (8, 8))] * 3])
    saved += generate.save_outputs(video, str(tmp_path), "/some/model", ["../../../tmp/evil"], 0)[0]
    assert len(saved) == 5 and all(os.path.dirname(os.path.realpath(p)) == os.path.realpath(tmp_path) for p in saved)
    assert [os.path.basename(p) for p in saved] == [
        "digits_x_0_seed0.png", "digits_etc-passwd_1_seed0.png", "digits_a-b_2_seed0.png", "digits_prompt_3_seed0.png",
        "model_tmp-evil_0_seed0.gif"]
    sheet = generate.contact_sheet(shown, str(tmp_path / "sheet.png"))
    assert Image.open(sheet).size == (4 * 166 + 6, 160 + 18 + 12)


def test_plan_flag_takes_last_run_json(tmp_path):
    from ditpass.plan import Plan

    plan = Plan(cfg=2, ulysses=2)
    path = tmp_path / "last_run.json"
    path.write_text(json.dumps(dict(plan=plan.to_dict(), world=4, seconds=1.0, files=[])))
    assert generate.parse_plan(str(path)) == plan
    assert generate.parse_plan("ulysses=2,cfg=2") == plan


def test_inspect_a_saved_pipeline_folder(tmp_path, capsys):
    from ditpass.models import zoo

    zoo.build("FluxTransformer2DModel", "tiny").save_pretrained(tmp_path / "pipe" / "transformer")
    status, out, err = _main(capsys, "inspect", "--model", str(tmp_path / "pipe"), "--plan", "ulysses=2",
                             "--height", "128", "--width", "128", "--json", str(tmp_path / "x.json"))
    assert status == 0, err
    assert "FluxTransformer2DModel from" in out and "joint: ulysses" in out and "DRY RUN as rank 0 of 2" in out
    assert json.loads((tmp_path / "x.json").read_text())["header"]["model"] == "FluxTransformer2DModel"


class HandDiT(torch.nn.Module):
    """A user's own DiT, not in diffusers: patch tokens, two pre-norm attention blocks, SDPA."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(4, dim)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(dict(
            norm=torch.nn.LayerNorm(dim), qkv=torch.nn.Linear(dim, 3 * dim), out=torch.nn.Linear(dim, dim)))
            for _ in range(depth))
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, x):
        h = self.embed(x)
        b, n, d = h.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm"](h)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            h = h + blk["out"](a.transpose(1, 2).reshape(b, n, d))
        return self.head(h)


def hand_inputs(model, device="cpu", dtype=torch.float32, height=64, width=64, **_):
    return dict(x=torch.randn(1, (height // 8) * (width // 8), 4, device=device, dtype=dtype))


def test_inspect_module_class_with_inputs(capsys):
    status, out, err = _main(capsys, "inspect", "--model", "test_cli_user:HandDiT", "--inputs",
                             "test_cli_user:hand_inputs", "--device", "cpu", "--plan", "ulysses=2")
    assert status == 0, err
    assert "model: test_cli_user:HandDiT with its default config" in out
    sites = out.split("== attention sites")[1].split("\n== ")[0]
    assert "(2: self x2)" in sites and sites.count("self: ulysses") == 2


def test_inspect_checks_outputs_first_and_refuses_what_parallelize_refuses(tmp_path, capsys):
    t = time.perf_counter()
    status, _, err = _main(capsys, "inspect", "--model", "FluxTransformer2DModel", "--svg",
                           str(tmp_path / "missing" / "g.svg"))
    assert status == 2 and "does not exist or is not writable" in err and time.perf_counter() - t < 2
    status, _, err = _main(capsys, "inspect", "--model", "FluxTransformer2DModel", "--height", "-64")
    assert status == 2 and "--height -64: must be >= 1" in err
    status, _, err = _main(capsys, "inspect", "--model", "FluxTransformer2DModel", "--plan",
                           "pipefusion=2,cuda_graphs=true")
    assert status == 2 and "cuda_graphs=True is not built yet" in err
    status, _, err = _main(capsys, "inspect", "--model", "nope:Nothing")
    assert status == 2 and "cannot import it" in err


def test_sequence_parallel_that_shards_nothing_says_so():
    """DiT at its config size exports static token counts (models/EXPORT_NOTES.md): ulysses=2 is exact but
    every rank computes every site whole; parallelize must not keep that quiet. FLUX shards: no warning."""
    import warnings

    import ditpass
    from ditpass.models import zoo
    from ditpass.passes.sequence_parallel import ReplicatedWarning
    from ditpass.tools.explain import dry_run, explain

    def dry(name):
        cap = ditpass.capture(zoo.build(name, "tiny"), dynamic_shapes=zoo.dynamic_dims(name, "tiny"),
                              **zoo.make_inputs(name, "tiny"))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            text = str(explain(dry_run(cap, ditpass.Plan(ulysses=2))))
        return [w for w in seen if issubclass(w.category, ReplicatedWarning)], text

    seen, text = dry("DiTTransformer2DModel")
    assert len(seen) == 1
    msg = str(seen[0].message)
    assert msg.startswith("2 of 2 attention sites (100% of the attention FLOPs) run whole on every rank")
    assert "transformer_blocks.0.attn1" in msg
    assert msg in text  # explain's sequence_parallel notes say it too
    seen, text = dry("FluxTransformer2DModel")
    assert not seen and "run whole on every rank" not in text
