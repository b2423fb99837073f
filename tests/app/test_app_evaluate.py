"""AppTest: Evaluate page (sweep curves per strategy, current plan marked, persisted across restarts)."""

from __future__ import annotations

import json
import re

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
    assert len(figs) == 4
    ppl, mmlu, kl, top1 = figs
    assert "KL" in kl["layout"]["yaxis"]["title"]["text"] and "agreement" in top1["layout"]["yaxis"]["title"]["text"]
    assert {"bi", "reverse"} <= {t["name"] for t in kl["data"]}
    names = {t["name"] for t in ppl["data"]}
    assert {"bi", "reverse"} <= names and any("current plan" in n for n in names)
    assert ppl["layout"]["yaxis"]["type"] == "log"
    assert "Pruning ratio" in ppl["layout"]["xaxis"]["title"]["text"]
    assert "MMLU" in mmlu["layout"]["yaxis"]["title"]["text"]
    frame = at.dataframe[0].value
    assert len(frame) == 7 and set(frame["strategy"]) == {"bi", "reverse", "current"}
    assert frame["perplexity"].notna().all() and frame["mmlu_accuracy"].notna().all()
    assert frame["kl"].notna().all() and frame["top1_agreement"].between(0, 1).all()
    unpruned = frame[frame["n_removed"] == 0]
    assert len(unpruned) and (unpruned["kl"].abs() < 1e-6).all() and (unpruned["top1_agreement"] == 1).all()

    # "restart": caches cleared, a brand-new session with the same settings sees the saved sweep at once
    st.cache_data.clear()
    st.cache_resource.clear()
    again = _open()
    again.run()
    _small(again, mmlu=True)
    assert not again.exception and not again.error
    assert len(again.get("plotly_chart")) == 4
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


@pytest.mark.parametrize("stop_after", [3, 7])  # 5 perplexity evaluations (distinct plans), then 5 MMLU
def test_stopped_sweep_shows_its_finished_points_at_once(env, monkeypatch, stop_after):
    """Stop during a sweep: the rerun the click causes shows the points that finished, without Run sweep."""
    import importlib

    from streamlit.runtime.scriptrunner import StopException

    sweep_module = importlib.import_module("layerlens.sweep")  # `layerlens.sweep` the attribute is the function
    real_sweep, interrupts = sweep_module.sweep, [1]

    def sweep_stopped(*args, progress=None, **kwargs):
        if progress is None or not interrupts:
            return real_sweep(*args, progress=progress, **kwargs)
        interrupts.pop()

        def progress_then_stop(done, total, label):
            progress(done, total, label)
            if done == stop_after:  # Streamlit raises at the progress bar's update once Stop is clicked
                raise StopException()

        return real_sweep(*args, progress=progress_then_stop, **kwargs)

    monkeypatch.setattr(sweep_module, "sweep", sweep_stopped)
    at = _open()
    at.run()
    _small(at, mmlu=True)
    at.button(key="ev_run").click().run()  # interrupted after `stop_after` of 10 evaluations
    assert not interrupts and not at.exception
    at.session_state["ll_sweep_stopped"] = True  # the Stop button's on_click, then the rerun it causes
    at.run()
    assert not at.exception and not at.error
    assert not any("No sweep for these settings" in i.value for i in at.info)
    stopped = at.dataframe[0].value
    assert any("Sweep stopped" in w.value and "shown below" in w.value for w in at.warning)
    # computed by this run (read back after the Stop, but not from an earlier run); perplexity runs first
    assert not stopped["cached"].any() and stopped["perplexity"].notna().all()
    if stop_after == 3:  # no MMLU finished: no empty column
        assert 0 < len(stopped) < 7 and "mmlu_accuracy" not in stopped
    else:  # every perplexity and 2 MMLU evaluations: all points, MMLU on some
        assert len(stopped) == 7 and 0 < stopped["mmlu_accuracy"].notna().sum() < 7
    assert len(at.get("plotly_chart")) >= 1
    assert any("a stopped sweep" in c.value for c in at.caption)

    at.button(key="ev_run").click().run()  # resume: the rest is computed, the finished points read back
    full = at.dataframe[0].value
    assert len(full) == 7 and full["perplexity"].notna().all() and full["mmlu_accuracy"].notna().all()
    merged = stopped.merge(full, on=["strategy", "ratio (%)"], suffixes=("_stopped", ""))
    assert len(merged) == len(stopped)
    assert list(merged["perplexity_stopped"]) == list(merged["perplexity"])


