"""More user mistakes across commands: one sentence, exit 2, no traceback (found in review)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerlens.cli import main
from layerlens.errors import LayerLensError

DATA = "tests/data/shakespeare_sample.txt"
SMALL = ["--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_out_under_a_file(tiny_llama, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc = main(["analyze", "--model", str(tiny_llama), "--data", DATA, *SMALL, "--out", str(blocker / "sub"),
               "--runs-dir", str(tmp_path / "r")])
    assert rc == 2 and "cannot write to" in _err(capsys)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"just a string"'])
def test_json_data_of_the_wrong_shape(tiny_llama, tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc = main(["analyze", "--model", str(tiny_llama), "--data", str(bad), *SMALL, "--out", str(tmp_path / "o")])
    assert rc == 2 and "list of strings" in _err(capsys)


def test_report_of_another_model_or_missing(tiny_model_factory, tmp_path, capsys):
    llama, gpt2 = tiny_model_factory("llama"), tiny_model_factory("gpt2")
    assert main(["analyze", "--model", str(gpt2), "--data", DATA, *SMALL, "--out", str(tmp_path / "a"),
                 "--runs-dir", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    rc = main(["plan", "--model", str(llama), "--report", str(tmp_path / "a" / "report.json"),
               "--strategy", "bi", "--ratio", "0.3"])
    assert rc == 2 and "gpt2 model" in _err(capsys)
    rc = main(["sweep", "--model", str(llama), "--report", str(tmp_path / "missing.json"), "--ratios", "0",
               "--out", str(tmp_path / "s"), "--runs-dir", str(tmp_path / "r")])
    assert rc == 2 and "Could not read the report" in _err(capsys)


def test_replacement_plan_cannot_be_replayed(tiny_llama, tmp_path, capsys):
    plan = {"num_layers": 6, "method": "remove", "remove": [2, 3], "strategy": "streamline",
            "params": {"replacement": {"kind": "ffn"}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rc = main(["eval", "--model", str(tiny_llama), "--plan", str(tmp_path / "plan.json"), "--mmlu", "none",
               "--seq-len", "32", "--ppl-data", DATA, "--out", str(tmp_path / "e"), "--runs-dir", str(tmp_path / "r")])
    assert rc == 2 and "pruned model folder" in _err(capsys)


def test_nonfinite_logits_are_reported_not_averaged(tiny_llama):
    from layerlens.evaluation import perplexity
    from layerlens.loading import load_model

    lm = load_model(str(tiny_llama), device="cpu")
    with torch.no_grad():
        lm.model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(LayerLensError, match="NaN/inf"):
        perplexity(lm.model, lm.tokenizer, Path(DATA).read_text(), seq_len=32, max_windows=2)


@pytest.mark.parametrize("spec", ["models/does-not-exist", "./does-not-exist", "~/layerlens-no-such-folder"])
def test_a_missing_model_folder_is_said_to_be_missing(tmp_path, monkeypatch, capsys, spec):
    """`models/x` has a hub id's shape: offline it was reported as "Hugging Face Hub cannot be reached". A
    spec that looks like a path (starts like one, or its parent folder exists) is a folder: a missing one
    is said to be missing, as the dashboard says it."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    rc = main(["analyze", "--model", spec, "--data", str(Path(__file__).parents[1] / "data" / "shakespeare_sample.txt"),
               *SMALL, "--out", str(tmp_path / "o")])
    err = _err(capsys)
    assert rc == 2 and f"The folder '{spec}' does not exist" in err and "Hub" not in err, err
