"""Few-shot MMLU: shared examples per subject (left out of the scoring) and the per-subject prefix KV cache,
whose log-likelihoods and choices equal scoring every full prompt from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerlens.errors import DataError, LayerLensError
from layerlens.evaluation import EvalBatch, MMLUTask, harness_max_length, mmlu, mmlu_prompt, model_logits
from layerlens.loading import load_model
from layerlens.questions import load_questions

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def questions():
    return load_questions(str(DATA / "mmlu_sample.jsonl"))  # 40 questions, 4 subjects


def _same(a, b):
    assert a.choices == b.choices and a.n == b.n
    for x, y in zip(a.loglikelihoods, b.loglikelihoods, strict=True):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-4)


def long_model(arch: str) -> torch.nn.Module:
    """A tiny random model of ``arch`` with room for few-shot prompts (the shared ones have 256 positions)."""
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    room = {"n_positions": 4096} if arch == "gpt2" else {"max_position_embeddings": 4096}
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **room), dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights: logits far from uniform, so choices are no near-ties
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(3.0)
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt", "gpt_neox", "qwen3", "phi3", "mistral"])
def test_prefix_cache_equals_full_prompts(tokenizer_dir, questions, letter_tokenizer, arch):
    from transformers import AutoTokenizer

    model = long_model(arch)
    dev = list(questions)
    for tok in (AutoTokenizer.from_pretrained(tokenizer_dir), letter_tokenizer):  # 4 rows per question, 1 row
        for shots in (0, 2):
            task = MMLUTask(tok, questions, shots=shots, dev=dev, batch_size=3, prefix_cache=True,
                            max_length=harness_max_length(model, tok))
            assert task.n_prefix_rows == sum(len(r) for r in task.reads)  # every row continues its prefix
            assert len({b.prefix_key for b in task.batches}) == len(questions.subjects)
            cached = mmlu(model, tok, questions, shots=shots, dev=dev, batch_size=3, prefix_cache=True)
            full = mmlu(model, tok, questions, shots=shots, dev=dev, batch_size=3, prefix_cache=False)
            _same(cached, full)


def test_prefix_split_never_moves_a_token_boundary(tiny_llama, questions):
    """The prefix is the subject's common TOKEN prefix: the prompt's string prefix "...\\n\\n" tokenizes
    differently on its own than inside the prompt, and the cached rows still equal the harness's tokens."""
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    tok, dev = lm.tokenizer, list(questions)
    task = MMLUTask(tok, questions, shots=2, dev=dev, batch_size=4, max_length=10_000)
    for batch, reads in zip(task.batches, task.reads, strict=True):
        if batch.prefix is None:
            continue
        for row, row_reads in reads:
            qi = row_reads[0].question
            ctx = task._prompt_ids[qi][0]
            ids = batch.prefix.tolist() + batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            assert ctx[:len(ids)] == ids[:len(ctx)]  # the model sees the prompt's own tokens, in order
            assert batch.position_ids[row, 0] == len(batch.prefix)


def test_truncated_prompts_run_whole(questions, letter_tokenizer):
    model = long_model("llama")
    dev = list(questions)
    lengths = sorted(len(letter_tokenizer(mmlu_prompt(q, [d for d in dev if d.subject == q.subject][:2]))["input_ids"])
                     for q in questions)
    max_length = lengths[len(lengths) // 2]  # half the prompts are left-truncated
    cached = MMLUTask(letter_tokenizer, questions, shots=2, dev=dev, batch_size=3, max_length=max_length)
    plain = MMLUTask(letter_tokenizer, questions, shots=2, dev=dev, batch_size=3, max_length=max_length,
                     prefix_cache=False)
    assert 0 < cached.n_prefix_rows < len(cached.questions)
    from layerlens.evaluation import plain_forward

    _same(cached.run(plain_forward(model)), plain.run(plain_forward(model)))


def test_examples_are_first_k_of_subject_and_excluded(questions):
    from transformers import AutoTokenizer  # noqa: F401 - only the tokenizer of the task matters here

    dev = list(questions)
    by_subject = {s: [q for q in dev if q.subject == s] for s in questions.subjects}

    class Tok:  # a whitespace tokenizer is enough to build the task
        def __call__(self, text, verbose=False):
            return {"input_ids": [hash(w) % 1000 for w in text.split(" ")]}

        pad_token_id, eos_token_id = 0, 0

    task = MMLUTask(Tok(), questions, shots=3, dev=dev)
    excluded = {q for qs in by_subject.values() for q in qs[:3]}
    assert set(task.excluded) == excluded and len(task.questions) == len(questions) - 3 * len(by_subject)
    assert not excluded & set(task.questions)
    with pytest.raises(DataError, match="`shots=11`"):
        MMLUTask(Tok(), questions, shots=11, dev=dev)
    # a separate dev set excludes nothing
    other = [q for q in dev if q not in set(list(questions)[::2])]
    task = MMLUTask(Tok(), list(questions)[::2], shots=1, dev=other)
    assert task.excluded == ()


def test_prefix_batch_needs_the_cache(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    batch = EvalBatch(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[3, 4]]),
                      prefix=torch.tensor([1, 2, 3]), prefix_key="x")
    with pytest.raises(LayerLensError, match="plain_forward"):
        model_logits(lm.model, batch)


def test_sweep_few_shot_equals_each_pruned_model_from_scratch(questions, letter_tokenizer):
    from layerlens.plans import PrunePlan
    from layerlens.surgery import apply_plan
    from layerlens.sweep import SweepConfig, sweep

    model = long_model("llama")
    dev = list(questions)
    plans = tuple(("manual", len(r) / 6, PrunePlan(6, "remove", remove=r, strategy="manual"))
                  for r in [(), (4,), (4, 5), (1, 4, 5)])
    frame = sweep(model, letter_tokenizer, None, SweepConfig(plans=plans, shots=2, mmlu_batch_size=4),
                  questions=questions, dev=dev).frame
    for (_, _, plan), row in zip(plans, frame.itertuples(), strict=True):
        ref = mmlu(apply_plan(model, plan), letter_tokenizer, questions, shots=2, dev=dev, prefix_cache=False)
        assert row.mmlu_accuracy == pytest.approx(ref.accuracy, abs=1e-12)
        assert row.mmlu_prob_correct == pytest.approx(ref.mean_prob_correct, rel=1e-4)
