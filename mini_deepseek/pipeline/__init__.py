"""Pipeline parallelism: schedules as data (naive to DualPipeV), a simulator of their bubbles and memory, Gantt
charts, stage modules cut from DeepSeekV3, and (in pipeline.run, which imports torch.distributed.pipelining)
real multi-process training with PyTorch's own schedules.

    from mini_deepseek.pipeline import schedule, simulate, plot_timeline
    timeline = simulate("dualpipe", stages=4, microbatches=8, F=1.0, B=2.0, W=1.0)
    timeline.idle, timeline.bubble_fraction, timeline.peak_activations, timeline.parameters_per_device

    python -m mini_deepseek.pipeline --schedule 1f1b --stages 2 --microbatches 4     # real processes
"""

from .plots import explorer, format_table, plot_timeline, schedule_table
from .schedules import KINDS, SCHEDULES, Op, Overlapped, Schedule, ops_of, schedule
from .simulate import Interval, Timeline, closed_form_idle, simulate, simulate_schedule
from .stages import StageModule, pipeline_config, split_model, stage_layers

__all__ = [
    "KINDS", "SCHEDULES", "Interval", "Op", "Overlapped", "Schedule", "StageModule", "Timeline", "closed_form_idle",
    "explorer", "format_table", "ops_of", "pipeline_config", "plot_timeline", "schedule", "schedule_table",
    "simulate", "simulate_schedule", "split_model", "stage_layers",
]
