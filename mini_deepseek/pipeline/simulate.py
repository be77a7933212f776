"""Time a pipeline schedule: when each operation runs, how long each device idles, how much it holds.

Cost model (the assumptions of the bubble formulas in the zero-bubble and DualPipe papers, made explicit):
- F, B and W are the times of one chunk's forward, whole backward and weight-gradient part (I = B - W), the
  same for every micro-batch; each may differ per stage (pass a list), not per micro-batch.
- A device runs one operation at a time, in its schedule's order, each as soon as its inputs exist:
  F(s, m) after F(s-1, m); the backward (B or I) of (s, m) after F(s, m) and after the backward of (s+1, m);
  W(s, m) after I(s, m).
- `comm` is the time a point-to-point message takes between devices (activations forward, gradients back);
  neighbouring stages on one device pass them for free. The papers' formulas assume comm = 0.
- `a2a` is the expert-parallel all-to-all (dispatch + combine) inside one F, B or I chunk. A lone chunk waits
  for it: it costs F + a2a. DualPipe's overlapped F&B runs both chunks' computation while their all-to-alls go
  on beside it, so the pair costs max(F + B, 2 a2a) (DeepSeek-V3 report, section 3.2.1, figure 4). W moves no
  tokens. The papers' formulas use F&B for the pair's time; with a2a = 0 it is F + B.

Activation memory: a chunk's activations are alive from the start of its forward to the end of its backward's
input-gradient part (B, or I). W still reads the inputs of the weight matrices, which the zero-bubble paper
counts as a smaller separate term (M_W in its table 1); the count here, like DualPipe's table, ignores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .schedules import Action, Op, Overlapped, Schedule, ops_of, schedule

Costs = float | Sequence[float]


@dataclass(frozen=True)
class Interval:
    device: int
    action: Action
    start: float
    end: float


@dataclass
class Timeline:
    """When every action of a schedule ran, and what that means for each device."""

    schedule: Schedule
    intervals: list[Interval]  # in start order per device
    origin: float  # time zero: the first start (simulated), or the barrier that started the step (measured)
    makespan: float  # from origin to the last end, over all devices
    busy: list[float]  # per device: time spent computing
    idle: list[float]  # per device: makespan - busy (waiting before, between and after its operations)
    bubble_fraction: float  # sum(idle) / (devices x makespan)
    peak_activations: list[int]  # per device: most chunks' activations alive at once
    parameters_per_device: list[int]  # per device: model stages whose weights it holds

    @classmethod
    def from_intervals(cls, schedule: Schedule, intervals: list[Interval], origin: float | None = None) -> Timeline:
        """The figures of a timeline, simulated or measured (run.py builds measured ones); origin defaults to
        the first start."""
        D = schedule.n_devices
        if not intervals:
            raise ValueError("a timeline needs at least one interval")
        origin = min(iv.start for iv in intervals) if origin is None else origin
        makespan = max(iv.end for iv in intervals) - origin
        busy = [0.0] * D
        for iv in intervals:
            busy[iv.device] += iv.end - iv.start
        idle = [makespan - b for b in busy]
        fraction = sum(idle) / (D * makespan) if makespan > 0 else 0.0
        return cls(schedule, sorted(intervals, key=lambda iv: (iv.device, iv.start)), origin, makespan, busy, idle,
                   fraction, _peak_activations(D, intervals), schedule.parameters_per_device())

    def summary(self) -> dict:
        """The headline figures as plain numbers (what the notebook tables print)."""
        return {"schedule": self.schedule.name, "stages": self.schedule.stages,
                "microbatches": self.schedule.microbatches, "devices": self.schedule.n_devices,
                "makespan": self.makespan, "idle_per_device": max(self.idle), "bubble_fraction": self.bubble_fraction,
                "peak_activations": max(self.peak_activations),
                "parameters_per_device": max(self.parameters_per_device)}


def _peak_activations(n_devices: int, intervals: list[Interval]) -> list[int]:
    events: list[list[tuple[float, int]]] = [[] for _ in range(n_devices)]  # (time, +1 or -1); frees sort first
    for iv in intervals:
        for op in ops_of(iv.action):
            if op.kind == "F":
                events[iv.device].append((iv.start, +1))
            elif op.kind in ("B", "I"):
                events[iv.device].append((iv.end, -1))
    peaks = []
    for device_events in events:
        alive = peak = 0
        for _, change in sorted(device_events):
            alive += change
            peak = max(peak, alive)
        peaks.append(peak)
    return peaks


def _per_stage(name: str, value: Costs, stages: int) -> list[float]:
    values = [float(value)] * stages if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != stages:
        raise ValueError(f"cost {name} has {len(values)} entries for {stages} stages")
    if any(v < 0 for v in values):
        raise ValueError(f"cost {name} = {value}: times must not be negative")
    return values


def simulate_schedule(sched: Schedule, F: Costs = 1.0, B: Costs = 2.0, W: Costs = 0.0, comm: float = 0.0,
                      a2a: float = 0.0) -> Timeline:
    """Run `sched` under the cost model of this module's docstring and return its timeline."""
    P = sched.stages
    f, b, w = (_per_stage(name, value, P) for name, value in (("F", F), ("B", B), ("W", W)))
    for s in range(P):
        if w[s] > b[s]:
            raise ValueError(f"W = {w[s]} exceeds B = {b[s]} at stage {s}: the weight part is a part of the backward")
    if comm < 0 or a2a < 0:
        raise ValueError(f"comm = {comm} and a2a = {a2a} must not be negative")
    compute = {"F": f, "B": b, "I": [b[s] - w[s] for s in range(P)], "W": w}

    def cost(action: Action) -> float:
        if isinstance(action, Overlapped):
            return max(sum(compute[op.kind][op.stage] for op in action.ops), 2 * a2a)
        return compute[action.kind][action.stage] + (a2a if action.kind != "W" else 0.0)

    done: dict[tuple[str, int, int], tuple[float, int]] = {}  # (kind, stage, mb) -> (end time, device)

    def ready_time(op: Op, device: int) -> float | None:
        """When op's inputs are on `device`, or None while some input is still missing."""
        needs = []
        if op.kind == "F" and op.stage > 0:
            needs.append(("F", op.stage - 1, op.microbatch))
        elif op.kind in ("B", "I"):
            needs.append(("F", op.stage, op.microbatch))
            if op.stage < P - 1:
                later = ("B", op.stage + 1, op.microbatch)
                needs.append(later if later in done else ("I", op.stage + 1, op.microbatch))
        elif op.kind == "W":
            needs.append(("I", op.stage, op.microbatch))
        t = 0.0
        for key in needs:
            if key not in done:
                return None
            end, where = done[key]
            t = max(t, end + (comm if where != device else 0.0))
        return t

    clock = [0.0] * sched.n_devices
    position = [0] * sched.n_devices
    intervals: list[Interval] = []
    remaining = sum(len(actions) for actions in sched.devices)
    while remaining:
        progressed = False
        for d, actions in enumerate(sched.devices):
            while position[d] < len(actions):
                action = actions[position[d]]
                times = [ready_time(op, d) for op in ops_of(action)]
                if any(t is None for t in times):
                    break
                start = max([clock[d], *times])
                end = start + cost(action)
                for op in ops_of(action):
                    done[op.kind, op.stage, op.microbatch] = (end, d)
                intervals.append(Interval(d, action, start, end))
                clock[d], position[d] = end, position[d] + 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {d: str(actions[position[d]]) for d, actions in enumerate(sched.devices)
                     if position[d] < len(actions)}
            raise ValueError(f"{sched.name}: the schedule deadlocks, every device waits on an input that comes "
                             f"later in some device's order; next actions per device: {stuck}")
    return Timeline.from_intervals(sched, intervals)


