"""The graded-exercise machinery: every graded test passes on solutions/ and fails on the stubs in exercises/,
the two packages expose the same names and signatures, and `make grade` and `check(...)` report it.

These checks assume exercises/ is as committed (CI runs `make test` on a clean clone). Once you start solving
exercises, the stub checks here fail by design: grade your work with `make grade` or `check("name")` instead.
"""

import importlib
import inspect
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

from exercises import REPO_ROOT, check

GRADED_DIR = REPO_ROOT / "tests" / "exercises"
EXERCISE_SETS = sorted(path.stem for path in (REPO_ROOT / "exercises").glob("ex[0-9]*_*.py"))


def public_api(module: ModuleType) -> dict[str, inspect.Signature]:
    """Signatures of the functions and classes (and their public methods) that `module` itself defines."""
    api = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            api[name] = inspect.signature(obj)
        if inspect.isclass(obj):
            api |= {f"{name}.{method_name}": inspect.signature(method) for method_name, method in vars(obj).items()
                    if inspect.isfunction(method) and not method_name.startswith("_")}
    return api


def stubs() -> list[tuple[str, str]]:
    """(set, exercise) for every public function and class of exercises/."""
    return [(set_name, name) for set_name in EXERCISE_SETS
            for name in public_api(importlib.import_module(f"exercises.{set_name}")) if "." not in name]


def junit_outcomes(junit_xml: Path) -> dict[str, tuple[str, str]]:
    """Test id -> (outcome, message) from a JUnit XML report; outcome is passed, failure, error or skipped."""
    outcomes = {}
    for case in ET.parse(junit_xml).iter("testcase"):
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcomes[test_id] = ("passed", "") if problem is None else (problem.tag, problem.get("message", ""))
    return outcomes


@pytest.fixture(scope="module")
def graded_runs(tmp_path_factory) -> dict[str, dict[str, tuple[str, str]]]:
    """The graded suite run on each package in fresh processes, side by side to keep `make test` fast."""
    reports = tmp_path_factory.mktemp("graded")
    runs = {impl: subprocess.Popen([sys.executable, "-m", "pytest", str(GRADED_DIR), f"--impl={impl}",
                                    "--disable-plugin-autoload", "-p", "no:cacheprovider", "-q",
                                    f"--junitxml={reports / impl}.xml"],
                                   cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for impl in ("exercises", "solutions")}
    for process in runs.values():
        process.wait()
    return {impl: junit_outcomes(reports / f"{impl}.xml") for impl in runs}


def test_every_exercise_set_has_solutions_and_tests():
    assert EXERCISE_SETS, "no exercises/exNN_*.py found"
    for set_name in EXERCISE_SETS:
        assert (REPO_ROOT / "solutions" / f"{set_name}.py").is_file(), f"solutions/{set_name}.py is missing"
        assert (GRADED_DIR / f"test_{set_name}.py").is_file(), f"tests/exercises/test_{set_name}.py is missing"
    assert EXERCISE_SETS == sorted(path.stem for path in (REPO_ROOT / "solutions").glob("ex[0-9]*_*.py"))


@pytest.mark.parametrize("set_name", EXERCISE_SETS)
def test_exercises_and_solutions_have_the_same_names_and_signatures(set_name):
    stub_api = public_api(importlib.import_module(f"exercises.{set_name}"))
    solution_api = public_api(importlib.import_module(f"solutions.{set_name}"))
    assert stub_api == solution_api


@pytest.mark.parametrize("set_name, name", stubs(), ids=[f"{s}.{n}" for s, n in stubs()])
def test_every_stub_raises_not_implemented_naming_itself(set_name, name):
    stub = getattr(importlib.import_module(f"exercises.{set_name}"), name)
    with pytest.raises(NotImplementedError, match=rf"^Exercise {name}\b"):
        stub(**dict.fromkeys(inspect.signature(stub).parameters))  # the stub raises before it reads any argument


def test_solutions_pass_every_graded_test(graded_runs):
    outcomes = graded_runs["solutions"]
    assert outcomes, "no graded tests were collected"
    assert {test: outcome for test, outcome in outcomes.items() if outcome[0] != "passed"} == {}


def test_untouched_stubs_fail_every_graded_test(graded_runs):
    outcomes = graded_runs["exercises"]
    assert outcomes, "no graded tests were collected"
    # A graded test that passes on a stub grades nothing; one that errors fails for a reason other than the stub.
    not_failing = {test: outcome for test, outcome in outcomes.items()
                   if outcome[0] != "failure" or not outcome[1].startswith("NotImplementedError: Exercise ")}
    assert not_failing == {}, "exercises/ differs from the committed stubs, or a graded test does not need its exercise"
    assert outcomes.keys() == graded_runs["solutions"].keys()


def test_grade_prints_a_passing_row_for_every_exercise():
    result = subprocess.run([sys.executable, "-m", "tests.exercises.grade", "--impl=solutions"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[3:] if line.strip()}
    for set_name, name in stubs():
        tests, status = rows[f"{set_name}.{name}"]
        passed, total = tests.split("/")
        assert status == "pass" and passed == total and int(total) > 0, f"{set_name}.{name}: {tests} {status}"


def test_check_grades_one_exercise_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a notebook runs from notebooks/, not the repository root
    assert check("rms_norm") is False
    out = capsys.readouterr().out
    assert out.startswith("FAIL  rms_norm: 0/5 tests pass (not started)")  # the verdict comes first, on one line
    assert "NotImplementedError: Exercise rms_norm" in out
    assert check("rms_norm", impl="solutions") is True
    out = capsys.readouterr().out
    assert out.startswith("PASS  rms_norm: all 5 tests pass")
    assert "ex00_basics.rms_norm  5/5" in out
