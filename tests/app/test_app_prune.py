"""AppTest: Prune page (strategy/ratio, manual, sliding merge; live plan; Apply leaves the cache untouched)."""

from __future__ import annotations

import importlib
import json
import time

import pytest
from tiny_models import param_hash


@pytest.fixture
def app(open_app):
    return open_app("pages/3_prune.py")


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _strip(at) -> dict:
    for c in at.get("plotly_chart"):
        spec = json.loads(c.proto.spec)
        if "Layer plan" in spec["layout"]["title"]["text"]:
            return spec
    raise AssertionError("no layer strip")


def _statuses(strip: dict) -> dict[str, list[int]]:
    return {t["name"].split(" ")[0]: list(t["x"]) for t in strip["data"]}


def test_defaults_and_ratio_slider_updates_plan_live(app):
    app.run()
    assert not app.exception and not app.error
    assert app.radio(key="pr_mode").value == "strategy"
    assert app.selectbox(key="pr_strategy").value == "bi"
    m = _metrics(app)
    assert m["Layers"] == "4 / 6" and m["Pruning ratio"] == "33.3%"  # round(0.25 * 6) = 2
    assert len(_statuses(_strip(app))["removed"]) == 2
    timings = []
    for ratio, layers in ((0.5, "3 / 6"), (0.0, "6 / 6"), (0.17, "5 / 6")):
        t = time.perf_counter()
        app.slider(key="pr_ratio").set_value(ratio).run()
        timings.append(time.perf_counter() - t)
        assert not app.exception and not app.error
        assert _metrics(app)["Layers"] == layers
    print(f"ratio slider re-render: {[f'{t * 1000:.0f} ms' for t in timings]}")
    assert any("bi: remove [" in md.value for md in app.markdown)
    app.selectbox(key="pr_strategy").set_value("reverse").run()
    app.slider(key="pr_ratio").set_value(0.5).run()
    assert _statuses(_strip(app))["removed"] == [3, 4, 5]


def test_sliding_merge_threshold_and_target_ratio(app):
    app.run()
    app.radio(key="pr_mode").set_value("slm").run()
    app.radio(key="pr_slm_by").set_value("threshold").run()  # the default is a target ratio
    assert not app.exception and not app.error
    app.slider(key="pr_threshold").set_value(0.5).run()
    low = _metrics(app)["Layers"]
    app.slider(key="pr_threshold").set_value(1.0).run()
    assert _metrics(app)["Layers"] == "6 / 6"
    assert low != "6 / 6"
    app.slider(key="pr_threshold").set_value(0.5).run()
    assert "merged" in _statuses(_strip(app))
    app.radio(key="pr_slm_by").set_value("ratio").run()
    app.slider(key="pr_target").set_value(0.34).run()
    assert not app.exception and not app.error
    kept = int(_metrics(app)["Layers"].split(" / ")[0])
    assert 6 - kept <= 2  # largest merge plan with ratio <= 0.34


def test_manual_pick_and_invalid_selection_clears_the_plan_everywhere(app):
    """Issue 14 item 4 (changed behaviour: the last valid plan used to stay on screen, with Apply enabled)."""
    app.run()
    app.radio(key="pr_mode").set_value("manual").run()
    app.multiselect(key="pr_layers").set_value([1, 4]).run()
    assert not app.exception and not app.error
    assert _statuses(_strip(app))["removed"] == [1, 4]
    assert _metrics(app)["Layers"] == "4 / 6"
    app.multiselect(key="pr_layers").set_value(list(range(6))).run()
    assert not app.exception
    assert len(app.error) == 1 and "all 6 layers" in app.error[0].value
    assert set(_metrics(app).values()) == {"–"}  # no stale numbers
    assert not any("Layer plan" in json.loads(c.proto.spec)["layout"]["title"]["text"]
                   for c in app.get("plotly_chart"))  # no stale strip; the bars stay, to fix the picks
    assert app.button(key="pr_apply").disabled
    assert app.session_state["ll_plan"] is None and app.session_state["ll_plan_error"]
    app.multiselect(key="pr_layers").set_value([2]).run()  # fixed: everything comes back
    assert not app.error and _metrics(app)["Layers"] == "5 / 6" and not app.button(key="pr_apply").disabled


