"""`layerlens analyze`: the JSON contract, the table, and one clear sentence for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerlens.cli import main

DATA = "tests/data/shakespeare_sample.txt"
SMALL = ["--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerlens", *args], capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_analyze_writes_report_contract(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["analyze", "--model", str(tiny_llama), "--data", DATA, *SMALL, "--out", str(out),
               "--runs-dir", str(tmp_path / "runs")])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("num_layers", "bi", "cosine", "cka", "cka_estimator", "block_distance", "magnitude", "meta"):
        assert key in report
    assert report["num_layers"] == 6 and len(report["bi"]) == 6
    assert len(report["cosine"]) == 7 and len(report["cka"][0]) == 7
    assert [len(r) for r in report["block_distance"]] == [6, 5, 4, 3, 2, 1]
    for key in ("model", "revision", "dtype", "device", "data", "samples", "seq_len", "tokens", "seed",
                "layerlens_version", "seconds"):
        assert key in report["meta"], key
    assert report["meta"]["samples"] == 4 and report["meta"]["device"] == "cpu"
    table = capsys.readouterr().out
    assert "BI" in table and "wrote" in table
    assert list((tmp_path / "runs" / "analyze").glob("*.json"))


def test_python_dash_m_works_the_same(tiny_llama, tmp_path):
    res = run_cli("analyze", "--model", str(tiny_llama), "--data", DATA, *SMALL, "--out", str(tmp_path),
                  "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "report.json").exists()


@pytest.fixture
def bad_inputs(tiny_llama, tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("   \n\n  ")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text('{"body": "hello"}\n')
    short = tmp_path / "short.txt"
    short.write_text("a")
    m = str(tiny_llama)
    return {
        "unknown model": (["--model", str(tmp_path / "nope")], "does not exist"),
        "empty folder": (["--model", str(empty_dir)], "no config.json"),
        "hub id offline": (["--model", "some-org/some-model"], "local folder"),
        "empty data": (["--model", m, "--data", str(empty_txt)], "no text"),
        "binary data": (["--model", m, "--data", str(binary)], "binary"),
        "non utf8": (["--model", m, "--data", str(latin)], "UTF-8"),
        "no text column": (["--model", m, "--data", str(no_text)], "no 'text' field"),
        "too short": (["--model", m, "--data", str(short)], "at least 2 tokens"),
        "samples 0": (["--model", m, "--samples", "0"], "at least 1"),
        "samples negative": (["--model", m, "--samples", "-3"], "at least 1"),
        "seq-len too long": (["--model", m, "--seq-len", "100000"], "above the model's limit"),
        "missing file": (["--model", m, "--data", str(tmp_path / "missing.jsonl")], "does not exist"),
    }


@pytest.mark.parametrize("case", ["unknown model", "empty folder", "hub id offline", "empty data",
                                  "binary data", "non utf8", "no text column", "too short", "samples 0",
                                  "samples negative", "seq-len too long", "missing file"])
def test_bad_input_one_sentence_no_traceback(bad_inputs, case, tmp_path, capsys):
    args, needle = bad_inputs[case]
    if "--data" not in args:
        args = [*args, "--data", DATA]
    rc = main(["analyze", *args, "--out", str(tmp_path / "o"), "--runs-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o" / "report.json").exists()


def test_unsupported_architecture_is_named(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         vocab_size=64)).save_pretrained(tmp_path / "bert")
    rc = main(["analyze", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "not a decoder-only causal LM" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_corrupt_weights_get_a_clear_message(tiny_llama, tmp_path, capsys, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x07" * 100)
    else:
        weights.unlink()
    rc = main(["analyze", "--model", str(broken), "--data", DATA, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "could not be read" in err and "Traceback" not in err
