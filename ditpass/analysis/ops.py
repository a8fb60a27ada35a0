"""What each op of an exported DiT does to the dims of its operands: one table keyed by op target.

The symbolic analysis (which dims broadcast, which lengths are concatenations, what mixes tokens)
and the sequence-parallel rules (which ops are token-wise) both read it, so they agree on what an op
is. Keys are op targets (``OpOverload`` for exported graphs, the torch function for Dynamo's graphs),
never names: an op that is not in the table is unknown, and the passes take their safe path on it.
``shared/ATEN_OPS.md`` lists the ops that exported diffusers DiTs contain.

Each entry is an `OpInfo`: ``name`` (the op's family: every overload of ``aten.view`` is ``"view"``),
``kind`` (below) and, for ops with a ``dim`` argument, where it is (``dim_arg``) and its default.

Kinds:
- ``pointwise``: elementwise; tensor operands broadcast against each other (besides everything
  torch tags ``pointwise``);
- ``view``: reshapes without moving data (the token dim survives when the sizes before it match);
- ``layout``: moves, selects, joins or repeats along dims (permute, slice, cat, expand, ...);
- ``reduce``: reduces over ``dim`` (mean, softmax, ...); ``norm``: normalises the last dims;
- ``linear``, ``embedding``, ``matmul``, ``outer``, ``repeat_interleave``, ``pad``: one rule each;
- ``attention``: SDPA (the sites the analysis classifies);
- ``tokenwise``: a submodule capture runs as one opaque op, token-wise along the dims it lists
  (``ditpass.opaque``);
- ``skip``: asserts and range constraints: no value, nothing to rewrite.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ditpass import opaque as _opaque

__all__ = ["OpInfo", "info", "name_of", "kind_of", "is_pointwise", "mutates", "SDPA", "MATMUL"]

aten = torch.ops.aten


@dataclass(frozen=True)
class OpInfo:
    name: str
    kind: str
    dim_arg: int | None = None  # position of the ``dim`` argument
    dim_default: int | None = None  # its value when not given


_TABLE: dict = {}


def _add(kind: str, packets, dim: dict | None = None):
    """Every overload of each packet (``aten.view`` -> ``aten.view.default``, ``aten.view.dtype``)."""
    for packet in packets:
        name = packet._qualified_op_name.split("::")[-1]
        pos, default = (dim or {}).get(name, (None, None))
        for ov in packet.overloads():
            _TABLE[getattr(packet, ov)] = OpInfo(name, kind, pos, default)


_add("view", [aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.view_as,
              aten.reshape_as], dim={"unflatten": (1, None)})
_add("layout", [aten.permute, aten.transpose, aten.t, aten.unsqueeze, aten.squeeze, aten.movedim, aten.expand,
                aten.expand_as, aten.repeat, aten.select, aten.slice, aten.narrow, aten.chunk, aten.split, aten.unbind,
                aten.stack, aten.cat, aten.concat, aten.split_with_sizes, aten.index_select,
                aten.view_as_complex, aten.view_as_real],
     dim={"cat": (1, 0), "concat": (1, 0), "stack": (1, 0), "select": (1, None), "slice": (1, 0),
          "narrow": (1, None), "index_select": (1, None), "unbind": (1, 0), "split_with_sizes": (2, 0),
          "split": (2, 0), "chunk": (2, 0), "squeeze": (1, None)})
_add("reduce", [aten.mean, aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.softmax, aten._softmax,
                aten.log_softmax, aten.var, aten.std, aten.cumsum, aten.any, aten.all, aten.argmax, aten.prod,
                aten.norm, aten.logsumexp])
_add("norm", [aten.layer_norm, aten.rms_norm, aten.native_layer_norm])
# elementwise ops torch does not tag pointwise: broadcast operands, keep every token's place
_add("pointwise", [aten.to, aten.contiguous, aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy, aten.dropout,
                   aten._to_copy, aten.type_as, aten.gelu, aten.silu, aten.relu, aten.copy_,
                   aten.copy, aten.fill_, aten.masked_fill_, aten.masked_fill, aten.empty_like, aten.zeros_like,
                   aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like, aten.where, aten.clamp,
                   aten.clip, aten.lerp, aten.addcmul, aten.addcdiv, aten.detach_])
_add("linear", [aten.linear])
_add("embedding", [aten.embedding])
_add("matmul", [aten.matmul, aten.bmm, aten.mm, aten.einsum, aten.baddbmm])
_add("outer", [aten.outer])
_add("repeat_interleave", [aten.repeat_interleave], dim={"repeat_interleave": (2, None)})
_add("pad", [aten.pad, aten.constant_pad_nd])  # pad widths from the last dim backwards
_add("attention", [aten.scaled_dot_product_attention])
_TABLE[_opaque.TOKENWISE] = OpInfo("opaque_tokenwise", "tokenwise")
_add("skip", [aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
              aten.sym_constrain_range])
# Dynamo's graphs (a model captured in pieces) call torch functions: the analysis reads those too
for _fn, _info in {torch.nn.functional.scaled_dot_product_attention: OpInfo("scaled_dot_product_attention", "attention"),
                   torch.matmul: OpInfo("matmul", "matmul"), torch.bmm: OpInfo("bmm", "matmul"),
                   torch.einsum: OpInfo("einsum", "matmul"), torch.baddbmm: OpInfo("baddbmm", "matmul"),
                   torch.cat: OpInfo("cat", "layout", 1, 0), torch.concat: OpInfo("concat", "layout", 1, 0),
                   operator.matmul: OpInfo("matmul", "matmul"), torch.where: OpInfo("where", "pointwise")}.items():
    _TABLE[_fn] = _info

SDPA = frozenset(t for t, i in _TABLE.items() if i.kind == "attention")
MATMUL = frozenset(t for t, i in _TABLE.items() if i.kind == "matmul")
# operands of these that only give a dtype: their shape does not broadcast against the others
_DTYPE_ONLY = frozenset(t for t, i in _TABLE.items() if i.name == "type_as")


def info(target) -> OpInfo | None:
    """The table's entry for an op target, None for an op the table does not know."""
    try:
        return _TABLE.get(target)
    except TypeError:  # an unhashable target
        return None


def name_of(target) -> str | None:
    i = info(target)
    return i.name if i else None


def kind_of(target) -> str | None:
    i = info(target)
    return i.kind if i else None


def is_pointwise(target) -> bool:
    """Elementwise ops whose tensor inputs broadcast against each other."""
    if torch.Tag.pointwise in getattr(target, "tags", ()):
        return True
    return kind_of(target) == "pointwise"


def dtype_only_operands(target) -> bool:
    """True where only the first operand's shape counts (``type_as``: the second gives a dtype)."""
    return target in _DTYPE_ONLY


def mutates(target) -> bool:
    """An in-place op: its schema writes one of its arguments."""
    schema = getattr(target, "_schema", None)
    return bool(schema and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments))
