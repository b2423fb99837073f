"""AppTest: with a model over the memory budget (layer-by-layer mode), Prune's Apply, Evaluate's sweep, Export,
Redundancy's evidence (damage, calibration sets) and Heal work (or, for Heal, say why not), against the
in-memory numbers of the same model."""

from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture
def layerwise_app(open_app, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERLENS_DATA_ROOT", str(tmp_path / "root"))
    (tmp_path / "root").mkdir(exist_ok=True)
    monkeypatch.setenv("LAYERLENS_MAX_MEMORY", "64KB")  # the tiny model's weights are ~0.5 MB
    return open_app


@pytest.fixture
def in_memory(tiny_llama):
    """The same checkpoint loaded whole (the independent reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isfinite(a) and abs(a - b) <= rel * abs(b)


def test_apply_export_and_heal_layer_by_layer(layerwise_app, in_memory, tmp_path):
    from transformers import AutoModelForCausalLM

    from layerlens import compare, surgery

    model, tok = in_memory
    app = layerwise_app("pages/3_prune.py")
    app.run()
    assert not app.exception and not app.error
    app.slider(key="pr_ratio").set_value(0.5).run()
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error, (app.exception, app.error)
    pruned = app.session_state["ll_pruned"]
    plan, q, o = pruned["plan"], pruned["quick"], pruned["original"]
    assert plan.n_removed == 3 and pruned["model"] is None
    # the very numbers of the in-memory quick check of the same plan
    assert _close(o["perplexity"], compare.quick_perplexity(model, tok))
    assert _close(q["perplexity"], compare.quick_perplexity(surgery.apply_plan(model, plan), tok))
    assert q["kl"] > 0 and 0 <= q["top1_agreement"] <= 1
    assert q["tokens_per_s"] is None and o["generation"] is None  # nothing made up
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Generation speed"] == "not measured"
    assert any("not measured in layer-by-layer mode" in i.value for i in app.info)

    # Export: the folder loads with transformers, logits equal to apply_plan
    app.switch_page("pages/5_export.py").run()
    app.button(key="ex_save_model").click().run()
    assert not app.exception and not app.error, (app.exception, app.error)
    folder = next((tmp_path / "runs" / "exports").iterdir())
    doc = json.loads((folder / "layerlens_plan.json").read_text())
    assert doc["plan"]["n_removed"] == 3 and doc["meta"]["execution"] == "layerwise"
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert saved.config.num_hidden_layers == 3
    ids = tok("To be, or not to be, that is the question", return_tensors="pt").input_ids
    with torch.no_grad():
        want = surgery.apply_plan(model, plan)(ids).logits
        got = saved(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    # Heal: one sentence why not, no error
    app.switch_page("pages/7_heal.py").run()
    assert not app.exception and not app.error
    assert any("Healing cannot run in layer-by-layer mode" in i.value for i in app.info)


def test_evaluate_sweeps_layer_by_layer(layerwise_app, in_memory):
    from layerlens.data import load_texts
    from layerlens.sweep import SweepConfig, make_plans, sweep

    model, tok = in_memory
    app = layerwise_app("pages/4_evaluate.py")
    app.run()
    assert not app.exception and not app.error
    app.multiselect(key="ev_strategies").set_value(["bi", "reverse"])
    app.multiselect(key="ev_ratios").set_value([0.0, 0.2, 0.4])
    app.number_input(key="ev_windows").set_value(2)
    app.number_input(key="ev_seq_len").set_value(64)
    app.checkbox(key="ev_mmlu").set_value(False)
    app.checkbox(key="ev_current").set_value(False)
    app.run()
    app.button(key="ev_run").click().run()
    assert not app.exception and not app.error, (app.exception, app.error)
    frame = app.session_state["ll_sweep_frame"][1]
    report = app.session_state["ll_report"]
    plans = make_plans(report, ["bi", "reverse"], [0.0, 0.2, 0.4], num_layers=report.num_layers)
    want = sweep(model, tok, report, SweepConfig(plans=tuple(plans), seq_len=64, max_windows=2),
                 ppl_texts=load_texts("default", role="eval")).frame
    assert len(frame) == len(want) == 6
    assert list(frame["strategy"]) == list(want["strategy"]) and list(frame["ratio"]) == list(want["ratio"])
    for got, ref in zip(frame["perplexity"], want["perplexity"], strict=True):
        assert _close(float(got), float(ref)), (got, ref)
    assert len(app.get("plotly_chart")) >= 1

    # Ray is refused with one sentence
    app.radio(key="ev_run_on").set_value("local Ray").run()
    app.multiselect(key="ev_ratios").set_value([0.0, 0.1]).run()
    app.button(key="ev_run").click().run()
    assert not app.exception
    assert any("runs layer by layer" in e.value and "Ray" in e.value for e in app.error)


def test_sublayer_parameters_from_the_skeleton(tiny_llama, in_memory):
    """Prune/Summary's parameter count of a sublayer plan, layer by layer: counted on the empty skeleton."""
    import threading

    from layerlens.adapters import sublayer_params
    from layerlens.layerwise import LayerwiseModel
    from pages._ui.resources import SharedModel

    shared = SharedModel(LayerwiseModel(str(tiny_llama), dtype="float32"), threading.RLock(), ())
    want = sublayer_params(in_memory[0])
    assert shared.sublayer_params() == want and all(a > 0 and m > 0 for a, m in want)


def test_redundancy_evidence_layer_by_layer(layerwise_app, in_memory):
    """The Redundancy page's leave-one-out damage and calibration-set comparison run layer by layer, with
    the in-memory damage numbers."""
    import numpy as np
    from plotly_json import array, figures

    from layerlens.damage import leave_one_out
    from layerlens.data import load_texts

    model, tok = in_memory
    app = layerwise_app("pages/2_redundancy.py")
    app.run()
    assert not app.exception and not app.error
    before = len(app.get("plotly_chart"))
    app.select_slider(key="rd_dmg_windows").set_value(2)
    app.select_slider(key="rd_dmg_seq").set_value(64)
    next(b for b in app.button if b.key == "rd_dmg_run").click().run()
    assert not app.exception and not app.error, (app.exception, app.error)
    figs = figures(app)
    assert len(figs) == before + 2  # scatter + bars
    bars = next(f for f in figs if f["data"][0]["type"] == "bar" and "removed alone" in json.dumps(f["layout"]))
    ref = leave_one_out(model, tok, load_texts("default", role="eval"), seq_len=64, max_windows=2)
    assert np.allclose(array(bars["data"][0]["y"]).astype(float), [u.ppl for u in ref.of("layer")], rtol=1e-5)

    next(b for b in app.button if b.key == "rd_cal_run").click().run()
    assert not app.exception and not app.error, (app.exception, app.error)
    assert len(app.get("plotly_chart")) == before + 3  # + the rank-difference heatmap
