"""Plan(cuda_graphs=True): a clear error without CUDA, and the replay bookkeeping (inputs copied into
the recorded buffers, outputs copied out, one recording per input signature).

The recording itself needs a GPU: benchmarks/bench_perf.py runs it there and compares the output with
the single-GPU one. Here ``torch.cuda.graph`` is replaced by a stand-in whose replay re-runs the recorded
call on the recorded input buffers, which is what a CUDA graph does to them."""
from __future__ import annotations

import contextlib

import pytest
import torch

import ditpass
from ditpass.backend import cudagraph
from ditpass.backend.cudagraph import CudaGraphError, GraphedStep
from tiny_models import tiny_flux


def test_cpu_model_is_a_clear_error():
    model, inputs = tiny_flux()
    pm = ditpass.parallelize(model, ditpass.Plan(cuda_graphs=True))
    with torch.no_grad(), pytest.raises(CudaGraphError, match="cuda_graphs=False"):
        pm(**inputs)


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: remembers the call made while 'capturing'."""

    current = None

    def __init__(self):
        self.call = None

    def replay(self):
        self.call()

    def pool(self):
        return "pool"


def test_replay_copies_inputs_and_outputs(monkeypatch):
    calls = []

    def step(x, scale=1.0):
        calls.append(x.shape)
        out = x * scale + 1
        if _FakeGraph.current is not None:  # being recorded: replay recomputes into the same buffer
            g, buf = _FakeGraph.current, out
            g.call = lambda: buf.copy_(x * scale + 1)
        return (out,)

    @contextlib.contextmanager
    def fake_capture(graph, pool=None, capture_error_mode="global"):
        _FakeGraph.current = graph
        try:
            yield
        finally:
            _FakeGraph.current = None

    monkeypatch.setattr(cudagraph, "_require_cuda", lambda flat: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    g = GraphedStep(step, warmup=2)
    a, b = torch.randn(3), torch.randn(3)
    (ya,) = g(a)
    assert len(calls) == 3  # two warm-ups, one recording
    (yb,) = g(b)
    assert len(calls) == 3  # replayed, not run
    assert torch.equal(ya, a + 1) and torch.equal(yb, b + 1)  # ya is a copy: the replay for b left it alone
    (yc,) = g(torch.randn(5))  # a new shape: recorded again
    assert len(calls) == 6 and len(g.graphs) == 2
    (yd,) = g(a, scale=2.0)  # a new non-tensor value: recorded again
    assert torch.equal(yd, a * 2 + 1) and len(g.graphs) == 3
    assert "3 recorded" in g.describe()
