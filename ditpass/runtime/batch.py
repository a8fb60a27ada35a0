"""Batch parallelism of a transformer call: data parallel (``dp``) and CFG parallel (``cfg``).

Every rank runs the same pipeline with the same inputs. Around each transformer call, the
``dp x cfg`` ranks that share a sequence-parallel position each take a slice of the batch, run
it (through the sequence-parallel graph when ``ring * ulysses > 1``), and all-gather the outputs
along the batch dim, so the scheduler step after the call sees the full batch on every rank and
the run stays identical to the single-device one.

Which inputs are split: every tensor (at any depth of lists, tuples and dicts) whose dim 0 equals
the batch of ``hidden_states`` (the ``hidden_states`` argument, else the first tensor argument):
``timestep`` per sample, class labels, text embeddings, pooled projections, masks; except those the
caller names (``whole``: paths, ``pytree.keystr`` of the input in ``(args, kwargs)``), which
`ditpass.ParallelModule` finds in the capture of the full call: inputs whose dim 0 the graph proves
to be another size (FLUX's ``txt_ids`` of shape [tokens, 3] when the text has as many tokens as the
batch has rows). Scalars and tensors of another leading size (a batch-1 broadcast, FLUX's
``img_ids``) stay whole.

Layout, with ``C = cfg``, ``D = dp`` and batch ``B``: the batch is ``C`` halves of ``h = B / C``
rows (CFG pipelines concatenate [uncond; cond] or [cond; uncond]); rank ``(dp=d, cfg=c)`` takes
rows ``[d*b, (d+1)*b)`` of half ``c``, with ``b = ceil(h / D)``. So cfg rank 0 holds the first
half and cfg rank 1 the second, whatever dp is. A half that ``D`` does not divide is padded by
repeating its last row; the padding is dropped after the gather: exact, not approximate.
``cfg=2`` needs an even batch, and says so otherwise (see `BatchSplit.layout`).

Outputs: every output tensor with ``b`` rows is all-gathered over the ``dp x cfg`` group with
``torch.distributed._functional_collectives`` (traceable by torch.compile) and put back in batch
order; anything else passes through.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ditpass.errors import PlanError

from .seq import all_gather

__all__ = ["BatchLayout", "BatchSplit", "batch_input", "batch_size_of", "split_inputs", "gather_output"]


@dataclass(frozen=True)
class BatchLayout:
    """Where this rank's rows sit in a batch of ``batch`` rows split over ``dp x cfg`` ranks."""

    batch: int  # B: rows of the full batch
    dp: int  # D
    cfg: int  # C
    dp_rank: int  # d
    cfg_rank: int  # c

    @property
    def half(self) -> int:
        """h: rows per CFG half (the whole batch when cfg=1)."""
        return self.batch // self.cfg

    @property
    def local(self) -> int:
        """b: rows each rank runs (padding included)."""
        return -(-self.half // self.dp)

    @property
    def padded(self) -> bool:
        return self.local * self.dp != self.half

    def rows(self) -> list[int]:
        """Global rows of this rank's slice, in order (padding repeats a half's last row)."""
        start = self.cfg_rank * self.half
        return [start + min(self.dp_rank * self.local + i, self.half - 1) for i in range(self.local)]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``x`` (dim 0): a view where no padding is needed."""
        if not self.padded:
            return x.narrow(0, self.cfg_rank * self.half + self.dp_rank * self.local, self.local)
        idx = torch.tensor(self.rows(), dtype=torch.long, device=x.device)
        return x.index_select(0, idx)

    def assemble(self, gathered: torch.Tensor) -> torch.Tensor:
        """The full batch from the all-gather of every rank's ``local`` rows.

        ``gathered`` is in the group's rank order, dp-major (``d * C + c``, as the mesh lays the
        ranks out); the batch is cfg-major (half ``c``, then ``d``)."""
        rest = gathered.shape[1:]
        g = gathered.view(self.dp, self.cfg, self.local, *rest)
        if self.cfg > 1 and self.dp > 1:
            g = g.transpose(0, 1)
        g = g.reshape(self.cfg, self.dp * self.local, *rest)
        if self.padded:
            g = g[:, : self.half]
        return g.reshape(self.batch, *rest)


def batch_input(module: torch.nn.Module | None, args: tuple, kwargs: dict) -> tuple[str, torch.Tensor] | None:
    """The input that defines the batch, with its path in ``(args, kwargs)``: ``hidden_states``, else the
    first tensor argument with a dim in the forward's parameter order; None when there is none."""
    x = kwargs.get("hidden_states")
    if _batched_tensor(x):
        return _path((1, "hidden_states")), x
    ordered = [((0, i), v) for i, v in enumerate(args)] + [((1, k), v) for k, v in kwargs.items()]
    if module is not None:
        try:
            names = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            order = {k: i for i, k in enumerate(names)}  # positional i binds the i-th parameter
            ordered.sort(key=lambda kv: kv[0][1] if kv[0][0] == 0 else order.get(kv[0][1], len(order)))
        except (TypeError, ValueError):
            pass
    return next(((_path(where), v) for where, v in ordered if _batched_tensor(v)), None)


