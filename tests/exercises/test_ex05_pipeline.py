"""Graded tests of exercise set 05 (exercises/ex05_pipeline.py): GPipe's and 1F1B's orders, the bubble of a
timeline, the activation memory of an order, and ZB-H1's placement of the weight passes.

Each exercise is checked against an example worked out by hand and against the library (mini_deepseek/pipeline):
its schedules, and its simulator timing the whole schedule built from the exercise's orders.
"""

import itertools

import pytest

from mini_deepseek.pipeline import (
    Op,
    Schedule,
    closed_form_idle,
    ops_of,
    schedule,
    simulate,
    simulate_schedule,
)

SETTINGS = [(2, 2), (2, 5), (3, 3), (4, 4), (4, 8), (5, 7), (8, 8), (8, 20)]  # (stages, microbatches), M >= P


def library_order(name: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    return [(op.kind, op.microbatch) for action in schedule(name, stages, microbatches).devices[stage]
            for op in ops_of(action)]


def build(name: str, order_fn, stages: int, microbatches: int) -> Schedule:
    """The whole schedule (one device per stage) made of order_fn's orders; refuses incomplete ones."""
    devices = tuple(tuple(Op(kind, s, m) for kind, m in order_fn(s, stages, microbatches)) for s in range(stages))
    return Schedule(name, stages, microbatches, devices)


# --- gpipe_order -------------------------------------------------------------------------------------------------
@pytest.mark.exercise("gpipe_order")
def test_gpipe_order_hand_example(exercise):
    assert exercise(1, 3, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


@pytest.mark.exercise("gpipe_order")
def test_gpipe_order_matches_the_library(exercise):
    for (P, M), s in ((pm, s) for pm in SETTINGS + [(4, 1), (4, 2)] for s in range(pm[0])):
        assert exercise(s, P, M) == library_order("gpipe", s, P, M), f"stage {s} of {P}, {M} micro-batches"


@pytest.mark.exercise("gpipe_order")
def test_gpipe_bubble_fraction_is_p_minus_1_over_m_plus_p_minus_1(exercise):
    for P, M in [(4, 4), (4, 12), (8, 8)]:
        timeline = simulate_schedule(build("gpipe", exercise, P, M), F=1.0, B=2.0)
        assert timeline.bubble_fraction == pytest.approx((P - 1) / (M + P - 1))


# --- one_f_one_b_order -------------------------------------------------------------------------------------------
@pytest.mark.exercise("one_f_one_b_order")
def test_1f1b_order_hand_example(exercise):
    F = [("F", m) for m in range(6)]
    B = [("B", m) for m in range(6)]
    assert exercise(1, 4, 6) == [F[0], F[1], F[2], B[0], F[3], B[1], F[4], B[2], F[5], B[3], B[4], B[5]]
    assert exercise(3, 4, 4) == [F[0], B[0], F[1], B[1], F[2], B[2], F[3], B[3]]  # the last stage: no warm-up


@pytest.mark.exercise("one_f_one_b_order")
def test_1f1b_order_matches_the_library(exercise):
    for (P, M), s in ((pm, s) for pm in SETTINGS for s in range(pm[0])):
        assert exercise(s, P, M) == library_order("1f1b", s, P, M), f"stage {s} of {P}, {M} micro-batches"


@pytest.mark.exercise("one_f_one_b_order")
def test_1f1b_keeps_gpipes_bubble_with_memory_p_minus_s(exercise):
    for P, M in [(4, 8), (6, 6)]:
        timeline = simulate_schedule(build("1f1b", exercise, P, M), F=1.0, B=2.0)
        assert timeline.idle == pytest.approx([(P - 1) * 3.0] * P)
        assert timeline.peak_activations == [P - s for s in range(P)]


# --- timeline_bubble ---------------------------------------------------------------------------------------------
@pytest.mark.exercise("timeline_bubble")
def test_timeline_bubble_hand_example(exercise):
    makespan, idle, fraction = exercise([[(0, 1), (2, 3)], [(1, 2), (3, 5)]])
    assert makespan == pytest.approx(5.0) and idle == pytest.approx([3.0, 2.0]) and fraction == pytest.approx(0.5)


@pytest.mark.exercise("timeline_bubble")
def test_timeline_bubble_counts_waiting_before_the_first_operation(exercise):
    # nothing runs before t = 2: the step still started at 0, on both devices
    makespan, idle, fraction = exercise([[(2.0, 3.0)], [(3.0, 4.0), (5.0, 6.0)]])
    assert makespan == pytest.approx(6.0) and idle == pytest.approx([5.0, 4.0])
    assert fraction == pytest.approx(9.0 / 12.0)


@pytest.mark.exercise("timeline_bubble")
def test_timeline_bubble_unsorted_and_an_idle_device(exercise):
    makespan, idle, fraction = exercise([[(4.0, 7.0), (0.0, 1.5)], [], [(1.0, 6.0)]])
    assert makespan == pytest.approx(7.0) and idle == pytest.approx([2.5, 7.0, 2.0])
    assert fraction == pytest.approx(11.5 / 21.0)


@pytest.mark.exercise("timeline_bubble")
def test_timeline_bubble_agrees_with_the_simulator(exercise):
    for name, P, M, costs in [("1f1b", 4, 8, (1, 2, 0)), ("dualpipe", 4, 8, (1, 2, 1)), ("zb-h1", 4, 4, (1.5, 2, 0.5))]:
        timeline = simulate(name, P, M, *costs)
        busy = [[(iv.start, iv.end) for iv in timeline.intervals if iv.device == d]
                for d in range(timeline.schedule.n_devices)]
        makespan, idle, fraction = exercise(busy)
        assert makespan == pytest.approx(timeline.makespan) and idle == pytest.approx(timeline.idle), name
        assert fraction == pytest.approx(timeline.bubble_fraction), name


# --- peak_in_flight ----------------------------------------------------------------------------------------------
@pytest.mark.exercise("peak_in_flight")
def test_peak_in_flight_hand_examples(exercise):
    assert exercise([("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]) == 2
    # a split backward frees at I, not at W
    assert exercise([("F", 0), ("I", 0), ("F", 1), ("W", 0), ("I", 1), ("W", 1)]) == 1
    assert exercise([("F", 0), ("F", 1), ("F", 2), ("I", 2), ("W", 2), ("I", 1), ("I", 0), ("W", 1), ("W", 0)]) == 3
    assert exercise([("F", 0), ("F", 1)]) == 2  # a warm-up alone: the peak is at the very end


@pytest.mark.exercise("peak_in_flight")
def test_peak_in_flight_of_the_library_schedules(exercise):
    for P, M in [(4, 8), (8, 16)]:
        assert [exercise(library_order("1f1b", s, P, M)) for s in range(P)] == [P - s for s in range(P)]
        assert [exercise(library_order("gpipe", s, P, M)) for s in range(P)] == [M] * P
        assert [exercise(library_order("zb-h1", s, P, M)) for s in range(P)] == [P - s for s in range(P)]
        # DualPipe: P + 1 chunks on every device, of both directions (its table's "PP + 1")
        assert [exercise(library_order("dualpipe", d, P, M)) for d in range(P)] == [P + 1] * P


# --- zb_h1_order -------------------------------------------------------------------------------------------------
@pytest.mark.exercise("zb_h1_order")
def test_zb_h1_order_hand_example(exercise):
    assert exercise(1, 2, 3) == [("F", 0), ("I", 0), ("F", 1), ("I", 1), ("W", 0), ("F", 2), ("I", 2), ("W", 1),
                                 ("W", 2)]
    # stage 0 postpones nothing: each I brings its own W at once
    assert exercise(0, 2, 2) == [("F", 0), ("F", 1), ("I", 0), ("W", 0), ("I", 1), ("W", 1)]


@pytest.mark.exercise("zb_h1_order")
def test_zb_h1_every_w_follows_its_i_and_keeps_1f1b_memory(exercise):
    for (P, M), s in ((pm, s) for pm in SETTINGS for s in range(pm[0])):
        order = exercise(s, P, M)
        assert sorted(order) == sorted(itertools.product("FIW", range(M))), f"stage {s}: one F, I, W per micro-batch"
        assert all(order.index(("I", m)) < order.index(("W", m)) for m in range(M)), f"stage {s}: W before its I"
        alive = peak = 0
        for kind, _ in order:
            alive += {"F": 1, "I": -1}.get(kind, 0)
            peak = max(peak, alive)
        assert peak <= P - s, f"stage {s} of {P} holds {peak} micro-batches, 1F1B only {P - s}"


@pytest.mark.exercise("zb_h1_order")
def test_zb_h1_reaches_the_zero_bubble_papers_bubble(exercise):
    for (P, M), (F, B, W) in itertools.product([(2, 2), (4, 4), (4, 9), (6, 12)], [(1, 2, 1), (2, 3, 1), (1, 2, 0.5)]):
        timeline = simulate_schedule(build("zb-h1", exercise, P, M), F=F, B=B, W=W)
        expected = closed_form_idle("zb-h1", P, M, F=F, B=B, W=W)
        assert timeline.idle == pytest.approx([expected] * P), \
            f"{P} stages, {M} micro-batches, F={F} B={B} W={W}: idle {timeline.idle}, (P-1)(F+B-2W) = {expected}"


@pytest.mark.exercise("zb_h1_order")
def test_zb_h1_order_matches_the_library(exercise):
    for (P, M), s in ((pm, s) for pm in SETTINGS for s in range(pm[0])):
        assert exercise(s, P, M) == library_order("zb-h1", s, P, M), f"stage {s} of {P}, {M} micro-batches"
