"""PipeFusion across diffusion steps: the transformer's output as a tensor that arrives patch by patch.

Within one transformer call the PipeFusion pipeline fills and drains (``M / (M + N - 1)`` of the ideal).
Not draining needs the scheduler step per patch: stage 0 can start step ``t + 1`` on patch 0 as soon as
the last stage has finished step ``t`` on patch 0, before it finishes the other patches. ditpass does
this for any diffusers pipeline without a copy of its loop: inside a pipeline call (`ditpass.components`)
a PipeFusion transformer returns a `Lazy` tensor at once, on every rank, and the pipeline's own Python
goes on. What it does with that tensor (guidance, the scheduler step, the next call's inputs) is
recorded, not run: ``noise_pred.chunk(2)``, ``uncond + g * (cond - uncond)``, ``sample + dt * out``,
``torch.cat([latents] * 2)`` make more lazy tensors. When the next call's input is lazy, stage 0
evaluates the recorded ops once per patch ``m``, on full-size tensors in which only the positions of
patches ``0..m`` hold this step's values (the last stage sends the transformer's output after each
patch, with the later patches still the previous step's), and runs patch ``m`` on the result.

Why full-size and not one patch's slice: which latent elements a token patch comes from is the
model's business (a packed sequence, a conv patch embed over pixel rows, frames). Token patch ``m``
reads only its own positions when the ops before the first block (patch embed, positions) and after
the last (norm, projection, un-patchify) act per token and the pipeline's step code acts per position;
then the tokens of patch ``m`` computed from the partly fresh latent equal those from the whole
fresh one. The runner checks this once per build, on patch 0 of the first pipelined step against
the complete input (`ditpass.runtime.pipeline`), and evaluates complete inputs from then on if it
fails (exact, but stage 0 waits for the whole step).

Which ops stay lazy: pointwise ops (``torch.Tag.pointwise``, scalars and same-shape tensors mixed
in), dtype / device copies, clones, and ``cat`` / ``split`` / ``slice`` / ``select`` along a dim that
is not a position dim (a dim whose size depends on the visual token count: the batch of CFG and the
channels of a learned variance are fine). Anything else (a reshape of the latent before the VAE, a
``.item()``, printing, a norm over the image) *materializes*: every rank of the pipeline gets the
tensor's full value (stage 0 waits for every patch and broadcasts each transformer output once
over the ``pipefusion`` group), then the op runs as usual. Every rank runs the same pipeline code,
so every rank materializes at the same points and the broadcasts pair up. In-place pointwise ops
on a lazy tensor record their out-of-place form and rebind it.

Stochastic schedulers stay exact: their noise is drawn as an ordinary tensor of the whole latent
(it depends on shapes only) and enters the recorded ops as a constant.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = ["Lazy", "Source", "is_lazy", "any_lazy", "materialize", "force_tree", "value_at"]

aten = torch.ops.aten

# ops that keep every dim where it is (besides pointwise ones)
_SAME = {aten._to_copy.default, aten.clone.default, aten.detach.default, aten.alias.default,
         aten.lift_fresh.default, aten.lift_fresh_copy.default}
# layout ops along one dim: (op) -> (index of the dim argument, its default, does the op drop the dim)
_ALONG = {aten.cat.default: (1, 0, False), aten.split.Tensor: (2, 0, False),
          aten.split_with_sizes.default: (2, 0, False), aten.slice.Tensor: (1, 0, False),
          aten.narrow.default: (1, None, False), aten.select.int: (1, None, True),
          aten.unbind.int: (1, 0, True), aten.chunk.default: (2, 0, False)}


class _Node:
    """A recorded op (``func(*args, **kwargs)[item]``; `_Node` arguments are other lazy values), or a
    `Source`. ``leaves``: the `Source` objects it depends on, in a fixed order (the same on every rank);
    ``value``: the full value once known on this rank."""

    __slots__ = ("func", "args", "kwargs", "item", "leaves", "value")

    def __init__(self, func, args, kwargs, item, leaves):
        self.func, self.args, self.kwargs, self.item, self.leaves = func, args, kwargs, item, leaves
        self.value = None


class Source(_Node):
    """One tensor the transformer returned in a pipelined call, arriving patch by patch.

    On stage 0 of the pipeline, ``posted[m]`` is the receive of the full-size output after patch ``m``
    (positions of patches ``0..m`` fresh), from the last stage; elsewhere nothing arrives until it is
    materialized (`share`)."""

    __slots__ = ("runner", "shape", "dtype", "device", "posted", "shared")

    def __init__(self, runner, shape, dtype, device):
        super().__init__(None, (), {}, None, ())
        self.leaves = (self,)
        self.runner, self.shape, self.dtype, self.device = runner, tuple(shape), dtype, device
        self.posted: list | None = None  # [(buffer, request)] per patch, stage 0 only
        self.shared = False

    def at(self, m: int | None) -> torch.Tensor:
        """The output after patch ``m`` (None: the last patch): stage 0 only, waits for it to arrive."""
        if self.value is not None:
            return self.value
        if self.posted is None:
            raise RuntimeError("ditpass: a pipelined PipeFusion output was read on a stage that never receives "
                               "it; please report this (it should have been materialized)")
        m = len(self.posted) - 1 if m is None else m
        buf, req = self.posted[m]
        if req is not None:
            req.wait()
            self.posted[m] = (buf, None)
        if m == len(self.posted) - 1:
            self.value, self.posted = buf, None
        return buf

    def share(self) -> None:
        """Collective over the pipeline group: every rank gets the full value (from stage 0)."""
        if self.shared:
            return
        r = self.runner
        if r.s == 0:
            t = self.at(None)
        else:
            t = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if r.N > 1:
            dist.broadcast(t, src=r.ranks[0], group=r.group)
        self.value, self.shared = t, True
        r.shared_steps.append(r.state.step_index if r.state is not None else None)


def _meta(x):
    if isinstance(x, Lazy):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    return x


class Lazy(torch.Tensor):
    """A tensor whose value is computed when needed (see the module docstring); shape, dtype and device
    are known at once."""

    @staticmethod
    def __new__(cls, node: _Node, meta: torch.Tensor, device, pos: frozenset):
        t = torch.Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride(), dtype=meta.dtype,
                                                device=device, requires_grad=False)
        t._node, t._pos = node, frozenset(pos)
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Lazy(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, position dims={sorted(self._pos)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _record(func, args, kwargs)
        if out is not NotImplemented:
            return out
        args, kwargs = force_tree((args, kwargs))
        return func(*args, **kwargs)


def is_lazy(x) -> bool:
    return isinstance(x, Lazy)


def any_lazy(tree) -> bool:
    return any(isinstance(x, Lazy) for x in pytree.tree_leaves(tree))


def from_source(src: Source, pos) -> Lazy:
    return Lazy(src, torch.empty(src.shape, dtype=src.dtype, device="meta"), src.device, pos)


def _leaves_of(flat) -> tuple:
    seen: dict = {}
    for x in flat:
        if isinstance(x, Lazy):
            for leaf in x._node.leaves:
                seen.setdefault(id(leaf), leaf)
    return tuple(seen.values())


def _out_of_place(func):
    """``aten.add_.Tensor`` -> ``aten.add.Tensor`` (None if there is none)."""
    name = func._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    return None if packet is None else getattr(packet, func._overloadname, None)


def _positions(func, args, kwargs, out_meta):
    """The position dims of the result (one set for every output), or None if ``func`` may mix positions."""
    flat = pytree.tree_leaves((args, kwargs))
    lazies = [x for x in flat if isinstance(x, Lazy)]
    pos: set = set()
    if torch.Tag.pointwise in func.tags or func in _SAME:
        nd = out_meta.dim() if isinstance(out_meta, torch.Tensor) else None
        if nd is None:
            return None
        for x in lazies:  # broadcasting aligns dims from the right
            pos |= {d + nd - x.dim() for d in x._pos}
            if any(x.shape[d] != out_meta.shape[d + nd - x.dim()] for d in x._pos):
                return None  # a position dim broadcast: not per position
        return frozenset(pos)
    if func in _ALONG:
        where, default, drops = _ALONG[func]
        dim = args[where] if len(args) > where else kwargs.get("dim", default)
        if dim is None:
            return None
        first = args[0][0] if func is aten.cat.default else args[0]
        nd = first.dim()
        dim = dim % max(nd, 1)
        if func is aten.cat.default and any(t.dim() != nd for t in args[0]):
            return None
        for x in lazies:
            if dim in x._pos:
                return None
            pos |= x._pos
        return frozenset(d - 1 if drops and d > dim else d for d in pos)
    return None


def _record(func, args, kwargs):
    """A lazy result for ``func`` on lazy arguments, or NotImplemented (materialize)."""
    inplace = func._schema.is_mutable
    target = None
    if inplace:
        if not (args and isinstance(args[0], Lazy)) or func is aten.copy_.default:
            return NotImplemented
        target, func = args[0], _out_of_place(func)
        if func is None or torch.Tag.pointwise not in func.tags:
            return NotImplemented
    flat = pytree.tree_leaves((args, kwargs))
    lazies = [x for x in flat if isinstance(x, Lazy)]
    if not lazies:
        return NotImplemented
    try:
        out_meta = func(*pytree.tree_map(_meta, args), **pytree.tree_map(_meta, kwargs))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: run it for real
        return NotImplemented
    pos = _positions(func, args, kwargs, out_meta if isinstance(out_meta, torch.Tensor) else
                     (out_meta[0] if isinstance(out_meta, (tuple, list)) and out_meta else None))
    if pos is None:
        return NotImplemented
    device = lazies[0].device
    nargs, nkwargs = pytree.tree_map(lambda x: x._node if isinstance(x, Lazy) else x, (args, kwargs))
    leaves = _leaves_of(flat)
    if isinstance(out_meta, torch.Tensor):
        out = Lazy(_Node(func, nargs, nkwargs, None, leaves), out_meta, device, pos)
        if target is not None:  # in place: the same Python object now stands for the new value
            if out.dtype != target.dtype:
                out = Lazy(_Node(aten._to_copy.default, (out._node,), {"dtype": target.dtype}, None, leaves),
                           torch.empty_strided(target.shape, target.stride(), dtype=target.dtype, device="meta"),
                           device, pos)
            target._node, target._pos = out._node, out._pos
            return target
        return out
    if isinstance(out_meta, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out_meta):
        return type(out_meta)(Lazy(_Node(func, nargs, nkwargs, i, leaves), t, device, pos)
                              for i, t in enumerate(out_meta))
    return NotImplemented


def value_at(x: Lazy, m: int | None) -> torch.Tensor:
    """Stage 0: ``x`` evaluated with every output after patch ``m`` (None: complete); waits for what it
    needs. Full-size; positions of patches ``0..m`` are this step's."""
    return _value(x._node, m, {})


