"""Plan(cuda_graphs=True): a clear error without CUDA, and GraphedStep's recording and replay (inputs
copied into the recorded buffers, outputs copied out, one recording per input signature).

On a GPU (benchmarks/gpu_checks.sh runs this file there) the real ``torch.cuda.graph`` records and
replays: a small module through GraphedStep, and a tiny FLUX through ``ditpass.parallelize``. Without
one, the bookkeeping is still checked with a stand-in for ``torch.cuda.graph`` whose replay re-runs the
recorded call on the recorded input buffers, which is what a CUDA graph does to them."""
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


# ---- the real recording, on a GPU -----------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="records real CUDA graphs: run on the GPU machine (benchmarks/gpu_checks.sh)")


class _Mlp(torch.nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.a, self.b = torch.nn.Linear(c, 4 * c), torch.nn.Linear(4 * c, c)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


@needs_cuda
def test_gpu_records_once_then_replays():
    torch.manual_seed(0)
    m = _Mlp().cuda().eval()
    calls = []

    def step(x, scale=1.0):
        calls.append(tuple(x.shape))
        return (m(x) * scale, {"sum": m(x).sum()})

    g = GraphedStep(step, warmup=2)
    a, b = torch.randn(4, 32, device="cuda"), torch.randn(4, 32, device="cuda")
    with torch.no_grad():
        eager_a, eager_b = m(a), m(b)
        ya, da = g(a)
        assert len(calls) == 3 and len(g.graphs) == 1  # two warm-ups, one recording
        yb, db = g(b)
        assert len(calls) == 3  # replayed: the Python step did not run
        torch.testing.assert_close(ya, eager_a, rtol=1e-5, atol=1e-5)  # a copy: b's replay left it alone
        torch.testing.assert_close(yb, eager_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db["sum"], eager_b.sum(), rtol=1e-4, atol=1e-4)
        assert (yb - ya).abs().max() > 1e-3  # a changed input changes the output: not a stale replay
        assert ya.data_ptr() != yb.data_ptr()
        b.mul_(-1)  # the same tensor changed in place: copied in again, replayed on the new values
        torch.testing.assert_close(g(b)[0], m(b), rtol=1e-5, atol=1e-5)
        assert len(calls) == 3
        c = torch.randn(8, 32, device="cuda")
        yc, _ = g(c)  # a new shape: a second graph
        assert len(calls) == 6 and len(g.graphs) == 2
        torch.testing.assert_close(yc, m(c), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g(a)[0], eager_a, rtol=1e-5, atol=1e-5)  # the first graph still replays
        assert len(calls) == 6
        yd, _ = g(a, scale=2.0)  # a new non-tensor value: a third graph
        assert len(calls) == 9 and len(g.graphs) == 3
        torch.testing.assert_close(yd, eager_a * 2, rtol=1e-5, atol=1e-5)
    assert "3 recorded" in g.describe()
    # the recorded graphs share one memory pool
    assert g.pool is not None


@needs_cuda
def test_gpu_parallelize_with_cuda_graphs_matches_eager():
    """ditpass.parallelize(..., Plan(cuda_graphs=True)) on one GPU: the rewritten step recorded at the
    first call, replayed at the next (new values, same shapes), both equal to the model's own output."""
    model, inputs = tiny_flux()
    model = model.cuda()
    dev = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    other = dict(dev, hidden_states=torch.randn_like(dev["hidden_states"]))
    pm = ditpass.parallelize(model, ditpass.Plan(cuda_graphs=True))
    with torch.no_grad():
        ref, ref_other = model(**dev)[0], model(**other)[0]
        out = pm(**dev)[0]
        runner = pm.ditpass_records[0].runner
        assert isinstance(runner, GraphedStep) and len(runner.graphs) == 1
        out_other = pm(**other)[0]
        assert len(pm.ditpass_records) == 1 and len(runner.graphs) == 1  # replayed, not recorded again
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_other, ref_other, rtol=1e-4, atol=1e-4)
    assert (out_other - out).abs().max() > 1e-3
    assert "CUDA graphs: 1 recorded" in str(ditpass.explain(pm))


@needs_cuda
def test_gpu_host_sync_is_a_clear_error():
    """A step that reads a value on the host can't be recorded: the error names the plan field.
    (Last in the file: a failed capture is the one thing here that could upset the CUDA context.)"""
    g = GraphedStep(lambda x: x * x.sum().item(), warmup=1)
    with torch.no_grad(), pytest.raises(CudaGraphError, match="cuda_graphs=False"):
        g(torch.randn(4, device="cuda"))