def test_sidebar_does_not_show_a_stale_plan(app):
    """AppTest reruns only the page after a widget change, so the sidebar (drawn by app.py) is checked on a
    first run that finds a stale valid plan in the session and an invalid selection in the settings."""
    from layerlens.dashboard.planning import PlanSettings
    from layerlens.plans import PrunePlan

    app.session_state["ll_plan"] = PrunePlan(num_layers=6, method="remove", remove=(1, 4), strategy="manual")
    app.session_state["ll_plan_settings"] = PlanSettings(mode="manual", layers=tuple(range(6)))
    app.run()
    assert len(app.error) == 1 and "all 6 layers" in app.error[0].value
    side = " ".join(md.value for md in app.sidebar.markdown)
    assert "**Model**" in side and "not valid" in side and "−2 layers" not in side


def test_box_select_adds_to_picks_and_clear_resets(app):
    app.run()
    widgets = importlib.import_module("pages._ui.widgets")
    event = {"selection": {"points": [{"x": 4, "y": 0.1}, {"x": 2}]}}
    assert widgets.add_selection([1], event) == [1, 2, 4]  # added, not replaced
    assert widgets.add_selection([1, 2], {"selection": {"points": []}}) == [1, 2]
    assert widgets.add_selection([3], None) == [3]
    app.radio(key="pr_mode").set_value("manual").run()
    app.multiselect(key="pr_layers").set_value([1, 4]).run()
    assert not app.button(key="pr_clear").disabled
    app.button(key="pr_clear").click().run()
    assert not app.exception and not app.error
    assert app.multiselect(key="pr_layers").value == [] and app.button(key="pr_clear").disabled
    assert _metrics(app)["Layers"] == "6 / 6" and app.button(key="pr_apply").disabled


def test_slider_shows_ratio_count_and_percent(app):
    app.run()
    assert any(c.value == "0.25 → 2 of 6 layers removed = 33.3%" for c in app.caption)  # 0.25 is not 33.3 %
    app.slider(key="pr_ratio").set_value(0.5).run()
    assert any(c.value == "0.50 → 3 of 6 layers removed = 50.0%" for c in app.caption)
    app.radio(key="pr_mode").set_value("slm").run()
    app.radio(key="pr_slm_by").set_value("threshold").run()  # the default is a target ratio
    app.slider(key="pr_threshold").set_value(1.0).run()
    assert any(c.value == "threshold 1.000 → 0 of 6 layers merged away = 0.0%" for c in app.caption)


def test_merge_formula_choice_and_paper_formula_warning(app):
    from layerlens.plans import FORMULA_NOTES

    app.run()
    app.radio(key="pr_mode").set_value("slm").run()
    app.radio(key="pr_slm_by").set_value("threshold").run()  # the default is a target ratio
    app.slider(key="pr_threshold").set_value(0.5).run()
    app.selectbox(key="pr_formula").set_value("task_vector").run()
    assert not app.exception and not app.error
    assert any(w.value == FORMULA_NOTES["task_vector"] for w in app.warning)
    assert app.session_state["ll_plan"].merge_formula == "task_vector"
    app.selectbox(key="pr_formula").set_value("mean").run()
    assert not any(w.value == FORMULA_NOTES["task_vector"] for w in app.warning)
    assert app.session_state["ll_plan"].merge_formula == "mean"
    assert app.session_state["ll_plan_settings"].formula == "mean"


