"""AppTest (issue 17): hand-picked attention/MLP sublayers on Prune, the sublayer strategies, and Apply."""

from __future__ import annotations

import importlib
import json

import pytest
from tiny_models import param_hash


@pytest.fixture
def app(open_app):
    return open_app("pages/3_prune.py")


def _charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_hand_picked_sublayers_build_the_plan_strip_and_apply(app, tiny_llama):
    app.run()
    app.radio(key="pr_mode").set_value("manual").run()
    app.multiselect(key="pr_drop_attn").set_value([1, 3]).run()
    app.multiselect(key="pr_drop_mlp").set_value([4]).run()
    assert not app.exception and not app.error
    keys = importlib.import_module("pages._ui.keys")
    plan = app.session_state[keys.SS_PLAN]
    assert plan.drop_attn == (1, 3) and plan.drop_mlp == (4,) and plan.removed_layers == ()
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Layers"] == "6 / 6" and metrics["Pruning ratio"] == "25.0%"  # 3 of 12 sublayers
    strip = next(c for c in _charts(app) if "Layer plan" in c["layout"]["title"]["text"])
    assert "2 attention, 1 MLP sublayers dropped" in strip["layout"]["title"]["text"]
    assert any(c["data"][0].get("name") == "whole layer" for c in _charts(app))  # sublayer BI bars
    assert not app.button(key="pr_apply").disabled
    resources = importlib.import_module("pages._ui.resources")
    shared = resources._shared_model(str(tiny_llama), None, "auto", "auto", False)
    before = param_hash(shared.model)
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error
    pruned = app.session_state[keys.SS_PRUNED]["model"]
    from layerlens.surgery import dropped_sublayers

    assert dropped_sublayers(pruned) == ((1, 3), (4,))
    assert dropped_sublayers(shared.model) == ((), ()) and param_hash(shared.model) == before


def test_attention_strategy_on_prune(app):
    app.run()
    app.selectbox(key="pr_strategy").set_value("attn_bi").run()
    app.slider(key="pr_ratio").set_value(0.25).run()
    assert not app.exception and not app.error
    keys = importlib.import_module("pages._ui.keys")
    plan = app.session_state[keys.SS_PLAN]
    assert len(plan.drop_attn) == 3 and plan.strategy == "attn_bi"  # round(0.25 * 12)
    assert any("sublayers dropped" in c.value for c in app.caption)

