"""Mesh arithmetic for a Plan: which global ranks share each axis, and the DeviceMesh.

Axes, outer to inner: ``dp, cfg, pipefusion, ring, ulysses``. Ranks are laid out row-major,
so the innermost axis (Ulysses, whose all-to-all moves the most bytes) groups adjacent ranks,
which torchrun places on the same node. For ``Plan(cfg=2, ring=2, ulysses=2)`` on 8 ranks::

    rank      0 1 2 3 4 5 6 7
    cfg       0 0 0 0 1 1 1 1
    ring      0 0 1 1 0 0 1 1
    ulysses   0 1 0 1 0 1 0 1

"Axis" names a mesh dimension; "dim" is kept for tensor dimensions.

Timeouts: every process group ditpass makes (the world group, when `init_distributed` creates it, and
the mesh's axis groups) gives up on a collective after ``init_distributed(timeout=...)`` seconds, else
``DITPASS_TIMEOUT``, else `DEFAULT_TIMEOUT_S` (torch's own default is 30 minutes for gloo, 10 for NCCL:
a frozen peer would hold every rank that long). `timeout_error` turns the error of a collective that
timed out into a `DistributedTimeout` that names the collective, this rank and the step.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ditpass.errors import DistributedTimeout
from ditpass.plan import DEGREES, Plan, PlanError

__all__ = ["AXES", "FLATTENED", "ParallelDims", "Placement", "init_distributed", "timeout_seconds", "timeout_error",
           "DEFAULT_TIMEOUT_S"]

# seconds a collective may wait for its peers: an inference step takes seconds, a first call's capture
# and compile minutes (ranks capture in step, so that counts once, not per rank)
DEFAULT_TIMEOUT_S = 300.0
_timeout_s: float | None = None  # what init_distributed was given, for the mesh's groups

AXES = DEGREES
# groups over several axes that passes address as one: the sequence ranks and the batch ranks
FLATTENED = {"sp": ("ring", "ulysses"), "batch": ("dp", "cfg")}


@dataclass(frozen=True)
class Placement:
    """This rank's place in the mesh: its coordinate and group along every axis.

    ``groups`` maps each axis, and each flattened group of `FLATTENED` (``"sp"``: ring x ulysses,
    ``"batch"``: dp x cfg), to the c10d group name of the ranks that share this rank's other
    coordinates; ``""`` where the degree is 1. A dry run (one process, nothing executed) has names
    ``"dry-run:<axis>"``. Passes read the placement, never the mesh."""

    rank: int
    world_size: int
    degrees: dict[str, int]  # axis -> degree, outer to inner
    coords: dict[str, int]  # axis -> this rank's coordinate
    groups: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False

    def degree(self, axis: str) -> int:
        return math.prod(self.degrees[a] for a in FLATTENED.get(axis, (axis,)))

    def coord(self, axis: str) -> int:
        """Coordinate along an axis; along a flattened group, row-major over its axes."""
        c = 0
        for a in FLATTENED.get(axis, (axis,)):
            c = c * self.degrees[a] + self.coords[a]
        return c

    def group(self, axis: str) -> str:
        return self.groups.get(axis, "")


@dataclass(frozen=True)
class ParallelDims:
    """A plan's degrees laid out over ``world_size`` ranks; validated once, on construction."""

    plan: Plan
    world_size: int

    def __post_init__(self):
        self.plan.validate(self.world_size)

    @property
    def degrees(self) -> dict[str, int]:
        """Axis name -> degree, outer to inner."""
        return {axis: getattr(self.plan, axis) for axis in AXES}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.degrees.values())

    @property
    def active_axes(self) -> tuple[str, ...]:
        """Axes with degree > 1, outer to inner."""
        return tuple(axis for axis, n in self.degrees.items() if n > 1)

    def _stride(self, axis: str) -> int:
        """Distance in global ranks between neighbours along ``axis``."""
        return math.prod(self.shape[AXES.index(axis) + 1 :])

    def _check(self, axis: str | None, rank: int):
        if axis is not None and axis not in AXES:
            raise ValueError(f"unknown mesh axis {axis!r}; axes are {', '.join(AXES)}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinate of global ``rank`` along every axis; pure arithmetic, no process group."""
        self._check(None, rank)
        return {axis: rank // self._stride(axis) % n for axis, n in self.degrees.items()}

    def ranks_of(self, axis: str, rank: int) -> list[int]:
        """Global ranks of the group along ``axis`` that contains ``rank``, in axis order."""
        self._check(axis, rank)
        stride = self._stride(axis)
        first = rank - self.coords(rank)[axis] * stride
        return [first + i * stride for i in range(self.degrees[axis])]

    def placement(self, rank: int, mesh=None) -> Placement:
        """``rank``'s `Placement`. With ``mesh`` (every rank must call this then: flattened groups are
        created collectively) the group names are the mesh's; without it, dry-run names."""
        self._check(None, rank)
        groups: dict[str, str] = {}
        for name in (*AXES, *FLATTENED):
            axes = [a for a in FLATTENED.get(name, (name,)) if self.degrees[a] > 1]
            if not axes:
                continue
            if mesh is None:
                groups[name] = f"dry-run:{name}"
            elif len(axes) == 1:
                groups[name] = mesh[axes[0]].get_group().group_name
            else:
                with _new_groups_timeout(timedelta(seconds=timeout_seconds())):
                    groups[name] = mesh[tuple(axes)]._flatten(name).get_group().group_name
        return Placement(rank, self.world_size, self.degrees, self.coords(rank), groups,
                         dry_run=mesh is None and self.world_size > 1)

    def build_mesh(self, device_type: str | None = None):
        """A DeviceMesh over the default process group with all five axes, size-1 ones too,
        so that ``mesh["ulysses"]`` always exists.

        ``device_type`` defaults to ``"cuda"`` under NCCL and ``"cpu"`` otherwise.
        Every rank must call this (it creates the axis process groups collectively).
        """
        from torch.distributed.device_mesh import init_device_mesh

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "build_mesh needs an initialised process group: call "
                "ditpass.mesh.init_distributed() under torchrun first"
            )
        if dist.get_world_size() != self.world_size:
            raise PlanError(
                f"ParallelDims was built for world_size={self.world_size} but the process "
                f"group has {dist.get_world_size()} ranks: rebuild it with "
                f"ParallelDims(plan, dist.get_world_size())"
            )
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        with _new_groups_timeout(timedelta(seconds=timeout_seconds())):
            return init_device_mesh(device_type, self.shape, mesh_dim_names=AXES)


@contextlib.contextmanager
def _new_groups_timeout(timeout: timedelta):
    """Groups created here time out after ``timeout``: c10d gives a new group its backend's default
    (30 min gloo, 10 min NCCL) unless told, and DeviceMesh tells it nothing."""
    c10d = dist.distributed_c10d
    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    try:
        yield
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved


def timeout_seconds(timeout: float | None = None) -> float:
    """The collective timeout in seconds: ``timeout``, else what `init_distributed` was given, else the
    ``DITPASS_TIMEOUT`` environment variable, else `DEFAULT_TIMEOUT_S`."""
    if timeout is None:
        timeout = _timeout_s
    source = "timeout"
    if timeout is None and os.environ.get("DITPASS_TIMEOUT"):
        timeout, source = os.environ["DITPASS_TIMEOUT"], "DITPASS_TIMEOUT"
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"{source}={timeout!r}: give the collective timeout in seconds, a number > 0 "
                         f"(e.g. {DEFAULT_TIMEOUT_S:g})")
    return seconds


