"""Graded exercises. Each exercise is a function (or class) in exercises/exNN_topic.py that raises
NotImplementedError naming itself until you write it; the reference sits under the same name in
solutions/exNN_topic.py, and tests/exercises/test_exNN_topic.py grades either one.

    check("rms_norm");                     # in a notebook: grade one exercise, print PASS/FAIL and the details
                                           # (it returns True if it passes; the ";" keeps the notebook from
                                           # echoing that True/False under the report)
    make grade                             # in a shell: a score table of every exercise
    pytest tests/exercises --impl=solutions --exercise=rms_norm    # the same tests, run by hand

A class exercise's stub raises from __init__, so constructing it names the exercise too.
"""

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def check(name: str, impl: str = "exercises") -> bool:
    """Run the tests of exercise `name` against `impl` ("exercises" or "solutions"); print one PASS/FAIL line,
    then how many tests pass and the first failure. Runs in a fresh Python process, so edits to exercises/*.py
    count without restarting the kernel. Returns True if every test passes.
    """
    result = subprocess.run(
        [sys.executable, "-m", "tests.exercises.grade", f"--impl={impl}", f"--exercise={name}", "--strict"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    details = result.stdout + result.stderr
    print(verdict(name, details, result.returncode), details, sep="\n\n", end="")
    return result.returncode == 0


def verdict(name: str, report: str, returncode: int) -> str:
    """The one line a learner reads first, from the grader's report of exercise `name` and its exit code."""
    row = re.search(rf"\.{re.escape(name)}\s+(\d+)/(\d+)\s*(.*)", report)
    if returncode == 0 and row:
        return f"PASS  {name}: all {row[2]} tests pass"
    if returncode == 1 and row:
        return f"FAIL  {name}: {row[1]}/{row[2]} tests pass ({row[3].strip()}); the first failure is below"
    return f"ERROR {name}: the tests could not be run (details below)"