def _value(root: _Node, m, memo: dict):
    """``root``'s value (iterative: a chain of many steps' ops is deeper than Python's recursion limit).
    A node whose sources are all complete keeps its value and drops its arguments."""
    def known(a):
        return a.value is not None or id(a) in memo

    def get(a):
        return a.value if a.value is not None else memo[id(a)]

    stack = [root]
    while stack:
        node = stack[-1]
        if known(node):
            stack.pop()
            continue
        if isinstance(node, Source):
            memo[id(node)] = node.at(m)
            stack.pop()
            continue
        kids = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, _Node) and not known(a)]
        if kids:
            stack.extend(kids)
            continue
        args, kwargs = pytree.tree_map(lambda a: get(a) if isinstance(a, _Node) else a, (node.args, node.kwargs))
        out = node.func(*args, **kwargs)
        if node.item is not None:
            out = out[node.item]
        if all(leaf.value is not None for leaf in node.leaves):  # complete: keep it, drop what made it
            node.value, node.args, node.kwargs = out, (), {}
        else:
            memo[id(node)] = out
        stack.pop()
    return get(root)


def materialize(x: Lazy) -> torch.Tensor:
    """The full value of ``x`` on every rank (collective over the pipeline group of each output it
    depends on, in a fixed order)."""
    for leaf in x._node.leaves:
        leaf.share()
    return _value(x._node, None, {})


def force_tree(tree):
    """``tree`` with every lazy tensor materialized (see `materialize`)."""
    return pytree.tree_map(lambda x: materialize(x) if isinstance(x, Lazy) else x, tree)
