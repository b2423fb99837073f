"""AppTest: Prune page (strategy/ratio, manual, sliding merge; live plan; Apply leaves the cache untouched)."""

from __future__ import annotations

import hashlib
import importlib
import json
import time

import pytest


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


def test_manual_pick_and_invalid_plan_keeps_last_valid(app):
    app.run()
    app.radio(key="pr_mode").set_value("manual").run()
    app.multiselect(key="pr_layers").set_value([1, 4]).run()
    assert not app.exception and not app.error
    assert _statuses(_strip(app))["removed"] == [1, 4]
    assert _metrics(app)["Layers"] == "4 / 6"
    app.multiselect(key="pr_layers").set_value(list(range(6))).run()
    assert not app.exception
    assert len(app.error) == 1 and "all 6 layers" in app.error[0].value
    assert _metrics(app)["Layers"] == "4 / 6"  # the last valid plan stays on screen


def _param_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_apply_measures_and_never_touches_the_cached_model(app, tiny_llama):
    app.run()
    keys = importlib.import_module("pages._ui.keys")
    resources = importlib.import_module("pages._ui.resources")
    shared = resources._shared_model(str(tiny_llama), None, "auto", "auto", False)  # the cache_resource entry
    before = _param_hash(shared.model)
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
    app.slider(key="pr_threshold").set_value(0.5).run()
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error
    again = resources._shared_model(str(tiny_llama), None, "auto", "auto", False)
    assert again is shared
    assert _param_hash(shared.model) == before  # bit-for-bit unchanged
    assert len(shared.model.model.layers) == n_layers
    assert [layer.self_attn.layer_idx for layer in shared.model.model.layers] == list(range(n_layers))
    pruned = app.session_state[keys.SS_PRUNED]["model"]
    assert pruned is not shared.model and len(pruned.model.layers) < n_layers
