"""`ParallelModule`: a transformer run through ditpass's passes; call it exactly like the original.

The returned module behaves like the original (same forward inputs and full outputs on every rank,
same attributes through ``__getattr__``, same parameters, not copies). On the first call of each
input signature the graph is captured and built (`ditpass.build.build`) and the `Record` cached in
``.ditpass_records`` for `ditpass.explain`. ``.ditpass_state`` is the state across the calls of one
generation (`ditpass.runtime.state.RunState`), reset by the pipeline hook.

What a call makes sure of, so that a run never gives a silently wrong result nor hangs silently:

- **Same inputs on every rank** (``Plan.check_inputs``): on the first call of each input signature
  (or every call), the ranks compare the signature of every input (shapes, dtypes, other arguments)
  and a checksum of every tensor (two float64 sums, on its device), in one ``all_gather_object`` of
  the world; a mismatch raises `InputMismatchError` naming the inputs and the ranks.
- **Current weights**: the graphs hold the parameter and buffer objects they were captured with, and
  compiled code aliases their storage. Each call checks that the module's parameters, buffers and
  submodules are what they were when the graphs were built (`ditpass.capture.Weights`: object
  identity, data pointer, dtype; no device work): a replaced layer or parameter,
  ``load_state_dict(assign=True)``, ``w.data = ...`` or ``model.half()`` rebuilds. In-place writes (``w.copy_(...)``, ``load_state_dict``) need nothing.
  Inside a pipeline call the check runs at its first transformer call only (about 0.8 ms of host time for
  FLUX.1's ~1000 tensors: not per step, where a CUDA-graphed step takes about 1 ms of host time in all).
- **Which inputs are per-sample** (``dp x cfg``): the full call is captured once per signature, and
  an input whose dim 0 its symbolic sizes prove to be another size is not split
  (`ditpass.runtime.batch`) although it has as many rows as the batch (FLUX's ``txt_ids`` with as
  many text tokens as prompts: the text length of ``encoder_hidden_states``).
- **Timeouts**: a collective that times out (`ditpass.mesh.timeout_seconds`) raises
  `DistributedTimeout` naming the collective, the rank and the call and step.
"""
from __future__ import annotations

import enum
import inspect
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .build import Record, build
from .capture import Weights, capture, signature_of
from .errors import InputMismatchError, PlanError
from .mesh import ParallelDims, init_distributed, timeout_error
from .plan import Plan
from .runtime import lazy
from .runtime.batch import BatchSplit
from .runtime.seq import sdpa_backend
from .runtime.state import RunState

__all__ = ["ParallelModule"]

log = logging.getLogger("ditpass.module")


