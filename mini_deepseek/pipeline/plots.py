"""Gantt charts of pipeline timelines, a table of schedules side by side, and the notebook's explorer.

matplotlib and ipywidgets are imported inside the functions that draw, so importing the pipeline package
costs neither.
"""

from __future__ import annotations

from .schedules import SCHEDULES, Overlapped, ops_of
from .simulate import Timeline, closed_form_idle, simulate

# One colour per kind; the darker shade marks a device's second stage (DualPipe's upward direction, the way
# back up a V, the second chunk of an interleaved device).
COLORS = {"F": ("#6baed6", "#2171b5"), "B": ("#74c476", "#238b45"), "I": ("#c7e9c0", "#74c476"),
          "W": ("#fdae6b", "#e6550d")}
LABELS = {"F": "F forward", "B": "B whole backward", "I": "I input-gradient part of B",
          "W": "W weight-gradient part of B"}


def plot_timeline(timeline: Timeline, ax=None, title: str | None = None, time_unit: str = "",
                  label_microbatches: bool = True):
    """Draw one row per device: a bar per operation (F&B pairs as two halves in one black frame), blank gaps
    where the device idles. Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    sched = timeline.schedule
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 0.45 * sched.n_devices + 1.2))
    span = timeline.makespan or 1.0
    origin = timeline.origin
    kinds_seen = []
    for iv in timeline.intervals:
        y = iv.device
        start, width = iv.start - origin, iv.end - iv.start
        parts = ops_of(iv.action)
        for k, op in enumerate(parts):  # an overlapped pair splits its box in two
            x = start + k * width / len(parts)
            shade = 0 if op.stage == iv.device else 1
            ax.add_patch(Rectangle((x, y - 0.4), width / len(parts), 0.8, facecolor=COLORS[op.kind][shade],
                                   edgecolor="white", linewidth=0.5))
            kinds_seen.append(op.kind)
            if label_microbatches and width / len(parts) > span / 80:
                ax.text(x + width / len(parts) / 2, y, str(op.microbatch), ha="center", va="center", fontsize=7)
        if isinstance(iv.action, Overlapped):
            ax.add_patch(Rectangle((start, y - 0.4), width, 0.8, fill=False, edgecolor="black", linewidth=1.2))
    ax.set_xlim(0, span)
    ax.set_ylim(sched.n_devices - 0.5, -0.5)
    ax.set_yticks(range(sched.n_devices), [f"device {d}" for d in range(sched.n_devices)])
    ax.set_xlabel(f"time{f' ({time_unit})' if time_unit else ''}")
    ax.set_facecolor("#f4f4f4")  # idle time shows as this grey
    handles = [Patch(facecolor=COLORS[k][0], label=LABELS[k]) for k in LABELS if k in kinds_seen]
    if any(isinstance(iv.action, Overlapped) for iv in timeline.intervals):
        handles.append(Patch(facecolor="white", edgecolor="black", label="F&B overlapped pair"))
    if any(op.stage != iv.device for iv in timeline.intervals for op in ops_of(iv.action)):
        handles.append(Patch(facecolor="#555555", label="darker: the device's second stage"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title is None:
        title = (f"{sched.name}: {sched.stages} stages on {sched.n_devices} devices, {sched.microbatches} "
                 f"micro-batches; bubble {timeline.bubble_fraction:.1%}, peak activations "
                 f"{max(timeline.peak_activations)}")
    ax.set_title(title, fontsize=10, loc="left")
    return ax


def schedule_table(stages: int, microbatches: int, F: float = 1.0, B: float = 2.0, W: float = 0.0,
                   comm: float = 0.0, a2a: float = 0.0, names=SCHEDULES) -> list[dict]:
    """One row per schedule at the same settings: its figures, the papers' formula, or why it cannot run."""
    rows = []
    for name in names:
        try:
            timeline = simulate(name, stages, microbatches, F=F, B=B, W=W, comm=comm, a2a=a2a)
        except ValueError as error:
            rows.append({"schedule": name, "error": str(error)})
            continue
        row = timeline.summary()
        row["formula_idle"] = closed_form_idle(name, stages, microbatches, F=F, B=B, W=W,
                                               FB=max(F + B, 2 * a2a)) if comm == 0 else None
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """schedule_table's rows as aligned text (the explorer's printed form)."""
    header = (f"{'schedule':<17}{'devices':>8}{'makespan':>10}{'idle/dev':>10}{'formula':>9}{'bubble':>8}"
              f"{'peak act':>9}{'params':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['schedule']:<17}  cannot run: {r['error']}")
            continue
        formula = "-" if r["formula_idle"] is None else f"{r['formula_idle']:.2f}"
        lines.append(f"{r['schedule']:<17}{r['devices']:>8}{r['makespan']:>10.2f}{r['idle_per_device']:>10.2f}"
                     f"{formula:>9}{r['bubble_fraction']:>8.1%}{r['peak_activations']:>9}"
                     f"{r['parameters_per_device']:>7}")
    return "\n".join(lines)


