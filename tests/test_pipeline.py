"""Pipeline schedules and their simulator (mini_deepseek/pipeline): every schedule respects its dependencies, the
simulated idle time equals the papers' closed forms under their cost assumptions, peak activations and
parameters per device match DualPipe's table, stage modules compose to the model, and bad input is refused.

The cost assumptions of the closed forms (checked here, stated in simulate.py): point-to-point messages and
all-to-all take no time (comm = a2a = 0), every stage costs the same, and
- zb-h1 (the zero-bubble paper's ZB-H1): W <= F and W <= B - W (a weight pass fits in the gaps it fills; the
  paper's own assumption F = B - W = W is one case);
- dualpipe and dualpipev: F = B - W >= W (the forward as long as the input-gradient backward), F&B = F + B.
"""

import itertools
import sys

import pytest
import torch

from mini_deepseek import DeepSeekV3, ModelConfig
from mini_deepseek.pipeline import (
    SCHEDULES,
    Op,
    Overlapped,
    Schedule,
    closed_form_idle,
    explorer,
    ops_of,
    pipeline_config,
    schedule,
    schedule_table,
    simulate,
    simulate_schedule,
    split_model,
    stage_layers,
)

STAGES = (2, 4, 6, 8)


def valid_settings(name: str, stages=STAGES, microbatches=(1, 2, 3, 4, 5, 6, 8, 12, 16, 20)):
    """(P, M) pairs the schedule accepts."""
    out = []
    for P, M in itertools.product(stages, microbatches):
        try:
            schedule(name, P, M)
        except ValueError:
            continue
        out.append((P, M))
    assert out, f"{name} accepted no setting"
    return out


def check_dependencies(timeline) -> None:
    """An independent check of a timeline: no device runs two things at once, each device runs its actions in
    its schedule's order, and every operation starts after the ones it needs have ended."""
    P = timeline.schedule.stages
    end: dict[tuple[str, int, int], float] = {}
    start: dict[tuple[str, int, int], float] = {}
    for iv in timeline.intervals:
        for op in ops_of(iv.action):
            start[op.kind, op.stage, op.microbatch] = iv.start
            end[op.kind, op.stage, op.microbatch] = iv.end
    for d, actions in enumerate(timeline.schedule.devices):
        mine = [iv for iv in timeline.intervals if iv.device == d]
        assert [iv.action for iv in mine] == list(actions), f"device {d} did not follow its order"
        for a, b in itertools.pairwise(mine):
            assert a.end <= b.start + 1e-9, f"device {d} overlaps {a.action} and {b.action}"
    for (kind, s, m), t in start.items():
        needs = []
        if kind == "F" and s > 0:
            needs = [("F", s - 1, m)]
        elif kind in ("B", "I"):
            needs = [("F", s, m)] + ([("B" if ("B", s + 1, m) in end else "I", s + 1, m)] if s < P - 1 else [])
        elif kind == "W":
            needs = [("I", s, m)]
        for need in needs:
            assert end[need] <= t + 1e-9, f"{kind}{m} of stage {s} starts at {t} before {need} ends at {end[need]}"


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_respects_its_dependencies(name):
    for (P, M), (F, B, W, comm, a2a) in itertools.product(
            valid_settings(name), [(1, 2, 1, 0, 0), (1, 3, 0.5, 0.2, 0), (2, 3, 1, 0, 1.5), (1, 1, 0.25, 0.1, 0.3)]):
        check_dependencies(simulate(name, P, M, F=F, B=B, W=W, comm=comm, a2a=a2a))


