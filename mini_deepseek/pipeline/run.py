"""Train a toy DeepSeekV3 with torch.distributed.pipelining's own schedules on real processes, time every
operation of every rank, and check the gradients against single-process training on the same batch.

    python -m mini_deepseek.pipeline --schedule 1f1b --stages 2 --microbatches 4
    torchrun --nproc-per-node 2 -m mini_deepseek.pipeline --schedule 1f1b --stages 2 --microbatches 4

Without torchrun the command starts one process per rank itself. gloo on CPUs; NCCL when CUDA offers one GPU
per rank (rank r on GPU r). The last line printed is one JSON object (see RunResult.to_json).

Timing: every process records the start and end of each forward_one_chunk, backward_one_chunk and
backward_weight_one_chunk its stages run (the loss, computed right after the last stage's forward, counts as
part of that forward). A step starts for all ranks at a barrier; its makespan is the latest end over ranks;
a rank's busy time is the sum of its operations, its idle time the rest of the makespan (waiting for
messages, and the engine's own bookkeeping between operations). One untimed warm-up step comes first; of the
timed steps, the one with the median makespan is reported (all are kept in RunResult.step_timelines).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules

from ..config import ModelConfig
from ..data import TokenDataset, stdlib_corpus
from ..distributed import run_processes
from ..model import DeepSeekV3
from .schedules import SCHEDULES, Action, Op, Overlapped, Schedule, schedule
from .simulate import Interval, Timeline, simulate_schedule
from .stages import pipeline_config, split_model, stage_layers

# Our name -> (torch.distributed.pipelining class, stages per rank, placement of a rank's two stages)
TORCH_SCHEDULES: dict[str, tuple[str, int, str]] = {
    "gpipe": ("ScheduleGPipe", 1, ""),
    "1f1b": ("Schedule1F1B", 1, ""),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", 2, "loop"),  # rank r: stages r and r + ranks
    "zb-h1": ("ScheduleInterleavedZeroBubble", 1, ""),  # one stage per rank: the zero-bubble paper's ZB-H1
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),  # rank r: stages r and stages-1-r
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}


@dataclass
class RunConfig:
    schedule: str = "1f1b"  # one of TORCH_SCHEDULES
    stages: int = 2  # model stages; ranks = stages / (stages per rank of the schedule)
    microbatches: int = 4  # micro-batches per training step
    steps: int = 3  # timed training steps, after one untimed warm-up step
    microbatch_size: int = 2  # sequences per micro-batch
    seq_len: int = 64  # tokens per sequence
    preset: str = "toy"  # ModelConfig preset of the model cut into stages
    n_layers: int = 0  # blocks of that model (0: the preset's); stages must divide it
    lr: float = 1e-3  # AdamW learning rate, the same for the pipeline and the single-process reference
    seed: int = 0  # model initialization (identical on every rank) and data
    threads: int = 1  # torch threads per process
    backend: str = "auto"  # "gloo", "nccl", or "auto": nccl when CUDA has a GPU for every rank, else gloo
    timeout_s: float = 300.0  # the whole run, and every collective inside it, gives up after this

    @property
    def stages_per_rank(self) -> int:
        return TORCH_SCHEDULES[self.schedule][1]

    @property
    def ranks(self) -> int:
        return self.stages // self.stages_per_rank

    def model_config(self) -> ModelConfig:
        overrides = {"n_layers": self.n_layers} if self.n_layers else {}
        return pipeline_config(ModelConfig.preset(self.preset, **overrides))

    def validate(self) -> None:
        """Raise ValueError naming the requirement a setting breaks."""
        if self.schedule not in TORCH_SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: torch.distributed.pipelining runs {tuple(TORCH_SCHEDULES)}")
        for name in ("stages", "microbatches", "steps", "microbatch_size", "seq_len", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RunConfig.{name} = {getattr(self, name)!r}: must be a positive integer")
        per, P, M = self.stages_per_rank, self.stages, self.microbatches
        if P % per or P // per < 2:
            raise ValueError(f"{self.schedule} puts {per} stage(s) on each rank and a pipeline needs at least 2 "
                             f"ranks: stages must be a multiple of {per} and at least {2 * per}; got {P}")
        stage_layers(self.model_config().n_layers, P)  # stages must divide the blocks
        if self.schedule == "gpipe" and M < 2:
            raise ValueError("gpipe needs microbatches >= 2 (torch's GPipe with one micro-batch has been reported "
                             "to hang)")
        if self.schedule in ("1f1b", "zb-h1", "zbv", "dualpipev") and M < P:
            raise ValueError(f"{self.schedule} needs microbatches >= stages = {P} (its warm-up fills every stage "
                             f"before the first backward); got {M}")
        if self.schedule == "interleaved-1f1b" and M % self.ranks:
            raise ValueError(f"interleaved-1f1b moves micro-batches in rounds of one per rank: microbatches must "
                             f"be a multiple of ranks = {self.ranks}; got {M}")
        if self.seq_len > self.model_config().max_seq_len:
            raise ValueError(f"seq_len = {self.seq_len} exceeds the model's max_seq_len "
                             f"{self.model_config().max_seq_len}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend = {self.backend!r}: 'auto', 'gloo' or 'nccl'")
        if self.backend == "nccl" and torch.cuda.device_count() < self.ranks:
            raise ValueError(f"backend 'nccl' needs one GPU per rank: {self.ranks} ranks, "
                             f"{torch.cuda.device_count()} GPUs")

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= self.ranks else "gloo"


def stages_of_rank(schedule: str, rank: int, ranks: int) -> list[int]:
    """The stages rank `rank` of `ranks` holds under `schedule`, in torch's placement."""
    _, per, style = TORCH_SCHEDULES[schedule]
    if per == 1:
        return [rank]
    return [rank, rank + ranks] if style == "loop" else [rank, 2 * ranks - 1 - rank]


