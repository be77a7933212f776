"""Pipeline schedules as data: the ordered operations each device runs in one training step.

A model cut into `stages` consecutive pieces (stage 0 holds the embedding, the last stage the output head and
the loss) trains on a batch split into `microbatches`. Every (stage, micro-batch) pair needs a forward and a
backward; a schedule says which device runs them and in which order. Nothing here runs a model: the simulator
(simulate.py) times a schedule, and run.py hands the same orders to torch.distributed.pipelining.

Operation kinds, in the vocabulary of DualPipe's table (DeepSeek-V3 report, arXiv 2412.19437, section 3.2.1, and
github.com/deepseek-ai/DualPipe):

    F    forward of one micro-batch through one stage (a "chunk")
    B    the whole backward of that chunk: gradients of its input and of its weights
    I    the input-gradient part of B alone, which the previous stage is waiting for
    W    the weight-gradient part of B, which nobody waits for and can run later (B = I + W)
    F&B  DualPipe's overlapped pair: the forward of one chunk and the backward of another, run together so
         that each one's all-to-all communication hides under the other's computation

The zero-bubble paper (Qi et al., arXiv 2401.10241) writes B for what is called I here, and its bubble
formulas in those terms; this module (like DualPipe's table) always means the whole backward by B.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

KINDS = ("F", "B", "I", "W")
SCHEDULES = ("naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Op:
    kind: str  # "F", "B" (whole backward), "I" (its input-gradient part) or "W" (its weight-gradient part)
    stage: int  # model stage, 0 .. stages-1
    microbatch: int  # 0 .. microbatches-1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Op.kind = {self.kind!r}: must be one of {KINDS}")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}/s{self.stage}"


@dataclass(frozen=True)
class Overlapped:
    """DualPipe's F&B: the forward of one chunk and the backward (B or I) of another, run as one unit."""

    forward: Op
    backward: Op
    kind: ClassVar[str] = "F&B"

    def __post_init__(self) -> None:
        if self.forward.kind != "F" or self.backward.kind not in ("B", "I"):
            raise ValueError(f"an overlapped pair is a forward and a backward, got {self.forward} and {self.backward}")

    @property
    def ops(self) -> tuple[Op, Op]:
        return self.forward, self.backward

    def __str__(self) -> str:
        return f"({self.forward}&{self.backward})"


Action = Op | Overlapped


def ops_of(action: Action) -> tuple[Op, ...]:
    """The plain operations inside an action: itself, or the two halves of an overlapped pair."""
    return action.ops if isinstance(action, Overlapped) else (action,)


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int  # model stages
    microbatches: int
    devices: tuple[tuple[Action, ...], ...]  # devices[d] = device d's actions, in the order it runs them

    def __post_init__(self) -> None:
        check_complete(self)

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    def stages_on(self, device: int) -> list[int]:
        """The model stages whose weights device `device` holds (those it runs any operation of)."""
        return sorted({op.stage for action in self.devices[device] for op in ops_of(action)})

    def parameters_per_device(self) -> list[int]:
        """Weights held by each device, in stages (a stage = 1/stages of the model's layers)."""
        return [len(self.stages_on(d)) for d in range(self.n_devices)]

    def order(self, device: int) -> list[str]:
        """Device `device`'s actions as short strings, e.g. ['F0/s0', 'F1/s0', 'B0/s0', ...]."""
        return [str(action) for action in self.devices[device]]


