"""Figure specs for the plot builders (pure plotly; no streamlit, no model)."""

from __future__ import annotations

import pandas as pd
import pytest

from layerlens.plots_curves import sweep_figure


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


def _healed_frame() -> pd.DataFrame:
    """A sweep that healed every point: a healed row after each pruned row, as layerlens.sweep writes it."""
    rows = []
    for _, row in _sweep_frame().iterrows():
        rows.append(row.to_dict() | {"healed": False})
        rows.append(row.to_dict() | {"healed": True, "perplexity": row["perplexity"] * 0.8})
    return pd.DataFrame(rows)


def test_sweep_figure_draws_healed_points_as_a_dashed_curve_of_the_same_colour():
    """Issue 15: pruned and healed rows of one strategy are two curves (never one zigzag line)."""
    fig = sweep_figure(_healed_frame(), "perplexity")
    curves = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    assert sorted(curves) == ["bi", "bi (healed)", "reverse", "reverse (healed)"]
    for strategy in ("bi", "reverse"):
        pruned, healed = curves[strategy], curves[f"{strategy} (healed)"]
        assert list(pruned.x) == list(healed.x) == [0.0, 10.0, 20.0, 30.0]  # monotone x: no zigzag
        assert healed.line.dash == "dash" and pruned.line.dash is None
        assert healed.line.color == pruned.line.color
        assert list(healed.y) == pytest.approx([0.8 * y for y in pruned.y])
    assert "healing" in fig.layout.title.text
    from_csv = _healed_frame().astype({"healed": str})  # a frame read back from sweep.csv
    assert len([t for t in sweep_figure(from_csv).data if t.name.endswith("(healed)")]) == 2
    assert "healing" not in sweep_figure(_sweep_frame()).layout.title.text  # no healed column: as before


def test_heal_curve_loss_and_checkpoints():
    from layerlens.plots_curves import heal_curve

    curve = [[1, 3.0], [2, 2.5], [3, 2.2], [4, 2.0]]
    evals = [[0, 80.0, 0.0], [2, 60.0, 1.5], [4, 62.0, 3.0]]
    fig = heal_curve(curve, evals, best_step=2)
    loss, ppl, best = fig.data
    assert list(loss.x) == [1, 2, 3, 4] and list(loss.y) == [3.0, 2.5, 2.2, 2.0]
    assert list(ppl.x) == [0, 2, 4] and ppl.yaxis == "y2" and fig.layout.yaxis2.type == "log"
    assert list(best.x) == [2] and list(best.y) == [60.0]
    assert "4 steps" in fig.layout.title.text
    assert len(heal_curve([], []).data) == 2  # before the first step: empty traces, no error


def test_sweep_figure_empty_frame_and_bad_metric():
    fig = sweep_figure(_sweep_frame().iloc[:0])
    assert not fig.data and fig.layout.annotations
    with pytest.raises(ValueError):
        sweep_figure(_sweep_frame(), "accuracy")


# ---------------------------------------------------------------------------------------------------------
# Per-layer bars, heatmaps, layer strip
# ---------------------------------------------------------------------------------------------------------

import numpy as np  # noqa: E402

from layerlens.plans import PrunePlan, plan_summary, slm_plan  # noqa: E402
from layerlens.plans.slm import merge_groups, similar_runs  # noqa: E402
from layerlens.plots import bi_bar, layer_strip, similarity_heatmap  # noqa: E402
from layerlens.report import LayerReport  # noqa: E402


def _report(num_layers: int = 8) -> LayerReport:
    """States 2..5 nearly identical (a patch-like block), the rest dissimilar."""
    n = num_layers + 1
    sim = np.full((n, n), 0.3)
    sim[2:6, 2:6] = 0.95
    np.fill_diagonal(sim, 1.0)
    bi = tuple(1.0 - sim[i, i + 1] for i in range(num_layers))
    block = tuple(tuple(float(np.arccos(sim[i, i + k]) / np.pi) for i in range(num_layers - k + 1))
                  for k in range(1, num_layers + 1))
    return LayerReport(num_layers=num_layers, bi=bi, cosine=tuple(map(tuple, sim)), cka=tuple(map(tuple, sim)),
                       cka_estimator="minibatch", block_distance=block,
                       magnitude=tuple(0.1 * (i + 1) for i in range(num_layers)))


@pytest.mark.parametrize("kind", ["cosine", "cka"])
def test_heatmap_shape_labels_and_ticks(kind):
    rep = _report()
    fig = similarity_heatmap(rep, kind)
    hm = fig.data[0]
    assert np.asarray(hm.z).shape == (rep.num_layers + 1, rep.num_layers + 1)
    assert list(hm.x) == list(range(rep.num_layers + 1)) and list(hm.y) == list(range(rep.num_layers + 1))
    assert fig.layout.title.text and "0-based" in fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert fig.layout.xaxis.tick0 == 0 and fig.layout.xaxis.dtick == 1
    assert "h_3 vs h_4" in hm.text[3][4] and "across layer 3" in hm.text[3][4]  # hover names 0-based layers
    assert hm.colorbar.title.text
    assert not fig.layout.shapes  # no threshold -> no outlines


