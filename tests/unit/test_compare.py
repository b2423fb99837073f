"""The quick before/after comparison (layerlens.compare): the numbers of the plain library calls, speed as a
median of interleaved runs with its spread, the original measured once, progress step by step."""

from __future__ import annotations

import statistics

import pytest
import torch

from layerlens import compare
from layerlens.data import load_texts
from layerlens.evaluation import perplexity
from layerlens.plans import make_plan
from layerlens.surgery import apply_plan


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from layerlens.loading import load_model

    return load_model(str(tiny_llama), device="cpu")


@pytest.fixture
def plan(loaded):
    return make_plan("manual", None, layers=(2, 3), num_layers=loaded.info.num_layers)


def _param_sum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


SPEED_KEYS = ["tokens_per_s", "tokens_per_s_spread", "spread", "tokens_per_s_q1", "tokens_per_s_q3",
              "tokens_per_s_min", "tokens_per_s_max", "tokens_per_s_runs", "runs", "warmup_runs", "new_tokens",
              "prompt_tokens", "device", "dtype", "threads"]


def test_quick_compare_is_perplexity_and_timed_generation_of_both_models(loaded, plan):
    model, tok = loaded.model, loaded.tokenizer
    texts = load_texts("default", role="eval")
    before = _param_sum(model)
    result = compare.quick_compare(model, tok, plan, "The king said")
    assert _param_sum(model) == before  # the original is never modified
    assert result.original.perplexity == float(perplexity(model, tok, texts, seq_len=128, max_windows=4).perplexity)
    assert result.pruned.perplexity == float(
        perplexity(apply_plan(model, plan), tok, texts, seq_len=128, max_windows=4).perplexity)
    assert result.pruned.surgery_s >= 0 and result.original.surgery_s is None
    assert result.original.tokens_per_s > 0 and result.pruned.tokens_per_s > 0
    assert result.paired and result.speedup > 0
    d = result.to_dict()
    assert list(d["original"]) == ["windows", "seq_len", "perplexity", "generation", "text_tokens"] + SPEED_KEYS
    assert list(d["pruned"]) == list(d["original"]) + ["surgery_s", "speedup", "speedup_paired"]
    o = d["original"]
    assert (o["windows"], o["seq_len"], o["text_tokens"], o["runs"], o["new_tokens"]) == (4, 128, 16, 5, 6)
    assert o["prompt_tokens"] == len(tok("The king said")["input_ids"])
    assert (o["device"], o["dtype"], o["spread"]) == ("cpu", "float32", "half the interquartile range")
    assert o["threads"] == compare.quick_threads() >= 1
    runs = o["tokens_per_s_runs"]
    assert len(runs) == 5 and o["tokens_per_s"] == statistics.median(runs)
    assert o["tokens_per_s_min"] <= o["tokens_per_s_q1"] <= o["tokens_per_s"] <= o["tokens_per_s_q3"] <= o["tokens_per_s_max"]
    assert o["tokens_per_s_spread"] == pytest.approx((o["tokens_per_s_q3"] - o["tokens_per_s_q1"]) / 2)
    given = compare.quick_compare(model, tok, plan, "The king said", baseline=compare.Baseline(1.5))
    assert given.original.perplexity == 1.5 and given.pruned.perplexity == result.pruned.perplexity


@pytest.mark.parametrize("layers, merge", [((2, 3), ()), ((0,), ()), ((4, 5), ()), ((), ((1, 2, 3),)),
                                           ((), ((3, 4), (0, 1)))])
