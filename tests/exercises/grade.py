"""Score the graded exercises: python -m tests.exercises.grade [--impl=exercises|solutions] [--exercise=NAME]

Runs the tests in tests/exercises with pytest and prints, for every exercise, how many of its tests pass, then
the first failure of each exercise that does not pass yet. Exits 0 whatever the score (`--strict`: 1 unless every
test passes, which is what `check` in exercises/__init__.py uses) and 2 when the tests could not be run at all.
"""

import argparse
import contextlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

GRADED_DIR = Path(__file__).resolve().parent
MAX_MESSAGE_LINES = 8


@dataclass
class ExerciseScore:
    set_name: str  # ex00_basics
    passed: int = 0
    total: int = 0
    first_failure: tuple[str, str] | None = None  # (test name, message) of the first test that did not pass
    started: bool = False  # False while every failure is the stub's NotImplementedError

    @property
    def status(self) -> str:
        if self.passed == self.total:
            return "pass"
        return "fail" if self.started else "not started"


@dataclass
class Recorder:
    """A pytest plugin that records, for every graded test, its exercise and whether and how it failed."""

    tests: dict[str, pytest.Item] = field(default_factory=dict)  # node id -> test, in collection order
    call_passed: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)  # node id -> message of its first failed phase
    deselected: set[str] = field(default_factory=set)  # exercises left out by --exercise

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected.update(exercise_name(item) for item in items)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.tests = {item.nodeid: item for item in session.items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Setup, call and teardown report separately: a test passes when its call passed and no phase failed.
        if report.when == "call" and report.passed:
            self.call_passed.add(report.nodeid)
        elif not report.passed:
            self.failures.setdefault(report.nodeid, failure_message(report))

    def scores(self) -> dict[str, ExerciseScore]:
        """Exercise name -> score, in the order of the test files."""
        scores: dict[str, ExerciseScore] = {}
        for nodeid, item in self.tests.items():
            score = scores.setdefault(exercise_name(item), ExerciseScore(item.path.stem.removeprefix("test_")))
            score.total += 1
            if nodeid in self.call_passed and nodeid not in self.failures:
                score.passed += 1
                continue
            message = self.failures.get(nodeid, "did not run")
            score.started |= not message.startswith("NotImplementedError")
            score.first_failure = score.first_failure or (item.name, message)
        return scores


def exercise_name(item: pytest.Item) -> str:
    return item.get_closest_marker("exercise").args[0]


def failure_message(report: pytest.TestReport) -> str:
    if report.skipped:
        return f"skipped: {report.longrepr[-1]}"
    crash = getattr(report.longrepr, "reprcrash", None)
    lines = (crash.message if crash else str(report.longrepr)).splitlines()
    return "\n".join(lines[:MAX_MESSAGE_LINES] + (["..."] if len(lines) > MAX_MESSAGE_LINES else []))


def run(impl: str, exercise: str | None = None) -> tuple[int, Recorder, str]:
    """Run the graded tests against `impl`; return pytest's exit code, the recorder and pytest's own output."""
    # The graded tests need no third-party pytest plugins; autoloading them (hypothesis, for one) costs seconds.
    args = [str(GRADED_DIR), f"--impl={impl}", "--disable-plugin-autoload", "-p", "no:cacheprovider"]
    if exercise is not None:
        args.append(f"--exercise={exercise}")
    recorder = Recorder()
    with contextlib.redirect_stdout(io.StringIO()) as pytest_output:  # the score table replaces pytest's report
        exit_code = pytest.main(args, plugins=[recorder])
    return exit_code, recorder, pytest_output.getvalue()


def report(impl: str, scores: dict[str, ExerciseScore]) -> str:
    """The score table, then the first failure of each exercise that does not pass yet."""
    rows = [("exercise", "tests", "status")]
    rows += [(f"{s.set_name}.{name}", f"{s.passed}/{s.total}", s.status) for name, s in scores.items()]
    rows.append(("total", f"{sum(s.passed for s in scores.values())}/{sum(s.total for s in scores.values())}", ""))
    width = max(len(row[0]) for row in rows) + 2
    lines = [f"Graded exercises, implementation: {impl}/", ""]
    lines += [f"  {name:<{width}}{tests:<8}{status}".rstrip() for name, tests, status in rows]
    failing = {name: score for name, score in scores.items() if score.status != "pass"}
    if failing:
        lines += ["", "First failure of each exercise that does not pass:"]
    for name, score in failing.items():
        test_name, message = score.first_failure
        lines.append(f"  {name} ({test_name})")
        lines += [f"      {line}".rstrip() for line in message.splitlines()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("exercises", "solutions"), default="exercises")
    parser.add_argument("--exercise", default=None, help="grade only this exercise (e.g. rms_norm)")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every graded test passes")
    args = parser.parse_args(argv)

    exit_code, recorder, pytest_output = run(args.impl, args.exercise)
    if exit_code == pytest.ExitCode.NO_TESTS_COLLECTED and args.exercise is not None:
        print(f"No exercise named {args.exercise!r}; the exercises are: {', '.join(sorted(recorder.deselected))}")
        return 2
    if exit_code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        print(pytest_output, f"pytest could not run the graded tests (exit code {exit_code})", sep="\n")
        return 2
    print(report(args.impl, recorder.scores()))
    return int(args.strict and exit_code != pytest.ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
