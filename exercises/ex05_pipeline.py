"""Exercise set 05: pipeline schedules. The order of GPipe and of 1F1B, the bubble of a timeline, the activation
memory of an order, and placing the weight-gradient passes W of a zero-bubble schedule
(notebooks/05_pipeline_bubbles.ipynb).

Replace each `raise NotImplementedError` with your implementation, then grade it in a notebook with
`check("gpipe_order")` or from the shell with `make grade`. Reference answers: solutions/ex05_pipeline.py.

An order is one stage's list of operations in the order its device runs them, each a tuple (kind, micro-batch):
"F" forward, "B" whole backward, "I" the input-gradient part of a backward, "W" its weight-gradient part
(B = I + W; the zero-bubble paper writes B for what is I here). Stages are numbered 0 .. stages-1 from the
embedding to the output head, micro-batches 0 .. microbatches-1; every stage sits on its own device.
"""


def gpipe_order(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """GPipe (Huang et al., arXiv 1811.06965): every forward of the step, then every backward.

    The order of stage `stage` (the same for every stage): ("F", 0), ("F", 1), ..., ("F", microbatches-1), then
    ("B", 0), ..., ("B", microbatches-1), backwards in micro-batch order as torch.distributed.pipelining's
    ScheduleGPipe runs them. E.g. gpipe_order(1, 3, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)].
    Every device holds all `microbatches` activations at once before its first backward.
    """
    raise NotImplementedError("Exercise gpipe_order: all forwards in micro-batch order, then all backwards")


def one_f_one_b_order(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """1F1B (PipeDream-flush, Narayanan et al., arXiv 2006.09503), microbatches >= stages.

    Stage s of P = stages runs:
      1. warm-up: the forwards of micro-batches 0 .. P-2-s (P-1-s of them; none on the last stage);
      2. steady state: for k = 0, 1, ...: the forward of the next micro-batch, then the backward of
         micro-batch k, until every forward has run;
      3. cool-down: the remaining backwards, in micro-batch order.
    E.g. one_f_one_b_order(1, 4, 6) == [F0, F1, F2, B0, F3, B1, F4, B2, F5, B3, B4, B5] written as tuples
    ("F", 0), ("F", 1), ... . Stage s never holds more than P - s micro-batches' activations.
    """
    raise NotImplementedError("Exercise one_f_one_b_order: warm-up forwards, then alternate F and B, then cool down")


def timeline_bubble(busy: list[list[tuple[float, float]]]) -> tuple[float, list[float], float]:
    """The bubble of a timeline: how long each device idles in one pipeline step.

    busy[d] lists device d's operations as (start, end) times, in any order, never overlapping; time 0 is
    the moment the step starts on every device. A device may have no operation at all.
    Returns (makespan, idle, bubble_fraction):
        makespan         the latest end over all devices (the step lasts until its last device finishes)
        idle[d]          makespan - (sum of device d's operation times): waiting before its first operation,
                         between operations and after its last one all count
        bubble_fraction  sum(idle) / (number of devices * makespan)
    E.g. busy = [[(0, 1), (2, 3)], [(1, 2), (3, 5)]] gives (5.0, [3.0, 2.0], 0.5).
    """
    raise NotImplementedError("Exercise timeline_bubble: makespan from time 0, idle = makespan - busy per device")


def peak_in_flight(order: list[tuple[str, int]]) -> int:
    """The activation memory an order needs, in micro-batches: the most micro-batches whose forward has run and
    whose backward's input-gradient part ("B", or "I" when split) has not yet, at any point of the order.

    A micro-batch's activations are stored by its "F" and released by its "B" or "I"; "W" changes nothing here
    (it keeps only the inputs of the weight matrices, which DualPipe's table and this count leave out).
    E.g. [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)] -> 2, and 1F1B's stage s -> P - s.
    """
    raise NotImplementedError("Exercise peak_in_flight: +1 at each F, -1 at each B or I, keep the maximum")


def zb_h1_order(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """ZB-H1 (Qi et al., Zero Bubble Pipeline Parallelism, arXiv 2401.10241, section 3.1): place the weight
    passes W so that they fill 1F1B's bubble. microbatches >= stages.

    Start from one_f_one_b_order(stage, stages, microbatches) with every ("B", m) replaced by ("I", m): only the
    input gradient is on the critical path, the previous stage waits for nothing else. Then add one ("W", m)
    per micro-batch, after its ("I", m), this way:
      - stage s postpones the weight passes of its first s micro-batches (0 .. s-1) to the very end of its order;
      - every other ("I", m) is followed at once by the W of the oldest micro-batch still waiting for its W;
      - the W still waiting after the last operation come last, oldest first.
    E.g. zb_h1_order(1, 2, 3) == [("F", 0), ("I", 0), ("F", 1), ("I", 1), ("W", 0), ("F", 2), ("I", 2), ("W", 1),
    ("W", 2)]. Stage s idles (P-1)(F + B - 2W) instead of 1F1B's (P-1)(F + B) when W <= F and W <= B - W.
    """
    raise NotImplementedError("Exercise zb_h1_order: split B into I and W; stage s postpones its first s W passes")
