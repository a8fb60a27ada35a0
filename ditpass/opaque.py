"""Opaque token-wise ops: a submodule that cannot be traced, run as one op that the passes can shard through.

Some submodules cannot be captured at all but act on every token on its own: a mixture-of-experts
feed-forward routes each token to its experts with per-expert token counts computed on the host
(HiDream's ``flat_expert_indices.bincount().cpu().numpy()``), so its graph would depend on the
routing of the example. Capture runs such a module as ``ditpass::opaque_tokenwise(x, weights, key,
dims)``: ``key`` names the module in a registry of this process, ``weights`` are its parameters and
buffers (inputs of the op, so that anything that keeps or frees weights by what the graph reads sees
them), ``dims`` the dims of ``x`` along which the module was shown to act token-wise.

Token-wise is verified, never assumed (`verify_tokenwise`): on the example input the capture saw, for
every dim but the last one (the features) of size 2 or more, the module's output equals the outputs of
the two halves of a split of that dim, joined. A module whose tokens see each other (attention, a
capacity limit that drops tokens, a norm over the sequence) fails that check, and the capture error
names it. The sequence-parallel rules treat the op like a linear layer over the listed dims: a rank
passes its own tokens through (``ditpass.analysis.ops`` kind ``tokenwise``).

The op's fake implementation gives the shape the module gave on the example with the leading dims of
``x`` (symbolic where ``x``'s are), so the graph's shapes stay true after a pass shards ``x``.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass

import torch

__all__ = ["TOKENWISE", "Opaque", "verify_tokenwise", "opaque_forwards", "single_tensor_call"]


@dataclass
class Opaque:
    """One registered module: what the op runs and what its fake implementation returns."""

    module: "weakref.ref[torch.nn.Module]"
    forward: object  # an instance-level forward the module had (a hook library's), else None: its class's
    path: str
    names: list[str]  # of the weights the op is given, in order: the module's parameters, then its buffers
    out_features: int  # size of the output's last dim
    dtype: torch.dtype  # of the output on the example


_REGISTRY: dict[int, Opaque] = {}
_KEYS = itertools.count()


@torch.library.custom_op("ditpass::opaque_tokenwise", mutates_args=())
def opaque_tokenwise(x: torch.Tensor, weights: list[torch.Tensor], key: int, dims: list[int]) -> torch.Tensor:
    entry = _REGISTRY.get(key)
    module = entry.module() if entry is not None else None
    if module is None:
        raise RuntimeError(f"ditpass::opaque_tokenwise: the module registered as {key} "
                           f"({entry.path if entry else '?'}) no longer exists: capture the model again")
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.nn.utils.stateless import _reparametrize_module

    # its own forward, not the module's call (while capturing, that is this op), on the weights it was given:
    # the capture's real-tensor propagation runs this with the example's values, from inside fake mode, while
    # the module itself holds fake parameters
    with unset_fake_temporarily(), _reparametrize_module(module, dict(zip(entry.names, weights))):
        out = (entry.forward or type(module).forward.__get__(module))(x)
    return out.clone() if out is x or (out._base is not None and out._base is x) else out


@opaque_tokenwise.register_fake
def _(x, weights, key, dims):
    entry = _REGISTRY[key]
    return x.new_empty((*x.shape[:-1], entry.out_features), dtype=entry.dtype)


TOKENWISE = torch.ops.ditpass.opaque_tokenwise.default


def single_tensor_call(args: tuple, kwargs: dict) -> bool:
    """A call the op can stand for: one tensor argument, nothing else but ``None`` keywords."""
    return (len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2
            and all(v is None for v in kwargs.values()))


def verify_tokenwise(module: torch.nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> tuple[list[int], str]:
    """The dims of ``x`` along which ``module`` acts token-wise on this example (each split in two halves
    gives the joined output), and why not where none: ``([], reason)``."""
    if x.device.type == "meta":
        return [], "its example input is on the meta device (no values to check)"
    with torch.no_grad():
        out = module(x)
        if not isinstance(out, torch.Tensor) or out.dim() != x.dim() or out.shape[:-1] != x.shape[:-1]:
            return [], f"its output ({type(out).__name__} {tuple(getattr(out, 'shape', ()))}) is not one tensor " \
                       f"with the input's leading dims {tuple(x.shape[:-1])}"
        scale = float(out.detach().abs().max()) or 1.0
        dims, tried = [], []
        for d in range(x.dim() - 1):
            n = x.shape[d]
            if n < 2:
                continue
            tried.append(d)
            k = (n + 1) // 2
            parts = [module(p) for p in (x.narrow(d, 0, k), x.narrow(d, k, n - k))]
            joined = torch.cat(parts, d)
            if joined.shape == out.shape and float((joined - out).abs().max()) <= rtol * scale:
                dims.append(d)
    if not tried:
        return [], f"no dim of its input {tuple(x.shape)} but the last has two or more entries to split"
    if not dims:
        return [], f"splitting its input {tuple(x.shape)} along dims {tried} changes its output (its tokens interact)"
    return dims, ""


def _weights(module: torch.nn.Module):
    return list(itertools.chain(module.named_parameters(), module.named_buffers()))


def register(module: torch.nn.Module, path: str, example_out: torch.Tensor) -> int:
    key = next(_KEYS)
    _REGISTRY[key] = Opaque(weakref.ref(module), module.__dict__.get("forward"), path, [n for n, _ in _weights(module)],
                            int(example_out.shape[-1]), example_out.dtype)
    return key


@contextlib.contextmanager
def opaque_forwards(modules: dict[torch.nn.Module, tuple[int, list[int]]]):
    """While capturing: each module's forward is the op (``{module: (key, dims)}``); restored afterwards."""
    saved = {}
    for m, (key, dims) in modules.items():
        saved[m] = m.__dict__.get("forward")

        def forward(x, *_a, _m=m, _key=key, _dims=dims, **_kw):
            weights = [t for _, t in _weights(_m)]
            return TOKENWISE(x, weights, _key, list(_dims))

        m.forward = forward
    try:
        yield
    finally:
        for m, f in saved.items():
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = f
