"""Every course notebook as a learner meets it: opened in JupyterLab in headless Chromium, outputs cleared, Run
All in quick mode; then no cell has an error output, every widget the kernel created has a view on the page, and
each explorer's output changes when one of its controls is changed through the page.

Notebooks are found by glob, so new ones are tested as they land; explorer_probes.py says which control to change
in explorers that are not built with mini_deepseek.explorer.explorer().
"""

from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (the test extra)")

from explorer_probes import PROBES  # noqa: E402
from lab_driver import NOTEBOOK_DIR, RUNS, exercise_notebook, run_timeout_s  # noqa: E402

pytestmark = pytest.mark.browser
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_every_probe_names_a_notebook():
    stems = {path.stem for path in NOTEBOOKS}
    assert set(PROBES) <= stems, f"explorer_probes.PROBES names notebooks that do not exist: {set(PROBES) - stems}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_in_jupyterlab(path: Path, browser, lab_server, artifacts_dir):
    run = exercise_notebook(browser, lab_server, path.name, PROBES.get(path.stem, []), artifacts_dir,
                            run_timeout_s())
    RUNS.append(run)
    assert not run.problems, (
        f"{path.name} in JupyterLab:\n  " + "\n  ".join(run.problems)
        + f"\nscreenshot: {run.screenshot}\nserver and kernel log: {lab_server.log_path}"
        + ("\nbrowser console errors:\n  " + "\n  ".join(run.console_errors[:10]) if run.console_errors else ""))
