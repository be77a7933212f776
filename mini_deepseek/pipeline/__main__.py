"""python -m mini_deepseek.pipeline --schedule 1f1b --stages 2 --microbatches 4 [--steps 3 ...]

Starts one process per rank itself, or, launched by torchrun (RANK and WORLD_SIZE set), runs as one of torchrun's
processes. Prints a per-rank table, then, last, one JSON line (RunResult.to_json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from .run import TORCH_SCHEDULES, RunConfig, RunResult, assemble, pipeline_worker, run_pipeline


def parse_args(argv: list[str] | None = None) -> RunConfig:
    parser = argparse.ArgumentParser(prog="python -m mini_deepseek.pipeline", description=__doc__.splitlines()[0],
                                     epilog="Each option is a field of RunConfig (mini_deepseek/pipeline/run.py), "
                                            "where a comment gives its meaning.")
    defaults = RunConfig()
    parser.add_argument("--schedule", default=defaults.schedule, choices=tuple(TORCH_SCHEDULES))
    for field in dataclasses.fields(RunConfig):
        if field.name in ("schedule",):
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name), dest=field.name)
    return RunConfig(**vars(parser.parse_args(argv)))


def run_under_torchrun(config: RunConfig) -> RunResult | None:
    """One of torchrun's processes: join its process group, run this rank's part; rank 0 returns the result."""
    config.validate()
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world_size != config.ranks:
        raise ValueError(f"{config.schedule} with {config.stages} stages needs {config.ranks} processes; torchrun "
                         f"started {world_size}")
    backend = config.resolved_backend()
    dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    try:
        gathered = pipeline_worker(rank, world_size, [config], local_rank=int(os.environ.get("LOCAL_RANK", rank)))
    finally:
        dist.destroy_process_group()
    return None if gathered is None else assemble(config, backend, gathered[0])


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        result = run_under_torchrun(config) if "RANK" in os.environ and "WORLD_SIZE" in os.environ \
            else run_pipeline(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result is None:  # a torchrun rank other than 0
        return 0
    print(f"{config.schedule}: {config.stages} stages on {result.ranks} ranks ({result.backend}), "
          f"{config.microbatches} micro-batches, {config.steps} timed steps")
    for r in range(result.ranks):
        print(f"  rank {r}: busy {result.busy_s[r]:.4f} s, idle {result.idle_s[r]:.4f} s")
    print(f"  makespan {result.makespan_s:.4f} s, bubble {result.bubble_fraction:.1%}, "
          f"max |grad - single-process grad| {result.max_grad_diff:.2e}")
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
