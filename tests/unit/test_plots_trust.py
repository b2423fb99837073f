"""Plot builders for damage and calibration comparison: valid plotly specs, short titles, the right data."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from layerlens.calibration_compare import compare_reports
from layerlens.plots import TITLE_LINE_MAX
from layerlens.plots_trust import (
    correlation_rows,
    damage_bars,
    damage_scatter,
    rank_difference_heatmap,
    rank_table,
)
from layerlens.report import LayerReport


def _report(values, L=8) -> LayerReport:
    eye = [[1.0 if a == b else 0.5 for b in range(L + 1)] for a in range(L + 1)]
    return LayerReport(num_layers=L, bi=tuple(values), cosine=eye, cka=eye, cka_estimator="minibatch",
                       block_distance=tuple(tuple(0.1 for _ in range(L - n)) for n in range(L)),
                       magnitude=tuple(v / 2 for v in values))


def _doc(L=8):
    rows = [{"index": i, "ppl": 10.0 + i * i, "ppl_increase": float(i * i) - 0.5, "kl": 0.1 * i} for i in range(L)]
    return {"baseline_ppl": 10.5, "layers": rows, "attn": rows, "correlations": {
        "bi": {"units": "layer", "n": L, "expected_sign": 1, "spearman": 0.5, "kendall": 0.4},
        "cosine": {"units": "layer", "n": L, "expected_sign": -1, "spearman": -0.5, "kendall": -0.4}}}


def _figures():
    rng = np.random.default_rng(0)
    reports = [_report(rng.random(8)) for _ in range(3)]
    comp = compare_reports(reports, ["plays", "prose", "my file"])
    yield damage_scatter(_doc(), reports[0], "bi")
    yield damage_bars(_doc())
    yield rank_difference_heatmap(comp)


@pytest.mark.parametrize("index", range(3))
def test_specs_pass_plotly_validation_and_titles_fit(index):
    fig = list(_figures())[index]
    checked = go.Figure(fig.to_dict())
    assert json.loads(pio.to_json(checked, validate=False)) == json.loads(pio.to_json(fig, validate=False))
    for line in fig.layout.title.text.replace("<sup>", "").replace("</sup>", "").split("<br>"):
        assert len(line) <= TITLE_LINE_MAX, line


def test_scatter_heatmap_and_tables_show_the_data():
    rep = _report([0.3, 0.1, 0.5, 0.2, 0.9, 0.4, 0.6, 0.7])
    scatter = damage_scatter(_doc(), rep, "bi")
    assert list(scatter.data[0].x) == pytest.approx(list(rep.bi))
    assert list(scatter.data[0].y) == [float(i * i) - 0.5 for i in range(8)]
    assert scatter.layout.yaxis.type == "linear"  # a negative increase: no log axis
    assert "Spearman +0.50" in scatter.layout.title.text
    other = _report([0.3, 0.1, 0.5, 0.9, 0.2, 0.4, 0.6, 0.7])
    comp = compare_reports([rep, other], ["a", "b"])
    heat = rank_difference_heatmap(comp)
    z = np.asarray(heat.data[0].z)
    assert z.shape == (2, 8) and z[:, 3].tolist() == [-3.0, 3.0]  # layer 3: rank 2 in a, rank 8 in b
    assert rank_table(comp)[0] == {"rank": 1, "a": 1, "b": 1}
    rows = correlation_rows(_doc())
    assert [r["key"] for r in rows] == ["bi", "cosine"] and rows[1]["predicts damage when"] == "negative"
    bars = damage_bars(_doc())
    assert [t.name for t in bars.data] == ["whole layer", "attention only"]
    assert bars.layout.shapes[0].y0 == 10.5