def test_heatmap_outlines_runs_above_threshold():
    rep = _report()
    assert similar_runs(rep, "cosine", 0.9) == [(2, 5)]  # outputs of layers 1..4 = states 2..5
    fig = similarity_heatmap(rep, "cosine", threshold=0.9, groups=merge_groups(rep, "cosine", 0.9))
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(rects) == 1
    assert (rects[0].x0, rects[0].x1, rects[0].y0, rects[0].y1) == (1.5, 5.5, 1.5, 5.5)
    assert "1 run" in fig.layout.title.text
    assert similar_runs(rep, "cosine", 0.99) == []
    assert similar_runs(rep, "cosine", 0.2) == [(1, rep.num_layers - 1)]  # one group; SLM keeps the last layer
    from layerlens.plans import slm_plan

    plan = slm_plan(rep, 0.9, criterion="cosine")
    fig = similarity_heatmap(rep, "cosine", groups=plan.merge)  # a plan's own groups
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [(r.x0, r.x1) for r in rects] == [(1.5, 5.5)] and "merge group" in fig.layout.title.text


def test_bi_bar_metrics_highlight_and_axes():
    rep = _report()
    fig = bi_bar(rep, highlight=(3,))
    bar = fig.data[0]
    assert list(bar.x) == list(range(rep.num_layers))
    assert list(bar.y) == pytest.approx(list(rep.bi))
    assert bar.marker.color[3] != bar.marker.color[0]
    assert "0-based" in fig.layout.xaxis.title.text and "Block Influence" in fig.layout.yaxis.title.text
    assert fig.layout.title.text and fig.layout.dragmode == "select"
    mag = bi_bar(rep, "magnitude")
    assert list(mag.data[0].y) == pytest.approx(list(rep.magnitude)) and "Magnitude" in mag.layout.title.text
    bd = bi_bar(rep, "block_distance", block_size=3, highlight=(5,))
    assert len(bd.data[0].x) == rep.num_layers - 2
    assert "3-layer block" in bd.layout.xaxis.title.text
    colors = bd.data[0].marker.color
    assert [c == colors[5] for c in colors][3:6] == [True, True, True]  # blocks 3..5 touch layer 5
    with pytest.raises(ValueError):
        bi_bar(rep, "block_distance", block_size=0)


def test_layer_strip_statuses():
    summary = [{"layer": i, "status": "kept", "into": None} for i in range(6)]
    summary[1]["status"] = "removed"
    summary[3].update(status="merged", into=3)
    summary[4].update(status="merged", into=3)
    fig = layer_strip(summary)
    names = {t.name.split(" ")[0]: t for t in fig.data}
    assert set(names) == {"kept", "removed", "merged"}
    assert list(names["removed"].x) == [1]
    assert list(names["merged"].text) == ["3", "4"]  # every cell its own number; the group is a bracket
    assert "0-based" in fig.layout.xaxis.title.text
    assert "4 of 6 layers remain" in fig.layout.title.text and "1 removed, 2 merged into 1" in fig.layout.title.text


def _every_figure():
    rep = _report(30)
    yield bi_bar(rep, highlight=(3, 4, 20))
    yield bi_bar(rep, "block_distance", block_size=3, highlight=(5,))
    yield layer_strip(plan_summary(PrunePlan(num_layers=30, method="remove", remove=(1, 5, 9))))
    yield layer_strip(plan_summary(slm_plan(rep, 0.9)))
    yield layer_strip([])
    yield similarity_heatmap(rep, "cka", threshold=0.9, groups=merge_groups(rep, "cka", 0.9))
    yield similarity_heatmap(rep, "cosine")
    yield sweep_figure(_sweep_frame(), "perplexity", current={"ratio": 0.2, "value": 15.0})
    yield sweep_figure(_sweep_frame(), "mmlu_accuracy", current=0.1)
    yield sweep_figure(_sweep_frame().iloc[:0])
    yield sweep_figure(_healed_frame(), "mmlu_accuracy", current=0.1)
    from layerlens.plots_curves import heal_curve

    yield heal_curve([[1, 3.0], [2, 2.5]], [[0, 80.0, 0.0], [2, 60.0, 1.5]], best_step=2)


