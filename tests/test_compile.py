"""A parallelized model compiled with inductor: one graph per forward (fullgraph), same output."""
from __future__ import annotations

import pytest
import torch

import ditpass
from ditpass.backend import BackendError, compile_graph

from dist_utils import run_distributed
from tiny_models import tiny_flux

_STATE: dict = {}


def _compiled(rank, world):
    import torch._dynamo

    model, inputs, ref = _STATE["model"], _STATE["inputs"], _STATE["ref"]
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # forked: the parent's count comes along
    with torch.no_grad():
        pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2, compile="inductor"))
        out = pm(**inputs)[0]
    # fullgraph=True makes any graph break an error; count the graphs Dynamo made to be sure
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    return float((out - ref).abs().max()), frames


def test_inductor_no_graph_break_same_output():
    model, inputs = tiny_flux()
    with torch.no_grad():
        ref = model(**inputs)[0]
    ditpass.capture(model, **inputs)
    _STATE.update(model=model, inputs=inputs, ref=ref)
    results = run_distributed(_compiled, 2, timeout=900, start_method="fork")
    for diff, graphs in results:
        assert diff <= 1e-4
        assert graphs == 1


def test_onediff_missing_is_a_clear_error():
    try:
        import nexfort  # noqa: F401
        pytest.skip("nexfort is installed")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="onediff and nexfort"):
        compile_graph(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), "nexfort")
