"""mini_deepseek.explorer: the CSS classes the browser tests find explorers by, and the live output's calls."""

import sys

import pytest

from mini_deepseek.explorer import CONTROL_CLASS, EXPLORER_CLASS, OUTPUT_CLASS, explorer, ipywidgets_or_none

widgets = pytest.importorskip("ipywidgets")


def test_explorer_tags_its_parts_and_redraws_on_every_change():
    calls = []
    size = widgets.IntSlider(value=2, min=1, max=9, description="size")
    kind = widgets.Dropdown(options=["a", "b"], value="a", description="kind")
    preset = widgets.Dropdown(options=["small", "large"], description="preset")
    box = explorer(lambda size, kind: calls.append((size, kind)), {"size": size, "kind": kind},
                   extra_controls=[preset])
    assert EXPLORER_CLASS in box._dom_classes
    layout, output = box.children
    assert list(layout.children) == [size, kind]  # the default layout: a VBox of the controls
    assert OUTPUT_CLASS in output._dom_classes and isinstance(output, widgets.Output)
    assert all(CONTROL_CLASS in c._dom_classes for c in (size, kind, preset))
    size.value = 5
    kind.value = "b"
    assert calls == [(2, "a"), (5, "a"), (5, "b")]


def test_explorer_keeps_a_given_layout():
    size = widgets.IntSlider(description="size")
    layout = widgets.HBox([size])
    assert explorer(lambda size: None, {"size": size}, layout=layout).children[0] is layout


def test_explorer_rejects_what_it_cannot_watch():
    with pytest.raises(ValueError, match="at least one control"):
        explorer(print, {})
    with pytest.raises(TypeError, match="'row' is a HBox"):
        explorer(print, {"row": widgets.HBox()})


def test_without_ipywidgets_the_notebook_is_told_to_print_instead(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` now raises ImportError
    assert ipywidgets_or_none() is None
    with pytest.raises(ImportError, match="print a table instead"):
        explorer(print, {"size": object()})