def simulate(name: str, stages: int, microbatches: int, F: Costs = 1.0, B: Costs = 2.0, W: Costs = 0.0,
             comm: float = 0.0, a2a: float = 0.0) -> Timeline:
    """Build schedule `name` (see schedules.SCHEDULES) and time it; F, B, W per chunk (B a whole backward, W its
    weight part), comm per point-to-point message, a2a per chunk's all-to-all (see this module's docstring)."""
    return simulate_schedule(schedule(name, stages, microbatches), F=F, B=B, W=W, comm=comm, a2a=a2a)


# --------------------------------------------------------------------------------------------------------------
# The closed forms, per device, in DualPipe's notation (B whole backward, W its weight part, F&B the overlapped
# pair). They hold under the cost model above with comm = 0, uniform stages and the conditions named.


def closed_form_idle(name: str, stages: int, microbatches: int, F: float = 1.0, B: float = 2.0, W: float = 0.0,
                     FB: float | None = None) -> float:
    """The bubble formula for `name`: idle time per device (the most idle device for dualpipe/dualpipev).

        naive             M (P-1)(F+B)             one micro-batch in flight: every device waits for the others
        gpipe, 1f1b       (P-1)(F+B)               GPipe's fraction (P-1)/(M+P-1) of a makespan (M+P-1)(F+B)
        interleaved-1f1b  (D-1)(F+B), D = P/2      devices; F, B per stage (half a device's share)
        zb-h1             (P-1)(F+B-2W)            zero-bubble paper, 1/3 of 1F1B's at F = B-W = W; needs W <= F
        dualpipe(v)       (P/2-1)(F&B+B-3W)        DualPipe's table, F&B = F + B without all-to-all
    """
    P, M = stages, microbatches
    FB = F + B if FB is None else FB
    formulas = {
        "naive": M * (P - 1) * (F + B),
        "gpipe": (P - 1) * (F + B),
        "1f1b": (P - 1) * (F + B),
        "interleaved-1f1b": (P // 2 - 1) * (F + B),
        "zb-h1": (P - 1) * (F + B - 2 * W),
        "dualpipe": (P // 2 - 1) * (FB + B - 3 * W),
        "dualpipev": (P // 2 - 1) * (FB + B - 3 * W),
    }
    if name not in formulas:
        raise ValueError(f"unknown schedule {name!r}; choose one of {tuple(formulas)}")
    return formulas[name]
