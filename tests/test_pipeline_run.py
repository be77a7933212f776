"""Real pipeline training on processes (mini_deepseek/pipeline/run.py): torch.distributed.pipelining's schedules
over gloo, checked against single-process training, with every process group torn down and every run bounded
by a time limit (batch_isend_irecv over gloo has hung in older torch releases, pytorch#132644).

Small on purpose: two ranks, one timed step, short sequences. Starting the processes (imports) takes most of
the time.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from mini_deepseek.pipeline import Overlapped, ops_of
from mini_deepseek.pipeline.__main__ import main
from mini_deepseek.pipeline.run import RunConfig, run_pipelines

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(steps=1, microbatch_size=1, seq_len=32, timeout_s=240.0)


def test_cli_trains_1f1b_on_two_processes_and_prints_json_last():
    args = ["--schedule", "1f1b", "--stages", "2", "--microbatches", "4", "--steps", "1", "--microbatch-size", "1",
            "--seq-len", "32", "--timeout-s", "240"]
    result = subprocess.run([sys.executable, "-m", "mini_deepseek.pipeline", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["schedule"], report["stages"], report["microbatches"], report["ranks"]) == ("1f1b", 2, 4, 2)
    assert len(report["busy_s"]) == len(report["idle_s"]) == 2
    for busy, idle in zip(report["busy_s"], report["idle_s"], strict=True):
        assert busy > 0 and idle >= 0 and busy + idle == pytest.approx(report["makespan_s"], abs=1e-5)
    assert 0 <= report["bubble_fraction"] < 1
    assert report["max_grad_diff"] < 1e-5  # the same gradients as one process training the whole model
    assert len(report["losses"]) == 2


def test_dualpipev_and_zb_h1_run_the_simulated_order_with_single_process_gradients():
    configs = [RunConfig(schedule="dualpipev", stages=4, microbatches=4, **SMALL),
               RunConfig(schedule="zb-h1", stages=2, microbatches=2, **SMALL)]
    results = run_pipelines(configs)
    assert any(isinstance(a, Overlapped) for d in results[0].planned.devices for a in d)  # DualPipeV's F&B pairs
    for result in results:
        name = result.config.schedule
        # torch ran, rank by rank, exactly the order our schedule() gives the simulator (F&B pairs as F then B)
        flat = [[op for action in actions for op in ops_of(action)] for actions in result.planned.devices]
        assert [list(actions) for actions in result.executed.devices] == flat, name
        assert result.max_grad_diff < 1e-5 and result.max_loss_diff < 1e-5, name
        assert result.ranks == 2 and len(result.timeline.intervals) == sum(len(d) for d in flat), name
        costs = result.stage_costs()
        assert all(f > 0 for f in costs["F"]) and all(w > 0 for w in costs["W"]), name  # both split backwards


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "dualpipev", "--stages", "2"], "at least 2 ranks"),
    (["--schedule", "1f1b", "--stages", "4", "--microbatches", "2"], "1f1b needs microbatches >= stages = 4"),
    (["--schedule", "1f1b", "--stages", "3"], "stages must divide n_layers"),
    (["--schedule", "gpipe", "--stages", "2", "--microbatches", "1"], "gpipe needs microbatches >= 2"),
    (["--schedule", "interleaved-1f1b", "--stages", "4", "--microbatches", "3"], "multiple of ranks = 2"),
])
def test_cli_refuses_bad_settings_before_starting_processes(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_config_names_the_requirement():
    with pytest.raises(ValueError, match="torch.distributed.pipelining runs"):
        RunConfig(schedule="dualpipe").validate()  # DualPipe itself is not in torch: simulate it instead
    with pytest.raises(ValueError, match="seq_len = 512 exceeds"):
        RunConfig(seq_len=512).validate()
    with pytest.raises(ValueError, match="same ranks"):
        run_pipelines([RunConfig(schedule="1f1b", stages=2), RunConfig(schedule="1f1b", stages=4)])
