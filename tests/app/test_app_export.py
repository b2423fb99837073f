"""AppTest: Export page (pruned model in transformers format + plan JSON; downloads; HTML report)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def app(open_app):
    return open_app()


def _download_labels(at) -> list[str]:
    return [b.proto.label for b in at.get("download_button")]


def test_export_without_pruned_model_offers_data_and_report(app):
    app.switch_page("pages/5_export.py").run()
    assert not app.exception and not app.error
    assert any("No pruned model" in i.value for i in app.info)
    labels = _download_labels(app)
    for want in (
        "Report (JSON)",
        "Per-layer metrics (CSV)",
        "Cosine matrix (CSV)",
        "CKA matrix (CSV)",
        "Current plan (JSON)",
        "Download the HTML report",
    ):
        assert want in labels
    assert labels.count("HTML") >= 4  # one per figure


def test_save_pruned_model_reloads_with_transformers(app, tmp_path):
    from transformers import AutoModelForCausalLM

    app.switch_page("pages/3_prune.py").run()
    app.slider(key="pr_ratio").set_value(0.5).run()
    app.button(key="pr_apply").click().run()
    app.switch_page("pages/5_export.py").run()
    app.text_input(key="ex_name").set_value("my pruned/../model").run()  # sanitised to one folder name
    app.button(key="ex_save_model").click().run()
    assert not app.exception and not app.error
    folder = next((tmp_path / "runs" / "exports").iterdir())
    assert folder.parent == tmp_path / "runs" / "exports" and "/" not in folder.name
    doc = json.loads((folder / "layerlens_plan.json").read_text())
    assert doc["plan"]["n_removed"] == 3 and doc["meta"]["layerlens_version"]
    report = app.session_state["ll_report"]
    assert doc["meta"]["samples"] == report.meta["samples"] and doc["meta"]["data"] == report.meta["data"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 3
    assert "Download the saved model (.zip)" in _download_labels(app)


def test_html_report_has_figures_and_provenance(app):
    from layerlens.dashboard.planning import PlanSettings, build_plan, plan_reason
    from layerlens.report_html import build_report_html

    app.run()
    report = app.session_state["ll_report"]
    plan = build_plan(report, PlanSettings(mode="strategy", strategy="bi", ratio=0.34))
    html = build_report_html(
        report,
        plan=plan,
        model_info=app.session_state["ll_model_info"],
        quick={"perplexity": 12.0, "tokens_per_s": 20.0, "windows": 4, "seq_len": 128},
        original={"perplexity": 10.0, "tokens_per_s": 15.0},
        reason=plan_reason(report, plan),
        params_before=1000,
        params_after=800,
    )
    assert html.count("Plotly.newPlot") == 4  # bars, 2 heatmaps, plan strip
    assert html.count('<script type="text/javascript">/**') <= 1  # plotly.js embedded once
    for want in (
        "Provenance",
        "What is removed and why",
        "layerlens_version",
        "git commit",
        "Block Influence",
        "seq_len",
        "12.00",
    ):
        assert want in html


def test_saved_manual_plan_records_no_calibration_data(app, tmp_path):
    """A plan picked by hand used no data: its provenance must not claim the analysis' data."""
    app.switch_page("pages/3_prune.py").run()
    app.radio(key="pr_mode").set_value("manual").run()
    app.multiselect(key="pr_layers").set_value([1]).run()
    app.button(key="pr_apply").click().run()
    app.switch_page("pages/5_export.py").run()
    app.button(key="ex_save_model").click().run()
    assert not app.exception and not app.error
    folder = next((tmp_path / "runs" / "exports").iterdir())
    doc = json.loads((folder / "layerlens_plan.json").read_text())
    assert doc["plan"]["strategy"] == "manual" and doc["plan"]["removed_layers"] == [1]
    assert doc["meta"]["data"] is None and "samples" not in doc["meta"]


def _quick(ppl, speed):
    return {"perplexity": ppl, "tokens_per_s": speed, "generation": " s s s", "surgery_s": 0.01, "windows": 4,
            "seq_len": 128, "new_tokens": 16}


def test_export_says_a_broken_pruned_model_is_broken(app):
    """Issue 14 item 2: a model whose perplexity is 10x the original's or more is called broken, in red."""
    from layerlens.plans import PrunePlan

    app.run()
    plan = PrunePlan(num_layers=6, method="remove", remove=(1, 2), strategy="manual")
    app.session_state["ll_pruned"] = {"plan_json": plan.to_json(), "plan": plan, "model": None,
                                      "quick": _quick(3582230116909.84, 3.3), "original": _quick(51.9, 2.4),
                                      "prompt": "The king said"}
    app.switch_page("pages/5_export.py").run()
    assert not app.exception
    assert len(app.error) == 1 and "Broken" in app.error[0].value and "3.6e12" in app.error[0].value
    app.session_state["ll_pruned"]["quick"] = _quick(60.0, 3.3)  # 1.16x: usable, no red
    app.run()
    assert not app.error and any(s.value.startswith("Usable") for s in app.success)


def test_html_report_formats_numbers_for_people_and_calls_broken_broken(app):
    from layerlens.dashboard.planning import PlanSettings, build_plan
    from layerlens.report_html import build_report_html

    app.run()
    report = app.session_state["ll_report"]
    plan = build_plan(report, PlanSettings(mode="strategy", strategy="bi", ratio=0.34))
    html = build_report_html(report, plan=plan, quick=_quick(3582230116909.84, 3.3), original=_quick(51.9, 2.4),
                             params_before=134_515_008, params_after=106_200_000)
    assert "class='verdict bad'" in html and "Broken" in html
    assert "3.6e12" in html and "3582230116909" not in html and "6.9e10× higher" in html
    assert "134.5 M" in html and "-21.0%" in html and "no win: the model is broken" in html
    ok = build_report_html(report, plan=plan, quick=_quick(55.0, 3.3), original=_quick(51.9, 2.4))
    assert "class='verdict ok'" in ok and "Usable" in ok
    import pandas as pd

    sweep = pd.DataFrame([
        {"strategy": "bi", "ratio": 0.0, "actual_ratio": 0.0, "n_removed": 0, "removed_layers": "",
         "perplexity": 51.9234, "mmlu_accuracy": 0.2456},
        {"strategy": "slm", "ratio": 0.3, "actual_ratio": 1 / 3, "n_removed": 2, "removed_layers": "2,3",
         "perplexity": 3582230116909.84, "mmlu_accuracy": float("nan")},
    ])
    table = build_report_html(report, plan=plan, sweep_frame=sweep).split("<h2>Sweep points</h2>")[1]
    for want in ("perplexity (lower is better)", "MMLU accuracy (%)", "51.92", "3.6e12", "24.6%", "33.3%"):
        assert want in table
    assert "3582230116909" not in table and "3.582e+12" not in table
