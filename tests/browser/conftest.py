"""Fixtures of the browser tests: one JupyterLab server and one headless Chromium for the whole session.

Both skip cleanly when Playwright for Python or a Chromium is missing (a learner's `make test` needs no browser).
The server always goes down in teardown, kernels first, whatever the tests did.
"""

import os
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="session")
def chromium_path() -> str:
    pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (the test extra)")
    from lab_driver import find_chromium

    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found: install Debian's chromium package (apt-get install chromium) or set "
                    "MINI_DEEPSEEK_CHROMIUM to a Chromium executable")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path):
    """Headless Chromium; Playwright gives it a fresh temporary profile (user data dir) on every launch."""
    from lab_driver import CHROMIUM_FLAGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def lab_server(chromium_path, tmp_path_factory):
    """`jupyter lab` on a temporary copy of notebooks/ (see lab_driver.JupyterLabServer)."""
    from lab_driver import JupyterLabServer

    server = JupyterLabServer(tmp_path_factory.mktemp("jupyterlab"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where the screenshots go: $MINI_DEEPSEEK_BROWSER_ARTIFACTS, else runs/browser/<date-time>/ (git ignores
    runs/)."""
    explicit = os.environ.get("MINI_DEEPSEEK_BROWSER_ARTIFACTS")
    folder = Path(explicit) if explicit else REPO_ROOT / "runs" / "browser" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pytest_terminal_summary(terminalreporter):
    driver = sys.modules.get("lab_driver")  # imported only when the browser tests ran
    RUNS = driver.RUNS if driver else []
    if not RUNS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("notebooks in JupyterLab (headless Chromium)")
    write(f"{'notebook':<34} {'open s':>7} {'run all s':>10} {'explorers s':>12} {'widgets':>8} {'views':>6}  result")
    for run in RUNS:
        write(f"{run.name:<34} {run.open_s:>7.1f} {run.run_s:>10.1f} {run.probe_s:>12.1f} {run.widget_models:>8} "
              f"{run.widget_views:>6}  {'ok' if not run.problems else f'{len(run.problems)} problem(s)'}")
        for line in run.explorers:
            write(f"    {line}")
    screenshots = {run.screenshot.parent for run in RUNS if run.screenshot}
    for folder in sorted(screenshots):
        write(f"screenshots: {folder}")
