"""Reference answers to exercises/ex05_pipeline.py (the docstrings there are the specification)."""


def gpipe_order(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """All forwards, then all backwards, in micro-batch order."""
    return [("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]


def one_f_one_b_order(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """P-1-s warm-up forwards, then forward/backward pairs, then the remaining backwards."""
    warmup = stages - 1 - stage
    order = [("F", m) for m in range(warmup)]
    for k in range(microbatches - warmup):
        order += [("F", warmup + k), ("B", k)]
    return order + [("B", m) for m in range(microbatches - warmup, microbatches)]


def timeline_bubble(busy: list[list[tuple[float, float]]]) -> tuple[float, list[float], float]:
    """Makespan from time 0 to the latest end; idle = makespan - busy per device; the idle share of all device time."""
    makespan = max((end for device in busy for _, end in device), default=0.0)
    idle = [makespan - sum(end - start for start, end in device) for device in busy]
    fraction = sum(idle) / (len(busy) * makespan) if makespan > 0 else 0.0
    return float(makespan), [float(i) for i in idle], float(fraction)


def peak_in_flight(order: list[tuple[str, int]]) -> int:
    """+1 at every forward, -1 at every B or I; the largest count reached."""
    alive = peak = 0
    for kind, _ in order:
        if kind == "F":
            alive += 1
            peak = max(peak, alive)
        elif kind in ("B", "I"):
            alive -= 1
    return peak


def zb_h1_order(stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """1F1B with I for B; the first `stage` weight passes wait for the end, every later I brings the oldest W."""
    order, waiting = [], []
    for kind, m in one_f_one_b_order(stage, stages, microbatches):
        if kind == "F":
            order.append(("F", m))
            continue
        order.append(("I", m))
        waiting.append(m)
        if m >= stage:
            order.append(("W", waiting.pop(0)))
    return order + [("W", m) for m in waiting]
