"""AppTest: Heal page (issue 15): heal the applied pruned model, live curve, Stop keeps the best checkpoint,
the before/after table of original / pruned / healed; the original never changes; Export saves the healed
model; the Summary shows all three."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from tiny_models import param_hash


@pytest.fixture
def app(open_app):
    return open_app()




def _shared(tiny_llama):
    resources = importlib.import_module("pages._ui.resources")
    return resources._shared_model(str(tiny_llama), None, "auto", "auto", False)  # the cache_resource entry


def _heal_table(app):
    return next(t.value for t in app.table if "Model" in t.value.columns)


def _apply_and_heal(app, steps: int = 3):
    app.run()
    app.switch_page("pages/3_prune.py").run()
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error
    app.switch_page("pages/7_heal.py").run()
    assert not app.exception and not app.error
    app.number_input(key="hl_steps").set_value(steps)
    app.number_input(key="hl_mmlu").set_value(1)  # off by default on a CPU (~40 s per model there)
    app.button(key="hl_run").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]


def test_heal_page_without_a_pruned_model_points_to_prune(app):
    app.run()
    app.switch_page("pages/7_heal.py").run()
    assert not app.exception and not app.error
    assert any("No pruned model to heal yet" in i.value for i in app.info)


def test_heal_shows_three_rows_keeps_the_original_and_reads_back(app, tiny_llama):
    app.run()
    shared = _shared(tiny_llama)
    before = param_hash(shared.model)
    flags = [p.requires_grad for p in shared.model.parameters()]
    types = [type(m).__name__ for m in shared.model.modules()]
    _apply_and_heal(app)
    assert app.selectbox(key="hl_loss").value == "kd"  # distillation from the original by default
    table = _heal_table(app)
    assert list(table["Model"]) == ["Original", "Pruned", "Healed"]
    assert list(table["Layers"]) == ["6", "4", "4"]
    assert table["Speed"].str.contains("tokens/s").all() and table["MMLU P(correct letter)"].str.endswith("%").all()
    assert len(app.text) == 3  # the three generations side by side
    healed = app.session_state["ll_healed"]
    assert healed["record"]["steps"] == 3 and healed["questions"] == 57 and not healed["cached"]
    assert any("Healing: loss and held-out perplexity" in json.loads(c.proto.spec)["layout"]["title"]["text"]
               for c in app.get("plotly_chart"))
    # the teacher (the cached original every session shares) is bit-identical and unwrapped
    assert _shared(tiny_llama) is shared and param_hash(shared.model) == before
    assert [p.requires_grad for p in shared.model.parameters()] == flags
    assert [type(m).__name__ for m in shared.model.modules()] == types
    # the same request again is read back from the runs folder, not retrained
    app.button(key="hl_run").click().run()
    assert not app.exception and not app.error
    assert app.session_state["ll_healed"]["cached"]
    assert any("Read back from the runs folder" in i.value for i in app.info)
    assert param_hash(shared.model) == before


def test_stop_keeps_the_best_checkpoint(app, monkeypatch):
    healing = importlib.import_module("pages._ui.healing")
    watch = healing.HealJob._watch

    def stop_after_two(self, curve, evals):  # what the Stop button does (sets the job's event), at step 2
        watch(self, curve, evals)
        if len(curve) >= 2:
            self.stop.set()

    monkeypatch.setattr(healing.HealJob, "_watch", stop_after_two)
    _apply_and_heal(app, steps=500)
    record = app.session_state["ll_healed"]["record"]
    assert record["stopped"] == "stopped" and record["steps"] == 2
    assert any(w.value.startswith("Stopped at step 2") for w in app.warning)
    assert len(_heal_table(app)) == 3


def test_a_bad_setting_is_one_sentence_in_the_page_words(app):
    app.run()
    app.switch_page("pages/3_prune.py").run()
    app.button(key="pr_apply").click().run()
    app.switch_page("pages/7_heal.py").run()
    app.number_input(key="hl_rank").set_value(500)  # more than the tiny model's hidden size (32)
    app.button(key="hl_run").click().run()
    assert not app.exception
    assert len(app.error) == 1 and "LoRA rank" in app.error[0].value and "hidden size 32" in app.error[0].value
    assert "ll_healed" not in app.session_state


def test_export_saves_the_healed_model_and_summary_shows_all_three(app, tmp_path):
    from transformers import AutoModelForCausalLM

    _apply_and_heal(app)
    healed = app.session_state["ll_healed"]
    app.switch_page("pages/5_export.py").run()
    assert not app.exception and not app.error
    app.button(key="ex_save_healed").click().run()
    assert not app.exception and not app.error
    folder = next(p for p in (tmp_path / "runs" / "exports").iterdir() if p.name.endswith("-healed"))
    doc = json.loads((folder / "layerlens_plan.json").read_text())
    assert doc["heal"]["steps"] == 3 and doc["heal"]["loss"] == "kd" and doc["plan"]["n_removed"] == 2
    again = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, healed["model"](ids).logits, atol=1e-5)
    app.switch_page("pages/6_summary.py").run()
    assert not app.exception and not app.error
    assert list(_heal_table(app)["Model"]) == ["Original", "Pruned", "Healed"]
    assert any("Healed" in md.value for md in app.markdown)


def test_evaluate_heals_every_point_and_draws_dashed_healed_curves(app):
    app.run()
    app.switch_page("pages/4_evaluate.py").run()
    app.multiselect(key="ev_strategies").set_value(["bi"])
    app.multiselect(key="ev_ratios").set_value([0.0, 0.3])
    app.number_input(key="ev_windows").set_value(2)
    app.number_input(key="ev_seq_len").set_value(64)
    app.checkbox(key="ev_mmlu").set_value(False)
    app.checkbox(key="ev_current").set_value(False)
    app.number_input(key="ev_heal").set_value(2).run()
    assert not app.exception and not app.error
    assert any("of healing (1 pruned point × 2 s" in c.value for c in app.caption)
    app.button(key="ev_run").click().run()
    assert not app.exception and not app.error
    frame = app.dataframe[0].value
    assert list(frame["healed"]) == [False, True, False, True]  # a healed row after each pruned row
    ppl = json.loads(app.get("plotly_chart")[0].proto.spec)
    curves = {t["name"]: t for t in ppl["data"]}
    assert set(curves) == {"bi", "bi (healed)"}
    assert curves["bi (healed)"]["line"]["dash"] == "dash"
    assert curves["bi (healed)"]["line"]["color"] == curves["bi"]["line"]["color"]


def test_sidebar_says_the_applied_plan_is_healed(open_app):
    """AppTest reruns only the page after the first run, so the sidebar (drawn by app.py) is checked on the
    first run of a session that already holds a report, an applied plan and its healed result."""
    from layerlens.plans import PrunePlan

    first = open_app()
    first.run()  # the quick analysis: its report, settings and model info seed the second session
    app = open_app()
    for key in ("ll_report", "ll_settings", "ll_model_info", "ll_requested"):
        app.session_state[key] = first.session_state[key]
    plan = PrunePlan(num_layers=6, method="remove", remove=(1, 2), strategy="manual")
    app.session_state["ll_pruned"] = {"plan_json": plan.to_json(), "plan": plan, "model": None, "quick": {},
                                      "original": {}, "prompt": "The king said"}
    app.session_state["ll_healed"] = {"plan_json": plan.to_json()}
    app.run()
    assert not app.exception
    assert any("Healed model" in md.value for md in app.sidebar.markdown)