def test_pruned_perplexity_from_the_first_changed_layer_is_bit_identical(loaded, layers, merge):
    """The layers before a plan's first change are the original's: their recorded inputs feed the rest."""
    from layerlens.plans import PrunePlan

    model, tok = loaded.model, loaded.tokenizer
    hooks = [dict(m._forward_pre_hooks) for m in model.modules()]
    baseline = compare.quick_baseline(model, tok)
    assert [dict(m._forward_pre_hooks) for m in model.modules()] == hooks  # recorded on a private view
    assert baseline.perplexity == compare.quick_perplexity(model, tok)
    assert len(baseline.layer_inputs) == loaded.info.num_layers
    plan = PrunePlan(num_layers=loaded.info.num_layers, method="merge" if merge else "remove", remove=layers,
                     merge=merge, strategy="manual")
    pruned = apply_plan(model, plan)
    n_layers = len(pruned.model.layers)
    assert compare.quick_perplexity(pruned, tok, baseline=baseline, plan=plan) == compare.quick_perplexity(pruned, tok)
    assert len(pruned.model.layers) == n_layers  # the tail ran on a private view


def test_no_layer_inputs_kept_above_the_size_cap(loaded, monkeypatch):
    monkeypatch.setattr(compare, "BASELINE_MAX_BYTES", 1000)
    baseline = compare.quick_baseline(loaded.model, loaded.tokenizer)
    assert baseline.layer_inputs == () and baseline.perplexity == compare.quick_perplexity(loaded.model, loaded.tokenizer)


def test_speed_is_the_median_of_interleaved_runs_after_a_warm_up(loaded, plan, monkeypatch):
    """Issue 14 item 3: several timed runs per model after an untimed warm-up, the models alternating
    (o,p then p,o), the median and half the interquartile range reported (was: one 16-token reading)."""
    model, tok = loaded.model, loaded.tokenizer
    calls = []
    fake = {True: iter([10.0, 11.0, 30.0, 12.0, 13.0]), False: iter([20.0, 1.0, 22.0, 24.0, 26.0])}

    def spy(m, tokenizer, enc, new_tokens):
        calls.append(("o" if m is model else "p", new_tokens, torch.get_num_threads()))
        if new_tokens == compare.QUICK_NEW_TOKENS:
            return 1.0, " text"
        return next(fake[m is model]), ""

    monkeypatch.setattr(compare, "generation_speed", spy)
    result = compare.quick_compare(model, tok, plan, "The king said")
    assert [(who, n) for who, n, _ in calls] == [("o", 16), ("p", 16)] + [
        ("o", 6), ("p", 6), ("p", 6), ("o", 6), ("o", 6), ("p", 6), ("p", 6), ("o", 6), ("o", 6), ("p", 6)]
    assert result.original.tokens_per_s == 12.0 and result.pruned.tokens_per_s == 22.0  # medians
    assert result.original.speed.runs == (10.0, 11.0, 30.0, 12.0, 13.0)
    assert result.original.speed.quartiles == (11.0, 13.0) and result.original.speed.plus_minus == 1.0
    assert result.pruned.speed.quartiles == (20.0, 24.0)  # the outlier 1.0 hardly moves them
    assert result.speedup == statistics.median([2.0, 1 / 11, 22 / 30, 2.0, 2.0])  # per-round pairs
    assert result.original.generation == result.pruned.generation == " text"


