"""`layerlens eval --tasks` and `layerlens sweep --tasks` with local lm-eval task YAMLs (offline)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("lm_eval")

from harness_tasks import write_tasks  # noqa: E402

from layerlens import cli  # noqa: E402
from layerlens.harness import run_tasks  # noqa: E402
from layerlens.loading import load_model  # noqa: E402
from layerlens.plans import PrunePlan  # noqa: E402
from layerlens.surgery import apply_plan  # noqa: E402


def test_eval_tasks_on_the_pruned_model(tiny_llama, tmp_path, capsys):
    mc, _gen = write_tasks(tmp_path)
    plan = PrunePlan(6, "remove", remove=(2, 4))
    (tmp_path / "plan.json").write_text(plan.to_json())
    rc = cli.main(["eval", "--model", str(tiny_llama), "--device", "cpu", "--dtype", "float32", "--ppl-data", "none",
                   "--mmlu", "none", "--tasks", str(mc), "--task-limit", "8", "--plan", str(tmp_path / "plan.json"),
                   "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    got = result["tasks"]["ll_local_mc"]
    assert got["n"] == 8 and {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(got)
    assert result["meta"]["harness"]["lm_eval"] == "0.4.13" and result["meta"]["harness"]["limit"] == 8
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    want = run_tasks(apply_plan(lm.model, plan), lm.tokenizer, [str(mc)], limit=8)
    assert got == want.tasks["ll_local_mc"]
    assert "ll_local_mc: acc" in capsys.readouterr().out


def test_eval_unknown_task_is_one_sentence(tiny_llama, tmp_path, capsys):
    rc = cli.main(["eval", "--model", str(tiny_llama), "--device", "cpu", "--ppl-data", "none", "--mmlu", "none",
                   "--tasks", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.yaml" in err and "does not exist" in err and "Traceback" not in err


def test_sweep_tasks_columns(tiny_llama, tmp_path):
    mc, _gen = write_tasks(tmp_path)
    argv = ["sweep", "--model", str(tiny_llama), "--device", "cpu", "--dtype", "float32", "--ppl-data", "none",
            "--mmlu", "none", "--tasks", str(mc), "--task-limit", "6", "--strategies", "sequential",
            "--ratios", "0,0.34", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "sweep")]
    assert cli.main(argv) == 0
    frame = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert {"ll_local_mc/acc", "ll_local_mc/acc_stderr", "ll_local_mc/acc_norm"} <= set(frame.columns)
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    for _, row in frame.iterrows():
        layers = "" if pd.isna(row["removed_layers"]) else str(row["removed_layers"])
        plan = PrunePlan(6, "remove", remove=tuple(int(x) for x in layers.split(",") if x.strip()))
        assert len(plan.removed_layers) == row["n_removed"]
        want = run_tasks(apply_plan(lm.model, plan), lm.tokenizer, [str(mc)], limit=6).tasks["ll_local_mc"]
        assert row["ll_local_mc/acc"] == pytest.approx(want["acc"])
        assert row["ll_local_mc/acc_norm_stderr"] == pytest.approx(want["acc_norm_stderr"])
    assert cli.main(argv) == 0  # read back from the persisted points
    again = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert again["cached"].all() and list(again["ll_local_mc/acc"]) == list(frame["ll_local_mc/acc"])