def test_per_stage_costs_and_communication_are_honoured():
    costs = dict(F=[1.0, 2.0, 0.5, 1.0], B=[2.0, 4.0, 1.0, 3.0], W=[1.0, 1.0, 0.5, 0.5])
    for name in ("1f1b", "zb-h1", "dualpipe"):
        timeline = simulate(name, 4, 8, comm=0.3, **costs)
        check_dependencies(timeline)
        for iv in timeline.intervals:
            if not isinstance(iv.action, Overlapped):
                op = iv.action
                want = {"F": costs["F"], "B": costs["B"], "W": costs["W"],
                        "I": [b - w for b, w in zip(costs["B"], costs["W"], strict=True)]}[op.kind][op.stage]
                assert iv.end - iv.start == pytest.approx(want)
    # a message between devices takes comm: stage 1's first forward starts one F of stage 0 plus comm in
    t = simulate("gpipe", 2, 2, F=1.0, B=2.0, comm=0.25)
    first_f1 = next(iv for iv in t.intervals if iv.action == Op("F", 1, 0))
    assert first_f1.start == pytest.approx(1.25)


# --- closed forms ------------------------------------------------------------------------------------------------
COSTS = [(1.0, 2.0, 0.0), (1.0, 2.0, 1.0), (1.0, 3.0, 0.5), (2.0, 3.0, 1.0), (0.5, 1.5, 0.25)]


def costs_meeting_assumptions(name):
    if name == "zb-h1":  # W <= F and W <= B - W
        return [(F, B, W) for F, B, W in COSTS + [(2.0, 2.0, 1.0), (1.0, 4.0, 1.0)] if W <= F and W <= B - W]
    if name in ("dualpipe", "dualpipev"):  # F = B - W >= W
        return [(F, F + W, W) for F, W in [(1.0, 0.0), (1.0, 1.0), (2.0, 1.0), (1.5, 0.5), (0.5, 0.25)]]
    return COSTS


@pytest.mark.parametrize("name", SCHEDULES)
def test_idle_time_equals_the_closed_form_on_every_device(name):
    for (P, M), (F, B, W) in itertools.product(valid_settings(name), costs_meeting_assumptions(name)):
        timeline = simulate(name, P, M, F=F, B=B, W=W)
        expected = closed_form_idle(name, P, M, F=F, B=B, W=W)
        assert timeline.idle == pytest.approx([expected] * timeline.schedule.n_devices), (P, M, F, B, W)


def test_the_closed_forms_in_numbers():
    # GPipe's bubble fraction (P-1)/(M+P-1), and 1F1B's equal to it
    for P, M in [(4, 8), (8, 32), (2, 1)]:
        assert simulate("gpipe", P, M).bubble_fraction == pytest.approx((P - 1) / (M + P - 1))
    assert simulate("1f1b", 4, 8).bubble_fraction == pytest.approx(3 / 11)
    # ZB-H1 at the zero-bubble paper's F = B_input = W: one third of 1F1B's bubble
    assert simulate("zb-h1", 4, 8, F=1, B=2, W=1).idle[0] == pytest.approx(simulate("1f1b", 4, 8, F=1, B=2).idle[0] / 3)
    # DualPipe on 8 devices, F = 1, B = 2, W = 1: (8/2 - 1)(3 + 2 - 3) = 6
    assert simulate("dualpipe", 8, 16, F=1, B=2, W=1).idle == pytest.approx([6.0] * 8)
    # interleaving halves 1F1B's bubble on the same devices, in time units of a device's whole share
    one, two = simulate("1f1b", 4, 8, F=2, B=4), simulate("interleaved-1f1b", 8, 8, F=1, B=2)
    assert two.schedule.n_devices == 4 and two.idle[0] == pytest.approx(one.idle[0] / 2)


def test_the_closed_forms_need_their_assumptions():
    """Outside the stated costs the formulas are estimates: the simulator shows by how much."""
    # ZB-H1 with a weight pass longer than the forward (W = 1 > F = 0.5): W no longer fits the gaps
    t = simulate("zb-h1", 4, 8, F=0.5, B=2.0, W=1.0)
    assert t.idle[0] > closed_form_idle("zb-h1", 4, 8, F=0.5, B=2.0, W=1.0) + 0.1
    # DualPipe with B - W = 2 F: the simulated bubble is shorter than (P/2-1)(F&B+B-3W)
    t = simulate("dualpipe", 4, 8, F=1.0, B=2.0, W=0.0)
    assert t.idle[0] == pytest.approx(4.0) and closed_form_idle("dualpipe", 4, 8, F=1.0, B=2.0, W=0.0) == 5.0