_TIMED_OUT = re.compile(r"timed? ?out", re.IGNORECASE)


def timeout_error(exc: BaseException, where: str) -> DistributedTimeout | None:
    """A `DistributedTimeout` for ``exc`` when it is a collective that timed out, else None.

    ``where``: what this rank was doing (the model, call and step). The collective is the outermost
    frame of torch.distributed in the traceback (a Python collective), else the last frame outside
    torch (the ditpass op or model line that called a functional collective)."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, DistributedTimeout) or not _TIMED_OUT.search(str(exc)):
        return None
    frames = [(f, f.filename.replace("\\", "/")) for f in traceback.extract_tb(exc.__traceback__)]
    inside = [f for f, path in frames if "/torch/distributed/" in path and not path.endswith("c10d_logger.py")]
    outside = [(f, path) for f, path in frames if "/torch/" not in path]
    if inside:  # the outermost: the function the caller called (all_gather_object, not its all_gather)
        op = f"torch.distributed.{inside[0].name}"
    elif outside:
        f, path = outside[-1]
        op = f"`{(f.line or '').strip()}` in {f.name} ({'/'.join(path.rsplit('/', 2)[-2:])}:{f.lineno})"
    else:
        op = "a collective"
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return DistributedTimeout(
        f"rank {rank}: {op} timed out after {timeout_seconds():g} s in {where}: a peer rank is stuck, "
        f"stopped or gone (its own log says why). Raise the limit with DITPASS_TIMEOUT=<seconds> or "
        f"init_distributed(timeout=...) if a step legitimately takes longer. ({first})")


def init_distributed(backend: str | None = None, timeout: float | None = None) -> tuple[int, int]:
    """Join the process group and return ``(rank, world_size)``.

    Uses an already initialised group as is; otherwise initialises from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``) with ``backend`` (default NCCL where CUDA is
    available, else gloo); without that environment, a single process: ``(0, 1)``, no group.
    ``timeout``: seconds a collective waits for its peers before it fails (`timeout_seconds`: default
    ``DITPASS_TIMEOUT``, else `DEFAULT_TIMEOUT_S`); it also applies to the mesh groups built after.
    """
    global _timeout_s
    if timeout is not None:
        _timeout_s = timeout_seconds(timeout)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
    missing = [v for v in needed if v not in os.environ]
    if missing:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                f"launch with torchrun, which sets {', '.join(needed)}"
            )
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("torchrun environment found but this torch build has no distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Bind this process to its GPU before NCCL creates communicators on the wrong one.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_seconds()))
    return dist.get_rank(), dist.get_world_size()
