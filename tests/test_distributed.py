"""run_processes: results in rank order (tensors of any dtype by value), a failing rank's traceback raised in the
caller, a hung collective killed at the time limit, and bad settings refused before any process starts."""

import time

import pytest
import torch
import torch.distributed as dist

from mini_deepseek.distributed import run_processes


def sum_worker(rank: int, world_size: int, scale: float) -> dict:
    """All-reduce each rank's number; return it with a bfloat16 tensor so the result travels by value."""
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return {"rank": rank, "total": total.item() * scale, "tensor": torch.full((2, 3), rank, dtype=torch.bfloat16),
            "group_size": dist.get_world_size()}


def failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise KeyError("rank 1 broke on purpose")


def hanging_worker(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        time.sleep(600)


def test_results_come_back_in_rank_order_with_tensors():
    results = run_processes(sum_worker, 3, 2.0, timeout_s=120)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["total"] == 12.0 and r["group_size"] == 3 for r in results)  # (1 + 2 + 3) * 2
    for rank, r in enumerate(results):
        assert r["tensor"].dtype == torch.bfloat16 and r["tensor"].shape == (2, 3)
        assert torch.equal(r["tensor"], torch.full((2, 3), rank, dtype=torch.bfloat16))


def test_a_failure_and_a_timeout_are_raised_here():
    with pytest.raises(RuntimeError, match="rank 1 broke on purpose"):
        run_processes(failing_worker, 2, timeout_s=120)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 5 s"):
        run_processes(hanging_worker, 2, timeout_s=5)
    assert time.monotonic() - started < 30  # killed, not left running


def test_bad_settings_are_refused_before_starting():
    with pytest.raises(ValueError, match="world_size = 0"):
        run_processes(failing_worker, 0)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="one GPU per process"):
            run_processes(failing_worker, 64, backend="nccl")