def test_overlap_hides_the_all_to_all():
    """A lone chunk waits for its all-to-all; DualPipe's pairs hide it while it is shorter than the computation."""
    plain, moe = simulate("1f1b", 4, 16, F=1, B=2), simulate("1f1b", 4, 16, F=1, B=2, a2a=0.5)
    assert moe.makespan > plain.makespan + 16 * 2 * 0.5 - 1e-9  # every F and B of device 0 pays it
    dual_plain, dual_moe = simulate("dualpipe", 4, 16, F=1, B=2, W=1), simulate("dualpipe", 4, 16, F=1, B=2, W=1, a2a=0.5)
    assert dual_moe.makespan - dual_plain.makespan < (moe.makespan - plain.makespan) / 3


# --- memory and parameters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("P", [2, 4, 6, 8])
def test_peak_activations_match_the_papers(P):
    M = 2 * P + 4
    assert simulate("1f1b", P, M).peak_activations == [P - s for s in range(P)]  # 1F1B: P on the first device
    assert simulate("zb-h1", P, M, W=0.5).peak_activations == [P - s for s in range(P)]  # ZB-H1 keeps 1F1B's
    assert simulate("gpipe", P, M).peak_activations == [M] * P  # GPipe holds every micro-batch
    assert simulate("naive", P, M).peak_activations == [1] * P
    assert simulate("dualpipe", P, M, W=0.5).peak_activations == [P + 1] * P  # DualPipe: P + 1 on every device
    assert simulate("dualpipev", P, M, W=0.5).peak_activations == [P + 1] * (P // 2)


def test_parameters_and_devices_match_dualpipes_table():
    for name, devices, per_device in [("1f1b", 8, 1), ("zb-h1", 8, 1), ("gpipe", 8, 1), ("dualpipe", 8, 2),
                                      ("dualpipev", 4, 2), ("interleaved-1f1b", 4, 2)]:
        t = simulate(name, 8, 16)
        assert t.schedule.n_devices == devices and t.parameters_per_device == [per_device] * devices, name
    # DualPipe's two copies: device d holds stage d and its mirror stage P-1-d; DualPipeV's V the same stages
    assert [schedule("dualpipe", 8, 16).stages_on(d) for d in (0, 3, 7)] == [[0, 7], [3, 4], [0, 7]]
    assert [schedule("dualpipev", 8, 8).stages_on(d) for d in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [schedule("interleaved-1f1b", 8, 8).stages_on(d) for d in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_dualpipe_feeds_both_ends_and_overlaps():
    s = schedule("dualpipe", 4, 8)
    first_forward = {d: next(op for a in s.devices[d] for op in ops_of(a) if op.kind == "F") for d in range(4)}
    assert first_forward[0] == Op("F", 0, 0) and first_forward[3] == Op("F", 0, 4)  # micro-batch 4 enters at the end
    assert all(any(isinstance(a, Overlapped) for a in actions) for actions in s.devices)


# --- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, P, M, match", [
    ("pipedream", 4, 8, "unknown schedule"),
    ("1f1b", 4, 3, "1f1b needs microbatches >= 4"),
    ("zb-h1", 8, 7, "zb-h1 needs microbatches >= 8"),
    ("dualpipe", 3, 8, "stages must be even"),
    ("dualpipe", 4, 6, r"even and >= 2 x stages = 8"),
    ("dualpipe", 4, 9, "even"),
    ("dualpipev", 5, 10, "stages must be even"),
    ("dualpipev", 8, 6, "dualpipev needs microbatches >= 8"),
    ("interleaved-1f1b", 5, 10, "stages must be even"),
    ("interleaved-1f1b", 8, 6, "multiple of 4"),
    ("gpipe", 0, 4, "stages = 0 must be a positive integer"),
    ("gpipe", 4, 2.5, "microbatches = 2.5 must be a positive integer"),
])
def test_bad_schedule_settings_name_the_requirement(name, P, M, match):
    with pytest.raises(ValueError, match=match):
        schedule(name, P, M)


def test_bad_costs_are_refused():
    with pytest.raises(ValueError, match="W = 3.0 exceeds B = 2.0"):
        simulate("zb-h1", 4, 8, F=1, B=2, W=3)
    with pytest.raises(ValueError, match="has 3 entries for 4 stages"):
        simulate("1f1b", 4, 8, F=[1, 1, 1])
    with pytest.raises(ValueError, match="must not be negative"):
        simulate("1f1b", 4, 8, F=-1)
    with pytest.raises(ValueError, match="must not be negative"):
        simulate("1f1b", 4, 8, comm=-0.1)


def test_incomplete_and_deadlocking_schedules_are_refused():
    with pytest.raises(ValueError, match="stage 1, micro-batch 0 has 1 F, 0 B"):
        Schedule("broken", 2, 1, ((Op("F", 0, 0), Op("B", 0, 0)), (Op("F", 1, 0),)))
    with pytest.raises(ValueError, match="away from its forward's activations"):
        Schedule("broken", 1, 1, ((Op("F", 0, 0),), (Op("B", 0, 0),)))
    # device 1 wants micro-batch 1 first, device 0 sends micro-batch 0 first and waits for its backward
    deadlock = Schedule("deadlock", 2, 2, ((Op("F", 0, 0), Op("B", 0, 0), Op("F", 0, 1), Op("B", 0, 1)),
                                           (Op("F", 1, 1), Op("B", 1, 1), Op("F", 1, 0), Op("B", 1, 0))))
    with pytest.raises(ValueError, match="deadlocks"):
        simulate_schedule(deadlock)


def test_schedule_table_reports_figures_and_refusals():
    rows = {r["schedule"]: r for r in schedule_table(4, 4, F=1, B=2, W=1)}
    assert "needs microbatches even and >= 2 x stages = 8; got 4" in rows["dualpipe"]["error"]
    assert rows["1f1b"]["idle_per_device"] == pytest.approx(rows["1f1b"]["formula_idle"]) == 9.0
    assert rows["dualpipev"]["devices"] == 2 and rows["dualpipev"]["peak_activations"] == 5


def test_explorer_prints_a_table_without_ipywidgets(monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets now raises ImportError
    explorer("zb-h1", stages=4, microbatches=8, F=1, B=2, W=1)
    out = capsys.readouterr().out
    assert "ipywidgets is not installed" in out
    assert "zb-h1" in out and "dualpipev" in out and "bubble" in out


# --- stage modules -----------------------------------------------------------------------------------------------
def test_stages_compose_to_the_model_under_the_same_names():
    torch.manual_seed(0)
    config = pipeline_config(ModelConfig.preset("toy"))
    model = DeepSeekV3(config).eval()
    stages = split_model(model, 4)
    x = torch.randint(0, config.vocab_size, (2, 16))
    h = x
    for s in range(4):
        h = stages[s](h)
    assert torch.equal(h, model(x))
    names = [n for s in range(4) for n, _ in stages[s].named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert [n for n, _ in stages[0].named_parameters()][0] == "embed_tokens.weight"
    assert any(n.startswith("layers.3.") for n, _ in stages[3].named_parameters())


def test_pipeline_config_drops_what_crosses_stages():
    config = pipeline_config(ModelConfig.preset("toy"))
    assert (config.n_mtp_modules, config.seq_aux_alpha, config.bias_update_speed) == (0, 0.0, 0.0)


def test_bad_splits_name_the_requirement():
    with pytest.raises(ValueError, match=r"stages must divide n_layers \(try stages in \[1, 2, 4\]\)"):
        stage_layers(4, 3)
    with pytest.raises(ValueError, match="tie_embeddings"):
        split_model(DeepSeekV3(pipeline_config(ModelConfig.preset("toy", tie_embeddings=True))), 2)
