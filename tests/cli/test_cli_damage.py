"""`layerlens damage` and `layerlens compare` on a tiny model: files, numbers equal to the library, resume,
clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from layerlens.calibration_compare import compare_reports
from layerlens.cli import main
from layerlens.damage import leave_one_out, sublayer_plans_available
from layerlens.data import TextSet, load_texts
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, analyze
from layerlens.report import LayerReport

DATA = str(Path(__file__).parents[1] / "data" / "shakespeare_sample.txt")
SMALL = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--max-windows", "3", "--device", "cpu",
         "--dtype", "float32"]


def test_damage_writes_damage_json_equal_to_the_library(tiny_llama, tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    sub = ["--sublayers"] if sublayer_plans_available() else []
    argv = ["damage", "--model", str(tiny_llama), "--data", DATA, "--ppl-data", DATA, *SMALL, *sub,
            "--runs-dir", str(runs), "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "damage.json").read_text())
    for key in ("baseline_ppl", "layers", "correlations", "meta", "best_predictor"):
        assert key in doc
    assert [r["index"] for r in doc["layers"]] == list(range(6))
    assert all({"index", "ppl", "kl"} <= set(r) for r in doc["layers"])
    for key in ("model", "dtype", "device", "data", "seq_len", "samples", "layerlens_version", "git_commit",
                "created", "calibration"):
        assert key in doc["meta"], key
    assert doc["meta"]["seq_len"] == 32 and doc["meta"]["samples"] == 3
    assert {"bi", "magnitude", "cosine", "cka"} <= set(doc["correlations"])
    for c in doc["correlations"].values():
        assert set(c) >= {"spearman", "kendall"}
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    texts = load_texts(DATA, role="eval")
    lib = leave_one_out(lm.model, lm.tokenizer, texts, seq_len=32, max_windows=3, sublayers=bool(sub))
    assert doc["baseline_ppl"] == pytest.approx(lib.baseline_ppl, rel=1e-6)
    for row, u in zip(doc["layers"], lib.of("layer"), strict=True):
        assert row["ppl"] == pytest.approx(u.ppl, rel=1e-5) and row["kl"] == pytest.approx(u.kl, rel=1e-4)
    if sub:
        assert len(doc["attn"]) == 6 and len(doc["mlp"]) == 6
        assert "attn_bi" in doc["correlations"] or "attn_bi" not in LayerReport.__dataclass_fields__
    text = capsys.readouterr().out
    assert "baseline perplexity" in text and "Spearman" in text and "wrote" in text
    # a rerun reads every unit back
    assert main(argv) == 0
    assert "0 removals computed" in capsys.readouterr().out


def test_damage_with_a_given_report_and_a_bad_window(tiny_llama, tmp_path, capsys):
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    report = analyze(lm.model, lm.tokenizer, load_texts(DATA), CaptureConfig(samples=4, seq_len=32))
    report.save(tmp_path / "r" / "report.json")
    rc = main(["damage", "--model", str(tiny_llama), "--report", str(tmp_path / "r"), "--ppl-data", DATA, *SMALL,
               "--no-kl", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "damage.json").read_text())
    assert all(r["kl"] is None for r in doc["layers"]) and doc["meta"]["kl"] is False
    rc = main(["damage", "--model", str(tiny_llama), "--ppl-data", DATA, "--samples", "2", "--seq-len", "100000",
               "--device", "cpu", "--out", str(tmp_path / "x"), "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2
    assert "--seq-len" in capsys.readouterr().err


def _reports(tiny_llama, tmp_path):
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    texts = load_texts(DATA).texts
    paths = []
    for name, chunk in (("plays_a", texts[:20]), ("plays_b", texts[-20:]), ("plays_c", texts[10:30])):
        report = analyze(lm.model, lm.tokenizer, TextSet(tuple(chunk), name, name), CaptureConfig(samples=6, seq_len=32))
        paths.append(report.save(tmp_path / name / "report.json"))
    return paths


def _slow_tau(a, b):
    s = nx = ny = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            dx = (a[i] > a[j]) - (a[i] < a[j])
            dy = (b[i] > b[j]) - (b[i] < b[j])
            s += dx * dy
            nx += dx != 0
            ny += dy != 0
    return s / math.sqrt(nx * ny)


def test_compare_reports_side_by_side(tiny_llama, tmp_path, capsys):
    paths = _reports(tiny_llama, tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, paths), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Kendall tau" in text and "plays_a" in text and "plays_b" in text
    doc = json.loads((out / "compare.json").read_text())
    reports = [LayerReport.load(p) for p in paths]
    assert doc["labels"] == ["plays_a", "plays_b", "plays_c"]
    for a in range(3):
        for b in range(3):
            assert doc["kendall_tau"][a][b] == pytest.approx(_slow_tau(reports[a].bi, reports[b].bi), abs=1e-12)
    # rank 1 = the lowest BI
    for r, rep in enumerate(reports):
        assert doc["ranks"][r][min(range(6), key=lambda i: rep.bi[i])] == 1
    assert (out / "compare_heatmap.html").stat().st_size > 1000
    fig = json.loads((out / "compare_heatmap.json").read_text())
    assert fig["data"][0]["type"] == "heatmap" and len(fig["data"][0]["z"]) == 3
    comp = compare_reports(reports, doc["labels"])
    assert doc["top_k"] == [list(comp.lowest(r)) for r in range(3)]
    assert comp.rank_difference().sum(axis=0) == pytest.approx([0.0] * 6)


def test_compare_errors_are_one_sentence(tiny_llama, tiny_model_factory, tmp_path, capsys):
    paths = _reports(tiny_llama, tmp_path)
    assert main(["compare", str(paths[0])]) == 2
    assert "at least two reports" in capsys.readouterr().err
    five = load_model(str(tiny_model_factory("llama", num_layers=5)), device="cpu", dtype="float32")
    analyze(five.model, five.tokenizer, load_texts(DATA), CaptureConfig(samples=2, seq_len=32)).save(tmp_path / "five.json")
    assert main(["compare", str(paths[0]), str(tmp_path / "five.json")]) == 2
    assert "different layer counts" in capsys.readouterr().err


def test_sweep_draws_the_oracle_curve(tiny_llama, tmp_path):
    from layerlens import damage
    from layerlens.data import calibration_tokens
    from layerlens.plans import make_plan

    damage._ORDERS.clear()
    out = tmp_path / "sw"
    rc = main(["sweep", "--model", str(tiny_llama), "--strategies", "bi,oracle", "--ratios", "0,0.2,0.4",
               "--data", DATA, "--ppl-data", DATA, "--mmlu", "none", *SMALL, "--runs-dir", str(tmp_path / "runs"),
               "--out", str(out)])
    assert rc == 0
    rows = [r for r in json.loads((out / "sweep.json").read_text())["rows"] if r["strategy"] == "oracle"]
    assert [r["n_removed"] for r in rows] == [0, 1, 2]
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    tokens = calibration_tokens(lm.tokenizer, load_texts(DATA), 4, 32)
    damage._ORDERS.clear()
    plan = make_plan("oracle", None, n=2, model=lm.model, tokenizer=lm.tokenizer, token_lists=tokens, num_layers=6)
    assert rows[2]["removed_layers"] == ",".join(map(str, plan.remove))
    assert rows[1]["removed_layers"] == str(plan.params["order"][0])
