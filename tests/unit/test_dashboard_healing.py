"""The Heal page's logic (issue 15): its controls as a HealConfig, the before/after table, the gap closed."""

from __future__ import annotations

import math

import pytest

from layerlens.dashboard.healing import comparison_frame, gap_recovered, heal_config
from layerlens.errors import LayerLensError


def _numbers(original=50.0, pruned=400.0, healed=100.0):
    side = lambda ppl, tps: {"perplexity": ppl, "tokens_per_s": tps, "tokens_per_s_spread": 0.5,  # noqa: E731
                             "mmlu_prob_correct": 0.26, "generation": " text"}
    return {"original": side(original, 10.0), "pruned": side(pruned, 13.0), "healed": side(healed, 13.1)}


def test_heal_config_from_the_controls():
    config = heal_config(loss="kd", seconds=60, steps=0, lora_rank=4, lr=1e-3, targets="cut")
    assert config.steps is None and config.seconds == 60.0  # step limit 0: the time budget alone
    assert config.lora_alpha == 8.0 and config.targets == "cut" and config.loss == "kd"
    assert heal_config(loss="lm", seconds=60, steps=7, lora_rank=8, lr=5e-4, targets="all").steps == 7


def test_a_bad_control_is_named_by_its_label():
    with pytest.raises(LayerLensError) as err:
        heal_config(loss="kd", seconds=60, steps=0, lora_rank=100, lr=5e-4, targets="all", hidden_size=64)
    assert str(err.value).startswith("LoRA rank must be at least 1 and at most the hidden size 64")
    assert "`" not in str(err.value)


def test_comparison_frame_has_one_row_per_model_with_units():
    table = comparison_frame(_numbers(), {"original": 30, "pruned": 22, "healed": 22})
    assert list(table["Model"]) == ["Original", "Pruned", "Healed"]
    assert list(table["Layers"]) == ["30", "22", "22"]
    assert table["Perplexity"].tolist() == ["50.00", "400 (8× higher)", "100 (2× higher)"]
    assert table["Speed"].str.endswith("tokens/s").all() and table["MMLU P(correct letter)"].eq("26.0%").all()
    no_mmlu = {k: {**v, "mmlu_prob_correct": None} for k, v in _numbers().items()}
    assert comparison_frame(no_mmlu, {})["MMLU P(correct letter)"].eq("–").all()


def test_gap_recovered_in_log_perplexity():
    assert gap_recovered(_numbers(healed=400.0)) == pytest.approx(0.0)
    assert gap_recovered(_numbers(healed=50.0)) == pytest.approx(1.0)
    assert gap_recovered(_numbers(healed=math.sqrt(50.0 * 400.0))) == pytest.approx(0.5)
    assert gap_recovered(_numbers(pruned=40.0)) is None  # pruning did not hurt: no gap to close
    assert gap_recovered({"original": {"perplexity": 1.0}}) is None