# ----------------------------------------------------------------------------------------------------------------
# Timing inside the processes


class Recorder:
    """Wall-clock spans of the compute operations of one process, relative to the start of the current step."""

    def __init__(self) -> None:
        self.spans: list[list] = []  # [kind, stage, micro-batch, start, end]
        self.origin = 0.0
        self.last_forward: dict[int, list] = {}  # stage -> its latest forward span

    def start_step(self) -> None:
        self.spans, self.last_forward, self.origin = [], {}, time.perf_counter()

    def timed(self, kind: str, stage: int, microbatch: int, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter() - self.origin
        result = fn()
        span = [kind, stage, microbatch, start, time.perf_counter() - self.origin]
        self.spans.append(span)
        if kind == "F":
            self.last_forward[stage] = span
        return result

    def loss_fn(self, last_stage: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The next-token loss of one micro-batch; its time extends the last stage's forward it follows."""
        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            value = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # [mb*T, vocab]
            if last_stage in self.last_forward:  # (torch also calls it once to infer shapes, outside any step)
                self.last_forward[last_stage][4] = time.perf_counter() - self.origin
            return value
        return loss


class TimedStage(PipelineStage):
    """torch's PipelineStage, with each forward, backward and weight-backward timed by a Recorder."""

    def __init__(self, *args: Any, recorder: Recorder, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recorder = recorder

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any):
        return self.recorder.timed("F", self.stage_index, fwd_chunk_id,
                                   lambda: super(TimedStage, self).forward_one_chunk(fwd_chunk_id, *args, **kwargs))

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any):
        # signature (bwd_chunk_id, loss=None, full_backward=True, last_backward=False)
        full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
        return self.recorder.timed("B" if full else "I", self.stage_index, bwd_chunk_id,
                                   lambda: super(TimedStage, self).backward_one_chunk(bwd_chunk_id, *args, **kwargs))

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any):
        return self.recorder.timed("W", self.stage_index, bwd_chunk_id,
                                   lambda: super(TimedStage, self).backward_weight_one_chunk(bwd_chunk_id, *args,
                                                                                             **kwargs))


