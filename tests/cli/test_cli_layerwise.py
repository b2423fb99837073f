"""--max-memory / --layerwise on analyze, eval, sweep and prune: the same files and numbers as in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from layerlens import cli
from layerlens.plans import PrunePlan

DATA = Path(__file__).parents[1] / "data"
MMLU = str(DATA / "mmlu_sample.jsonl")
TEXT = str(DATA / "shakespeare_sample.txt")
DATA_ARGS = ["--samples", "8", "--seq-len", "48", "--batch-size", "3", "--device", "cpu", "--dtype", "float32"]
EVAL_ARGS = ["--ppl-data", TEXT, "--max-windows", "3", "--mmlu", MMLU, "--mmlu-limit", "1"]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_analyze_over_the_budget_runs_layerwise_with_the_same_report(tiny_llama, tmp_path):
    runs = ["--runs-dir", tmp_path / "runs"]
    assert run("analyze", "--model", tiny_llama, *DATA_ARGS, *runs, "--out", tmp_path / "mem") == 0
    assert run("analyze", "--model", tiny_llama, *DATA_ARGS, *runs, "--max-memory", "1GB",
               "--out", tmp_path / "fits") == 0
    assert run("analyze", "--model", tiny_llama, *DATA_ARGS, *runs, "--max-memory", "100KB",
               "--out", tmp_path / "lw") == 0
    mem, fits, lw = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("mem", "fits", "lw"))
    assert mem["meta"]["execution"] == fits["meta"]["execution"] == "in_memory"
    assert lw["meta"]["execution"] == "layerwise" and lw["meta"]["layerwise"]["bytes_read"] > 0
    assert lw["meta"]["layerwise"]["spill_bytes"] > 0
    assert not list((tmp_path / "runs" / "layerwise").iterdir())  # spilled in the runs folder, then removed
    for name, tol in (("bi", 1e-4), ("cosine", 1e-4), ("magnitude", 1e-4), ("cka", 2e-3)):
        assert np.allclose(np.array(mem[name]), np.array(lw[name]), atol=tol), name


def test_eval_layerwise_with_a_plan_equals_in_memory(tiny_model_factory, tmp_path):
    path = tiny_model_factory("gpt2")
    plan = PrunePlan(6, "merge", merge=((2, 3),), merge_formula="mean")
    (tmp_path / "plan.json").write_text(plan.to_json())
    common = ["--model", path, "--device", "cpu", "--dtype", "float32", "--seq-len", "48", *EVAL_ARGS,
              "--plan", tmp_path / "plan.json", "--runs-dir", tmp_path / "runs"]
    assert run("eval", *common, "--out", tmp_path / "mem") == 0
    assert run("eval", *common, "--layerwise", "--out", tmp_path / "lw") == 0
    mem, lw = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("mem", "lw"))
    assert lw["meta"]["execution"] == "layerwise" and mem["meta"]["execution"] == "in_memory"
    assert lw["perplexity"] == pytest.approx(mem["perplexity"], rel=1e-6)
    assert lw["mmlu"]["accuracy"] == mem["mmlu"]["accuracy"]
    if mem.get("kl") is not None:  # KL(original || pruned) and top-1 agreement from the same pass
        assert lw["kl"] == pytest.approx(mem["kl"], rel=1e-5) and lw["top1_agreement"] == mem["top1_agreement"]
    assert lw["mmlu"]["mean_prob_correct"] == pytest.approx(mem["mmlu"]["mean_prob_correct"], abs=1e-6)


@pytest.mark.parametrize("strategy", ["bi", "attn_bi"])  # whole layers; attention sublayers (zeroed o_proj)
def test_prune_layerwise_writes_the_same_model(tiny_model_factory, tmp_path, strategy):
    path = tiny_model_factory("qwen2")
    common = ["--model", path, "--device", "cpu", "--dtype", "float32", "--strategy", strategy, "--n", "2",
              *DATA_ARGS[:6], "--runs-dir", tmp_path / "runs"]
    assert run("prune", *common, "--out", tmp_path / "mem") == 0
    assert run("prune", *common, "--max-memory", "64KB", "--out", tmp_path / "lw") == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "lw").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mem, lw = (json.loads((tmp_path / d / "layerlens_plan.json").read_text()) for d in ("mem", "lw"))
    assert mem["plan"]["remove"] == lw["plan"]["remove"]
    assert mem["plan"].get("drop_attn") == lw["plan"].get("drop_attn")
    assert bool(lw["plan"].get("drop_attn")) == (strategy == "attn_bi")
    assert lw["meta"]["execution"] == "layerwise" and mem["meta"]["execution"] == "in_memory"


def test_sweep_layerwise_rows_equal_in_memory(tiny_llama, tmp_path):
    common = ["--model", tiny_llama, *DATA_ARGS, *EVAL_ARGS, "--strategies", "bi,reverse",
              "--ratios", "0,0.34", "--runs-dir", tmp_path / "runs"]
    assert run("sweep", *common, "--out", tmp_path / "mem") == 0
    assert run("sweep", *common, "--layerwise", "--out", tmp_path / "lw") == 0
    mem, lw = (pd.read_csv(tmp_path / d / "sweep.csv") for d in ("mem", "lw"))
    assert list(mem.removed_layers.fillna("")) == list(lw.removed_layers.fillna(""))
    assert np.allclose(mem.perplexity, lw.perplexity, rtol=1e-6)
    assert np.allclose(mem.mmlu_accuracy, lw.mmlu_accuracy)
    assert json.loads((tmp_path / "lw" / "sweep.json").read_text())["meta"]["execution"] == "layerwise"


def test_layerwise_refusals_name_the_flags(tiny_llama, tmp_path, capsys):
    rc = run("analyze", "--model", tiny_llama, *DATA_ARGS, "--max-memory", "lots", "--out", tmp_path / "x")
    assert rc == 2 and "--max-memory" in capsys.readouterr().err
    rc = run("prune", "--model", tiny_llama, "--device", "cpu", "--layerwise", "--strategy", "streamline", "--n", "1",
             "--replace", "ffn", "--out", tmp_path / "y")
    err = capsys.readouterr().err
    assert rc == 2 and "--replace" in err and "--max-memory" in err


@pytest.mark.parametrize("plan_args", [["--remove", "1,4"], ["--merge", "2-3"]])
def test_a_bf16_checkpoint_is_saved_in_bf16_by_both_modes(tiny_model_factory, tmp_path, plan_args):
    """`--save-dtype checkpoint` (the default): a bf16 checkpoint analysed in float32 on a CPU is written in
    bf16 again, in memory and layer by layer alike (merges computed in float32 by both, then cast)."""
    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).to(torch.bfloat16).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_factory("llama") / f).exists():
            (src / f).write_bytes((tiny_model_factory("llama") / f).read_bytes())
    common = ["--model", src, "--device", "cpu", "--dtype", "float32", *plan_args, "--runs-dir", tmp_path / "runs"]
    assert run("prune", *common, "--out", tmp_path / "mem") == 0
    assert run("prune", *common, "--layerwise", "--out", tmp_path / "lw") == 0
    assert run("prune", *common, "--save-dtype", "loaded", "--out", tmp_path / "mem32") == 0
    assert run("prune", *common, "--layerwise", "--save-dtype", "loaded", "--out", tmp_path / "lw32") == 0
    for a, b, dtype in (("mem", "lw", torch.bfloat16), ("mem32", "lw32", torch.float32)):
        sa = AutoModelForCausalLM.from_pretrained(tmp_path / a, dtype="auto").state_dict()
        sb = AutoModelForCausalLM.from_pretrained(tmp_path / b, dtype="auto").state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert {v.dtype for v in sa.values()} == {dtype}
        assert json.loads((tmp_path / a / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
        assert json.loads((tmp_path / b / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
        record = json.loads((tmp_path / a / "layerlens_plan.json").read_text())
        assert record["meta"]["export_dtype"] == str(dtype).removeprefix("torch.")
