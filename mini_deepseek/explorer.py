"""The notebooks' interactive explorers: ipywidgets controls and an output that redraws whenever one changes.

Every explorer built here carries three CSS classes, and the browser tests (tests/browser/) rely on them: they
find each `md-explorer` on the page, change its first `md-explorer-control` the way a learner would (pick another
option, press an arrow key on a slider, tick a box) and check that its `md-explorer-output` shows something new.

    widgets = ipywidgets_or_none()
    if widgets is None:
        print("ipywidgets is not installed: the table above is what the explorer shows at its defaults")
    else:
        batch = widgets.BoundedIntText(value=8, min=1, max=1024, description="batch")
        explorer(show_report, {"batch": batch, ...})

Without ipywidgets a notebook prints the explorer's output at its default values instead (the course's rule:
explorers degrade to a printed table), so building the controls stays inside the `else` branch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

EXPLORER_CLASS = "md-explorer"  # the box that holds one explorer's controls and its output
CONTROL_CLASS = "md-explorer-control"  # a widget a learner changes
OUTPUT_CLASS = "md-explorer-output"  # the Output widget the explorer redraws


def ipywidgets_or_none() -> ModuleType | None:
    """The ipywidgets module, or None where it is not installed (the notebook then prints a table instead)."""
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def explorer(show: Callable[..., Any], controls: dict[str, Any], layout: Any = None,
             extra_controls: Iterable[Any] = ()) -> Any:
    """Display `layout` (a VBox of the controls by default) above an Output widget that calls show(**values).

    controls: keyword name -> ipywidgets control; show is called with each control's value under its name, once
    now and again whenever one changes. extra_controls: controls that are not arguments of show but change the
    others (e.g. a preset dropdown that fills in sizes); they are tagged as controls too. Returns the displayed box.
    """
    widgets = ipywidgets_or_none()
    if widgets is None:
        raise ImportError("explorer() needs ipywidgets; check ipywidgets_or_none() first and print a table instead")
    from IPython.display import display

    if not controls:
        raise ValueError("explorer() needs at least one control")
    for name, control in controls.items():
        if not isinstance(control, widgets.ValueWidget):
            raise TypeError(f"control {name!r} is a {type(control).__name__}, not an ipywidgets value widget")
    for control in [*controls.values(), *extra_controls]:
        control.add_class(CONTROL_CLASS)
    output = widgets.interactive_output(show, controls)
    output.add_class(OUTPUT_CLASS)
    box = widgets.VBox([layout if layout is not None else widgets.VBox(list(controls.values())), output])
    box.add_class(EXPLORER_CLASS)
    # A saved notebook viewed without a kernel shows text/plain: a readable line, not the widget's repr.
    bundle = box._repr_mimebundle_()
    bundle["text/plain"] = "[interactive explorer: run the notebook to use its controls]"
    display(bundle, raw=True)
    return box
