"""Run a function on N CPU processes joined in a gloo process group, for tests.

    from dist_utils import run_distributed

    def _worker(rank, world_size, plan):      # module level: it is pickled by name
        ...
        return something_picklable

    results = run_distributed(_worker, 4, plan)   # [rank 0's return, rank 1's, ...]

An exception in any rank is re-raised in the caller as the same exception, with the child's
traceback attached as its cause; the other ranks are killed. Nothing waits longer than
``timeout`` seconds: a rank that hangs is killed and TimeoutError names it.

A model test that wants one capture for all its ranks forks them from the parent instead:

    def _worker(rank, world_size, model, inputs, ref, plan):   # any function: nothing is pickled
        ...

    ref, results = run_forked(_worker, 2, model, inputs, plan)   # reference + capture, once, here
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import queue
import shutil
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

__all__ = ["run_distributed", "run_forked", "first_output", "RemoteTraceback"]

# Imported once by the fork server, so that ranks start with them loaded; add modules that
# most multi-process tests import (a missing one is skipped).
PRELOAD = ["torch", "torch.distributed", "torch.distributed.device_mesh", "pytest", "ditpass"]

# After the first failure, how long to keep collecting other ranks' errors before killing them:
# the cause is the earliest one, which need not be the first to arrive.
_ERROR_GRACE_S = 1.0


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a child rank (set as the re-raised one's cause)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self):
        return self.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context(start_method: str = "forkserver"):
    """Fork ranks from a server that imported torch once: starting a rank then costs
    milliseconds instead of a torch import (seconds), and no parent state leaks in as it
    would with a plain fork. ``"fork"`` is for tests that *want* the parent's state (a model
    captured once in the parent instead of once per rank)."""
    if start_method == "fork":
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts, once per session
    return ctx


def _child(rank, world_size, init_file, port, timeout, results, fn, args):
    import torch
    import torch.distributed as dist

    # One thread per rank: the ranks share the machine's cores.
    torch.set_num_threads(1)
    # What torchrun would set; DeviceMesh and ditpass.mesh.init_distributed read these.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # If the parent kills us for a hang, the stacks of every thread are already on stderr.
    faulthandler.dump_traceback_later(max(timeout - 2.0, 1.0), exit=False)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        payload = ("ok", pickle.dumps(fn(rank, world_size, *args)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        payload = ("error", _describe(e))
    # Report before leaving the group: leaving makes peers fail, and the parent tells the
    # cause from the consequences by the time each rank failed.
    results.put((rank, *payload))
    faulthandler.cancel_dump_traceback_later()
    if dist.is_initialized():
        dist.destroy_process_group()


def _describe(e: BaseException) -> tuple:
    """(when it failed, the pickled exception or None if it cannot travel, its traceback)."""
    failed_at = time.time()
    tb = "".join(traceback.format_exception(e))
    try:
        exc = pickle.dumps(e)
        pickle.loads(exc)
    except Exception:  # noqa: BLE001 - an exception that cannot travel
        exc = None
    return failed_at, exc, tb


def run_distributed(fn, world_size: int, *args, timeout: float = 120, start_method: str = "forkserver"):
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` new processes, each in a gloo
    process group (initialised before ``fn`` runs, destroyed after), and return the list of
    their return values by rank.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level), except with
    ``start_method="fork"``: the ranks then inherit them, as every other object of this process
    (see ``run_forked``). Return values are pickled, so tensors come back as copies.
    """
    __tracebackhide__ = True  # pytest: show the child's traceback, not this loop
    ctx = _context(start_method)
    results = ctx.Queue()
    tmpdir = tempfile.mkdtemp(prefix="ditpass_dist_")
    init_file = os.path.join(tmpdir, "init")
    port = _free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, init_file, port, timeout, results, fn, args),
            name=f"rank{rank}",
            # not daemonic, so that fn may start processes of its own (e.g. compile workers)
            daemon=False,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    values: dict[int, object] = {}
    errors: dict[int, tuple] = {}
    error_deadline = None
    try:
        for p in procs:
            p.start()
        while len(values) + len(errors) < world_size:
            now = time.monotonic()
            if error_deadline is not None and now >= error_deadline:
                break
            if now >= deadline:
                waiting = sorted(set(range(world_size)) - values.keys() - errors.keys())
                raise TimeoutError(
                    f"{fn.__qualname__}: ranks {waiting} did not finish within {timeout} s "
                    f"(ranks {sorted(values)} did; their stacks are on stderr above)"
                )
            try:
                rank, status, payload = results.get(timeout=0.1)
            except queue.Empty:
                # A rank that died without reporting (segfault, os._exit, kill) never will.
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if p.exitcode is not None and r not in values and r not in errors
                ]
                # Its message may still be in the pipe: give the queue one more look first.
                if dead and results.empty():
                    time.sleep(0.2)
                    if results.empty():
                        for r in dead:
                            errors[r] = (
                                time.time(),
                                None,
                                f"rank {r} exited with code {procs[r].exitcode} "
                                f"without returning or raising",
                            )
                        error_deadline = error_deadline or time.monotonic() + _ERROR_GRACE_S
                continue
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                error_deadline = error_deadline or time.monotonic() + _ERROR_GRACE_S
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())) if not errors else 0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
        results.cancel_join_thread()
        shutil.rmtree(tmpdir, ignore_errors=True)
    if errors:
        # The earliest failure is the cause: peers fail after it, when its group goes away.
        first = min(errors, key=lambda r: errors[r][0])
        _, exc_bytes, tb = errors[first]
        others = [r for r in errors if r != first]
        header = f"rank {first} of {world_size} failed in {fn.__qualname__}"
        if others:
            header += f" (ranks {others} failed too, likely as a consequence)"
        cause = RemoteTraceback(f"{header}:\n\n{tb}")
        exc = pickle.loads(exc_bytes) if exc_bytes is not None else None
        if exc is None:
            raise RuntimeError(header) from cause
        raise exc from cause
    return [values[r] for r in range(world_size)]


def first_output(out):
    """The first output of a model call: ``out[0]`` of a tuple (``return_dict=False``), else ``.sample``; a list
    of per-sample tensors there (Z-Image, Cosmos3Omni) gives its first sample."""
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def run_forked(fn, world_size: int, model, inputs: dict, *args, timeout: float = 120):
    """The fork-and-capture pattern: the single-process reference ``first_output(model(**inputs))``
    (under ``no_grad``) and ``ditpass.capture(model, **inputs)`` are done once, here; then
    ``fn(rank, world_size, model, inputs, ref, *args)`` runs in ``world_size`` ranks forked from this
    process, so they share the model and hit the capture cache instead of exporting it once each.

    ``fn`` and ``args`` need not be picklable (fork passes them); return values are, as for
    ``run_distributed``. Returns ``(ref, [rank 0's return, rank 1's, ...])``.
    """
    __tracebackhide__ = True
    import torch

    import ditpass

    with torch.no_grad():
        ref = first_output(model(**inputs))
    ditpass.capture(model, **inputs)  # once, in the parent; the forked ranks hit the cache

    def forked(rank, world_size, *args):
        return fn(rank, world_size, model, inputs, ref, *args)

    forked.__qualname__ = fn.__qualname__  # what run_distributed's errors name
    return ref, run_distributed(forked, world_size, *args, timeout=timeout, start_method="fork")