def torch_order(pipeline_order: dict[int, list]) -> list[list[list]]:
    """torch's per-rank schedule (its `pipeline_order`, idle slots and non-compute actions dropped) as nested
    lists: [kind, stage, micro-batch] or, for an overlapped pair, ["F&B", [F ...], [B ...]]."""
    def plain(action) -> list:
        return [action.computation_type.value, action.stage_index, action.microbatch_index]

    ranks = []
    for rank in sorted(pipeline_order):
        actions = []
        for action in pipeline_order[rank]:
            if action is None:
                continue
            kind = action.computation_type.value
            if kind == "OVERLAP_F_B":
                actions.append(["F&B", *(plain(sub) for sub in action.sub_actions)])
            elif kind in ("F", "B", "I", "W"):
                actions.append(plain(action))
        ranks.append(actions)
    return ranks


def schedule_from_order(name: str, stages: int, microbatches: int, order: list[list[list]]) -> Schedule:
    """A Schedule (the simulator's data) from torch_order's nested lists."""
    def action(item: list) -> Action:
        if item[0] == "F&B":
            return Overlapped(Op(*item[1]), Op(*item[2]))
        return Op(*item)

    return Schedule(name, stages, microbatches, tuple(tuple(action(a) for a in rank) for rank in order))


def _device_for(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pipeline_worker(rank: int, world_size: int, configs: list[RunConfig], local_rank: int | None = None
                    ) -> list[dict] | None:
    """One rank's part of the runs `configs` (in a process group already; all with the same ranks), one after
    the other. Rank 0 returns, per run, every rank's records; the others return None. local_rank picks the GPU
    under NCCL (default: rank)."""
    torch.set_num_threads(configs[0].threads)
    device = _device_for(configs[0].resolved_backend(), rank if local_rank is None else local_rank)
    data = TokenDataset.from_text(stdlib_corpus(max_bytes=300_000))
    runs = [train_one(rank, world_size, config, device, data) for config in configs]
    return runs if rank == 0 else None


def train_one(rank: int, world_size: int, config: RunConfig, device: torch.device, data: TokenDataset) -> dict | None:
    """Train config.steps + 1 steps with the torch schedule and, beside it, the whole model in this process on
    the same batches; rank 0 returns every rank's records."""
    torch.manual_seed(config.seed)
    reference = DeepSeekV3(config.model_config()).to(device)  # the same weights on every rank: same seed, order
    mine = stages_of_rank(config.schedule, rank, world_size)
    modules = split_model(copy.deepcopy(reference), config.stages, keep=mine)
    recorder = Recorder()
    stages = [TimedStage(modules[s], s, config.stages, device, recorder=recorder) for s in mine]
    last = config.stages - 1
    cls = getattr(torch_schedules, TORCH_SCHEDULES[config.schedule][0])
    loss_fn = recorder.loss_fn(last)
    multi = issubclass(cls, torch_schedules.PipelineScheduleMulti)  # these take a list of the rank's stages
    pipe = cls(stages if multi else stages[0], config.microbatches, loss_fn=loss_fn)

    params = {name: p for m in modules.values() for name, p in m.named_parameters()}
    reference_params = dict(reference.named_parameters())
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, foreach=False)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=config.lr, foreach=False)
    batch = config.microbatches * config.microbatch_size
    steps = []
    for step in range(config.steps + 1):
        x, y = (t.to(device) for t in data.get_batch(config.seed * 1000 + step, batch, config.seq_len))  # [batch, T]
        optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        dist.barrier()
        recorder.start_step()
        pipe.step(*((x,) if 0 in mine else ()), target=y if last in mine else None,
                  losses=losses if last in mine else None)
        spans = recorder.spans

        reference_optimizer.zero_grad(set_to_none=True)
        reference_loss, _ = reference.loss(x, y)
        reference_loss.backward()
        grad_diff = max((p.grad - reference_params[name].grad).abs().max().item() for name, p in params.items())
        loss = torch.stack(losses).mean().item() if losses else None
        optimizer.step()
        reference_optimizer.step()
        steps.append({"spans": spans, "grad_diff": grad_diff, "loss": loss, "reference_loss": reference_loss.item()})

    message_s = ping_pong(rank, (config.microbatch_size, config.seq_len, reference.config.dim), device)
    record = {"rank": rank, "stages": mine, "steps": steps, "message_s": message_s}
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(record, gathered, dst=0)
    if rank != 0:
        return None
    # Multi-stage schedules execute their pipeline_order; GPipe's and 1F1B's are loops whose pipeline_order is
    # only a picture (torch 2.13's for 1F1B even misnumbers the last rank's micro-batches): not returned.
    runtime = isinstance(pipe, torch_schedules._PipelineScheduleRuntime)
    return {"records": gathered, "order": torch_order(pipe.pipeline_order) if runtime else None}