class ParallelModule(torch.nn.Module):
    """A transformer run through ditpass's passes. Call it exactly like the original."""

    def __init__(self, module: torch.nn.Module, plan: Plan, dynamic_shapes: Any = "auto"):
        super().__init__()
        from ditpass.passes.registry import check_built

        check_built(plan)
        self.module = module  # registered: parameters are the original ones
        self.plan = plan
        self.dynamic_shapes = dynamic_shapes
        rank, world = init_distributed()
        self.rank, self.world_size = rank, world
        dims = ParallelDims(plan, world)
        # every rank builds the mesh and its flattened groups here, together (collective)
        self.placement = dims.placement(rank, dims.build_mesh() if world > 1 else None)
        self.ditpass_state = RunState()
        self._records: dict[tuple, Record] = {}
        self._weights: Weights | None = None  # the module's weights after the last build
        self._inputs_checked: set[tuple] = set()  # signatures whose inputs the ranks agreed on
        self._whole: dict[tuple, set[str]] = {}  # signature -> paths of inputs the batch split leaves whole
        # dp x cfg: each call's batch is split over those ranks, outputs gathered (runtime/batch.py)
        self.batch_split = BatchSplit.from_placement(self.placement, type(module).__name__)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    @property
    def ditpass_records(self) -> list[Record]:
        return list(self._records.values())

    def build(self, *args, **kwargs) -> Record:
        """Capture and build for these inputs (done by the first call automatically)."""
        sig = signature_of(args, kwargs)
        if sig not in self._records:
            if self.plan.pipefusion > 1 and self._records:
                raise PlanError(
                    "PipeFusion freed the weights of the other pipeline stages on this rank after the first "
                    "input signature, so a call with new input shapes cannot be captured again: parallelize a "
                    "fresh model for each resolution (or batch size)")
            captured = capture(self.module, *args, dynamic_shapes=self.dynamic_shapes, **kwargs)
            self._records[sig] = build(captured, self.plan, self.placement, state=self.ditpass_state)
            self._weights = Weights(self.module)  # after the build: PipeFusion frees other stages' weights
        return self._records[sig]

    def forward(self, *args, **kwargs):
        try:
            state = self.ditpass_state
            if not state.steps_counted or state.calls == 0:  # in a pipeline call: its first transformer call
                self._check_weights()
            if lazy.any_lazy((args, kwargs)) and not self._takes_lazy(args, kwargs):
                args, kwargs = lazy.force_tree((args, kwargs))  # a pipelined PipeFusion output, needed whole here
            self._check_inputs(args, kwargs)
            if self.batch_split is not None:  # this rank's rows of the batch; outputs all-gathered
                out = self.batch_split.run(self._forward_local, self.module, args, kwargs, self._keep_whole)
            else:
                out = self._forward_local(*args, **kwargs)
        except RuntimeError as exc:
            state = self.ditpass_state
            timed_out = timeout_error(exc, f"call {state.calls} (step {state.step_index}, generation "
                                           f"{state.generation}) of {type(self.module).__name__}")
            if timed_out is None:
                raise
            raise timed_out from exc
        self.ditpass_state.calls += 1
        return out

    def _takes_lazy(self, args, kwargs) -> bool:
        """True when the build for these inputs is a PipeFusion runner that pipelines across steps (it
        evaluates lazy inputs patch by patch; `ditpass.runtime.lazy`)."""
        rec = self._records.get(signature_of(args, kwargs))
        return rec is not None and getattr(rec.runner, "across", False) and self.batch_split is None

    def _forward_local(self, *args, **kwargs):
        runner = self.build(*args, **kwargs).runner
        with sdpa_backend(self.plan.attention):
            try:
                return runner(*args, **kwargs)
            except RuntimeError as exc:
                if _SPECIALIZED not in str(exc):
                    raise
                runner = self._recapture(args, kwargs, exc)
            return runner(*args, **kwargs)

    def _recapture(self, args, kwargs, exc):
        """A graph captured specialised on values read from its example inputs (``export-values``) met
        inputs that read others (a prompt with another number of valid text tokens): capture and build
        again for them. Every rank sees the same inputs, so every rank fails at the same assertion and
        builds again alike. Not under PipeFusion, which freed the other stages' weights."""
        from .capture import forget

        if self.plan.pipefusion > 1:
            raise PlanError(
                f"{type(self.module).__name__} was captured specialised on values read from its first inputs and "
                f"these inputs read others, but PipeFusion freed the other stages' weights on this rank, so it "
                f"cannot be captured again: parallelize a fresh model for these inputs ({str(exc).splitlines()[0][:300]})"
            ) from exc
        log.info("%s: inputs read other values than the specialised capture's example: capturing again",
                 type(self.module).__name__)
        forget(self.module)
        self._records.pop(signature_of(args, kwargs), None)
        return self.build(*args, **kwargs).runner

    def _check_weights(self) -> None:
        """Drop every build when the module's weights are no longer the ones the graphs read."""
        if self._weights is None or self._weights.current():
            return
        if self.plan.pipefusion > 1:
            raise PlanError(
                f"the weights of {type(self.module).__name__} were replaced after PipeFusion freed the other "
                f"stages' weights on this rank, so its graphs cannot be rebuilt: parallelize a fresh model with "
                f"the new weights (in-place updates, w.copy_(...) or load_state_dict(), need no rebuild)")
        log.info("%s: parameters or buffers were replaced since the last build: capturing again",
                 type(self.module).__name__)
        self._records.clear()
        self._weights = None

    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        if self.world_size == 1 or self.plan.check_inputs == "off":
            return
        sig = signature_of(args, kwargs)
        if self.plan.check_inputs == "always" or sig not in self._inputs_checked:
            check_same_inputs(self.module, args, kwargs)
            self._inputs_checked.add(sig)

    def _keep_whole(self, args: tuple, kwargs: dict, batch_path: str) -> set[str]:
        """Paths of the inputs not to split although dim 0 has the batch's size: the capture of the full call
        proves that dim equal to a size of another input that is not the batch (FLUX's ``txt_ids``: the
        text length of ``encoder_hidden_states``), or fixed where the batch (of ``batch_path``) is symbolic.
        Not "split only what is proven to be the batch": diffusers' attention masks are per-sample, but
        ``prepare_attention_mask`` only bounds their rows by the batch's."""
        sig = signature_of(args, kwargs)
        if sig not in self._whole:
            from .analysis.symbolic import build_classes, to_expr

            captured = capture(self.module, *args, dynamic_shapes=self.dynamic_shapes, **kwargs)
            dims = {p: [to_expr(n) for n in v.shape] for p, v in captured.input_values().items()
                    if isinstance(v, torch.Tensor)}
            b = dims[batch_path][0] if dims.get(batch_path) else None
            whole: set[str] = set()
            if b is not None and not b.is_Integer:  # concrete sizes only: no proof either way
                classes = build_classes(captured.exported_program.graph)
                sizes = [(p, k, e) for p, ds in dims.items() for k, e in enumerate(ds) if not classes.same(e, b)]
                for p, ds in dims.items():
                    if ds and not classes.same(ds[0], b) and (ds[0].is_Integer or any(
                            (q, k) != (p, 0) and classes.same(e, ds[0]) for q, k, e in sizes)):
                        whole.add(p)
            self._whole[sig] = whole
        return self._whole[sig]