def check_complete(schedule: Schedule) -> None:
    """Every (stage, micro-batch) has one F and either one B or one I and one W, F and backward on one device."""
    P, M = schedule.stages, schedule.microbatches
    counts: Counter = Counter()
    home: dict[tuple[int, int], int] = {}  # (stage, micro-batch) -> device of its forward
    for device, actions in enumerate(schedule.devices):
        for op in (op for action in actions for op in ops_of(action)):
            if not (0 <= op.stage < P and 0 <= op.microbatch < M):
                raise ValueError(f"{schedule.name}: {op} lies outside {P} stages x {M} micro-batches")
            counts[op.kind, op.stage, op.microbatch] += 1
            if op.kind == "F":
                home[op.stage, op.microbatch] = device
            elif home.get((op.stage, op.microbatch), device) != device:
                raise ValueError(f"{schedule.name}: {op} runs on device {device}, away from its forward's "
                                 f"activations on device {home[op.stage, op.microbatch]}")
    for s in range(P):
        for m in range(M):
            f, b, i, w = (counts[kind, s, m] for kind in KINDS)
            if f != 1 or not ((b, i, w) == (1, 0, 0) or (b, i, w) == (0, 1, 1)):
                raise ValueError(f"{schedule.name}: stage {s}, micro-batch {m} has {f} F, {b} B, {i} I, {w} W; "
                                 f"it needs one F and either one B or one I and one W")


# --------------------------------------------------------------------------------------------------------------
# The schedules


