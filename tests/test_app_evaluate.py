"""AppTest: Evaluate page (sweep curves per strategy, current plan marked, persisted across restarts)."""

from __future__ import annotations

import json

import pytest
import streamlit as st
from conftest import APP
from streamlit.testing.v1 import AppTest


@pytest.fixture
def env(app_env):
    return app_env


def _open() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.switch_page("pages/4_evaluate.py")
    return at


def _small(at: AppTest, mmlu: bool) -> None:
    at.multiselect(key="ev_strategies").set_value(["bi", "reverse"])
    at.multiselect(key="ev_ratios").set_value([0.0, 0.2, 0.4])
    at.number_input(key="ev_windows").set_value(2)
    at.number_input(key="ev_seq_len").set_value(64)
    at.checkbox(key="ev_mmlu").set_value(mmlu)
    at.run()


def test_widgets_and_empty_state(env):
    at = _open()
    at.run()
    assert not at.exception and not at.error
    assert at.multiselect(key="ev_strategies").value == ["bi", "reverse"]
    assert at.multiselect(key="ev_ratios").value == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert any("No sweep for these settings" in i.value for i in at.info)


def test_sweep_curves_current_plan_and_restart(env):
    at = _open()
    at.run()
    _small(at, mmlu=True)
    at.button(key="ev_run").click().run()
    assert not at.exception and not at.error
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(figs) == 2
    ppl, mmlu = figs
    names = {t["name"] for t in ppl["data"]}
    assert {"bi", "reverse"} <= names and any("current plan" in n for n in names)
    assert ppl["layout"]["yaxis"]["type"] == "log"
    assert "Pruning ratio" in ppl["layout"]["xaxis"]["title"]["text"]
    assert "MMLU" in mmlu["layout"]["yaxis"]["title"]["text"]
    frame = at.dataframe[0].value
    assert len(frame) == 7 and set(frame["strategy"]) == {"bi", "reverse", "current"}
    assert frame["perplexity"].notna().all() and frame["mmlu_accuracy"].notna().all()

    # "restart": caches cleared, a brand-new session with the same settings sees the saved sweep at once
    st.cache_data.clear()
    st.cache_resource.clear()
    again = _open()
    again.run()
    _small(again, mmlu=True)
    assert not again.exception and not again.error
    assert len(again.get("plotly_chart")) == 2
    assert len(again.dataframe[0].value) == 7


def test_sweep_resumes_from_persisted_points(env):
    at = _open()
    at.run()
    _small(at, mmlu=False)
    at.button(key="ev_run").click().run()
    first = at.dataframe[0].value
    assert not first["cached"].all()
    at.button(key="ev_run").click().run()  # same settings: every point read back
    assert at.dataframe[0].value["cached"].all()
    assert list(at.dataframe[0].value["perplexity"]) == list(first["perplexity"])
    assert any("MMLU was not part" in i.value for i in at.info)
