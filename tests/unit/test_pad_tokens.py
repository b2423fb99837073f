"""A pad token added to the tokenizer without resizing the model (issue 14 item 11): its id lies past the
embedding matrix, and padded batches used to crash with a raw IndexError. Padded positions are masked, so
they are filled with a valid id and every number equals the one without that pad token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from layerlens import compare
from layerlens.data import TextSet, batches, pad_id
from layerlens.evaluation import mmlu
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, analyze
from layerlens.plans import make_plan
from layerlens.questions import load_questions

MMLU_SAMPLE = str(Path(__file__).parents[1] / "data" / "mmlu_sample.jsonl")


@pytest.fixture(scope="module")
def models(tiny_llama):
    """(plain, with an added pad token): the same model twice, the second tokenizer with a NEW pad token
    (as some ``AutoTokenizer`` classes add one) whose id is the vocabulary size: no embedding row."""
    plain = load_model(str(tiny_llama), device="cpu")
    added = load_model(str(tiny_llama), device="cpu")
    added.tokenizer.add_special_tokens({"pad_token": "<|added-pad|>"})
    assert added.tokenizer.pad_token_id == added.model.get_input_embeddings().num_embeddings  # out of range
    return plain, added


@pytest.fixture(scope="module")
def texts(sample_texts) -> TextSet:
    return TextSet(tuple(sample_texts), "test", "test paragraphs")


def test_pad_id_is_always_inside_the_embedding(models):
    plain, added = models
    assert pad_id(plain.tokenizer) == plain.tokenizer.pad_token_id  # a valid pad id is kept
    assert pad_id(added.tokenizer) == added.tokenizer.eos_token_id  # the added one is not used
    (batch,) = list(batches(added.tokenizer, [[5, 6, 7], [8]], batch_size=2))
    assert batch.input_ids.max() < added.model.get_input_embeddings().num_embeddings
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_id_without_pad_or_eos_is_zero():
    class Bare:
        vocab_size, pad_token_id, eos_token_id = 10, None, None

    class PastTheEnd:
        vocab_size, pad_token_id, eos_token_id = 10, 12, 11

    assert pad_id(Bare()) == 0 and pad_id(PastTheEnd()) == 0


def test_analyze_with_an_added_pad_token_equals_the_numbers_without_padding(models, texts):
    plain, added = models
    padded = CaptureConfig(samples=8, seq_len=128, batch_size=4)  # texts of 48..128 tokens: padded batches
    rep = analyze(added.model, added.tokenizer, texts, padded)  # raised IndexError before the fix
    same = analyze(plain.model, plain.tokenizer, texts, padded)
    unpadded = analyze(plain.model, plain.tokenizer, texts, CaptureConfig(samples=8, seq_len=128, batch_size=1))
    assert rep.meta["tokens"] == same.meta["tokens"] == unpadded.meta["tokens"]
    for name in ("cosine", "cka", "bi", "magnitude"):
        np.testing.assert_array_equal(rep.array(name), same.array(name), err_msg=name)  # masked: bit for bit
        np.testing.assert_allclose(rep.array(name), unpadded.array(name), atol=2e-5, err_msg=name)


def test_mmlu_with_an_added_pad_token(models):
    plain, added = models
    questions = load_questions(MMLU_SAMPLE, limit=8)
    a = mmlu(added.model, added.tokenizer, questions, batch_size=4)
    b = mmlu(plain.model, plain.tokenizer, questions, batch_size=4)
    assert a.choices == b.choices and a.loglikelihoods == b.loglikelihoods


def test_quick_compare_with_an_added_pad_token(models):
    _, added = models
    plan = make_plan("manual", None, layers=(2,), num_layers=added.info.num_layers)
    result = compare.quick_compare(added.model, added.tokenizer, plan, "The king said")
    assert result.pruned.tokens_per_s > 0
