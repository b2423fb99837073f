"""AppTest: the Redundancy page's evidence (leave-one-out damage, calibration-set comparison) and the
Summary's best predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import APP
from plotly_json import array, figures
from streamlit.testing.v1 import AppTest


def _button(at, key):
    return next(b for b in at.button if b.key == key)


def test_damage_button_measures_shows_table_scatter_and_summary_names_the_best_predictor(open_app, tiny_llama):
    from layerlens.damage import leave_one_out
    from layerlens.data import load_texts
    from layerlens.loading import load_model

    at = open_app("pages/2_redundancy.py")
    at.run()
    assert not at.exception and not at.error
    before = len(at.get("plotly_chart"))
    at.select_slider(key="rd_dmg_windows").set_value(2)
    at.select_slider(key="rd_dmg_seq").set_value(64)
    _button(at, "rd_dmg_run").click().run()
    assert not at.exception and not at.error
    figs = figures(at)
    assert len(figs) == before + 2  # scatter + bars
    scatter = next(f for f in figs if f["data"][0]["type"] == "scatter")
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    ref = leave_one_out(lm.model, lm.tokenizer, load_texts("default", role="eval"), seq_len=64, max_windows=2)
    assert array(scatter["data"][0]["y"]) == pytest.approx(ref.increase("layer"), rel=1e-4, abs=1e-6)
    assert any("Best predictor" in s.value for s in at.success)
    table = at.dataframe[0].value
    assert {"Block Influence", "CKA to next layer"} <= set(table["metric"])
    # a rerun reads the saved damage back (no button needed)
    at.run()
    assert len(at.get("plotly_chart")) == before + 2
    at.switch_page("pages/6_summary.py").run()
    assert not at.exception
    assert any("Best predictor of the real damage" in m.value for m in at.markdown)


def test_calibration_sets_side_by_side(open_app):
    at = open_app("pages/2_redundancy.py")
    at.run()
    assert at.multiselect(key="rd_cal_sets").value == ["default", "prose"]
    before = len(at.get("plotly_chart"))
    _button(at, "rd_cal_run").click().run()
    assert not at.exception and not at.error
    figs = figures(at)
    assert len(figs) == before + 1
    heat = figs[-1]
    z = array(heat["data"][0]["z"])
    assert z.shape == (2, 6) and np.allclose(z.sum(axis=0), 0.0)  # rank minus the mean rank
    ranks, tau = at.dataframe[-2].value, at.dataframe[-1].value
    assert len(ranks) == 6 and len(tau) == 1
    assert -1.0 <= float(tau.iloc[0]["Kendall τ"]) <= 1.0


def test_evaluate_draws_the_oracle_curve(app_env, tiny_llama):
    from layerlens import damage

    damage._ORDERS.clear()
    at = AppTest.from_file(APP, default_timeout=300)
    at.switch_page("pages/4_evaluate.py")
    at.run()
    at.multiselect(key="ev_strategies").set_value(["bi", "oracle"])
    at.multiselect(key="ev_ratios").set_value([0.0, 0.2, 0.4])
    at.number_input(key="ev_windows").set_value(2)
    at.number_input(key="ev_seq_len").set_value(64)
    at.checkbox(key="ev_mmlu").set_value(False)
    at.run()
    assert not at.exception and not at.error
    at.button(key="ev_run").click().run()
    assert not at.exception and not at.error
    frame = at.dataframe[0].value
    oracle = frame[frame["strategy"] == "oracle"]
    assert list(oracle["n_removed"]) == [0, 1, 2] and oracle["perplexity"].notna().all()
    ppl = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "oracle" in {t["name"] for t in ppl["data"]}
    # the real greedy on the session's calibration data (8 samples x 128 tokens), not a stand-in
    from layerlens.data import calibration_tokens, load_texts
    from layerlens.loading import load_model
    from layerlens.plans import make_plan

    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    tokens = calibration_tokens(lm.tokenizer, load_texts("default"), 8, 128)
    damage._ORDERS.clear()
    plan = make_plan("oracle", None, n=2, model=lm.model, tokenizer=lm.tokenizer, token_lists=tokens, num_layers=6)
    assert list(oracle["removed_layers"].astype(str))[1:] == [str(plan.params["order"][0]),
                                                               ",".join(map(str, plan.remove))]
