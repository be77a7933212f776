"""Graded exercises. Each exercise is a function (or class) in exercises/exNN_topic.py that raises
NotImplementedError naming itself until you write it; the reference sits under the same name in
solutions/exNN_topic.py, and tests/exercises/test_exNN_topic.py grades either one.

    check("rms_norm")                      # in a notebook: grade one exercise, print a summary, True if it passes
    make grade                             # in a shell: a score table of every exercise
    pytest tests/exercises --impl=solutions --exercise=rms_norm    # the same tests, run by hand

A class exercise's stub raises from __init__, so constructing it names the exercise too.
"""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def check(name: str, impl: str = "exercises") -> bool:
    """Run the tests of exercise `name` against `impl` ("exercises" or "solutions"); print how many pass and the
    first failure. Runs in a fresh Python process, so edits to exercises/*.py count without restarting the kernel.
    """
    result = subprocess.run(
        [sys.executable, "-m", "tests.exercises.grade", f"--impl={impl}", f"--exercise={name}", "--strict"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    print(result.stdout + result.stderr, end="")
    return result.returncode == 0
