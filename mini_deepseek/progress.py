"""Progress bars that leave one final line, in a terminal and in a saved notebook.

tqdm's notebook bar is an ipywidget: a saved notebook keeps only the text it had when it was first shown (a frozen
"0%"), and without ipywidgets it degrades with a warning. In a Jupyter kernel this module draws tqdm's text bar
into one display output instead and updates that output in place, so a live notebook shows a moving bar and a
saved one its last state. Elsewhere it is tqdm's ordinary bar on stderr.
"""

from __future__ import annotations

from typing import Any

from tqdm.std import tqdm


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython with a kernel attached), False in a terminal or a plain script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class DisplayLine:
    """A file-like object for tqdm: each bar refresh replaces the text of one notebook display output."""

    def __init__(self) -> None:
        self.handle = None  # IPython DisplayHandle, created at the first write
        self.text = ""  # the line shown now

    def write(self, s: str) -> None:
        # tqdm writes "\r" + the bar on every refresh and "\n" when it closes: keep the last non-empty piece.
        pieces = [p for p in s.replace("\n", "\r").split("\r") if p.strip()]
        if not pieces:
            return
        self.text = pieces[-1]
        from IPython.display import display

        bundle = {"text/plain": self.text}
        if self.handle is None:
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)

    def flush(self) -> None:
        pass


def progress_bar(**kwargs: Any) -> tqdm:
    """tqdm(**kwargs) that leaves its final line: one in-place display output in a notebook, stderr elsewhere."""
    if in_notebook() and "file" not in kwargs:
        kwargs["file"] = DisplayLine()
    return tqdm(**kwargs)
