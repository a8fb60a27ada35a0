"""The one-line API: ``ditpass.parallelize(model, plan)``.

The returned module behaves like the original (same forward inputs and full outputs on every
rank, same attributes through ``__getattr__``, same parameters, not copies). The graph is
captured, analysed and rewritten on the first call of each input signature and cached; every
step's result is in ``.ditpass_records`` for `ditpass.explain`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from .analysis import analyze
from .capture import capture, signature_of
from .mesh import ParallelDims, init_distributed
from .pass_base import PassContext, PassResult, run_passes
from .plan import Plan

__all__ = ["parallelize", "ParallelModule", "Record"]


@dataclass
class Record:
    """What was done for one input signature: capture, analysis and every pass's result."""

    signature: tuple
    captured: Any
    analysis: Any
    results: list[PassResult] = field(default_factory=list)
    graph_module: torch.fx.GraphModule | None = None
    runner: Any = None  # what forward calls: the graph module, or its compiled form


def _group_name(mesh, axis) -> str:
    if mesh is None:
        return ""
    return mesh[axis].get_group().group_name


class ParallelModule(torch.nn.Module):
    """A transformer run through ditpass's passes. Call it exactly like the original."""

    def __init__(self, module: torch.nn.Module, plan: Plan, dynamic_shapes: Any = "auto"):
        super().__init__()
        self.module = module  # registered: parameters are the original ones
        self.plan = plan
        self.dynamic_shapes = dynamic_shapes
        rank, world = init_distributed()
        self.rank, self.world_size = rank, world
        self.dims = ParallelDims(plan, world)
        self.mesh = self.dims.build_mesh() if world > 1 else None
        self._records: dict[tuple, Record] = {}
        # dp x cfg: each call's batch is split over those ranks, outputs gathered (runtime/batch.py)
        from .runtime.batch import BatchSplit

        self.batch_split = BatchSplit.from_plan(plan, self.dims, rank, self.mesh, type(module).__name__)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    @property
    def ditpass_records(self) -> list[Record]:
        return list(self._records.values())

    def seq_config(self):
        from ditpass.passes.sequence_parallel import SeqConfig

        c = self.dims.coords(self.rank)
        u, r = self.plan.ulysses, self.plan.ring
        sp_group = ""
        if self.mesh is not None and u * r > 1:
            sp_group = (self.mesh["ring", "ulysses"]._flatten("sp") if u > 1 and r > 1
                        else self.mesh["ulysses" if u > 1 else "ring"]).get_group().group_name
        return SeqConfig(n=u * r, u=u, r=r, p=c["ring"] * u + c["ulysses"], ulysses_rank=c["ulysses"],
                         ring_rank=c["ring"], sp_group=sp_group,
                         ulysses_group=_group_name(self.mesh, "ulysses") if u > 1 else "",
                         ring_group=_group_name(self.mesh, "ring") if r > 1 else "")

    def build(self, *args, **kwargs) -> Record:
        """Capture, analyse and rewrite for these inputs (done by the first call automatically)."""
        from ditpass.passes.registry import transformer_passes

        sig = signature_of(args, kwargs)
        if sig in self._records:
            return self._records[sig]
        captured = capture(self.module, *args, dynamic_shapes=self.dynamic_shapes, **kwargs)
        if not captured.whole and self.plan.sp > 1:
            raise RuntimeError(
                f"{type(self.module).__name__} could only be captured in pieces ({captured.method}: "
                f"{'; '.join(captured.errors.values())}), and sequence parallelism needs one whole graph")
        # rewrite a copy of the graph: the captured one stays as the single-device reference
        gm = captured.graph_module
        if captured.whole:
            gm = torch.fx.GraphModule(gm, _copy_graph(gm.graph), type(gm).__name__)
        analysis = analyze(gm)
        ctx = PassContext(analysis, self.plan, self.dims, self.rank, self.mesh)
        ctx.details = {"seq_config": self.seq_config()}
        results = run_passes(gm, ctx, transformer_passes(self.plan)) if captured.whole else []
        from .backend import compile_graph

        runner = compile_graph(gm, self.plan.compile) if captured.whole else captured
        if self.plan.cuda_graphs:
            from .backend.cudagraph import GraphedStep

            runner = GraphedStep(runner)
        rec = Record(sig, captured, analysis, results, gm, runner)
        self._records[sig] = rec
        return rec

    def forward(self, *args, **kwargs):
        if self.batch_split is not None:  # this rank's rows of the batch; outputs all-gathered
            return self.batch_split.run(self._forward_local, self.module, args, kwargs)
        return self._forward_local(*args, **kwargs)

    def _forward_local(self, *args, **kwargs):
        runner = self.build(*args, **kwargs).runner
        with sdpa_backend(self.plan.attention):
            return runner(*args, **kwargs)


def sdpa_backend(name: str):
    """The context that makes SDPA use ``Plan.attention``'s kernel ("auto": torch's own choice).

    It sets torch's SDPA backend flags, which ``F.scaled_dot_product_attention`` and ditpass's ring
    attention (`ditpass.runtime.seq.sdpa_lse`) both follow."""
    if name == "auto":
        return contextlib.nullcontext()
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = graph._codegen
    return new


def parallelize(model: torch.nn.Module, plan: Plan | None = None, **plan_fields) -> torch.nn.Module:
    """Return ``model`` rewritten for ``plan`` (or ``Plan(**plan_fields)``).

    Under ``torchrun``: uses the default process group if one is initialised, else initialises it
    from torchrun's environment. Every rank passes the same full inputs and gets the full output.
    """
    plan = plan or Plan(**plan_fields)
    from . import components as pipeline

    pipeline.check_supported(plan)
    if pipeline.is_pipeline(model):  # a diffusers pipeline: its transformer(s) wrapped, pipe returned
        return pipeline.parallelize_pipeline(model, plan)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    plan.validate(world)
    return ParallelModule(model, plan)