def explorer(schedule: str = "dualpipe", stages: int = 4, microbatches: int = 8, F: float = 1.0, B: float = 2.0,
             W: float = 1.0, comm: float = 0.0, a2a: float = 0.0) -> None:
    """Sliders for the schedule, stages, micro-batches and the F/B/W/comm/all-to-all costs; every change redraws
    the Gantt chart and the table of all schedules at those settings. Without ipywidgets (or outside a
    notebook) it prints the table and draws the chart for the arguments given instead."""
    import matplotlib.pyplot as plt

    from ..explorer import explorer as interactive_explorer
    from ..explorer import ipywidgets_or_none

    def show(schedule, stages, microbatches, F, B, W, comm, a2a) -> None:
        print(format_table(schedule_table(stages, microbatches, F, B, W, comm, a2a)))
        try:
            timeline = simulate(schedule, stages, microbatches, F=F, B=B, W=W, comm=comm, a2a=a2a)
        except ValueError as error:
            print(f"\n{schedule}: {error}")
            return
        plot_timeline(timeline)
        plt.show()

    widgets = ipywidgets_or_none()
    if widgets is None:
        print("ipywidgets is not installed: the table and chart for the arguments given "
              "(call explorer(...) with other values to explore).\n")
        show(schedule, stages, microbatches, F, B, W, comm, a2a)
        return
    style = {"description_width": "110px"}
    controls = {
        "schedule": widgets.Dropdown(options=SCHEDULES, value=schedule, description="schedule", style=style),
        "stages": widgets.IntSlider(value=stages, min=2, max=16, step=1, description="stages P", style=style),
        "microbatches": widgets.IntSlider(value=microbatches, min=1, max=48, description="micro-batches M",
                                          style=style),
        "F": widgets.FloatSlider(value=F, min=0.1, max=4, step=0.1, description="F", style=style),
        "B": widgets.FloatSlider(value=B, min=0.1, max=8, step=0.1, description="B (whole)", style=style),
        "W": widgets.FloatSlider(value=W, min=0, max=4, step=0.1, description="W (part of B)", style=style),
        "comm": widgets.FloatSlider(value=comm, min=0, max=2, step=0.05, description="comm (p2p)", style=style),
        "a2a": widgets.FloatSlider(value=a2a, min=0, max=3, step=0.1, description="all-to-all", style=style),
    }
    values = list(controls.values())
    # the shared explorer helper tags controls and output for the browser tests (tests/browser/)
    interactive_explorer(show, controls, layout=widgets.HBox([widgets.VBox(values[:4]), widgets.VBox(values[4:])]))


# One forward and one backward chunk of a MoE layer, split as DeepSeek-V3's figure 4 splits them (report section
# 3.2.1): attention and MLP compute; all-to-all dispatch and combine move tokens to and from their experts.
# Each entry: (name, stream, duration key, the entry it waits for). A backward chunk runs its parts in reverse.
_FORWARD_CHUNK = [("attn F", "compute", "attn", None), ("dispatch F", "comm", "a2a", "attn F"),
                  ("mlp F", "compute", "mlp", "dispatch F"), ("combine F", "comm", "a2a", "mlp F")]
_BACKWARD_CHUNK = [("combine B", "comm", "a2a", None), ("mlp B", "compute", "mlp2", "combine B"),
                   ("dispatch B", "comm", "a2a", "mlp B"), ("attn B", "compute", "attn2", "dispatch B")]
# DualPipe's pairing: while one chunk's tokens travel, the other chunk computes.
_OVERLAPPED_ORDER = ["combine B", "attn F", "mlp B", "dispatch F", "dispatch B", "mlp F", "attn B", "combine F"]


def chunk_overlap(attn: float = 1.0, mlp: float = 1.0, a2a: float = 1.0, overlapped: bool = True
                  ) -> list[tuple[str, str, float, float]]:
    """(name, stream, start, end) of the parts of a forward chunk and a backward chunk (backward compute twice
    the forward's), run one after the other (overlapped=False) or paired as DualPipe pairs them: each stream
    runs its parts in the pair's order, each part as soon as the part it needs has finished."""
    length = {"attn": attn, "mlp": mlp, "attn2": 2 * attn, "mlp2": 2 * mlp, "a2a": a2a}
    parts = {name: (stream, length[key], need) for name, stream, key, need in _FORWARD_CHUNK + _BACKWARD_CHUNK}
    order = _OVERLAPPED_ORDER if overlapped else [p[0] for p in _FORWARD_CHUNK + _BACKWARD_CHUNK]
    free, end, out = {"compute": 0.0, "comm": 0.0}, {}, []
    previous = None
    for name in order:
        stream, duration, need = parts[name]
        start = max(free[stream], end.get(need, 0.0))
        if not overlapped and previous is not None:  # one chunk at a time, one part at a time
            start = max(start, end[previous])
        end[name] = free[stream] = start + duration
        out.append((name, stream, start, start + duration))
        previous = name
    return out


def plot_chunk_overlap(attn: float = 1.0, mlp: float = 1.0, a2a: float = 1.0, axes=None):
    """Two panels: a forward and a backward chunk one after the other, then overlapped as a DualPipe pair."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(11, 3.4), sharex=True)
    colors = {"F": COLORS["F"][0], "B": COLORS["B"][0]}
    for ax, overlapped in zip(axes, (False, True), strict=True):
        parts = chunk_overlap(attn, mlp, a2a, overlapped)
        for name, stream, start, end in parts:
            y = 0 if stream == "compute" else 1
            ax.barh(y, end - start, left=start, color=colors[name[-1]], edgecolor="black",
                    hatch="" if stream == "compute" else "//")
            ax.text((start + end) / 2, y, name, ha="center", va="center", fontsize=8)
        total = max(end for *_, end in parts)
        ax.set_yticks([0, 1], ["compute", "communication"])
        ax.set_ylim(1.6, -0.6)
        ax.set_title(f"{'overlapped F&B pair (DualPipe)' if overlapped else 'forward chunk, then backward chunk'}:"
                     f" {total:g} time units", fontsize=10, loc="left")
    axes[-1].set_xlabel("time (forward attention = 1)")
    return axes
