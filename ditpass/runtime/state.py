"""Run state: what lives across the transformer calls of one generation.

One `RunState` per parallelized model. It counts the transformer calls and the scheduler steps of
the generation under way and holds the tensors that passes keep from one call to the next (per-site
caches, K/V buffers, step-cache residuals). The pipeline hook (`ditpass.components`) calls
`RunState.reset` when a generation starts; a model used without a pipeline is reset by hand
(``model.ditpass_state.reset()``) or never (every call then belongs to one long generation).

Buffers are allocated once per name with the shape the graph computes on this rank (``meta["val"]``
after the passes is the local shape) and keep their storage for the model's life, so a CUDA graph
that recorded them stays valid; `reset` zeroes them in place instead of freeing them.

A graph writes a buffer through ``torch.ops.ditpass.cache_write(buf, value)`` (`ditpass.runtime.ops`),
which declares that it mutates ``buf``: dead-code elimination keeps it although nothing reads its
result, and ``torch.compile`` orders it against the buffer's reads.
"""
from __future__ import annotations

import torch

__all__ = ["RunState"]


class RunState:
    def __init__(self):
        self.generation = 0  # generations started (resets so far)
        self.calls = 0  # transformer calls in this generation
        self.step = 0  # scheduler steps taken in this generation
        self.buffers: dict[str, torch.Tensor] = {}
        # True once a pipeline hook counts scheduler steps in `step`; else a call is a step
        self.steps_counted = False

    @property
    def step_index(self) -> int:
        """The diffusion step under way: scheduler steps where the hook counts them, else calls."""
        return self.step if self.steps_counted else self.calls

    def reset(self) -> None:
        """A new generation: counters to zero, every buffer zeroed in place (its storage kept)."""
        self.generation += 1
        self.calls = 0
        self.step = 0
        with torch.no_grad():
            for buf in self.buffers.values():
                buf.zero_()

    def buffer(self, name: str, like: torch.Tensor | None = None, *, shape=None, dtype=None,
               device=None) -> torch.Tensor:
        """The buffer ``name``, allocated (zeros) like ``like`` (or of ``shape, dtype, device``) on first
        use; the same tensor after.

        A name is one buffer for the model's life (a graph holds it), so a pass names its buffers per
        input signature; asking for a name again with another shape, dtype or device is an error."""
        if like is not None:
            shape, dtype, device = like.shape, like.dtype, like.device
        shape, device = torch.Size(shape), torch.device(device)
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.zeros(shape, dtype=dtype, device=device)
        elif (buf.shape, buf.dtype, buf.device) != (shape, dtype, device):
            raise ValueError(f"run-state buffer {name!r} is {tuple(buf.shape)} {buf.dtype} on {buf.device}, asked for "
                             f"{tuple(shape)} {dtype} on {device}: name buffers per input signature")
        return buf

    def __repr__(self) -> str:
        return (f"RunState(generation={self.generation}, calls={self.calls}, step={self.step}, "
                f"buffers={len(self.buffers)})")
