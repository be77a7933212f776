"""Start W local processes joined in one torch.distributed process group, for tests, notebooks and the CLIs.

    run_processes(fn, 4, x, backend="gloo")  ->  [fn(0, 4, x), fn(1, 4, x), fn(2, 4, x), fn(3, 4, x)]

Each process joins the group through a file store in a temporary folder (no port to pick or collide on), runs
fn(rank, world_size, *args) with one thread, sends its result back and destroys its process group however fn
ends. A failure anywhere is raised in the caller with the failing rank's traceback; a run past its time limit
(a hung collective, a rank that never joins) has every process killed and raises TimeoutError, so a caller can
never hang. gloo runs on CPUs; NCCL puts rank r on GPU r. Launched by torchrun instead, code calls
init_process_group itself (see mini_deepseek/pipeline/__main__.py).
"""

from __future__ import annotations

import dataclasses
import os
import queue as queue_module
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_processes(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                  timeout_s: float = 120.0) -> list[Any]:
    """Run fn(rank, world_size, *args) in world_size fresh processes joined in one process group; return the
    results in rank order.

    fn must be importable (defined in a module, not in a notebook cell), as must its arguments; tensors in its
    result come back as tensors. Every process destroys its process group when fn ends, however it ends. If any
    process fails, its traceback is raised here; if the whole run takes longer than timeout_s, every process is
    killed and a TimeoutError is raised. NCCL puts rank r on GPU r, so it needs world_size GPUs.
    """
    if world_size < 1:
        raise ValueError(f"world_size = {world_size}: need at least one process")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend 'nccl' needs one GPU per process: {world_size} processes, "
                         f"{torch.cuda.device_count()} GPUs")
    context = _process_context()
    results: queue_module.Queue = context.Queue()
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = os.path.join(folder, "rendezvous")  # a file store: no port to pick or collide on
        processes = [context.Process(target=_process_main, daemon=True,
                                     args=(fn, rank, world_size, backend, rendezvous, timeout_s, results, args))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        try:
            outcomes: dict[int, Any] = {}
            while len(outcomes) < world_size:
                try:
                    rank, ok, value = results.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
                except queue_module.Empty:
                    dead = [r for r, p in enumerate(processes) if r not in outcomes and p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"rank {dead[0]} died (exit code {processes[dead[0]].exitcode}) "
                                           f"without reporting") from None
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"run_processes: {world_size} processes did not finish within "
                                           f"{timeout_s:.0f} s (waiting for ranks "
                                           f"{sorted(set(range(world_size)) - set(outcomes))})") from None
                    continue
                if not ok:
                    raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
                outcomes[rank] = _unpack(value)
            for process in processes:
                process.join(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
    return [outcomes[rank] for rank in range(world_size)]


def _process_context() -> Any:
    """Fresh processes that start fast: forked from a server process that has imported torch once (Linux, macOS),
    else spawned (Windows), which imports torch again in every process. Neither copies the caller's threads."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # takes effect when the server starts (the first call)
    return context


def _process_main(fn: Callable[..., Any], rank: int, world_size: int, backend: str, rendezvous: str,
                  timeout_s: float, results: queue_module.Queue, args: tuple) -> None:
    torch.set_num_threads(1)  # W processes share the machine's cores
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        results.put((rank, True, _pack(fn(rank, world_size, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclasses.dataclass
class _PackedTensor:
    """A tensor as plain bytes: sent by value (a pickled tensor would travel as shared memory that its sender
    must outlive) and in any dtype (numpy has no bfloat16)."""

    dtype: str
    shape: tuple[int, ...]
    data: Any  # numpy uint8 array


def _pack(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return _PackedTensor(str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy())
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pack(v) for v in value)
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, _PackedTensor):
        return torch.from_numpy(value.data.copy()).view(getattr(torch, value.dtype)).reshape(value.shape)
    if isinstance(value, dict):
        return {k: _unpack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_unpack(v) for v in value)
    return value
