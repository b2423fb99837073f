"""The quick before/after comparison (layerlens.compare): the numbers of the plain library calls."""

from __future__ import annotations

import pytest

from layerlens import compare
from layerlens.data import load_texts
from layerlens.evaluation import perplexity
from layerlens.plans import make_plan
from layerlens.surgery import apply_plan


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from layerlens.loading import load_model

    return load_model(str(tiny_llama), device="cpu")


def _param_sum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def test_quick_compare_is_perplexity_and_timed_generation_of_both_models(loaded):
    model, tok = loaded.model, loaded.tokenizer
    plan = make_plan("manual", None, layers=(2, 3), num_layers=loaded.info.num_layers)
    texts = load_texts("default", role="eval")
    before = _param_sum(model)
    result = compare.quick_compare(model, tok, plan, "The king said")
    assert _param_sum(model) == before  # the original is never modified
    assert result.original.perplexity == float(perplexity(model, tok, texts, seq_len=128, max_windows=4).perplexity)
    assert result.pruned.perplexity == float(
        perplexity(apply_plan(model, plan), tok, texts, seq_len=128, max_windows=4).perplexity)
    assert result.pruned.surgery_s >= 0 and result.original.surgery_s is None
    assert result.original.tokens_per_s > 0 and result.pruned.tokens_per_s > 0
    d = result.to_dict()
    assert list(d["original"]) == ["windows", "seq_len", "new_tokens", "perplexity", "tokens_per_s", "generation"]
    assert list(d["pruned"]) == list(d["original"]) + ["surgery_s"]
    assert (d["pruned"]["windows"], d["pruned"]["seq_len"], d["pruned"]["new_tokens"]) == (4, 128, 16)
    given = compare.quick_compare(model, tok, plan, "The king said", perplexity_before=1.5)
    assert given.original.perplexity == 1.5 and given.pruned.perplexity == result.pruned.perplexity


def test_generation_speed_counts_exactly_the_new_tokens(loaded):
    enc = loaded.tokenizer("Hello there", return_tensors="pt")
    speed, text = compare.generation_speed(loaded.model, loaded.tokenizer, dict(enc), 5)
    assert speed > 0 and isinstance(text, str)
