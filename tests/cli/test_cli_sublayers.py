"""`layerlens prune --drop-attn/--drop-mlp` and `layerlens analyze` with sublayers, confidence and peer
conventions, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerlens.cli as cli
from layerlens.loading import load_model
from layerlens.plans import PrunePlan
from layerlens.report import LayerReport
from layerlens.surgery import apply_plan, dropped_sublayers

DATA = str(Path(__file__).parents[1] / "data" / "shakespeare_sample.txt")
FAST = ["--device", "cpu", "--data", DATA, "--samples", "4", "--seq-len", "24", "--batch-size", "2"]
IDS = torch.tensor([[5, 17, 33, 99, 120, 7, 8, 9]])


@pytest.fixture(autouse=True)
def _runs(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERLENS_RUNS", str(tmp_path / "runs"))


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_prune_drop_attn_with_remove_saves_identical_logits(tiny_llama, tmp_path, capsys):
    out = tmp_path / "p"
    assert run("prune", "--model", tiny_llama, "--remove", "4", "--drop-attn", "1,2-3", "--drop-mlp", "5",
               "--out", out, "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert "attn 0..5: .---x." in text and "mlp 0..5: ....x-" in text
    plan = PrunePlan(6, "remove", remove=(4,), drop_attn=(1, 2, 3), drop_mlp=(5,), strategy="manual")
    record = json.loads((out / "layerlens_plan.json").read_text())
    assert PrunePlan.from_dict(record["plan"]) == plan
    original = load_model(str(tiny_llama), device="cpu").model
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, apply_plan(original, plan)(IDS).logits)
    assert dropped_sublayers(load_model(str(out), device="cpu").model) == ((1, 2, 3), (4,))


def test_prune_drop_mlp_alone(tiny_llama, tmp_path):
    out = tmp_path / "p"
    assert run("prune", "--model", tiny_llama, "--drop-mlp", "0", "--out", out, "--device", "cpu") == 0
    plan = PrunePlan.from_dict(json.loads((out / "layerlens_plan.json").read_text())["plan"])
    assert plan.drop_mlp == (0,) and plan.removed_layers == () and plan.num_layers_after == 6


@pytest.mark.parametrize("argv, words", [
    (["--remove", "2", "--drop-attn", "2"], "removed whole"),
    (["--drop-attn", "9"], "out of range"),
    (["--drop-attn", "0-5"], "every kept layer"),
    (["--plan", "x.json", "--drop-mlp", "1"], "--plan"),
])
def test_bad_sublayer_arguments_exit_2_with_one_sentence(tiny_llama, tmp_path, capsys, argv, words):
    assert run("prune", "--model", tiny_llama, *argv, "--out", tmp_path / "p", "--device", "cpu") == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_strategy_attn_bi_via_cli(tiny_llama, tmp_path, capsys):
    out = tmp_path / "p"
    assert run("prune", "--model", tiny_llama, "--strategy", "attn_bi", "--n", "3", "--out", out, *FAST) == 0
    record = json.loads((out / "layerlens_plan.json").read_text())
    plan = PrunePlan.from_dict(record["plan"])
    report = LayerReport.from_dict(record["report"])
    expect = sorted(sorted(range(6), key=lambda i: (report.attn_bi[i], i))[:3])
    assert list(plan.drop_attn) == expect and plan.strategy == "attn_bi"


def test_analyze_conventions_and_confidence_in_meta_and_table(tiny_llama, tmp_path, capsys):
    assert run("analyze", "--model", tiny_llama, "--out", tmp_path / "a", *FAST, "--last-state", "post-norm",
               "--block-distance", "last-token", "--bootstrap", "100", "--rank-k", "2") == 0
    text = capsys.readouterr().out
    assert "attn BI" in text and "in 2 lowest" in text and "last state post-norm" in text
    rep = LayerReport.load(tmp_path / "a")
    assert rep.meta["last_state"] == "post-norm" and rep.meta["block_distance"] == "last-token"
    assert rep.meta["bootstrap"]["resamples"] == 100 and rep.meta["bootstrap"]["rank_k"] == 2
    assert len(rep.attn_bi) == 6 and len(rep.bi_ci_low) == 6
    assert sum(rep.rank_stability) == pytest.approx(2.0)


def test_plan_command_prints_and_jsons_sublayers(tiny_llama, capsys):
    assert run("plan", "--model", tiny_llama, "--drop-attn", "2", "--json", "--device", "cpu") == 0
    d = json.loads(capsys.readouterr().out)
    assert d["drop_attn"] == [2] and d["summary"][2]["attn"] == "dropped" and d["ratio"] == 1 / 12
