"""explain, the SVG picture and `python -m ditpass inspect`, on tiny FLUX built on the meta device.

The two command runs start as subprocesses when the module starts and run while the in-process
tests capture their own copy; the command tests collect their output at the end.
"""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import ditpass
from ditpass.tools.cli import main
from ditpass.tools.explain import dry_run, explain
from ditpass.models import NAMES, build, dynamic_dims, make_inputs
from ditpass.plan import Plan
from ditpass.tools.render import to_svg

FLUX = "FluxTransformer2DModel"
SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ditpass", "inspect", "--model", FLUX]
    procs = {
        "plain": subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
        "plan": subprocess.Popen(cmd + ["--plan", "ulysses=2", "--svg", str(out / "g.svg"), "--json",
                                        str(out / "e.json")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
    }
    results = {}

    def get(name):
        if name not in results:
            stdout, stderr = procs[name].communicate(timeout=600)
            assert procs[name].returncode == 0, stderr[-3000:]
            results[name] = stdout
        return results[name]

    yield out, get
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def captured():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build(FLUX, "tiny", device="meta")
    cap = ditpass.capture(model, dynamic_shapes=dynamic_dims(FLUX, "tiny"), **make_inputs(FLUX, "tiny", device="meta"))
    yield cap
    torch.set_num_threads(old)


def _section(text: str, title: str) -> list[str]:
    """Data rows of the table under ``== title``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"== {title}"))
    rows = []
    for ln in lines[start + 3:]:
        if not ln.strip() or ln.startswith("=="):
            break
        rows.append(ln)
    return rows


def _joint_rows_text_first(rows: list[str]) -> bool:
    joint = [r for r in rows if re.search(r"\bjoint\b", r)]
    return bool(joint) and all(0 <= r.find("text[") < r.find("visual[") for r in joint)


def test_explain_captured(captured):
    e = explain(captured)
    text = str(e)
    assert "capture: export-dynamic" in text and "1 graph" in text
    assert "attention sites (4: joint x4)" in text
    sites = _section(text, "attention sites")
    assert len(sites) == 2  # runs of equal blocks fold: transformer_blocks.{0..1}, single_transformer_blocks.{0..1}
    assert "transformer_blocks.{0..1}.attn" in sites[0] and "single_transformer_blocks.{0..1}.attn" in sites[1]
    assert _joint_rows_text_first(sites)
    assert "== pass " not in text  # nothing ran
    d = json.loads(json.dumps(e.to_dict()))
    part = d["parts"][0]
    assert [s["kind"] for s in part["sites"]] == ["joint"] * 4
    assert [b["name"] for b in part["blocks"]] == ["transformer_blocks", "single_transformer_blocks"]
    assert {i["name"]: i["token_dims"] for i in part["inputs"]}["hidden_states"] == {"1": ["visual"]}
    assert len(_section(e.text(condense=False), "attention sites")) == 4


def test_explain_dry_run_and_svg(captured, tmp_path):
    result = dry_run(captured, Plan(ulysses=2))
    e = explain(result, graph=True)
    text = str(e)
    assert "DRY RUN as rank 0 of 2" in text
    sites = _section(text, "attention sites")
    assert sites and all(r.rstrip().endswith("joint: ulysses") for r in sites), sites
    d = e.to_dict()
    ps = {p["name"]: p for p in d["parts"][0]["passes"]}
    sp = ps["sequence_parallel"]
    assert sp["modified"] and sum(c["op"].startswith("all_to_all") for c in sp["collectives"]) == 4
    code = sp["graph_code"]
    assert code.count("torch.ops.ditpass.attention.default(") == 4 and code.count("torch.ops.ditpass.ulysses_send") == 4
    assert "== graph after pass sequence_parallel" in text
    inputs = {i["name"]: i["after"] for i in d["parts"][0]["inputs"]}
    assert inputs["hidden_states"].startswith("sharded along dim 1") and inputs["encoder_hidden_states"].startswith("sharded along dim 1")
    assert d["parts"][0]["outputs"][0]["after"].startswith("all-gathered along dim 1")

    svg = to_svg(result.graph_module, tmp_path / "g.svg", title="tiny flux")
    texts = [t.text or "" for t in ET.parse(tmp_path / "g.svg").getroot().iter(f"{SVG_NS}text")]
    assert sum(t.startswith("ulysses \u00b7 joint") for t in texts) == 4 and any(t.startswith("all_gather") for t in texts)
    assert len(svg) < 100_000


def test_explain_not_built_and_wrong_type():
    pm = ditpass.parallelize(torch.nn.Linear(2, 2), Plan())
    assert "not built yet: call it once" in str(explain(pm))
    with pytest.raises(TypeError, match="Captured"):
        explain(object())


def test_cli_unknown_model(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--model", "FluxTransformer"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean FluxTransformer2DModel" in err and all(n in err for n in NAMES)


def test_cli_inspect(cli_runs):
    _, get = cli_runs
    text = get("plain")
    assert "attention sites (4: joint x4)" in text
    assert _joint_rows_text_first(_section(text, "attention sites"))
    groups = _section(text, "block groups")
    assert [g.split()[0] for g in groups] == ["transformer_blocks", "single_transformer_blocks"]
    assert "DRY RUN" not in text


def test_cli_plan_svg_json(cli_runs):
    out, get = cli_runs
    text = get("plan")
    assert "DRY RUN as rank 0 of 2" in text and "== pass sequence_parallel" in text
    assert "all_to_all" in text and "all_gather" in text
    root = ET.parse(out / "g.svg").getroot()
    texts = [t.text or "" for t in root.iter(f"{SVG_NS}text")]
    assert sum(t.startswith("ulysses \u00b7 joint") for t in texts) == 4  # one per joint attention, in its block's box
    assert any(t.startswith("all_gather") for t in texts) and any(t.startswith("shard ") for t in texts)
    d = json.loads((out / "e.json").read_text())
    assert len({p["name"]: p for p in d["parts"][0]["passes"]}["sequence_parallel"]["collectives"]) == 5


def test_ditpass_explain_stays_the_function():
    """`ditpass.explain` is the function, also after the submodule `ditpass.explain` is imported
    (a lazy import inside the function used to replace it with the module after the first call)."""
    import importlib

    import ditpass

    mod = importlib.import_module("ditpass.tools.explain")
    assert callable(ditpass.explain) and ditpass.explain is mod.explain
    model = torch.nn.Linear(2, 2)
    pm = ditpass.parallelize(model, ditpass.Plan())
    for _ in range(2):  # the second call is the one that failed
        assert "not built yet" in str(ditpass.explain(pm))


def test_cli_inspect_plan_the_model_cannot_run_is_one_line(capsys):
    """A pass that refuses the model (PipeFusion on CogVideoX, which splits text and video inside attention)."""
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--model", "CogVideoXTransformer3DModel", "--plan", "pipefusion=2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--plan pipefusion=2: pass 'pipefusion' failed" in err and "transformer_blocks.0.attn1" in err
    assert "Traceback" not in err
