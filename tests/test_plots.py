"""Figure specs for the plot builders (pure plotly; no streamlit, no model)."""

from __future__ import annotations

import pandas as pd
import pytest

from layerlens.plots import save_figure, sweep_figure


def _sweep_frame() -> pd.DataFrame:
    rows = []
    for strategy, slope in (("bi", 1.0), ("reverse", 3.0)):
        for ratio in (0.0, 0.1, 0.2, 0.3):
            rows.append(dict(strategy=strategy, ratio=ratio, n_removed=round(ratio * 30),
                             removed_layers=list(range(round(ratio * 30))), perplexity=10 * (1 + slope * ratio) ** 2,
                             mmlu_accuracy=0.3 - 0.1 * ratio * slope, seconds=1.0))
    return pd.DataFrame(rows)


def test_sweep_figure_one_curve_per_strategy_log_perplexity():
    fig = sweep_figure(_sweep_frame(), "perplexity", current={"ratio": 0.2, "value": 15.0})
    curves = [t for t in fig.data if t.mode == "lines+markers"]
    assert sorted(t.name for t in curves) == ["bi", "reverse"]
    assert fig.layout.yaxis.type == "log"
    assert "Pruning ratio" in fig.layout.xaxis.title.text and "%" in fig.layout.xaxis.title.text
    assert "Perplexity" in fig.layout.yaxis.title.text
    assert fig.layout.title.text
    star = [t for t in fig.data if t.name == "current plan"]
    assert star and list(star[0].x) == [20.0] and list(star[0].y) == [15.0]
    bi = next(t for t in curves if t.name == "bi")
    assert list(bi.x) == [0.0, 10.0, 20.0, 30.0]  # percent


def test_sweep_figure_mmlu_percent_and_current_line():
    fig = sweep_figure(_sweep_frame(), "mmlu_accuracy", current=0.1)
    assert fig.layout.yaxis.type != "log"
    bi = next(t for t in fig.data if t.name == "bi")
    assert bi.y[0] == pytest.approx(30.0)
    assert any(s.type == "line" for s in fig.layout.shapes)  # vertical line for a ratio-only current plan


def test_sweep_figure_empty_frame_and_bad_metric():
    fig = sweep_figure(_sweep_frame().iloc[:0])
    assert not fig.data and fig.layout.annotations
    with pytest.raises(ValueError):
        sweep_figure(_sweep_frame(), "accuracy")


def test_save_figure_writes_html(tmp_path, monkeypatch):
    import layerlens.plots as plots

    monkeypatch.setattr(plots, "figure_png_bytes", lambda *a, **k: None)  # PNG path tested in the browser suite
    paths = save_figure(sweep_figure(_sweep_frame()), tmp_path / "sweep.png")
    assert paths == [tmp_path / "sweep.html"]
    assert "plotly" in paths[0].read_text()
