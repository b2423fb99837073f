"""AppTest: Summary page (one screen; state in the URL) and session isolation."""

from __future__ import annotations

import importlib
from urllib.parse import parse_qs

import pytest
from conftest import APP
from streamlit.testing.v1 import AppTest


@pytest.fixture
def env(app_env, tiny_llama):
    return tiny_llama


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_summary_shows_plan_quality_and_share_link(env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page("pages/6_summary.py").run()
    assert not at.exception and not at.error
    m = _metrics(at)
    assert m["Layers removed"] == "2 of 6"
    assert m["Generation speed"].endswith("tokens/s")  # one unit everywhere (was "tok/s" here)
    assert any(k.startswith("Perplexity") for k in m)
    assert m["MMLU accuracy"] == "–"
    assert "4 of 6 layers kept" in at.title[0].value
    assert len(at.get("plotly_chart")) == 3  # strip, heatmap, bars
    query = parse_qs(at.code[0].value.split("?", 1)[1])
    assert query["strategy"] == ["bi"] and query["ratio"] == ["0.25"] and query["model"] == [str(env)]


def _quick(ppl, speed):
    return {"perplexity": ppl, "tokens_per_s": speed, "generation": " s s s", "surgery_s": 0.01, "windows": 4,
            "seq_len": 128, "new_tokens": 16}


def test_summary_reads_in_30_seconds_verdict_cost_saving_basis(env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page("pages/6_summary.py").run()
    assert not at.exception and not at.error
    verdicts = [e.value for e in at.success] + [e.value for e in at.error]
    assert len(verdicts) == 1 and verdicts[0].strip("*").split(":")[0] in ("Usable", "Degraded", "Broken")
    texts = " ".join(md.value for md in at.markdown)
    for want in ("What was removed:", "What it costs in quality", "What it saves"):
        assert want in texts
    assert any(c.value.startswith("Quick check: perplexity on 4 held-out windows") for c in at.caption)


def test_summary_says_broken_in_red_and_shows_no_speed_win(env):
    from streamlit.proto.Metric_pb2 import Metric

    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page("pages/6_summary.py").run()
    plan = at.session_state["ll_plan"]
    at.session_state["ll_pruned"] = {"plan_json": plan.to_json(), "plan": plan, "model": None,
                                     "quick": _quick(3582230116909.84, 3.3), "original": _quick(51.9, 2.4),
                                     "prompt": "The king said"}
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("**Broken") and "3.6e12" in at.error[0].value
    assert not at.success
    m = {x.label: x for x in at.metric}
    assert m["Perplexity"].value == "3.6e12" and "higher" in m["Perplexity"].delta
    speed = m["Generation speed"]
    assert "no win" in speed.delta and speed.proto.color == Metric.MetricColor.GRAY  # was a green "+38 %"


def test_summary_compares_the_last_applied_plans(env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page("pages/3_prune.py").run()
    for ratio in (0.17, 0.5):
        at.slider(key="pr_ratio").set_value(ratio).run()
        at.button(key="pr_apply").click().run()
    at.switch_page("pages/6_summary.py").run()
    assert not at.exception and not at.error
    table = at.table[0].value
    assert len(table) == 2 and list(table["Layers kept"]) == ["3 of 6", "5 of 6"]  # newest first


def test_share_link_restores_model_strategy_and_ratio(env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(
        {
            "model": str(env),
            "samples": "6",
            "seq_len": "64",
            "mode": "strategy",
            "strategy": "reverse",
            "ratio": "0.5",
        }
    )
    at.run()  # a share link: the session starts from the URL
    assert not at.exception and not at.error
    at.switch_page("pages/6_summary.py").run()
    assert not at.exception and not at.error
    assert "3 of 6 layers kept" in at.title[0].value
    assert any("layers 3, 4, 5" in md.value for md in at.markdown)
    assert at.session_state["ll_report"].meta["samples"] == 6


def test_bad_share_link_values_fall_back_to_defaults(env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(
        {"model": str(env), "ratio": "7", "strategy": "rm -rf /", "samples": "-3", "mode": "strategy"}
    )
    at.run()
    assert not at.exception and not at.error
    at.switch_page("pages/6_summary.py").run()
    assert not at.exception and not at.error
    assert "4 of 6 layers kept" in at.title[0].value  # bi at 0.25


def test_two_sessions_share_the_model_but_not_plans(env):
    a = AppTest.from_file(APP, default_timeout=180)
    b = AppTest.from_file(APP, default_timeout=180)
    for at in (a, b):
        at.switch_page("pages/3_prune.py").run()
    a.slider(key="pr_ratio").set_value(0.5).run()
    a.button(key="pr_apply").click().run()
    b.radio(key="pr_mode").set_value("manual").run()
    b.multiselect(key="pr_layers").set_value([0]).run()
    assert _metrics(a)["Layers"] == "3 / 6" and _metrics(b)["Layers"] == "5 / 6"
    b.run()
    assert _metrics(b)["Layers"] == "5 / 6"
    assert "ll_pruned" in a.session_state and "ll_pruned" not in b.session_state
    keys = importlib.import_module("pages._ui.keys")
    resources = importlib.import_module("pages._ui.resources")
    assert a.session_state[keys.SS_PLAN].removed_layers == (3, 4, 5)
    assert b.session_state[keys.SS_PLAN].removed_layers == (0,)
    shared = resources._shared_model(str(env), None, "auto", "auto", False)
    assert shared.model is not a.session_state["ll_pruned"]["model"]


def test_shared_link_viewer_sees_quality_measured_by_another_session(env):
    a = AppTest.from_file(APP, default_timeout=300)
    a.switch_page("pages/4_evaluate.py").run()
    a.multiselect(key="ev_strategies").set_value(["bi"])
    a.multiselect(key="ev_ratios").set_value([0.0, 0.3])
    a.number_input(key="ev_windows").set_value(2)
    a.number_input(key="ev_seq_len").set_value(64)
    a.multiselect(key="ev_subjects").set_value(["astronomy", "virology"])
    a.run()
    a.button(key="ev_run").click().run()
    assert not a.exception and not a.error
    viewer = AppTest.from_file(APP, default_timeout=180)  # another browser: only the disk is shared
    viewer.switch_page("pages/6_summary.py").run()
    assert not viewer.exception and not viewer.error
    assert _metrics(viewer)["MMLU accuracy"].endswith("%")


def test_summary_mmlu_names_its_question_count_and_calls_tiny_differences_noise(env):
    at = AppTest.from_file(APP, default_timeout=300)
    at.switch_page("pages/4_evaluate.py").run()
    at.multiselect(key="ev_strategies").set_value(["bi"])
    at.multiselect(key="ev_ratios").set_value([0.0, 0.3])
    at.number_input(key="ev_windows").set_value(2)
    at.number_input(key="ev_seq_len").set_value(64)
    at.multiselect(key="ev_subjects").set_value(["astronomy", "virology", "marketing"])  # 1 each: 3 questions
    at.run()
    at.button(key="ev_run").click().run()
    assert not at.exception and not at.error
    at.switch_page("pages/6_summary.py").run()
    assert not at.exception and not at.error
    mmlu = next(m for m in at.metric if m.label == "MMLU accuracy")
    assert mmlu.value.endswith("%")
    assert "on 3 questions" in mmlu.delta and "was " in mmlu.delta
    assert "too few" in mmlu.delta and "pts" not in mmlu.delta  # no difference presented as a result
    assert len(mmlu.delta) <= 40  # short enough for its column (a long delta was cut off at "on 5…")