def test_estimate_before_the_sweep_then_measured_speed(env):
    """No hard-coded promise ("about a minute" took 397 s under load): an estimate from measured time,
    first by timing one short window, then from how fast the sweeps on this model really ran."""
    at = _open()
    at.run()
    _small(at, mmlu=True)
    assert not at.exception and not at.error
    empty = next(i.value for i in at.info if "No sweep for these settings" in i.value)
    assert "about a minute" not in empty and re.search(r"about \d+ (s|min) on this machine", empty), empty
    guess = next(c.value for c in at.caption if "Estimated time" in c.value)
    assert "7 points" not in guess and "evaluations" in guess and "timing one short perplexity window" in guess
    at.button(key="ev_run").click().run()
    assert not at.exception and not at.error
    done = next(s.label for s in at.status if "Sweep done" in s.label)
    assert re.search(r"Sweep done: 7 points in \d+ s \(was estimated \d+ (s|min)\)", done), done
    at.multiselect(key="ev_ratios").set_value([0.0, 0.1]).run()  # a new sweep: estimated from the last one
    guess = next(c.value for c in at.caption if "Estimated time" in c.value)
    assert "as fast as the earlier sweeps on this model ran" in guess, guess


def test_the_url_carries_the_session_and_the_evaluate_settings_before_any_sweep(env):
    """A link copied on Evaluate before any sweep used to have no parameters (the page's st.stop() also
    stopped app.py's URL sync) and the sidebar's "This session" panel was gone. Evaluate's settings are
    part of the link: opened, it starts the page with them, and the URL keeps carrying them.
    (AppTest routes only a session's first run through app.py, so the link is opened, not typed.)"""
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"ev_windows": "3", "ev_ratios": "0,0.25", "ev_current": "0", "ev_mmlu": "off"})
    at.switch_page("pages/4_evaluate.py")
    at.run()
    assert not at.exception and not at.error
    assert any("No sweep for these settings" in i.value for i in at.info)
    assert at.number_input(key="ev_windows").value == 3
    assert at.multiselect(key="ev_ratios").value == [0.0, 0.25]
    assert at.checkbox(key="ev_current").value is False and at.checkbox(key="ev_mmlu").value is False
    assert at.multiselect(key="ev_strategies").value == ["bi", "reverse"]  # defaults stay defaults
    link = dict(at.query_params)
    assert link.get("model") and link.get("samples"), link  # the session's state
    assert {k: link.get(k) for k in ("ev_windows", "ev_ratios", "ev_current", "ev_mmlu")} == {
        "ev_windows": "3", "ev_ratios": "0,0.25", "ev_current": "0", "ev_mmlu": "off"}, link
    assert "ev_strategies" not in link  # only what differs from the defaults
    assert any("This session" in c.value for c in at.sidebar.caption)


def test_lm_eval_task_field_adds_task_columns(env, tmp_path):
    pytest.importorskip("lm_eval")
    from harness_tasks import write_tasks

    mc, _gen = write_tasks(tmp_path)
    at = _open()
    at.run()
    at.multiselect(key="ev_strategies").set_value(["bi"])
    at.multiselect(key="ev_ratios").set_value([0.0, 0.2])
    at.number_input(key="ev_windows").set_value(2)
    at.number_input(key="ev_seq_len").set_value(64)
    at.checkbox(key="ev_mmlu").set_value(False)
    at.checkbox(key="ev_current").set_value(False)
    at.text_input(key="ev_tasks").set_value(str(mc))
    at.run()
    at.button(key="ev_run").click().run()
    assert not at.exception and not at.error
    frame = at.dataframe[0].value
    assert {"ll_local_mc/acc", "ll_local_mc/acc_norm"} <= set(frame.columns)
    assert frame["ll_local_mc/acc"].between(0, 1).all() and len(frame) == 2