def _inject_applied(at, plan, ppl_after, ppl_before=51.9, speed_after=3.3, speed_before=2.4):
    quick = {"perplexity": ppl_after, "tokens_per_s": speed_after, "generation": " s s s s", "surgery_s": 0.01,
             "windows": 4, "seq_len": 128, "new_tokens": 16}
    original = {"perplexity": ppl_before, "tokens_per_s": speed_before, "generation": " a fine day",
                "windows": 4, "seq_len": 128, "new_tokens": 16}
    at.session_state["ll_pruned"] = {"plan_json": plan.to_json(), "plan": plan, "model": None, "quick": quick,
                                     "original": original, "prompt": "The king said"}


def test_broken_model_is_said_plainly_in_red_without_a_speed_win(app):
    from layerlens.plans import PrunePlan

    plan = PrunePlan(num_layers=6, method="remove", remove=(1, 2), strategy="manual")
    app.run()  # the first run's analysis starts a fresh session state for its report
    _inject_applied(app, plan, 3582230116909.84)
    app.run()
    assert not app.exception
    red = " ".join(e.value for e in app.error)
    assert "Broken" in red and "3.6e12" in red and "51.90" in red
    speed = next(m for m in app.metric if m.label == "Generation speed")
    from streamlit.proto.Metric_pb2 import Metric

    assert "no win" in speed.delta and speed.proto.color == Metric.MetricColor.GRAY  # not a green "+38 %"
    assert "3582230116909" not in " ".join(m.value for m in app.metric)
    assert next(m for m in app.metric if m.label == "Perplexity").value == "3.6e12"


def test_merge_worse_than_plain_removal_is_said(app):
    from layerlens.plans import PrunePlan

    merge = PrunePlan(num_layers=6, method="merge", merge=((2, 3, 4),), strategy="slm", merge_formula="mean")
    app.run()
    _inject_applied(app, merge, 1e9, ppl_before=1e8)  # far worse than removing 2 layers of the tiny model
    app.run()
    assert not app.exception
    assert any("Merging measures worse than plain removal" in w.value for w in app.warning)
    _inject_applied(app, merge, 1.0, ppl_before=1.0)
    app.run()
    assert not any("Merging measures worse" in w.value for w in app.warning)
    assert any("no worse than plain removal" in c.value for c in app.caption)




def test_apply_measures_and_never_touches_the_cached_model(app, tiny_llama):
    app.run()
    keys = importlib.import_module("pages._ui.keys")
    resources = importlib.import_module("pages._ui.resources")
    shared = resources._shared_model(str(tiny_llama), None, "auto", "auto", False)  # the cache_resource entry
    before = param_hash(shared.model)
    n_layers = len(shared.model.model.layers)
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error
    m = _metrics(app)
    assert m["Generation speed"].endswith("tokens/s") and "Perplexity" in " ".join(m)
    assert len(app.text) == 2  # side-by-side generations
    for ratio in (0.5, 0.34):  # more prunes, and a merge
        app.slider(key="pr_ratio").set_value(ratio).run()
        app.button(key="pr_apply").click().run()
    app.radio(key="pr_mode").set_value("slm").run()
    app.radio(key="pr_slm_by").set_value("threshold").run()  # the default is a target ratio
    app.slider(key="pr_threshold").set_value(0.5).run()
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error
    again = resources._shared_model(str(tiny_llama), None, "auto", "auto", False)
    assert again is shared
    assert param_hash(shared.model) == before  # bit-for-bit unchanged
    assert len(shared.model.model.layers) == n_layers
    assert [layer.self_attn.layer_idx for layer in shared.model.model.layers] == list(range(n_layers))
    pruned = app.session_state[keys.SS_PRUNED]["model"]
    assert pruned is not shared.model and len(pruned.model.layers) < n_layers
    table = app.table[0].value  # the last three applied plans side by side (issue 14 item 14)
    assert len(table) == 3 and list(table.columns) == ["Plan", "Layers kept", "Perplexity", "Speed", "Verdict"]
    assert table["Speed"].str.contains("tokens/s").all()