def test_timing_runs_with_one_core_left_free_and_restores_threads(loaded, plan, monkeypatch):
    """Two OpenMP threads on a busy 2-core CPU made generation 2-6x slower (bench/bench_quick.py)."""
    seen = []
    real = compare.generation_speed

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(compare, "generation_speed", spy)
    monkeypatch.setattr(compare.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = compare.quick_compare(loaded.model, loaded.tokenizer, plan, "The king said")
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(old)
    assert seen and set(seen) == {1}
    assert result.original.speed.threads == result.pruned.speed.threads == 1


def test_a_cached_original_is_not_measured_again(loaded, plan, monkeypatch):
    model, tok = loaded.model, loaded.tokenizer
    first = compare.quick_compare(model, tok, plan, "The king said")
    measured = []
    real = compare.generation_speed

    def spy(m, *args):
        measured.append(m is model)
        return real(m, *args)

    monkeypatch.setattr(compare, "generation_speed", spy)
    monkeypatch.setattr(compare, "quick_baseline", lambda m, t: pytest.fail("the original measured again"))
    other = make_plan("manual", None, layers=(1,), num_layers=loaded.info.num_layers)
    again = compare.quick_compare(model, tok, other, "The king said", original=first.original,
                                  baseline=compare.Baseline(first.original.perplexity))
    assert measured and not any(measured)  # only the pruned model generated
    assert again.original == first.original and not again.paired
    assert again.speedup == pytest.approx(again.pruned.tokens_per_s / first.original.tokens_per_s)
    assert again.to_dict()["pruned"]["speedup_paired"] is False


def test_progress_names_every_step(loaded, plan):
    steps = []
    compare.quick_compare(loaded.model, loaded.tokenizer, plan, "The king said",
                          progress=lambda done, total, label: steps.append((done, total, label)))
    totals = {t for _, t, _ in steps}
    assert len(totals) == 1 and steps[-1] == (totals.pop(), steps[-1][1], "Done")
    assert [d for d, _, _ in steps] == sorted(d for d, _, _ in steps) and steps[0][0] == 0
    labels = " | ".join(label for _, _, label in steps)
    for part in ("Pruning", "Original model: perplexity", "Pruned model: perplexity", "warm-up",
                 "Timing generation: run 5 of 5"):
        assert part in labels
    assert len(steps) == steps[-1][1] + 1  # one call per step, and the final one


def test_quick_windows_are_tokenized_once_per_tokenizer(loaded, monkeypatch):
    """The held-out text took 0.65 s to tokenize at every Apply on the default model."""
    compare.quick_perplexity(loaded.model, loaded.tokenizer)
    monkeypatch.setattr(compare, "eval_texts", lambda: pytest.fail("tokenized again"))
    value = compare.quick_perplexity(loaded.model, loaded.tokenizer)
    texts = load_texts("default", role="eval")
    assert value == float(perplexity(loaded.model, loaded.tokenizer, texts, seq_len=128, max_windows=4).perplexity)


def test_speed_statistics():
    s = compare.Speed((5.0, 1.0, 4.0, 2.0, 100.0), 8, 3, "cpu", "float32", 1)
    assert s.median == 4.0 and s.quartiles == (2.0, 5.0) and s.plus_minus == 1.5
    d = s.to_dict()
    assert (d["tokens_per_s"], d["tokens_per_s_min"], d["tokens_per_s_max"], d["runs"]) == (4.0, 1.0, 100.0, 5)
    one = compare.Speed((7.0,), 8, 3, "cpu", "float32", 1)
    assert one.median == 7.0 and one.plus_minus == 0.0


def test_generation_speed_counts_exactly_the_new_tokens(loaded):
    enc = loaded.tokenizer("Hello there", return_tensors="pt")
    speed, text = compare.generation_speed(loaded.model, loaded.tokenizer, dict(enc), 5)
    assert speed > 0 and isinstance(text, str)


def test_an_empty_prompt_is_one_sentence(loaded, plan):
    from layerlens.errors import LayerLensError

    with pytest.raises(LayerLensError, match="prompt is empty"):
        compare.quick_compare(loaded.model, loaded.tokenizer, plan, "")


def test_measure_original_is_the_original_side_of_a_comparison(loaded, plan):
    """What the dashboard measures in the background before the first Apply: the same perplexity and text
    as the original's side of quick_compare, with its own timed runs, and only the original generating."""
    model, tok = loaded.model, loaded.tokenizer
    steps = []
    alone = compare.measure_original(model, tok, "The king said", progress=lambda d, t, s: steps.append((d, t)))
    both = compare.quick_compare(model, tok, plan, "The king said")
    assert alone.perplexity == both.original.perplexity
    assert alone.generation == both.original.generation
    assert len(alone.speed.runs) == compare.QUICK_SPEED.runs and alone.tokens_per_s == alone.speed.median
    assert alone.surgery_s is None
    assert steps[-1][0] == steps[-1][1] and all(d <= t for d, t in steps)
    assert len(steps) == 1 + 1 + compare.QUICK_SPEED.runs + 1  # perplexity, warm-up, timed runs, done
