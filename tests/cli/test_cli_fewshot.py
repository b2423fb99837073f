"""`layerlens eval --shots K`: examples from the evaluated file itself are left out of the scoring, and meta
says where they came from and how many questions they displaced."""

from __future__ import annotations

import json
from pathlib import Path

from layerlens import cli
from layerlens.evaluation import mmlu
from layerlens.loading import load_model
from layerlens.questions import load_questions

MMLU = str(Path(__file__).parents[1] / "data" / "mmlu_sample.jsonl")


def test_eval_shots_records_examples_and_exclusions(tiny_llama, tmp_path):
    rc = cli.main(["eval", "--model", str(tiny_llama), "--device", "cpu", "--dtype", "float32", "--ppl-data", "none",
                   "--mmlu", MMLU, "--subjects", "astronomy,us_foreign_policy", "--shots", "2",
                   "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    few = result["meta"]["fewshot"]
    qs = load_questions(MMLU, subjects="astronomy,us_foreign_policy")
    n_subjects = len(qs.subjects)
    assert few["shots"] == 2 and few["excluded"] == 2 * n_subjects and few["source"] == qs.source
    assert "first 2 questions" in few["rule"]
    assert result["mmlu"]["n"] == len(qs) - 2 * n_subjects == result["meta"]["mmlu_n"]
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    want = mmlu(lm.model, lm.tokenizer, qs, shots=2, dev=load_questions(MMLU, subjects="astronomy,us_foreign_policy"),
                prefix_cache=False)
    assert result["mmlu"]["accuracy"] == want.accuracy
