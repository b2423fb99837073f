"""`layerlens eval --plan` and `layerlens sweep` report KL to the original and top-1 agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from layerlens import cli
from layerlens.data import load_texts
from layerlens.evaluation import perplexity
from layerlens.loading import load_model
from layerlens.plans import PrunePlan
from layerlens.surgery import apply_plan

TEXT = str(Path(__file__).parents[1] / "data" / "shakespeare_sample.txt")


def test_eval_plan_writes_kl_and_agreement(tiny_llama, tmp_path, capsys):
    plan = PrunePlan(6, "remove", remove=(2, 4))
    (tmp_path / "plan.json").write_text(plan.to_json())
    rc = cli.main(["eval", "--model", str(tiny_llama), "--device", "cpu", "--ppl-data", TEXT, "--seq-len", "64",
                   "--max-windows", "3", "--mmlu", "none", "--plan", str(tmp_path / "plan.json"),
                   "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    lm = load_model(str(tiny_llama), device="cpu")
    ref = perplexity(apply_plan(lm.model, plan), lm.tokenizer, load_texts(TEXT, role="eval"), seq_len=64,
                     max_windows=3, original=lm.model)
    assert result["kl"] == pytest.approx(ref.kl, rel=1e-6) and result["kl"] > 0
    assert result["top1_agreement"] == pytest.approx(ref.top1_agreement)
    assert result["perplexity_details"]["kl"] == result["kl"]
    assert "top-1 agreement" in capsys.readouterr().out
    # without a plan there is nothing to compare with
    rc = cli.main(["eval", "--model", str(tiny_llama), "--device", "cpu", "--ppl-data", TEXT, "--seq-len", "64",
                   "--max-windows", "3", "--mmlu", "none", "--runs-dir", str(tmp_path / "runs"),
                   "--out", str(tmp_path / "plain")])
    assert rc == 0
    assert json.loads((tmp_path / "plain" / "eval.json").read_text())["kl"] is None


def test_sweep_csv_has_kl_columns(tiny_llama, tmp_path):
    rc = cli.main(["sweep", "--model", str(tiny_llama), "--device", "cpu", "--ppl-data", TEXT, "--seq-len", "48",
                   "--max-windows", "3", "--mmlu", "none", "--strategies", "sequential", "--ratios", "0,0.34",
                   "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "sweep")])
    assert rc == 0
    frame = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert {"kl", "top1_agreement"} <= set(frame.columns)
    zero, two = frame.iloc[0], frame.iloc[1]
    assert zero.kl == pytest.approx(0.0, abs=1e-6) and zero.top1_agreement == 1.0
    assert two.kl > 0 and two.top1_agreement < 1.0
    assert (tmp_path / "sweep" / "kl.html").exists()
