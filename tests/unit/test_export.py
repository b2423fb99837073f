"""What a user takes away (layerlens.export): the pruned model folder and its record, figures, zips."""

from __future__ import annotations

import io
import json
import zipfile

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import layerlens.export as export
from layerlens.export import safe_name, save_figure, save_pruned, zip_folder
from layerlens.plots_curves import sweep_figure


def test_safe_name_and_zip(tmp_path):
    assert safe_name("../../etc") == "etc"
    assert "/" not in safe_name("a/b c")
    assert safe_name("///") == "pruned-model"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")

    names = zipfile.ZipFile(io.BytesIO(zip_folder(tmp_path / "m"))).namelist()
    assert names == ["m/config.json"]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from layerlens.loading import load_model

    return load_model(str(tiny_llama), device="cpu")


def test_save_pruned_writes_a_loadable_model_and_one_record(loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    from layerlens.plans import make_plan, plan_summary
    from layerlens.surgery import apply_plan

    plan = make_plan("manual", None, layers=(1, 4), num_layers=loaded.info.num_layers)
    out = tmp_path / "pruned"
    record = save_pruned(apply_plan(loaded.model, plan), loaded.tokenizer, plan, out, meta={"model": "tiny"})
    doc = json.loads((out / "layerlens_plan.json").read_text())
    assert list(doc) == ["plan", "summary", "report", "meta"] and doc == json.loads(json.dumps(record, default=str))
    assert doc["plan"] == plan.to_dict() and doc["summary"] == plan_summary(plan) and doc["report"] is None
    assert doc["meta"]["model"] == "tiny" and doc["meta"]["layerlens_version"] and doc["meta"]["created"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == loaded.info.num_layers - 2
    assert (out / "tokenizer_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # written in a temp folder, then renamed


def test_save_pruned_leaves_nothing_behind_on_failure(tmp_path):
    class Broken:
        def save_pretrained(self, folder):
            (folder / "half.bin").write_bytes(b"x")
            raise OSError("disk full")

    from layerlens.plans import make_plan

    with pytest.raises(OSError):
        save_pruned(Broken(), None, make_plan("manual", None, layers=(1,), num_layers=4), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _sweep_frame() -> pd.DataFrame:
    return pd.DataFrame([dict(strategy="bi", ratio=r, n_removed=round(r * 30), removed_layers=[], perplexity=10 + r,
                              mmlu_accuracy=0.3, seconds=1.0) for r in (0.0, 0.1)])


def test_save_figure_writes_html(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "figure_png_bytes", lambda *a, **k: None)  # PNG path tested in the browser suite
    paths = save_figure(sweep_figure(_sweep_frame()), tmp_path / "sweep.png")
    assert paths == [tmp_path / "sweep.html"]
    assert "plotly" in paths[0].read_text()


@pytest.mark.skipif(not export.png_available(), reason="needs kaleido and a Chromium")
def test_png_export_from_several_threads_gets_each_its_own_figure():
    """One kaleido browser serves the process; callers from several threads (dashboard sessions) must
    each get their own figure's PNG, byte-identical to a serial render."""
    import hashlib
    import threading

    figs = [go.Figure(go.Bar(y=[i, 2, 3]), layout=dict(title=f"figure {i}")) for i in range(4)]

    def digest(fig):
        return hashlib.sha256(export.figure_png_bytes(fig, width=300, height=200, scale=1)).hexdigest()

    serial = [digest(f) for f in figs]
    assert len(set(serial)) == 4
    threaded: list[str | None] = [None] * 4
    workers = [threading.Thread(target=lambda i=i: threaded.__setitem__(i, digest(figs[i]))) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert threaded == serial


def test_html_report_sweep_table_says_which_rows_are_healed():
    """Issue 15: a sweep that healed every point has a healed row beside each pruned row; the report's
    table says which is which (they share strategy, ratio and layers)."""
    from layerlens.report_html import _sweep_table

    frame = pd.DataFrame([{"strategy": "bi", "ratio": 0.2, "removed_layers": "3,4", "perplexity": 80.0, "healed": h}
                          for h in (False, True)])
    html = _sweep_table(frame)
    assert "healed (LoRA)" in html and html.count("<td>no</td>") == 1 and html.count("<td>yes</td>") == 1
    assert "healed" not in _sweep_table(frame.drop(columns="healed"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: tied embeddings
def test_save_in_another_dtype_leaves_the_loaded_model_alone(tiny_model_factory, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from layerlens import surgery
    from layerlens.loading import load_model
    from layerlens.plans import PrunePlan

    lm = load_model(str(tiny_model_factory(arch)), device="cpu", dtype="float32")
    plan = PrunePlan(lm.info.num_layers, "remove", remove=(2,))
    pruned = surgery.apply_plan(lm.model, plan)
    record = save_pruned(pruned, lm.tokenizer, plan, tmp_path / "bf16", dtype="bfloat16")
    assert record["meta"]["export_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())  # shared weights never cast
    assert all(p.dtype == torch.float32 for p in pruned.parameters())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert back.config.num_hidden_layers == lm.info.num_layers - 1
    want = {k: v.to(torch.bfloat16) for k, v in pruned.state_dict().items()}
    got = back.state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in got)
    assert save_pruned(pruned, lm.tokenizer, plan, tmp_path / "same", dtype="float32")["meta"]["export_dtype"] == \
        "float32"
