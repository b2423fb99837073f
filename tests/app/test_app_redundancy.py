"""AppTest: Redundancy page (bars, heatmaps with run outlines; sliders never recompute the metrics)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from plotly_json import array, figures


@pytest.fixture
def app(open_app):
    return open_app("pages/2_redundancy.py")


def test_opens_with_bars_and_heatmaps_of_shape_layers_plus_one(app):
    app.run()
    assert not app.exception and not app.error
    figs = figures(app)
    assert len(figs) == 5  # BI bars, sublayer BI bars, rank stability, cosine, CKA
    bar, sub, stab, cos, cka = figs
    assert [t["name"] for t in sub["data"]] == ["whole layer", "attention", "MLP"]
    assert "error_y" in bar["data"][0] and "error_y" in sub["data"][1]  # bootstrap intervals
    assert len(array(stab["data"][0]["y"])) == 6
    assert bar["data"][0]["type"] == "bar" and len(array(bar["data"][0]["x"])) == 6
    for heat in (cos, cka):
        z = array(heat["data"][0]["z"])
        assert heat["data"][0]["type"] == "heatmap"
        assert z.shape == (7, 7)  # layers + 1 states
        assert np.allclose(np.diag(z), 1.0, atol=1e-4)
        assert heat["layout"]["title"]["text"] and "0-based" in heat["layout"]["xaxis"]["title"]["text"]
    assert app.slider(key="rd_threshold").value == pytest.approx(0.9)
    assert app.radio(key="rd_metric").value == "bi"


def test_threshold_slider_outlines_runs_without_recomputing(app, monkeypatch):
    app.run()
    import layerlens.metrics

    def boom(*a, **k):
        raise AssertionError("metrics recomputed on a slider move")

    monkeypatch.setattr(layerlens.metrics, "analyze", boom)
    timings = []
    for value in (0.5, 0.99, 0.5):
        t = time.perf_counter()
        app.slider(key="rd_threshold").set_value(value).run()
        timings.append(time.perf_counter() - t)
        assert not app.exception and not app.error
    shapes_low = figures(app)[3]["layout"].get("shapes", [])  # after BI, sublayer BI, rank stability
    assert shapes_low, "a low threshold outlines at least one run"
    assert all(s["line"]["color"] == "red" for s in shapes_low)
    assert any("runs ≥ 0.50" in c.value for c in app.caption)
    print(f"threshold slider re-render: {[f'{t * 1000:.0f} ms' for t in timings]}")
    assert min(timings) < 2.0


def test_metric_switch_and_block_size(app):
    app.run()
    app.radio(key="rd_metric").set_value("block_distance").run()
    assert not app.exception
    app.slider(key="rd_block").set_value(3).run()
    bar = figures(app)[0]
    assert len(array(bar["data"][0]["x"])) == 4  # 6 layers, blocks of 3
    assert "3-layer block" in bar["layout"]["xaxis"]["title"]["text"]
    app.radio(key="rd_metric").set_value("magnitude").run()
    assert "Magnitude" in figures(app)[0]["layout"]["title"]["text"]
    app.multiselect(key="rd_kinds").set_value(["cka"]).run()
    assert len(figures(app)) == 4  # bars, sublayer bars, rank stability, CKA


def _patched_analysis(monkeypatch, edit):
    """The page's analysis returns the real report with ``edit(d)`` applied to its dict (a hand-made sink)."""
    import layerlens.metrics
    from layerlens.report import LayerReport

    real = layerlens.metrics.analyze

    def analyze(*a, **k):
        d = real(*a, **k).to_dict()
        edit(d)
        return LayerReport.from_dict(d)

    monkeypatch.setattr(layerlens.metrics, "analyze", analyze)


def _agree(d):
    d["cka"] = [list(row) for row in d["cosine"]]  # the criteria agree everywhere


def _sink_at_layer_2(d, skip_first=0):
    _agree(d)
    d["cosine"][2][3] = d["cosine"][3][2] = 0.97
    d["cka"][2][3] = d["cka"][3][2] = 0.02
    d["meta"]["skip_first"] = skip_first


def test_sink_like_disagreement_is_explained_with_its_fix(app, monkeypatch):
    _patched_analysis(monkeypatch, _sink_at_layer_2)
    app.run()
    assert not app.exception and not app.error
    notes = [i.value for i in app.info if "CKA and cosine disagree" in i.value]
    assert len(notes) == 1
    assert "layer 2:" in notes[0] and "0.02" in notes[0] and "attention sink" in notes[0]
    assert "Skip first tokens to 1" in notes[0]
    app.multiselect(key="rd_kinds").set_value(["cosine"]).run()  # no CKA heatmap: nothing to disagree with
    assert not any("CKA and cosine disagree" in i.value for i in app.info)


def test_no_disagreement_note_when_the_criteria_agree(app, monkeypatch):
    _patched_analysis(monkeypatch, _agree)
    app.run()
    assert not app.exception and not app.error
    assert not any("disagree" in i.value for i in app.info)


def test_with_the_first_token_already_skipped_the_note_offers_no_skip_fix(app, monkeypatch):
    _patched_analysis(monkeypatch, lambda d: _sink_at_layer_2(d, skip_first=1))
    app.run()
    notes = [i.value for i in app.info if "CKA and cosine disagree" in i.value]
    assert len(notes) == 1 and "already left out" in notes[0] and "Skip first tokens" not in notes[0]
