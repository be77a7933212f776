"""The notebooks' formatting and plotting helpers: mini_deepseek.notebook, mini_deepseek.plots, mini_deepseek.progress."""

import sys

import pytest

from mini_deepseek import ModelConfig, progress
from mini_deepseek import notebook as nb
from mini_deepseek.train import History, TrainConfig

plt = pytest.importorskip("matplotlib.pyplot")
plots = pytest.importorskip("mini_deepseek.plots")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_tables_format_every_cell_and_reject_ragged_rows():
    header, rows = ["a", "bb"], [[1, "x"], [22, "yyy"]]
    assert nb.markdown_table(header, rows) == "| a | bb |\n|---|---|\n| 1 | x |\n| 22 | yyy |"
    assert nb.text_table(header, rows).splitlines() == ["a   bb", "--  ---", "1   x", "22  yyy"]
    with pytest.raises(ValueError, match="2 cells"):
        nb.markdown_table(header, [[1]])


def test_kv_cache_table_uses_the_library_count_and_gb():
    sizes = nb.attention_sizes("v3")
    caption, header, rows = nb.kv_cache_table(**sizes, batch=8, context=nb.LONG_CONTEXT, bytes_per_element=2,
                                              gpu_gb=141)
    assert "131,072 tokens" in caption and "GB = 10^9 bytes" in caption
    mla = dict(zip(header, next(r for r in rows if r[0] == "MLA (absorbed cache)"), strict=True))
    elements = ModelConfig.preset("v3", mla_mode="absorb").kv_cache_elements_per_token()
    assert mla["elements per token"] == f"{elements:,}" == "35,136"
    per_sequence = nb.LONG_CONTEXT * elements * 2 / 1e9
    assert mla["GB per sequence"] == f"{per_sequence:,.2f}"
    assert mla["sequences that fit"] == str(int(141 // per_sequence)) and mla["fits the batch?"] == "yes"
    mha = dict(zip(header, rows[0], strict=True))
    assert mha["variant"] == "MHA" and mha["fits the batch?"] == "no" and mha["sequences that fit"] == "0"
    # a size the config rejects is reported by name, not raised into the widget
    assert "head_dim" in nb.kv_cache_report(**{**sizes, "head_dim": 127}, batch=1, context=1024,
                                            bytes_per_element=2, gpu_gb=80)


def test_kv_cache_calculator_prints_a_table_without_ipywidgets(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` now raises ImportError
    nb.kv_cache_calculator(preset="v2-lite", batch=2, context=4096)
    out = capsys.readouterr().out
    assert "ipywidgets is not installed" in out
    assert "batch 2, context 4,096 tokens" in out
    assert "MLA (absorbed cache)  15,552" in out  # V2-Lite: (512 + 64) x 27 layers, in an aligned text table


def test_visible_runs_names_long_runs_of_spaces_only():
    assert nb.visible_runs("def f():\n        return" + " " * 40 + "x") == "def f():\n        return<40 spaces>x"


def test_training_summary_is_one_line():
    history = History(train=[{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}],
                      evals=[{"step": 2, "val_loss": 2.75}])
    line = nb.training_summary("MHA, seed 0", history, TrainConfig(batch_size=4, seq_len=8), seconds=2.0)
    assert line == ("MHA, seed 0: 2 steps, 64 tokens in 2.0 s (32 tokens/s); last step (2) loss 2.500, "
                    "val loss 2.750 at step 2")
    resumed = nb.training_summary("resumed", history, TrainConfig(batch_size=4, seq_len=8), 1.0, since_step=1)
    assert resumed.startswith("resumed: 1 steps, 32 tokens in 1.0 s")


def test_run_time_reports_mode_and_duration(monkeypatch, capsys):
    monkeypatch.setenv("MINI_DEEPSEEK_QUICK", "1")
    assert nb.setup(seed=0) is True
    line = nb.run_time()
    assert line.startswith("this run: quick mode, 0 min ") and "from setup() to here" in line
    assert "mode: quick" in capsys.readouterr().out


def test_display_line_keeps_only_the_last_state_of_the_bar(monkeypatch):
    shown = []

    class Handle:
        def update(self, bundle, raw):
            shown[-1] = bundle["text/plain"]

    def fake_display(bundle, raw, display_id):
        shown.append(bundle["text/plain"])
        return Handle()

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", fake_display)
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    with progress.progress_bar(total=3, desc="train", mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert len(shown) == 1, "one display output, updated in place"
    assert shown[0].startswith("train: 100%") and "3/3" in shown[0]


def test_progress_bar_outside_a_notebook_writes_to_stderr(capsys):
    assert not progress.in_notebook()
    with progress.progress_bar(total=2, desc="work", mininterval=0) as bar:
        bar.update(2)
    assert "work: 100%" in capsys.readouterr().err


def _texts(fig) -> str:
    """Every text drawn on the figure's axes, and its title."""
    return "\n".join([t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts])


@pytest.mark.parametrize("preset, hidden, vocab", [("toy", "128", "264"), ("v3", "7,168", "129,280")])
def test_architecture_diagram_takes_its_shapes_from_the_config(preset, hidden, vocab):
    text = _texts(plots.architecture_diagram(ModelConfig.preset(preset), seq_len=8))
    assert f"[8, {hidden}]" in text and f"[8, {vocab}]" in text  # hidden states and logits
    assert f"[7, {vocab}]" in text  # the MTP module predicts one position fewer
    cfg = ModelConfig.preset(preset)
    assert f"block, x {cfg.n_layers}" in text and f"{cfg.n_routed_experts} routed experts" in text


@pytest.mark.parametrize("preset, latent, naive", [("toy", "64 + 16 = 80", "4 x (32 + 16 + 32) = 320"),
                                                   ("v3", "512 + 64 = 576", "128 x (128 + 64 + 128) = 40,960")])
def test_mla_diagram_takes_its_shapes_from_the_config(preset, latent, naive):
    cfg = ModelConfig.preset(preset)
    text = _texts(plots.mla_diagram(cfg))
    assert latent in text and naive in text
    assert f"latent cache [S, {cfg.kv_lora_rank + cfg.qk_rope_head_dim}]" in text
    assert f"{cfg.softmax_scale:.4g}" in text  # V3's includes the YaRN factor
    with pytest.raises(ValueError, match="attn_type"):
        plots.mla_diagram(cfg.replace(attn_type="mha"))


def test_smooth_is_a_trailing_mean():
    assert plots.smooth([1, 2, 3, 4], window=2) == [1.0, 1.5, 2.5, 3.5]
    with pytest.raises(ValueError):
        plots.smooth([1.0], window=0)


def test_training_plot_draws_losses_and_maxvio():
    history = History(train=[{"step": s, "lm_loss": 3.0 - s / 10, "mtp_loss": 3.1, "maxvio": 0.5}
                             for s in range(1, 6)], evals=[{"step": 5, "val_lm_loss": 2.9}])
    plot = plots.TrainingPlot(window=2, show=False)
    plot(history)
    assert len(plot.ax_loss.lines) == 5 and len(plot.ax_vio.lines) == 2  # 2 per training curve, 1 val
    assert list(plot.ax_loss.lines[1].get_ydata()[-2:]) == pytest.approx([2.65, 2.55])


def test_charts_draw_one_line_per_variant():
    caches = {"MHA": 1024, "MLA": 320}
    fig = plots.kv_cache_memory_plot(caches, bytes_per_element=2, gpu_gb=141, gpu_name="H200",
                                     max_context=nb.LONG_CONTEXT, batches=(1, 8))
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3  # two variants + the GPU line
    assert fig.axes[0].lines[0].get_xdata()[-1] == nb.LONG_CONTEXT
    fig = plots.variant_comparison_plot(caches, {"MHA": [2.0, 2.2], "MLA": [1.9, 2.0]},
                                        {"MHA": [([1, 2], [3, 2])] * 2, "MLA": [([1, 2], [3, 1.9])] * 2},
                                        seeds=[0, 1], steps=2, n_layers=4)
    assert len(fig.axes[1].lines) == 4
    fig = plots.decode_latency_plot({"MHA": {256: 1.0, 1024: 2.0}, "MLA": {256: 1.0, 1024: 1.2}}, caches, "t")
    assert len(fig.axes[0].lines) == 2
