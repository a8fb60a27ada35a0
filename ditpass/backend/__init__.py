"""Backends: what runs the rewritten graph. One function, chosen by ``Plan.compile``.

- ``eager``: the GraphModule itself.
- ``inductor``: ``torch.compile(fullgraph=True)`` region by region (`ditpass.backend.regional`): each
  distinct transformer block is compiled once and reused for every block of its kind; the glue
  between blocks runs eagerly. The inserted operations are ``torch.ops.ditpass`` custom ops
  (opaque to the compiler, functional collectives inside), so no region has a graph break; a break
  is an error.
- ``nexfort``: onediff's compiler with its nexfort backend, where installed; otherwise an error that
  says what to install.
"""
from __future__ import annotations

import torch

__all__ = ["BackendError", "compile_graph"]


class BackendError(RuntimeError):
    """The backend named in the plan can't run here; the message says why and what to do."""


def compile_graph(gm: torch.fx.GraphModule, backend: str):
    """A callable that runs ``gm`` with ``backend`` (compiled lazily, on the first call)."""
    if backend == "eager":
        return gm
    if backend == "inductor":
        from .regional import compile_regions

        return compile_regions(gm)
    if backend == "nexfort":
        try:
            import nexfort  # noqa: F401
            from onediff.infer_compiler import compile as od_compile
        except ImportError as exc:
            raise BackendError(
                f"Plan(compile='nexfort') needs onediff and nexfort (pip install 'ditpass[nexfort]'); "
                f"they are not importable with torch {torch.__version__} here ({exc}). "
                "Use compile='inductor' instead.") from exc
        return od_compile(gm, backend="nexfort")
    raise BackendError(f"unknown backend {backend!r}: use eager, inductor or nexfort")