_SPECIALIZED = "was captured specialised on a value read from its example inputs"  # capture._explain_asserts


def _named_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """Every leaf of the call (tensors and other values) with a readable name: the forward's parameter
    name, then the pytree path inside it (``img_shapes[0][1]``)."""
    try:
        top = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments.items())
    except (TypeError, ValueError):
        top = [(f"args[{i}]", v) for i, v in enumerate(args)] + list(kwargs.items())
    out = []
    for name, value in top:
        leaves, _ = pytree.tree_flatten_with_path(value)
        out += [(name + pytree.keystr(path), leaf) for path, leaf in leaves]
    return out


def _describe(value) -> str:
    """What ranks must agree on besides the values: a tensor's shape, dtype and device; a plain value
    itself; of any other object its type (its repr may hold an address)."""
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')} on {value.device.type}"
    if value is None or isinstance(value, (bool, int, float, str, enum.Enum, torch.dtype, torch.device)):
        return repr(value)[:80]
    return type(value).__qualname__


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Two float64 sums of a tensor's values, on its device: of ``|x|``, and of ``x`` weighted by
    ``1 + i % 7`` (so that moved values count too)."""
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    x = x.reshape(-1).to(torch.float64)
    w = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(7).add_(1)
    return torch.stack([x.abs().sum(), (x * w).sum()])


def _same_values(a: list | None, b: list | None) -> bool:
    if a is None or b is None:
        return a == b
    scale = 1e-9 * max(abs(a[0]), abs(b[0]))  # |x| summed: bounds both sums' rounding
    return all(x == y or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= scale for x, y in zip(a, b))


def check_same_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise `InputMismatchError` unless every rank of the world passed these inputs (collective)."""
    mine = {}
    for name, leaf in _named_inputs(module, args, kwargs):
        sums = (_checksum(leaf).tolist() if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta"
                and not lazy.is_lazy(leaf) else None)  # a lazy input: the same recorded ops on every rank
        mine[name] = (_describe(leaf), sums)
    world = dist.get_world_size()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    problems = []
    for name in dict.fromkeys(n for ranks in everyone for n in ranks):
        seen = [ranks.get(name) for ranks in everyone]
        kind = [None if s is None else s[0] for s in seen]
        if len(set(kind)) > 1:
            problems.append(f"`{name}` is " + ", ".join(f"{k or 'missing'} on rank {r}" for r, k in enumerate(kind)))
            continue
        differ = [r for r in range(1, world) if not _same_values(seen[0][1], seen[r][1])]
        if differ:
            problems.append(f"`{name}` ({kind[0]}) has other values on rank{'s' if len(differ) > 1 else ''} "
                            f"{', '.join(map(str, differ))} than on rank 0")
    if problems:
        raise InputMismatchError(
            f"the ranks called {type(module).__name__} with different inputs: {'; '.join(problems)}. Every rank "
            f"must pass the same full inputs (ditpass splits them itself): draw random inputs from a generator "
            f"seeded alike on every rank (torch.Generator().manual_seed(0)) or broadcast them from rank 0. "
            f"Plan(check_inputs='off') turns this check off, check_inputs='always' checks every call")
