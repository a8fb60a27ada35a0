import os
import time

import pytest
import torch.distributed as dist

from dist_utils import run_distributed
from ditpass.mesh import AXES, ParallelDims, init_distributed
from ditpass.plan import Plan, PlanError


def test_axes_outer_to_inner():
    assert AXES == ("dp", "cfg", "pipefusion", "ring", "ulysses")


def test_validated_on_construction():
    with pytest.raises(PlanError, match="needs 4 processes"):
        ParallelDims(Plan(cfg=2, ulysses=2), 8)


def test_active_axes_and_shape():
    dims = ParallelDims(Plan(cfg=2, ring=2, ulysses=2), 8)
    assert dims.active_axes == ("cfg", "ring", "ulysses")
    assert dims.shape == (1, 2, 1, 2, 2)
    assert ParallelDims(Plan(), 1).active_axes == ()


def test_coords_row_major():
    dims = ParallelDims(Plan(cfg=2, ring=2, ulysses=2), 8)
    got = [tuple(dims.coords(r)[a] for a in ("cfg", "ring", "ulysses")) for r in range(8)]
    assert got == [(c, r, u) for c in range(2) for r in range(2) for u in range(2)]
    assert all(dims.coords(r)["dp"] == 0 and dims.coords(r)["pipefusion"] == 0 for r in range(8))


def test_ranks_of():
    dims = ParallelDims(Plan(cfg=2, ring=2, ulysses=2), 8)
    assert dims.ranks_of("ulysses", 5) == [4, 5]
    assert dims.ranks_of("ring", 5) == [5, 7]
    assert dims.ranks_of("cfg", 5) == [1, 5]
    assert dims.ranks_of("dp", 5) == [5]
    assert dims.ranks_of("pipefusion", 5) == [5]
    # the groups along an axis partition the world, and each contains its rank
    for axis in AXES:
        groups = {tuple(dims.ranks_of(axis, r)) for r in range(8)}
        assert sorted(r for g in groups for r in g) == list(range(8))
        assert all(r in dims.ranks_of(axis, r) for r in range(8))


def test_ranks_of_every_axis_active():
    dims = ParallelDims(Plan(dp=2, cfg=2, pipefusion=2, ring=2, ulysses=2), 32)
    assert dims.ranks_of("dp", 3) == [3, 19]
    assert dims.ranks_of("pipefusion", 19) == [19, 23]
    assert dims.coords(27) == dict(dp=1, cfg=1, pipefusion=0, ring=1, ulysses=1)


def test_bad_axis_or_rank():
    dims = ParallelDims(Plan(ulysses=2), 2)
    with pytest.raises(ValueError, match="axes are dp, cfg"):
        dims.ranks_of("tp", 0)
    with pytest.raises(ValueError, match="rank 2"):
        dims.coords(2)


def test_init_distributed_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    assert init_distributed() == (0, 1)
    assert not dist.is_initialized()


def test_init_distributed_partial_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed()


def test_build_mesh_needs_a_group():
    with pytest.raises(RuntimeError, match="init_distributed"):
        ParallelDims(Plan(), 1).build_mesh()


def _mesh_worker(rank, world_size, plan):
    assert init_distributed() == (rank, world_size)  # uses the group run_distributed made
    dims = ParallelDims(plan, world_size)
    mesh = dims.build_mesh()
    assert mesh.mesh_dim_names == AXES
    return {
        axis: (dist.get_process_group_ranks(mesh[axis].get_group()), dims.ranks_of(axis, rank))
        for axis in AXES
    }


def test_mesh_groups_match_arithmetic():
    results = run_distributed(_mesh_worker, 4, Plan(cfg=2, ulysses=2), timeout=60)
    assert len(results) == 4
    for rank, groups in enumerate(results):
        for axis, (from_mesh, from_arithmetic) in groups.items():
            assert from_mesh == from_arithmetic, (rank, axis)
    assert results[1]["ulysses"][0] == [0, 1]
    assert results[1]["cfg"][0] == [1, 3]


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise PlanError("rank 1 says no")
    dist.barrier()  # rank 0 would hang here without the kill


def test_run_distributed_reraises_child_error():
    with pytest.raises(PlanError, match="rank 1 says no") as info:
        run_distributed(_fail_on_rank_1, 2, timeout=30)
    cause = str(info.value.__cause__)
    assert "rank 1 of 2 failed" in cause and "_fail_on_rank_1" in cause


def _die(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def test_run_distributed_child_dies():
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed"):
        run_distributed(_die, 2, timeout=30)


def _hang_on_rank_1(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


def test_run_distributed_kills_a_hang():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 3 s"):
        run_distributed(_hang_on_rank_1, 2, timeout=3)
    assert time.monotonic() - start < 15
