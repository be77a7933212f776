"""Grading harness: the same tests grade exercises/ (the learner's code) or solutions/ (the references).

    pytest tests/exercises                      # grade exercises/ (the default)
    pytest tests/exercises --impl=solutions     # grade the reference answers
    pytest tests/exercises --exercise=rms_norm  # only the tests of one exercise

Every test names its exercise with @pytest.mark.exercise("name") and receives it through the `exercise`
fixture, from the module of its own set (test_ex00_basics.py grades <impl>.ex00_basics).

The graded tests fail by design until the learner writes the exercises, so a run that does not name
tests/exercises (`make test`, `pytest tests`) skips collecting them; tests/test_exercise_mechanism.py runs
them there instead, against both packages.
"""

import importlib
from pathlib import Path
from types import ModuleType

import pytest
import torch

GRADED_DIR = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("exercises", "graded exercises")
    group.addoption("--impl", choices=("exercises", "solutions"), default="exercises", help="package graded by tests/exercises")
    group.addoption("--exercise", default=None, help="run only the tests of this exercise (e.g. rms_norm)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "exercise(name): the graded exercise this test belongs to")


def _named_on_command_line(config: pytest.Config) -> bool:
    for arg in config.args:
        path = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if path == GRADED_DIR or GRADED_DIR in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    graded_test_file = collection_path.parent == GRADED_DIR and collection_path.name.startswith("test_")
    return True if graded_test_file and not _named_on_command_line(config) else None


def exercise_name(item: pytest.Item) -> str:
    """The exercise a graded test belongs to, from its @pytest.mark.exercise("name")."""
    marker = item.get_closest_marker("exercise")
    if marker is None or len(marker.args) != 1:
        raise pytest.UsageError(f'{item.nodeid}: graded tests need exactly one @pytest.mark.exercise("name")')
    return marker.args[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    graded = [item for item in items if item.path.parent == GRADED_DIR]
    for item in graded:  # catch a misspelled marker here, not as a puzzling failure on the learner's side
        set_name = item.path.stem.removeprefix("test_")
        if not hasattr(importlib.import_module(f"solutions.{set_name}"), exercise_name(item)):
            raise pytest.UsageError(f"{item.nodeid}: solutions.{set_name} has no exercise {exercise_name(item)!r}")
    only = config.getoption("exercise")
    if only is not None:
        deselected = {item for item in graded if exercise_name(item) != only}
        if deselected:
            config.hook.pytest_deselected(items=list(deselected))
            items[:] = [item for item in items if item not in deselected]


@pytest.fixture
def impl_module(request: pytest.FixtureRequest) -> ModuleType:
    """The graded package's module for this test file's set: <impl>.ex00_basics for test_ex00_basics.py."""
    set_name = request.path.stem.removeprefix("test_")
    return importlib.import_module(f"{request.config.getoption('impl')}.{set_name}")


@pytest.fixture
def exercise(request: pytest.FixtureRequest, impl_module: ModuleType):
    """The function (or class) under test, named by the test's exercise marker."""
    return getattr(impl_module, exercise_name(request.node))


@pytest.fixture(autouse=True)
def seed() -> None:
    """Every graded test draws the same random inputs, so a score does not change from run to run."""
    torch.manual_seed(0)
