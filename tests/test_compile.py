"""A parallelized model compiled with inductor: region by region, repeated blocks compiled once, each
region one graph (fullgraph), same output."""
from __future__ import annotations

import pytest
import torch

import ditpass
from ditpass.backend import BackendError, compile_graph

from dist_utils import run_forked
from tiny_models import tiny_flux
from ditpass.models import zoo
from ditpass.backend.regional import RegionalModule

def _compiled(rank, world, model, inputs, ref, fields):
    import torch._dynamo

    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # forked: the parent's count comes along
    with torch.no_grad():
        pm = ditpass.parallelize(model, ditpass.Plan(**fields, compile="inductor"))
        out = pm(**inputs)[0]
        out2 = pm(**inputs)[0]  # the second call reuses every compiled region
    # fullgraph=True makes any graph break an error; count the graphs Dynamo made to be sure:
    # one per distinct region (template), not one per block
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    runner = pm.ditpass_records[0].runner
    compiled = sum(t["compiled"] for t in runner.templates.values())
    assert "backend: how the rewritten graph runs" in str(ditpass.explain(pm))  # what runs is visible
    return float((out - ref).abs().max()), float((out2 - ref).abs().max()), frames, compiled, len(runner.regions)


@pytest.mark.parametrize("fields", [dict(ulysses=2), dict(ring=2)], ids=["ulysses2", "ring2"])
def test_inductor_no_graph_break_same_output(fields):
    """ring=2 too: its kernel choice reads torch's SDPA flags, which Dynamo can't trace (it broke the
    compile on GPUs: 'torch.* op returned non-Tensor')."""
    model, inputs = tiny_flux()
    _, results = run_forked(_compiled, 2, model, inputs, fields, timeout=900)
    for diff, diff2, graphs, templates, regions in results:
        assert diff <= 1e-4 and diff2 <= 1e-4
        assert graphs == templates >= 2  # one graph per compiled block template: no break inside any
        assert regions >= 3


def test_repeated_blocks_share_one_template():
    """FLUX tiny with 3 double and 4 single blocks: the blocks of one kind share compiled code (the
    last of each list may differ: it hands on fewer values), and running region by region is exact."""
    cfg = dict(zoo.config("FluxTransformer2DModel", "tiny"), num_layers=3, num_single_layers=4)
    torch.manual_seed(0)
    model = type(zoo.build("FluxTransformer2DModel", "tiny"))(**cfg).eval()
    inputs = zoo.make_inputs("FluxTransformer2DModel", "tiny")
    with torch.no_grad():
        ref = model(**inputs)[0]
        gm = ditpass.parallelize(model, ditpass.Plan()).build(**inputs).graph_module
        compiled = []
        rm = RegionalModule(gm, lambda g: compiled.append(g) or g)  # "compile" = identity: count them
        out = rm(**inputs)[0]
    assert float((out - ref).abs().max()) == 0.0
    blocks = [r for r in rm.regions if r.block]
    assert len(blocks) == 7
    assert len(compiled) == len([t for t in rm.templates.values() if t["compiled"]]) <= 4  # <= 2 per block list
    used = {r.template for r in blocks if r.block.startswith("single")}
    assert len(used) <= 2 and len([r for r in blocks if r.block.startswith("single")]) == 4
    assert "regions" in rm.describe()


def test_onediff_missing_is_a_clear_error():
    try:
        import nexfort  # noqa: F401
        pytest.skip("nexfort is installed")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="onediff and nexfort"):
        compile_graph(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), "nexfort")
