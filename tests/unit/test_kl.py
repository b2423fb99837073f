"""KL(original ‖ pruned) and top-1 agreement in the perplexity pass, against a slow independent loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layerlens.data import TextSet
from layerlens.errors import LayerLensError
from layerlens.evaluation import PerplexityTask, perplexity, plain_forward
from layerlens.plans import PrunePlan
from layerlens.surgery import apply_plan
from layerlens.sweep import SweepConfig, sweep

SEQ, WINDOWS = 32, 5


def slow_kl(original, pruned, tokenizer, texts, seq_len, max_windows) -> tuple[float, float, int]:
    """One window at a time, full forwards of both models, torch's kl_div summed in float64."""
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    n = min(len(ids) // seq_len, max_windows)
    total, agree, count = 0.0, 0, 0
    for w in range(n):
        x = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]])
        with torch.no_grad():
            p = original(input_ids=x).logits[0, :-1].double()
            q = pruned(input_ids=x).logits[0, :-1].double()
        log_p, log_q = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
        total += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += seq_len - 1
    return total / count, agree / count, count


def test_empty_plan_kl_zero_agreement_one(arch_model, tokenizer_dir, sample_texts):
    from transformers import AutoTokenizer

    _, model = arch_model
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    n = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    same = apply_plan(model, PrunePlan(n, "remove", remove=(), strategy="manual"))
    res = perplexity(same, tok, sample_texts, seq_len=SEQ, max_windows=WINDOWS, original=model)
    assert res.kl is not None and abs(res.kl) < 1e-6
    assert res.top1_agreement == 1.0
    plain = perplexity(model, tok, sample_texts, seq_len=SEQ, max_windows=WINDOWS)
    assert plain.kl is None and plain.top1_agreement is None
    assert res.perplexity == pytest.approx(plain.perplexity, rel=1e-6)


def test_kl_equals_slow_reference(arch_model, tokenizer_dir, sample_texts):
    from transformers import AutoTokenizer

    arch, model = arch_model
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    n = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    small = apply_plan(model, PrunePlan(n, "remove", remove=(1, 3), strategy="manual"))
    res = perplexity(small, tok, sample_texts, seq_len=SEQ, max_windows=WINDOWS, batch_size=2, original=model)
    kl, agree, count = slow_kl(model, small, tok, sample_texts, SEQ, WINDOWS)
    assert res.n_tokens == count
    assert kl > 1e-3, arch  # removing two of six layers of a random model changes it: the test can fail
    assert res.kl == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert res.top1_agreement == pytest.approx(agree, abs=1.0 / count)  # a near-tie may flip in float32
    assert 0.0 <= res.top1_agreement < 1.0


def test_kl_task_without_reference_refuses(tiny_llama, sample_texts):
    from layerlens.loading import load_model

    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    task = PerplexityTask(lm.tokenizer, sample_texts, seq_len=SEQ, max_windows=2, kl=True)
    with pytest.raises(LayerLensError, match="keep_reference"):
        task.run(plain_forward(lm.model))
    assert task.identity() != PerplexityTask(lm.tokenizer, sample_texts, seq_len=SEQ, max_windows=2).identity()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sweep_rows_carry_kl_equal_to_scratch(tiny_model_factory, sample_texts, arch, tmp_path):
    from layerlens.loading import load_model

    lm = load_model(str(tiny_model_factory(arch)), device="cpu", dtype="float32")
    m, t = lm.model, lm.tokenizer
    L = m.config.num_hidden_layers
    plans = [("manual", 0.0, PrunePlan(L, "remove", remove=(), strategy="manual")),
             ("manual", 1 / 6, PrunePlan(L, "remove", remove=(4,), strategy="manual")),
             ("manual", 2 / 6, PrunePlan(L, "remove", remove=(4, 5), strategy="manual")),
             ("manual", 3 / 6, PrunePlan(L, "remove", remove=(2, 4, 5), strategy="manual"))]
    texts = TextSet(tuple(sample_texts), "t", "t")
    config = SweepConfig(plans=tuple(plans), seq_len=SEQ, max_windows=WINDOWS, ppl_batch_size=2)
    frame = sweep(m, t, None, config, ppl_texts=texts, runs_dir=tmp_path).frame
    assert {"kl", "top1_agreement"} <= set(frame.columns)
    for (_, _, plan), row in zip(plans, frame.itertuples(), strict=True):
        ref = perplexity(apply_plan(m, plan), t, texts, seq_len=SEQ, max_windows=WINDOWS, original=m)
        assert row.kl == pytest.approx(ref.kl, rel=1e-4, abs=1e-6)
        assert row.top1_agreement == pytest.approx(ref.top1_agreement, abs=1e-9)
    assert frame.kl.iloc[0] < 1e-6 and frame.top1_agreement.iloc[0] == 1.0
    assert frame.kl.iloc[-1] > frame.kl.iloc[1] > 0
    # read back from the persisted points: same values
    again = sweep(m, t, None, config, ppl_texts=texts, runs_dir=tmp_path).frame
    assert again.cached.all()
    assert list(again.kl) == list(frame.kl) and not any(math.isnan(v) for v in again.kl)
