"""AppTest: a model over the memory budget opens layer by layer on its own, analyses, and says so."""

from __future__ import annotations

import json

import numpy as np


def test_model_over_the_budget_is_analysed_layer_by_layer(open_app, tmp_path, monkeypatch):
    """Model & data analyses it layer by layer and says so; Redundancy and Prune (plans from the report)
    work on that report without the weights."""
    monkeypatch.setenv("LAYERLENS_DATA_ROOT", str(tmp_path / "root"))
    (tmp_path / "root").mkdir(exist_ok=True)
    monkeypatch.setenv("LAYERLENS_MAX_MEMORY", "64KB")  # the tiny model's weights are ~0.5 MB
    app = open_app()
    app.run()
    assert not app.exception and not app.error
    assert {m.label: m.value for m in app.metric}["Decoder layers"] == "6"
    assert any("layer by layer" in i.value for i in app.info)
    saved = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("*.json")]
    reports = [r for r in saved if isinstance(r, dict) and "cosine" in r]
    assert reports and reports[0]["meta"]["execution"] == "layerwise"
    assert np.asarray(reports[0]["cosine"]).shape == (7, 7)
    for page in ("pages/2_redundancy.py", "pages/3_prune.py"):
        other = open_app(page)
        other.run()
        assert not other.exception, page
