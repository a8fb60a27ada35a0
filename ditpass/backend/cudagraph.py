"""CUDA graphs: one step of the rewritten model recorded once and replayed (``Plan(cuda_graphs=True)``).

A DiT step that runs region by region still launches every kernel from Python: FLUX.1 at 1024^2 on
4 GPUs took 97 ms per step compiled for about 25 ms of GPU work (benchmarks/results/perf_flux.md,
finding 3). Recording the whole step, the collectives that the sequence-parallel pass inserted
included (NCCL >= 2.9.6 can be captured, and ProcessGroupNCCL keeps captured work away from its
watchdog), leaves one ``cudaGraphLaunch`` per step.

How: the first call with a new input signature (tensor shapes, dtypes, strides, devices and the
values of the non-tensor arguments) runs the step ``warmup`` times as usual (this is where
``torch.compile`` compiles and NCCL sets up its communicators), then records one more run with
``torch.cuda.graph`` on copies of the inputs. Every call copies its inputs into those copies,
replays, and returns a copy of the recorded outputs (so an output survives the next step). All
ranks record at the same call, as they run the same steps.

What it needs: CUDA tensors, shapes fixed per signature (a new size records a new graph), and no
host synchronisation inside the step (``.item()``, data-dependent shapes): capture fails on those,
and the error names this plan field. The graphs share one memory pool; each holds one step's
intermediate tensors.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

__all__ = ["GraphedStep", "CudaGraphError"]


class CudaGraphError(RuntimeError):
    """The step can't be recorded as a CUDA graph; the message says why and how to turn it off."""


def _signature(flat: list) -> tuple:
    return tuple(("tensor", tuple(x.shape), x.dtype, x.device, x.stride()) if isinstance(x, torch.Tensor)
                 else ("value", type(x).__name__, repr(x)) for x in flat)


def _require_cuda(flat: list) -> None:
    bad = [f"{tuple(x.shape)} on {x.device}" for x in flat if isinstance(x, torch.Tensor) and x.device.type != "cuda"]
    if bad or not torch.cuda.is_available():
        raise CudaGraphError(
            "Plan(cuda_graphs=True) records the step as a CUDA graph and needs every input tensor on a "
            f"CUDA device; got {', '.join(bad) or 'no CUDA'}. Move the model and inputs to the GPU or "
            "set cuda_graphs=False.")


class GraphedStep:
    """``runner`` called through CUDA graphs, one per input signature (see the module docstring)."""

    def __init__(self, runner, warmup: int = 2):
        self.runner = runner
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}  # (spec, signature) -> (graph, static inputs, static outputs)
        self.pool = None  # one memory pool shared by all of this step's graphs

    def __call__(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = (spec, _signature(flat))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._record(flat, spec)
        graph, static_in, static_out = entry
        for s, x in zip(static_in, flat):
            if isinstance(x, torch.Tensor) and s.data_ptr() != x.data_ptr():
                s.copy_(x)
        graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def _record(self, flat: list, spec):
        _require_cuda(flat)
        with torch.inference_mode(False):  # plain tensors, so any later call may copy into them
            static_in = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
        args, kwargs = pytree.tree_unflatten(static_in, spec)
        for _ in range(self.warmup):  # compiles, autotunes, sets up NCCL: none of it may be captured
            self.runner(*args, **kwargs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: NCCL's watchdog thread may query its (uncaptured) events meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_out = self.runner(*args, **kwargs)
        except RuntimeError as exc:
            raise CudaGraphError(
                f"recording the step as a CUDA graph failed ({type(exc).__name__}: {exc}). A step that "
                "synchronises with the host (.item(), a data-dependent shape, a CPU tensor) cannot be "
                "recorded; set Plan(cuda_graphs=False).") from exc
        self.pool = graph.pool()
        return graph, static_in, static_out

    def describe(self) -> str:
        inner = self.runner.describe() if hasattr(self.runner, "describe") else type(self.runner).__name__
        return (f"CUDA graphs: {len(self.graphs)} recorded (one per input signature, after {self.warmup} "
                f"warm-up runs), replaying:\n{inner}")
