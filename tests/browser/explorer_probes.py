"""Which control to change in the explorers that the browser tests cannot find on their own.

An explorer built with mini_deepseek.explorer.explorer() needs no entry: the test changes its first control and
watches its output (CSS classes md-explorer, md-explorer-control, md-explorer-output). A notebook whose explorer
is built by hand gets an entry here: the notebook's file name without .ipynb -> the Probes to run, each naming a
control by its description label and (optionally) a CSS selector, inside that control's cell, of the output that
must change. A notebook with neither still gets every other check (no errors, every widget rendered); one that
shows controls with neither fails, so that no explorer goes untested.
"""

from lab_driver import Probe

PROBES: dict[str, list[Probe]] = {
    # the KV-cache calculator (section 5): a bigger batch changes the "GB for the batch" column
    "01_attention_kv_cache": [Probe(control="batch")],
    # the GRPO group explorer (section 2): its first control (clip ε) is changed by the generic check; β changes the
    # KL term, so the per-token objective drawn and tabulated below the controls
    "06_grpo_r1": [Probe(control="β (KL)")],
}
