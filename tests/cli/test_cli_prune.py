"""`layerlens prune` / `plan`: saved models load in plain transformers; bad input -> exit 2, no output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerlens.cli as cli
from layerlens import adapters
from layerlens.loading import load_model
from layerlens.plans import PrunePlan, make_plan
from layerlens.report import LayerReport
from layerlens.surgery import apply_plan

DATA = str(Path(__file__).parents[1] / "data" / "shakespeare_sample.txt")
FAST = ["--device", "cpu", "--data", DATA, "--samples", "6", "--seq-len", "24", "--batch-size", "3"]
IDS = torch.tensor([[5, 17, 33, 99, 120, 7, 8, 9]])


@pytest.fixture(autouse=True)
def _cli(monkeypatch, tmp_path):
    if "prune" not in cli.COMMANDS:  # until cli.py lists it
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "prune"))
    monkeypatch.setenv("LAYERLENS_RUNS", str(tmp_path / "runs"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_prune_remove_saves_a_plain_transformers_model(tiny_llama, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert run("prune", "--model", tiny_llama, "--remove", "1,3", "--out", out, "--device", "cpu") == 0
    assert "wrote" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    AutoTokenizer.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    original = load_model(str(tiny_llama), device="cpu").model
    plan = PrunePlan(6, "remove", remove=(1, 3))
    assert torch.equal(logits(reloaded), logits(apply_plan(original, plan)))
    record = json.loads((out / "layerlens_plan.json").read_text())
    assert PrunePlan.from_dict(record["plan"]) == plan and record["report"] is None
    assert {"layerlens_version", "git_commit", "created", "model"} <= set(record["meta"])
    assert [r["status"] for r in record["summary"]] == ["kept", "removed", "kept", "removed", "kept", "kept"]
    assert list((tmp_path / "runs" / "prune").glob("*.json"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_prune_bi_ratio_records_report_and_matches_library(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen2")
    out = tmp_path / "bi"
    assert run("prune", "--model", path, "--strategy", "bi", "--ratio", "0.34", *FAST, "--out", out) == 0
    record = json.loads((out / "layerlens_plan.json").read_text())
    report = LayerReport.from_dict(record["report"])
    plan = PrunePlan.from_dict(record["plan"])
    assert plan == make_plan("bi", report, ratio=0.34) and plan.n_removed == 2  # round(0.34 * 6) = 2
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    original = load_model(str(path), device="cpu").model
    assert torch.equal(logits(reloaded), logits(apply_plan(original, plan)))
    # the same report reused: `plan --report` gives the same plan without re-analysing
    (tmp_path / "report.json").write_text(json.dumps(record["report"]))
    assert (
        run(
            "plan",
            "--model",
            path,
            "--strategy",
            "bi",
            "--ratio",
            "0.34",
            "--report",
            tmp_path / "report.json",
            "--device",
            "cpu",
        )
        == 0
    )


DATA_FIELDS = ("samples", "seq_len", "batch_size", "data_description", "tokens")


@pytest.mark.parametrize("plan_args", [["--remove", "1,3"], ["--merge", "2-3"], ["--strategy", "reverse", "--n", "1"]])
def test_provenance_of_a_plan_made_without_data_records_no_data(tiny_llama, tmp_path, plan_args):
    out = tmp_path / "explicit"
    assert run("prune", "--model", tiny_llama, *plan_args, *FAST, "--out", out) == 0  # data args given, unused
    meta = json.loads((out / "layerlens_plan.json").read_text())["meta"]
    assert meta["data"] is None and meta["report_file"] is None
    assert not set(DATA_FIELDS) & set(meta), meta
    runs_record = json.loads(next((tmp_path / "runs" / "prune").glob("*.json")).read_text())
    assert runs_record["meta"]["data"] is None


def test_provenance_of_a_report_plan_is_the_reports_data(tiny_model_factory, tmp_path):
    path = tiny_model_factory("qwen2")
    out = tmp_path / "analysed"
    assert run("prune", "--model", path, "--strategy", "bi", "--n", "1", *FAST, "--out", out) == 0
    record = json.loads((out / "layerlens_plan.json").read_text())
    rmeta, meta = record["report"]["meta"], record["meta"]
    assert meta["samples"] == rmeta["samples"] and meta["seq_len"] == 24 and meta["batch_size"] == 3
    assert meta["data"] == rmeta["data"] and meta["tokens"] == rmeta["tokens"]
    # a reused report: its settings are recorded, not the (different, unused) data args of this call
    (tmp_path / "report.json").write_text(json.dumps(record["report"]))
    out2 = tmp_path / "reused"
    assert run("prune", "--model", path, "--strategy", "bi", "--n", "1", "--report", tmp_path / "report.json",
               "--device", "cpu", "--samples", "2", "--seq-len", "8", "--out", out2) == 0
    meta2 = json.loads((out2 / "layerlens_plan.json").read_text())["meta"]
    assert meta2["report_file"] == str(tmp_path / "report.json")
    assert {k: meta2[k] for k in ("data", "samples", "seq_len", "batch_size", "tokens")} == {
        k: rmeta[k] for k in ("data", "samples", "seq_len", "batch_size", "tokens")
    }


def test_plan_json_and_slm_merge(tiny_llama, tmp_path, capsys):
    assert (
        run(
            "plan",
            "--model",
            tiny_llama,
            "--strategy",
            "slm",
            "--ratio",
            "0.4",
            "--criterion",
            "cosine",
            *FAST,
            "--json",
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    plan = PrunePlan.from_dict(printed)
    assert plan.strategy == "slm" and plan.ratio <= 0.4 and "threshold" in plan.params
    assert len(printed["summary"]) == 6
    (tmp_path / "plan.json").write_text(json.dumps(printed))
    out = tmp_path / "slm"
    assert (
        run("prune", "--model", tiny_llama, "--plan", tmp_path / "plan.json", "--out", out, "--device", "cpu")
        == 0
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == plan.num_layers_after
    original = load_model(str(tiny_llama), device="cpu").model
    torch.testing.assert_close(logits(reloaded), logits(apply_plan(original, plan)))
    # manual merge with the keep_top formula
    assert (
        run(
            "prune",
            "--model",
            tiny_llama,
            "--merge",
            "2-4",
            "--formula",
            "keep_top",
            "--out",
            tmp_path / "m",
            "--device",
            "cpu",
        )
        == 0
    )
    rec = json.loads((tmp_path / "m" / "layerlens_plan.json").read_text())
    assert rec["plan"]["merge"] == [[2, 3, 4]] and rec["plan"]["merge_formula"] == "keep_top"


def test_plan_forward_pass_strategies(tiny_llama, capsys):
    assert (
        run("plan", "--model", tiny_llama, "--strategy", "laco", "--threshold", "0.3", "--laco-m", "2", *FAST)
        == 0
    )
    assert capsys.readouterr().out.startswith("laco: merge")
    assert (
        run(
            "plan",
            "--model",
            tiny_llama,
            "--strategy",
            "slm",
            "--criterion",
            "output",
            "--threshold",
            "0.5",
            "--formula",
            "mean",
            *FAST,
            "--json",
        )
        == 0
    )
    plan = PrunePlan.from_json(capsys.readouterr().out)
    assert plan.params["criterion"] == "output" and plan.merge_formula == "mean"
    assert (
        run(
            "plan",
            "--model",
            tiny_llama,
            "--strategy",
            "random",
            "--ratio",
            "0.5",
            "--seed",
            "3",
            "--device",
            "cpu",
        )
        == 0
    )
    assert "random: remove" in capsys.readouterr().out


def test_prune_streamline_with_replacement(tiny_llama, tmp_path):
    out = tmp_path / "stream"
    assert (
        run(
            "prune",
            "--model",
            tiny_llama,
            "--strategy",
            "streamline",
            "--n",
            "2",
            "--replace",
            "ffn",
            "--epochs",
            "2",
            "--train-seconds",
            "60",
            *FAST,
            "--out",
            out,
        )
        == 0
    )
    record = json.loads((out / "layerlens_plan.json").read_text())
    rep = record["plan"]["params"]["replacement"]
    assert rep["kind"] == "ffn" and rep["steps"] == 4
    trained_on = record["meta"]["replacement_data"]
    assert trained_on["samples"] == 6 and trained_on["seq_len"] == 24 and trained_on["seed"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 5
    assert torch.isfinite(logits(reloaded)).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--remove", "0-5"], "removes all 6 layers"),
        (["--remove", "6"], "out of range"),
        (["--remove", "2,2"], "listed twice"),
        (["--remove", "two"], "comma-separated"),
        (["--strategy", "bi", "--ratio", "1.0"], r"outside \[0, 1\)"),
        (["--strategy", "bi", "--ratio", "-0.1"], r"outside \[0, 1\)"),
        (["--strategy", "slm", "--threshold", "1.5"], r"outside \[-1, 1\]"),
        (["--strategy", "bi", "--n", "6"], "removes every layer"),
        (["--strategy", "bi"], "exactly one of --ratio or --n"),
        (["--remove", "1", "--strategy", "bi", "--ratio", "0.2"], "exactly one of"),
        (["--merge", "1,3"], "not consecutive"),
        (["--strategy", "bi", "--ratio", "0.2", "--replace", "ffn"], "--strategy streamline"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_llama, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert run("prune", "--model", tiny_llama, *args, "--out", out, *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unmergeable_architecture_and_foreign_out(tiny_llama, tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert run("prune", "--model", tiny_llama, "--remove", "1", "--out", foreign, "--device", "cpu") == 2
    assert "not a LayerLens prune output" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert run("prune", "--model", tiny_llama, "--remove", "1", "--out", tiny_llama, "--device", "cpu") == 2
    monkeypatch.setitem(
        adapters.ADAPTERS,
        "llama",
        adapters.ArchAdapter(layers="model.layers", final_norm="model.norm", attention="nope"),
    )
    assert (
        run("prune", "--model", tiny_llama, "--merge", "1-2", "--out", tmp_path / "x", "--device", "cpu") == 2
    )
    assert "cannot be merged" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_failure_while_saving_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    # an unexpected error: one sentence + a log under the runs folder, exit 1 (issue 14 item 11)
    assert run("prune", "--model", tiny_llama, "--remove", "1", "--out", tmp_path / "o", "--device", "cpu") == 1
    assert not (tmp_path / "o").exists()
    assert [p for p in os.listdir(tmp_path) if p != "runs"] == []


def test_slm_defaults_to_cosine_and_keep_top_and_the_help_warns_about_the_papers_formula(tiny_llama, capsys):
    """Issue 14: `--strategy slm` without --criterion/--formula merges cosine windows with keep_top (what measured
    best on the default model); task_vector stays a named option whose help says it degrades wide windows."""
    assert run("plan", "--model", tiny_llama, "--strategy", "slm", "--ratio", "0.4", *FAST, "--json") == 0
    plan = PrunePlan.from_dict(json.loads(capsys.readouterr().out))
    assert plan.params["criterion"] == "cosine" and plan.merge_formula == "keep_top"
    assert run("plan", "--model", tiny_llama, "--merge", "1-3", *FAST, "--json") == 0
    assert PrunePlan.from_dict(json.loads(capsys.readouterr().out)).merge_formula == "keep_top"
    with pytest.raises(SystemExit):
        run("prune", "--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "task_vector is the papers' formula and degrades windows of three or more layers" in help_text
    assert "(default keep_top)" in help_text and "(default cosine)" in help_text
