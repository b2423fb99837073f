"""`layerlens heal`: a merged, plain-transformers folder with the heal record; read back; adapter; errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerlens.cli as cli
from layerlens.export import skip_recorded_sublayers
from layerlens.plans import PrunePlan


@pytest.fixture
def data(tmp_path, sample_texts):
    train, held_out = tmp_path / "train.txt", tmp_path / "held_out.txt"
    train.write_text("\n\n".join(sample_texts[:24]), encoding="utf-8")
    held_out.write_text("\n\n".join(sample_texts[24:]), encoding="utf-8")
    return ["--data", str(train), "--eval-data", str(held_out), "--seq-len", "32", "--eval-windows", "2",
            "--eval-every", "4", "--heal-batch-size", "2", "--device", "cpu", "--runs-dir", str(tmp_path / "runs")]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_heal_writes_a_merged_model_with_its_record_and_reads_back(tiny_llama, data, tmp_path, capsys):
    out = tmp_path / "healed"
    assert run("heal", "--model", tiny_llama, "--remove", "4,5", "--steps", "8", "--loss", "both", *data,
               "--out", out) == 0
    first = capsys.readouterr().out
    assert "healed: 8 steps" in first and "LoRA merged" in first
    record = json.loads((out / "layerlens_plan.json").read_text())
    heal = record["heal"]
    assert heal["loss"] == "both" and heal["steps"] == 8 and heal["tokens"] == 8 * 2 * 32
    assert heal["ppl_after"] <= heal["ppl_before"] and heal["curve"][0][0] == 1 and len(heal["curve"]) == 8
    assert record["plan"]["remove"] == [4, 5]
    model = AutoModelForCausalLM.from_pretrained(out)  # no peft needed
    assert model.config.num_hidden_layers == 4
    assert not any("lora" in n for n, _ in model.named_parameters())

    again = tmp_path / "again"
    assert run("heal", "--model", tiny_llama, "--remove", "4,5", "--steps", "8", "--loss", "both", *data,
               "--out", again) == 0
    assert "read back from the runs folder" in capsys.readouterr().out
    ids = torch.tensor([[3, 7, 11, 13]])
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(again)
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-6)
    assert run("eval", "--model", out, "--device", "cpu", "--ppl-data", data[3], "--seq-len", "32",
               "--max-windows", "2", "--mmlu", "none", "--out", tmp_path / "ev") == 0  # any folder evaluates
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["perplexity"] > 0


def test_heal_a_plan_that_only_drops_sublayers(tiny_llama, data, tmp_path, capsys):
    """Dropping attention/MLP sublayers is pruning too: healed like a layer removal, and the saved folder
    (dropped sublayers as zeroed output projections) reloads with the healed model's logits."""
    out = tmp_path / "healed"
    assert run("heal", "--model", tiny_llama, "--drop-attn", "1,3", "--drop-mlp", "4", "--steps", "4",
               "--loss", "kd", *data, "--out", out) == 0
    assert "healed: 4 steps" in capsys.readouterr().out
    record = json.loads((out / "layerlens_plan.json").read_text())
    assert record["plan"]["drop_attn"] == [1, 3] and record["plan"]["drop_mlp"] == [4]
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.num_hidden_layers == 6 and not plain.model.layers[1].self_attn.o_proj.weight.any()
    skipped = skip_recorded_sublayers(AutoModelForCausalLM.from_pretrained(out), out)
    ids = torch.tensor([[3, 7, 11, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, skipped(ids).logits, atol=1e-5)
    empty = tmp_path / "empty_plan.json"
    empty.write_text(PrunePlan(6, "remove").to_json(), encoding="utf-8")
    assert run("heal", "--model", tiny_llama, "--plan", empty, "--steps", "2", *data, "--out", tmp_path / "x") == 2
    assert "drops no sublayer" in capsys.readouterr().err


def test_adapter_only_writes_the_peft_adapter(tiny_llama, data, tmp_path):
    out = tmp_path / "adapter"
    assert run("heal", "--model", tiny_llama, "--remove", "1", "--steps", "3", "--loss", "lm", *data,
               "--adapter-only", "--out", out) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "layerlens_plan.json"} <= names
    assert "model.safetensors" not in names
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "2", "--lr", "-1"], "--lr must be a positive"),
    (["--steps", "2", "--lora-rank", "100000"], "at most the hidden size"),
])
def test_bad_input_gets_one_sentence(tiny_llama, data, tmp_path, capsys, extra, message):
    assert run("heal", "--model", tiny_llama, "--remove", "1", *extra, *data, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sweep_heal_seconds_adds_a_healed_row_beside_each_pruned_row(tiny_llama, data, tmp_path):
    import pandas as pd

    out = tmp_path / "sw"
    assert run("sweep", "--model", tiny_llama, "--strategies", "reverse", "--ratios", "0,0.34",
               "--heal-seconds", "3", "--heal-loss", "lm", "--mmlu", "none", "--max-windows", "2",
               "--ppl-data", data[3], "--data", data[1], "--seq-len", "32", "--device", "cpu",
               "--runs-dir", tmp_path / "runs", "--out", out) == 0
    frame = pd.read_csv(out / "sweep.csv")
    assert list(frame["healed"]) == [False, True, False, True]
    assert frame["perplexity"].iloc[0] == frame["perplexity"].iloc[1]  # nothing removed: nothing healed
    assert frame["perplexity"].iloc[3] <= frame["perplexity"].iloc[2]  # the best checkpoint, never worse