def ping_pong(rank: int, shape: tuple[int, ...], device: torch.device, rounds: int = 10) -> float:
    """Seconds one activation-sized float32 message takes from rank 0 to rank 1 (half a round trip, averaged);
    the other ranks wait at the barrier. 0.0 on ranks other than 0."""
    message = torch.zeros(shape, device=device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        if rank == 0:
            dist.send(message, dst=1)
            dist.recv(message, src=1)
        elif rank == 1:
            dist.recv(message, src=0)
            dist.send(message, dst=0)
    elapsed = time.perf_counter() - start
    dist.barrier()
    return elapsed / (2 * rounds) if rank == 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The result


@dataclass
class RunResult:
    config: RunConfig
    ranks: int
    backend: str
    executed: Schedule  # the operations each rank ran, in the order it ran them (measured)
    planned: Schedule  # the same order as the simulator takes it: our schedule(), or torch's own order (zbv),
    #                    with F&B pairs where the schedule overlaps them
    makespan_s: float  # of the timed step with the median makespan (below: of that step too)
    busy_s: list[float]  # per rank: time inside its operations
    idle_s: list[float]  # per rank: makespan - busy
    bubble_fraction: float  # sum(idle) / (ranks x makespan)
    max_grad_diff: float  # largest |gradient - single-process gradient| of any parameter, over all steps
    max_loss_diff: float  # largest |pipeline loss - single-process loss| over all steps
    message_s: float  # one activation-sized message from rank 0 to rank 1, measured after training
    losses: list[float]  # the pipeline's loss at every step (the warm-up step first)
    timeline: Timeline  # the measured timeline of the timed step with the median makespan
    step_timelines: list[Timeline]  # every timed step's measured timeline

    def stage_costs(self) -> dict[str, list[float]]:
        """Median seconds per stage over the timed steps, as simulate() takes them: F; B the whole backward (a B,
        or the I and W of one micro-batch added up); W the weight part where the schedule splits it, else 0.
        Noise on a shared machine can make the median W exceed the median whole backward: W is capped at B."""
        F: dict[int, list[float]] = {}
        whole: dict[int, list[float]] = {}
        W: dict[int, list[float]] = {}
        for timeline in self.step_timelines:
            split: dict[tuple[int, int], float] = {}  # (stage, micro-batch) -> I + W so far
            for iv in timeline.intervals:
                op, seconds = iv.action, iv.end - iv.start
                if op.kind == "F":
                    F.setdefault(op.stage, []).append(seconds)
                elif op.kind == "B":
                    whole.setdefault(op.stage, []).append(seconds)
                else:  # I or W
                    split[op.stage, op.microbatch] = split.get((op.stage, op.microbatch), 0.0) + seconds
                    if op.kind == "W":
                        W.setdefault(op.stage, []).append(seconds)
            for (stage, _), seconds in split.items():
                whole.setdefault(stage, []).append(seconds)
        P = self.config.stages
        costs = {"F": [statistics.median(F[s]) for s in range(P)], "B": [statistics.median(whole[s]) for s in range(P)]}
        costs["W"] = [min(statistics.median(W[s]), costs["B"][s]) if s in W else 0.0 for s in range(P)]
        return costs

    def simulated(self, comm: float = 0.0) -> Timeline:
        """The simulator's timeline of the planned order with this run's measured per-stage costs (and comm per
        message between ranks: pass self.message_s for the measured one)."""
        return simulate_schedule(self.planned, comm=comm, **self.stage_costs())

    def to_json(self) -> dict:
        """The CLI's last line."""
        return {"schedule": self.config.schedule, "stages": self.config.stages,
                "microbatches": self.config.microbatches, "ranks": self.ranks, "backend": self.backend,
                "steps": self.config.steps, "makespan_s": round(self.makespan_s, 6),
                "busy_s": [round(b, 6) for b in self.busy_s], "idle_s": [round(i, 6) for i in self.idle_s],
                "bubble_fraction": round(self.bubble_fraction, 4), "max_grad_diff": self.max_grad_diff,
                "max_loss_diff": self.max_loss_diff, "message_s": round(self.message_s, 6),
                "losses": [round(v, 5) for v in self.losses]}


def assemble(config: RunConfig, backend: str, gathered: dict) -> RunResult:
    """Rank 0's gathered records -> RunResult (measured timelines, per-rank busy and idle)."""
    records = sorted(gathered["records"], key=lambda r: r["rank"])
    ranks = len(records)
    P, M = config.stages, config.microbatches
    executed = Schedule(config.schedule, P, M, tuple(
        tuple(Op(kind, stage, mb) for kind, stage, mb, _, _ in sorted(r["steps"][0]["spans"], key=lambda s: s[3]))
        for r in records))
    planned = schedule(config.schedule, P, M) if config.schedule in SCHEDULES else \
        schedule_from_order(config.schedule, P, M, gathered["order"])
    timelines = []
    for step in range(1, config.steps + 1):  # step 0 warms up: communicators, shape inference, allocator
        intervals = [Interval(r["rank"], Op(kind, stage, mb), start, end)
                     for r in records for kind, stage, mb, start, end in r["steps"][step]["spans"]]
        timelines.append(Timeline.from_intervals(executed, intervals, origin=0.0))  # 0: the step's barrier
    # The step with the median makespan stands for the run: the load of a shared machine makes single steps
    # (and so means) jumpy; every step stays in step_timelines.
    median = sorted(timelines, key=lambda t: t.makespan)[len(timelines) // 2]
    last_rank = next(r for r in records if config.stages - 1 in r["stages"])
    return RunResult(
        config=config, ranks=ranks, backend=backend, executed=executed, planned=planned,
        makespan_s=median.makespan, busy_s=median.busy, idle_s=median.idle, bubble_fraction=median.bubble_fraction,
        max_grad_diff=max(s["grad_diff"] for r in records for s in r["steps"]),
        max_loss_diff=max(abs(s["loss"] - s["reference_loss"]) for s in last_rank["steps"]),
        message_s=records[0]["message_s"], losses=[s["loss"] for s in last_rank["steps"]], timeline=median,
        step_timelines=timelines)


def run_pipeline(config: RunConfig | None = None, **overrides: Any) -> RunResult:
    """Start config.ranks processes, train, and return the measured result (see the module docstring)."""
    return run_pipelines([dataclasses.replace(config or RunConfig(), **overrides)])[0]


def run_pipelines(configs: list[RunConfig]) -> list[RunResult]:
    """Several runs in one set of processes (starting one costs seconds of imports): they must need the same
    number of ranks. The time limit is the sum of theirs."""
    for config in configs:
        config.validate()
    if len({(c.ranks, c.resolved_backend(), c.threads) for c in configs}) != 1:
        raise ValueError("run_pipelines: every run must need the same ranks, backend and threads; got "
                         f"{[(c.schedule, c.ranks, c.resolved_backend(), c.threads) for c in configs]}")
    backend = configs[0].resolved_backend()
    results = run_processes(pipeline_worker, configs[0].ranks, configs, backend=backend,
                            timeout_s=sum(c.timeout_s for c in configs))
    return [assemble(config, backend, gathered) for config, gathered in zip(configs, results[0], strict=True)]