def schedule(name: str, stages: int, microbatches: int) -> Schedule:
    """The schedule `name` (one of SCHEDULES) for `stages` model stages and `microbatches` micro-batches.

    Devices: naive, gpipe, 1f1b, zb-h1 and dualpipe put one device per stage (DualPipe's devices also hold a
    second stage, the mirror one, for the reverse direction); interleaved-1f1b and dualpipev put two stages on
    each of stages/2 devices (interleaved: stages d and d + stages/2; dualpipev: stages d and stages-1-d, a V).
    """
    builders = {"naive": naive, "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved-1f1b": interleaved_1f1b,
                "zb-h1": zb_h1, "dualpipe": dualpipe, "dualpipev": dualpipev}
    if name not in builders:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    for label, value in (("stages", stages), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {label} = {value!r} must be a positive integer")
    return builders[name](stages, microbatches)


def _build(name: str, stages: int, microbatches: int, devices: list[list[Action]]) -> Schedule:
    return Schedule(name, stages, microbatches, tuple(tuple(actions) for actions in devices))


def naive(P: int, M: int) -> Schedule:
    """No pipelining: micro-batch m goes forward through every stage and back before m + 1 enters."""
    return _build("naive", P, M, [[Op(kind, s, m) for m in range(M) for kind in "FB"] for s in range(P)])


def gpipe(P: int, M: int) -> Schedule:
    """GPipe (Huang et al., arXiv 1811.06965): every forward, then every backward (micro-batch order)."""
    return _build("gpipe", P, M, [[Op("F", s, m) for m in range(M)] + [Op("B", s, m) for m in range(M)]
                                  for s in range(P)])


def one_f_one_b_actions(s: int, P: int, M: int, backward: str = "B") -> list[Op]:
    """Stage s of 1F1B: P-1-s warm-up forwards, then one forward and one backward in turn, then the rest of
    the backwards. Stage s never holds more than P - s micro-batches' activations."""
    warmup = P - 1 - s
    actions = [Op("F", s, m) for m in range(warmup)]
    for k in range(M - warmup):
        actions += [Op("F", s, warmup + k), Op(backward, s, k)]
    return actions + [Op(backward, s, m) for m in range(M - warmup, M)]


def _need_microbatches(name: str, M: int, least: int, why: str) -> None:
    if M < least:
        raise ValueError(f"{name} needs microbatches >= {least} ({why}); got {M}")


def one_f_one_b(P: int, M: int) -> Schedule:
    """1F1B (PipeDream-flush, Narayanan et al., arXiv 2006.09503): the same bubble as GPipe, memory P not M."""
    _need_microbatches("1f1b", M, P, "stage 0 runs stages warm-up forwards before its first backward")
    return _build("1f1b", P, M, [one_f_one_b_actions(s, P, M) for s in range(P)])


def zb_h1(P: int, M: int) -> Schedule:
    """ZB-H1 (zero-bubble paper, section 3.1: 1F1B's memory, bubble (P-1)(F+B-2W)) written as one rule on 1F1B
    with each backward split into I and W: stage s runs the W of its first s micro-batches late (at the very end,
    where it would otherwise idle); that shortens its early cycles, so input gradients travel back to stage 0
    sooner. The same order as torch's ScheduleInterleavedZeroBubble with one stage per rank."""
    _need_microbatches("zb-h1", M, P, "stage 0 runs stages warm-up forwards before its first backward")
    devices = []
    for s in range(P):
        actions: list[Action] = []
        waiting: list[int] = []  # micro-batches whose I ran and whose W has not
        for op in one_f_one_b_actions(s, P, M, backward="I"):
            actions.append(op)
            if op.kind == "I":
                waiting.append(op.microbatch)
                if op.microbatch >= s:  # the first s W passes wait for the end
                    actions.append(Op("W", s, waiting.pop(0)))
        devices.append(actions + [Op("W", s, m) for m in waiting])
    return _build("zb-h1", P, M, devices)


def interleaved_1f1b(P: int, M: int) -> Schedule:
    """Interleaved 1F1B (Megatron-LM, Narayanan et al., arXiv 2104.04473, section 2.2) with two stages per
    device: device d holds stages d and d + D (D = P/2 devices). Micro-batches move in rounds of D: a device
    runs D forwards of its first stage, then D of its second, and so on; backwards in the mirrored order.
    The bubble shrinks by the number of stages per device, for twice the point-to-point messages."""
    if P % 2:
        raise ValueError(f"interleaved-1f1b puts two stages on each device, so stages must be even; got {P}")
    D = P // 2
    if M % D:
        raise ValueError(f"interleaved-1f1b moves micro-batches in rounds of stages/2 = {D}: microbatches must be "
                         f"a multiple of {D}; got {M}")
    devices = []
    for d in range(D):
        total = 2 * M  # forwards (and backwards) of the device: M per stage
        warmup = min(D + 2 * (D - 1 - d), total)
        actions = [_interleaved_op("F", d, D, k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [_interleaved_op("F", d, D, warmup + k), _interleaved_op("B", d, D, k)]
        devices.append(actions + [_interleaved_op("B", d, D, k) for k in range(total - warmup, total)])
    return _build("interleaved-1f1b", P, M, devices)


def _interleaved_op(kind: str, device: int, D: int, k: int) -> Op:
    """The k-th forward (kind "F") or backward ("B") of `device` in interleaved 1F1B: rounds of D micro-batches,
    first through the device's stage `device`, then through `device + D`; backwards take the stages in reverse."""
    round_, within = divmod(k, 2 * D)
    chunk = within // D if kind == "F" else 1 - within // D
    return Op(kind, device + D * chunk, round_ * D + within % D)


class _DualPipeRank:
    """One rank's order in DeepSeek's DualPipe / DualPipeV (dualpipe.py / dualpipev.py, `step`): two model
    stages per rank, "phase 0" and "phase 1", with per-phase forward and backward counters and a FIFO of
    postponed weight passes (their WeightGradStore)."""

    def __init__(self, stage_of_phase: tuple[int, int], first_microbatch: tuple[int, int]):
        self.stage_of_phase, self.first_microbatch = stage_of_phase, first_microbatch
        self.forwards, self.backwards = [0, 0], [0, 0]
        self.postponed: list[Op] = []
        self.actions: list[Action] = []

    def _forward_op(self, phase: int) -> Op:
        m = self.first_microbatch[phase] + self.forwards[phase]
        self.forwards[phase] += 1
        return Op("F", self.stage_of_phase[phase], m)

    def _backward_op(self, phase: int, zero_bubble: bool) -> Op:
        m = self.first_microbatch[phase] + self.backwards[phase]
        self.backwards[phase] += 1
        op = Op("I" if zero_bubble else "B", self.stage_of_phase[phase], m)
        if zero_bubble:
            self.postponed.append(Op("W", op.stage, op.microbatch))
        return op

    def forward(self, phase: int) -> None:
        self.actions.append(self._forward_op(phase))

    def backward(self, phase: int, zero_bubble: bool = False) -> None:
        self.actions.append(self._backward_op(phase, zero_bubble))

    def forward_backward(self, forward_phase: int, backward_phase: int) -> None:
        self.actions.append(Overlapped(self._forward_op(forward_phase), self._backward_op(backward_phase, False)))

    def weight(self) -> None:
        self.actions.append(self.postponed.pop(0))

    def run_steps(self, n: int, h: int, chunks: int, unpaired_first: bool) -> list[Action]:
        """The eight steps of DualPipe's `step` for half-rank h of n (DualPipeV: rank h of n), `chunks`
        micro-batches per phase; `unpaired_first` marks the rank whose first step-4 pair is not overlapped."""
        for _ in range((n - h - 1) * 2):  # step 1: nF0
            self.forward(0)
        for _ in range(h + 1):  # step 2: nF0F1
            self.forward(0)
            self.forward(1)
        for _ in range(n - h - 1):  # step 3: nB1W1F1, zero bubble
            self.backward(1, zero_bubble=True)
            self.weight()
            self.forward(1)
        for i in range(chunks - 2 * n + h + 1):  # step 4, the main step: nF0B1F1B0
            if i == 0 and unpaired_first:  # "we don't overlap these two chunks to further reduce bubble size"
                self.forward(0)
                self.backward(1)
            else:
                self.forward_backward(0, 1)
            self.forward_backward(1, 0)
        for _ in range(n - h - 1):  # step 5: nB1F1B0
            self.backward(1)
            self.forward_backward(1, 0)
        zero_bubble = False
        for i in range(h + 1):  # step 6: nB1B0, the second half with zero bubble
            if i == (h + 1) // 2 and h % 2 == 1:
                zero_bubble = True
            self.backward(1, zero_bubble)
            if i == (h + 1) // 2 and h % 2 == 0:
                zero_bubble = True
            self.backward(0, zero_bubble)
        for _ in range(n - h - 1):  # step 7: nWB0, zero bubble
            self.weight()
            self.backward(0, zero_bubble=True)
        for _ in range(h + 1):  # step 8: nW
            self.weight()
        assert not self.postponed, "every postponed weight pass must have run"
        return self.actions


def dualpipe(P: int, M: int) -> Schedule:
    """DualPipe (DeepSeek-V3 report, section 3.2.1; the order of deepseek-ai/DualPipe's dualpipe.py).

    P devices, P even, device d holding stage d for micro-batches 0 .. M/2-1 travelling down the pipeline, and
    stage P-1-d (a second copy of the weights) for micro-batches M/2 .. M-1 travelling up. In the middle of
    the step every device alternates overlapped F&B pairs, one from each direction."""
    if P % 2:
        raise ValueError(f"dualpipe pairs device d with device stages-1-d, so stages must be even; got {P}")
    if M % 2 or M < 2 * P:
        raise ValueError(f"dualpipe feeds microbatches/2 from each end and needs microbatches even and >= "
                         f"2 x stages = {2 * P}; got {M}")
    n, half = P // 2, M // 2
    devices = []
    for d in range(P):
        second_half = d >= n  # DualPipe's phase 0 is the downward direction on the first half of the devices
        down, up = (d, 0), (P - 1 - d, half)  # (stage on this device, first micro-batch) of each direction
        phases = (up, down) if second_half else (down, up)
        rank = _DualPipeRank((phases[0][0], phases[1][0]), (phases[0][1], phases[1][1]))
        devices.append(rank.run_steps(n, min(d, P - 1 - d), half, unpaired_first=d in (n - 1, n)))
    return _build("dualpipe", P, M, devices)


def dualpipev(P: int, M: int) -> Schedule:
    """DualPipeV (deepseek-ai/DualPipe's dualpipev.py, Sea AI Lab's "cut-in-half" DualPipe): P stages on P/2
    devices in a V, device d holding stages d and P-1-d, one direction; the same order as torch's
    ScheduleDualPipeV."""
    if P % 2:
        raise ValueError(f"dualpipev folds the stages into a V on stages/2 devices, so stages must be even; got {P}")
    _need_microbatches("dualpipev", M, P, "each of the stages/2 devices warms up with two forwards per device "
                       "below it before its first backward")
    n = P // 2
    devices = [_DualPipeRank((d, P - 1 - d), (0, 0)).run_steps(n, d, M, unpaired_first=d == n - 1)
               for d in range(n)]
    return _build("dualpipev", P, M, devices)
