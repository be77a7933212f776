"""The browser checks themselves can fail: a notebook written here plants one fault of each kind the checks look
for (an error cell, a widget never shown, an explorer whose output ignores its control, an explorer callback that
raises inside its output, an observer that raises outside it, controls that no probe covers), and every control
kind that change_control() knows is driven through the page once.
"""

import pytest

pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (the test extra)")

import nbformat  # noqa: E402
from lab_driver import Probe, exercise_notebook  # noqa: E402

pytestmark = pytest.mark.browser

CONTROL_KINDS = '''\
import ipywidgets as widgets
from IPython.display import display
from tqdm.auto import tqdm

from mini_deepseek.explorer import explorer

for _ in tqdm(range(3), desc="a tqdm bar: four widgets"):
    pass
kinds = [widgets.IntSlider(value=3, max=10, description="int slider"),
         widgets.FloatSlider(value=10.0, max=10.0, description="slider at its maximum"),
         widgets.SelectionSlider(options=[1, 2, 4], value=2, description="selection slider"),
         widgets.Dropdown(options={"a": 1, "b": 2}, description="dropdown"),
         widgets.BoundedIntText(value=5, min=1, max=5, description="number box at its maximum"),
         widgets.FloatText(value=1.5, description="float box"),
         widgets.Text(value="abc", description="text"),
         widgets.Checkbox(value=False, description="checkbox"),
         widgets.ToggleButtons(options=["x", "y"], description="toggle buttons"),
         widgets.RadioButtons(options=["p", "q"], description="radio"),
         widgets.ToggleButton(description="toggle")]
for control in kinds:
    explorer(lambda value: print(f"value = {value!r}"), {"value": control})
'''
HAND_BUILT = '''\
size = widgets.IntSlider(value=2, min=1, max=9, description="size")
display(size, widgets.interactive_output(lambda size: print("#" * size), {"size": size}))
'''
FAULTS = '''\
never_shown = widgets.IntSlider(description="never shown")
explorer(lambda value: print("this output ignores its control"), {"value": widgets.Dropdown(options=["u", "v"])})


def show_or_raise(value):
    if value == "boom":
        raise ValueError("planted error in an explorer")
    print(value)


explorer(show_or_raise, {"value": widgets.Dropdown(options=["ok", "boom"])})
logged = widgets.Dropdown(options=["a", "b"], description="logged")
explorer(lambda value: print(value), {"value": logged})
logged.observe(lambda change: 1 / 0, names="value")  # after the explorer's own observer: the output still changes
'''
ERROR_CELL = 'raise RuntimeError("planted error cell")'
UNPROBED = '''\
import ipywidgets as widgets
from IPython.display import display

display(widgets.IntSlider(description="unprobed"))
'''


def write_notebook(path, *sources):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(notebook, path)


def test_checks_catch_planted_faults(browser, lab_server, tmp_path):
    write_notebook(lab_server.root / "zz_planted_faults.ipynb", CONTROL_KINDS, HAND_BUILT, FAULTS, ERROR_CELL)
    run = exercise_notebook(browser, lab_server, "zz_planted_faults.ipynb", [Probe("size")], tmp_path,
                            run_timeout_s=300, change_timeout_s=10)
    problems = "\n".join(run.problems)
    changed = "\n".join(run.explorers)
    # every control kind, and the hand-built explorer found by its label, changed its output through the page
    for i in range(1, 12):
        assert f"explorer {i}:" in changed, (i, problems, changed)
    assert "probe 'size'" in changed, (problems, changed)
    # and each planted fault was caught, with nothing else
    expected = ["cell 3", "RuntimeError: planted error cell",
                "have no view on the page: IntSlider('never shown')",
                "explorer 12: picked option 1", "did not change within 10 s",
                "an Output widget shows an error: ValueError: planted error in an explorer",
                "a widget callback raised where no output shows it: ZeroDivisionError"]
    for text in expected:
        assert text in problems, (text, problems)
    assert len(run.problems) == 5, problems
    # tqdm's bar, 14 explorers of 4 (control, its VBox, Output, outer VBox), the hand-built pair, never_shown
    assert run.widget_models == 4 + 4 * 14 + 2 + 1 and run.widget_views == run.widget_models - 1, run
    assert run.screenshot is not None and run.screenshot.stat().st_size > 0


def test_controls_without_a_probe_fail(browser, lab_server, tmp_path):
    write_notebook(lab_server.root / "zz_unprobed.ipynb", UNPROBED)
    run = exercise_notebook(browser, lab_server, "zz_unprobed.ipynb", [], tmp_path, run_timeout_s=120)
    assert len(run.problems) == 1 and "controls (unprobed) but no explorer is probed" in run.problems[0], run
