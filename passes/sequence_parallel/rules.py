"""The rules of sequence parallelism: which ops treat the tokens of an operand independently.

One question per op, ``tokenwise(rw, node, a)``: may operand ``a`` of ``node`` hold only this rank's
tokens (its token dim ``d`` sharded) and the op still compute this rank's tokens of the result
exactly? (``a=None``: is the op token-wise in general, so that an all-replicated node may be sharded
where it is computed.) The answer depends on the op's family and on where its ``dim`` argument points;
families come from one table keyed by op target (`ditpass.analysis.ops`), which the symbolic analysis
reads too. An op the table does not know is never token-wise: the rewriter gathers around it and says
so in explain.

``rw`` is the rewriter (`rewriter._Rewriter`): the rules ask it where the token dim of an operand is
(``rw.in_dim``), which dims of a value are token dims (``rw.out_token_dims``) and whether a view keeps
the token dim (``rw.view_keeps``).
"""
from __future__ import annotations

import torch.fx

from ditpass.analysis import ops
from ditpass.analysis.symbolic import node_val

__all__ = ["tokenwise", "op_dim", "mutates", "family"]

# families whose operands may be sharded along any dim the op does not touch (a=None answers True)
_GENERAL = {"view", "layout", "norm", "reduce", "matmul", "outer", "repeat_interleave", "pad"}
# layout ops that select or cut along their dim argument: token-wise when it is another dim
_ALONG_DIM = {"select", "slice", "narrow", "chunk", "split", "split_with_sizes", "unbind", "index_select"}


def family(node: torch.fx.Node) -> ops.OpInfo | None:
    return ops.info(node.target) if node.op == "call_function" else None


def op_dim(node: torch.fx.Node):
    """The op's ``dim`` argument (positional, keyword or default), None when it has none."""
    i = family(node)
    if i is None or i.dim_arg is None:
        return None
    if len(node.args) > i.dim_arg:
        return node.args[i.dim_arg]
    return node.kwargs.get("dim", i.dim_default)


def mutates(node: torch.fx.Node) -> bool:
    """An in-place op (its schema writes an argument)."""
    return ops.mutates(node.target)


def is_pointwise(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and ops.is_pointwise(node.target)


def tokenwise(rw, node: torch.fx.Node, a) -> bool:
    """See the module docstring."""
    i = family(node)
    if is_pointwise(node):
        return True
    if i is None:
        return False
    name, kind = i.name, i.kind
    if kind == "tokenwise":  # an opaque module, verified token-wise along the dims it lists (ditpass.opaque)
        return a is None or (a is node.args[0] and rw.in_dim(a) in node.args[3])
    if kind in ("linear", "embedding"):
        if a is None:
            return True
        if kind == "embedding":  # the weight table: every token reads all of it
            return a is not node.args[0]
        if a is not node.args[0]:  # a linear's weight or bias
            return False
        d = rw.in_dim(a)
        return d is not None and d != node_val(a).dim() - 1
    if a is None:
        return kind in _GENERAL and (kind != "matmul" or name in ("matmul", "bmm", "mm"))
    d = rw.in_dim(a)
    if d is None:
        return False
    nd = node_val(a).dim()
    if kind == "norm":
        return d < nd - len(node.args[1])
    if kind == "reduce":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        return all(x % nd != d for x in dims)
    if kind == "outer":
        return a is node.args[0] and not rw.out_token_dims(node_val(node.args[1]))
    if kind == "repeat_interleave":
        dim = op_dim(node)
        return dim is not None and dim % nd != d
    if kind == "pad":  # pads (left, right) per dim from the last one: token-wise where the token dim gets none
        widths = list(node.args[1])
        k = nd - 1 - d
        return a is node.args[0] and all(w == 0 for w in widths[2 * k:2 * k + 2])
    if kind == "matmul":
        if name not in ("matmul", "bmm", "mm"):
            return False
        if a is node.args[0]:  # the rows of a ([..., S, K] @ W)
            return d < nd - 1 and not rw.out_token_dims(node_val(node.args[1]))
        # the columns of b (Sana's scores @ q: [.., D, D] @ [.., D, S])
        return a is node.args[1] and nd >= 2 and d == nd - 1 and not rw.out_token_dims(node_val(node.args[0]))
    if kind == "view":
        return rw.view_keeps(node, a, d)
    if kind != "layout":
        return False
    if name in ("view_as_complex", "view_as_real"):  # reinterpret the last dim only
        return d < nd - 1
    if name in _ALONG_DIM:
        dim = op_dim(node)
        return dim is not None and dim % nd != d
    if name == "repeat":
        reps = node.args[1]
        return reps[d + len(reps) - nd] == 1
    if name in ("cat", "concat"):
        return op_dim(node) % nd != d
    # permute, transpose, t, unsqueeze, squeeze, movedim, expand, expand_as, stack: the token dim moves
    # but each token keeps its own values
    return True