def _path(where: tuple) -> str:
    """``pytree.keystr`` of a top-level argument: ``(0, i)`` positional, ``(1, name)`` keyword."""
    return f"[{where[0]}][{where[1]!r}]"


def batch_size_of(module: torch.nn.Module | None, args: tuple, kwargs: dict) -> int | None:
    """The batch of a transformer call: dim 0 of `batch_input`; None when the call has no tensor with a dim."""
    found = batch_input(module, args, kwargs)
    return None if found is None else int(found[1].shape[0])


def _batched_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() >= 1


def split_inputs(layout: BatchLayout, args: tuple, kwargs: dict, whole: set[str] = frozenset()) -> tuple[tuple, dict]:
    """``args, kwargs`` with every tensor of ``layout.batch`` rows cut to this rank's rows, except those at
    the paths ``whole`` (``pytree.keystr`` in ``(args, kwargs)``)."""

    def cut(path, v):
        if _batched_tensor(v) and v.shape[0] == layout.batch and pytree.keystr(path) not in whole:
            return layout.take(v)
        return v

    return pytree.tree_map_with_path(cut, (tuple(args), dict(kwargs)))


def gather_output(layout: BatchLayout, out: Any, group: str) -> Any:
    """Every output tensor of ``layout.local`` rows gathered back into the full batch."""

    def full(v):
        if _batched_tensor(v) and v.shape[0] == layout.local:
            return layout.assemble(all_gather(v, layout.dp * layout.cfg, group))
        return v

    return pytree.tree_map(full, out)


class BatchSplit:
    """What `ditpass.ParallelModule` calls around its graph when ``dp * cfg > 1``.

    ``run(fn, args, kwargs)``: split the inputs, ``fn(*local_args, **local_kwargs)``, gather.
    """

    def __init__(self, dp: int, cfg: int, dp_rank: int, cfg_rank: int, group: str, owner: str = "transformer"):
        self.dp, self.cfg, self.dp_rank, self.cfg_rank = dp, cfg, dp_rank, cfg_rank
        self.group = group  # c10d group name of the dp x cfg ranks that share this rank's sp position
        self.owner = owner  # class name, for messages
        self.calls = 0  # transformer calls split so far (for explain and tests)
        self.last_layout: BatchLayout | None = None

    @classmethod
    def from_placement(cls, placement, owner: str = "transformer") -> "BatchSplit | None":
        """None when ``dp * cfg == 1``; else the split for this rank (`ditpass.mesh.Placement`)."""
        if placement.degree("batch") == 1:
            return None
        return cls(placement.degrees["dp"], placement.degrees["cfg"], placement.coords["dp"],
                   placement.coords["cfg"], placement.group("batch"), owner)

    def layout(self, batch: int) -> BatchLayout:
        if self.cfg > 1 and batch % self.cfg:
            raise PlanError(
                f"cfg={self.cfg} runs the two classifier-free-guidance halves of the transformer's "
                f"batch on different ranks, but {self.owner} was called with a batch of {batch}, "
                f"which has no two halves: the pipeline does not put the conditional and "
                f"unconditional inputs into one call (it calls the transformer once per half, as "
                f"FLUX's true CFG, Wan, CogView4, HunyuanVideo and Qwen-Image do, or guidance is "
                f"off). Use dp={self.dp * self.cfg}, cfg=1 instead (it splits the prompts of each call)"
            )
        return BatchLayout(batch, self.dp, self.cfg, self.dp_rank, self.cfg_rank)

    def run(self, fn: Callable, module: torch.nn.Module | None, args: tuple, kwargs: dict,
            keep_whole: Callable | None = None):
        """``keep_whole(args, kwargs, path)``: the paths of the inputs not to split although they have the
        batch's rows (``path``: the batch input's)."""
        found = batch_input(module, args, kwargs)
        if found is None:  # nothing per-sample to split: every rank runs the whole call
            return fn(*args, **kwargs)
        layout = self.layout(int(found[1].shape[0]))
        whole = keep_whole(args, kwargs, found[0]) if keep_whole is not None and layout.batch > 1 else frozenset()
        local_args, local_kwargs = split_inputs(layout, args, kwargs, whole)
        out = fn(*local_args, **local_kwargs)
        self.calls += 1
        self.last_layout = layout
        return gather_output(layout, out, self.group)

    def __repr__(self):
        return (f"BatchSplit(dp={self.dp}, cfg={self.cfg}, dp_rank={self.dp_rank}, cfg_rank={self.cfg_rank}, "
                f"group={self.group!r})")