@pytest.mark.parametrize("index", range(12))
def test_builders_specs_pass_plotly_validation(index):
    """The builders skip plotly's validation for speed; a validating Figure rebuilt from each spec must accept
    every property (no typo, no wrong type) and serialize to the very same JSON."""
    import json

    import plotly.graph_objects as go
    import plotly.io as pio

    fig = list(_every_figure())[index]
    checked = go.Figure(fig.to_dict())  # validates every property; raises on an invalid one
    assert json.loads(pio.to_json(checked, validate=False)) == json.loads(pio.to_json(fig, validate=False))
    assert fig.layout.template.layout.plot_bgcolor == "white"  # plotly_white, resolved


def test_builders_do_not_share_mutable_state():
    a, b = layer_strip([{"layer": 0, "status": "kept"}]), layer_strip([{"layer": 0, "status": "kept"}])
    a.layout.template.layout.font.size = 40
    assert b.layout.template.layout.font.size != 40


# ---------------------------------------------------------------------------------------------------------
# Looks (issue 14): titles that fit, heatmaps that fill their box, merge groups as brackets, the MMLU
# chance line, zoom kept across reruns
# ---------------------------------------------------------------------------------------------------------


def _title_lines(text: str) -> list[str]:
    import re

    return [re.sub(r"<[^>]+>", "", line) for line in text.split("<br>")]


def test_every_title_line_fits_half_a_page():
    from layerlens.plots import TITLE_LINE_MAX

    rep = _report(30)
    figs = list(_every_figure()) + [
        similarity_heatmap(rep, "cosine", threshold=0.9, groups=merge_groups(rep, "cosine", 0.9)),
        bi_bar(rep, "block_distance", block_size=12),
        layer_strip([{"layer": i, "status": "merged" if 2 <= i <= 8 else "removed" if i > 25 else "kept",
                      "into": 2 if 2 <= i <= 8 else None} for i in range(30)]),
    ]
    for fig in figs:
        for line in _title_lines(fig.layout.title.text):
            assert len(line) <= TITLE_LINE_MAX, line  # "… — 1 run(s) ≥ 0.90 outlined" was cut off on screen


def test_heatmap_fills_its_box_and_colorbar_matches_it():
    fig = similarity_heatmap(_report(30), "cka", threshold=0.9)
    assert fig.layout.yaxis.scaleanchor is None and fig.layout.xaxis.constrain is None  # no square-cell box
    assert fig.data[0].colorbar.len == 1.0 and fig.data[0].colorbar.lenmode == "fraction"


def test_layer_strip_draws_merge_groups_as_brackets():
    from layerlens.plans import plan_summary, slm_plan

    rep = _report(8)
    plan = slm_plan(rep, 0.9, criterion="cosine")
    assert plan.merge == ((1, 2, 3, 4),)
    fig = layer_strip(plan_summary(plan))
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    brackets = [s for s in fig.layout.shapes if s.type == "path"]
    assert [(r.x0, r.x1) for r in rects] == [(0.5, 4.5)] and len(brackets) == 1
    assert [a.text for a in fig.layout.annotations] == ["1–4 → 1"]
    assert fig.layout.yaxis.range[1] > 1.0  # room above the cells for the bracket
    removal = layer_strip(plan_summary(PrunePlan(num_layers=8, method="remove", remove=(2,))))
    assert not removal.layout.shapes and not removal.layout.annotations


def test_mmlu_axis_keeps_chance_line_and_a_sensible_range():
    frame = _sweep_frame()
    frame["mmlu_accuracy"] = [0.21, 0.22, 0.24, 0.26] * 2  # all near chance: was zoomed to 21-26 %
    fig = sweep_figure(frame, "mmlu_accuracy")
    assert tuple(fig.layout.yaxis.range) == (0.0, 50.0)
    chance = [s for s in fig.layout.shapes if s.name == "chance"]
    assert chance and chance[0].y0 == chance[0].y1 == 25.0
    assert any("chance" in a.text for a in fig.layout.annotations)
    frame["mmlu_accuracy"] = [0.7] * 8
    assert fig.layout.yaxis.range[0] == 0.0 and sweep_figure(frame, "mmlu_accuracy").layout.yaxis.range[1] >= 75.0
    assert sweep_figure(frame, "perplexity").layout.yaxis.range is None  # log axis: autorange


def test_uirevision_follows_the_data_not_the_highlight():
    rep, other = _report(8), _report(10)
    pairs = [
        (bi_bar(rep, highlight=(1,)), bi_bar(rep, highlight=(5, 6)), bi_bar(other)),
        (similarity_heatmap(rep, "cka", threshold=0.9), similarity_heatmap(rep, "cka", groups=[(1, 2)]),
         similarity_heatmap(rep, "cosine")),
        (sweep_figure(_sweep_frame(), current=0.1), sweep_figure(_sweep_frame(), current=0.3),
         sweep_figure(_sweep_frame().iloc[:3])),
    ]
    for same_a, same_b, different in pairs:
        assert same_a.layout.uirevision and same_a.layout.uirevision == same_b.layout.uirevision
        assert different.layout.uirevision != same_a.layout.uirevision
