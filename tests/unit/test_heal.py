"""Healing a pruned model with LoRA (peft): training works, the original never changes, export reloads."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerlens.errors import LayerLensError
from layerlens.heal import HealConfig, cut_neighbours, heal, heal_plan, lora_targets
from layerlens.loading import load_model
from layerlens.plans import PrunePlan
from layerlens.surgery import apply_plan

FAST = dict(seq_len=32, batch_size=2, eval_windows=2, eval_every=5, seconds=None)


@pytest.fixture
def lm(tiny_llama):
    return load_model(str(tiny_llama), device="cpu")


@pytest.fixture
def texts(sample_texts):
    return sample_texts[:24], sample_texts[24:]


def _fingerprint(model):
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().numpy().tobytes())
    flags = [p.requires_grad for p in model.parameters()]
    types = [type(m).__name__ for m in model.modules()]
    return h.hexdigest(), flags, types


def test_cut_neighbours_and_targets():
    plan = PrunePlan(8, "remove", remove=(3, 4))
    assert cut_neighbours(plan) == (2, 3)  # kept 2 (below) and 5 (above) -> new indices 2, 3
    assert cut_neighbours(PrunePlan(8, "merge", merge=((5, 6),))) == (5, 6)  # the merged base 5, layer 7 -> 6


def test_lm_loss_decreases_and_the_original_is_untouched(lm, texts):
    before = _fingerprint(lm.model)
    plan = PrunePlan(6, "remove", remove=(4, 5))
    result = heal(apply_plan(lm.model, plan), lm.tokenizer, *texts,
                  HealConfig(loss="lm", steps=30, lr=3e-3, **FAST), plan=plan)
    first, last = result.curve[0][1], sum(v for _, v in result.curve[-5:]) / 5
    assert last < first
    assert result.ppl_after <= result.ppl_before
    assert result.steps == 30 and result.tokens == 30 * 2 * 32
    assert _fingerprint(lm.model) == before  # weights, requires_grad flags and module types
    assert not any("lora" in name for name, _ in lm.model.named_parameters())
    assert not any("lora" in name.lower() for name, _ in result.model.named_modules())  # merged, unwrapped


def test_distillation_from_the_original_keeps_it_bit_identical(lm, texts):
    before = _fingerprint(lm.model)
    plan = PrunePlan(6, "remove", remove=(2, 3))
    result = heal(apply_plan(lm.model, plan), lm.tokenizer, *texts,
                  HealConfig(loss="kd", steps=15, lr=3e-3, targets="cut", **FAST), teacher=lm.model, plan=plan)
    assert result.curve[-1][1] < result.curve[0][1]
    assert all(".layers.1." in t or ".layers.2." in t for t in result.targets)  # next to the cut only
    assert _fingerprint(lm.model) == before


def test_merged_export_reloads_with_identical_logits_and_cached_generation(lm, texts, tmp_path):
    plan = PrunePlan(6, "remove", remove=(1,))
    healed = heal(apply_plan(lm.model, plan), lm.tokenizer, *texts,
                  HealConfig(loss="both", steps=8, lr=3e-3, **FAST), teacher=lm.model, plan=plan).model
    healed.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = lm.tokenizer("The king said to his daughter", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(healed(ids).logits, again(ids).logits)
        a = again.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        b = again.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_a_stop_keeps_the_best_checkpoint(lm, texts):
    plan = PrunePlan(6, "remove", remove=(4,))
    calls = {"n": 0}

    def stop_after_12() -> bool:
        calls["n"] += 1
        return calls["n"] > 12

    result = heal(apply_plan(lm.model, plan), lm.tokenizer, *texts,
                  HealConfig(loss="lm", steps=100, lr=3e-3, **FAST), plan=plan, stop=stop_after_12)
    assert result.stopped == "stopped" and result.steps == 12
    best_ppl = min(p for _, p, _ in result.evals)
    assert result.best_step == next(s for s, p, _ in result.evals if p == best_ppl)
    assert result.ppl_after == pytest.approx(best_ppl, rel=1e-4)  # the merged model is the best checkpoint


def test_watch_sees_the_live_curve_and_checkpoints(lm, texts):
    """The dashboard draws the loss and the held-out checkpoints while training (issue 15)."""
    plan = PrunePlan(6, "remove", remove=(4,))
    seen: list[tuple[int, int]] = []
    result = heal(apply_plan(lm.model, plan), lm.tokenizer, *texts, HealConfig(loss="lm", steps=10, **FAST),
                  plan=plan, watch=lambda curve, evals: seen.append((len(curve), len(evals))))
    assert seen[0] == (0, 1)  # before the first step: the pruned model's checkpoint (step 0)
    assert [n for n, _ in seen] == list(range(11)) and seen[-1][1] == 3  # checkpoints at steps 0, 5, 10
    assert len(result.curve) == 10


def test_a_finished_result_is_read_back_not_retrained(lm, texts, tmp_path):
    plan = PrunePlan(6, "remove", remove=(0,))
    config = HealConfig(loss="kd", steps=6, lr=3e-3, **FAST)
    first = heal_plan(lm.model, lm.tokenizer, plan, *texts, config, runs_dir=tmp_path)
    assert not first.meta.get("cached")
    second = heal_plan(lm.model, lm.tokenizer, plan, *texts, config, runs_dir=tmp_path)
    assert second.meta["cached"] and second.curve == first.curve
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(first.model(ids).logits, second.model(ids).logits, atol=1e-6)


@pytest.mark.parametrize(("config", "message"), [
    (dict(steps=0), "`steps` must be at least 1"),
    (dict(lr=-1e-3), "`lr` must be a positive"),
    (dict(lora_rank=10_000), "at most the hidden size"),
    (dict(steps=None, seconds=None), "Give a budget"),
    (dict(loss="mse"), "`loss` must be one of"),
])
def test_bad_configs_get_one_sentence(lm, texts, config, message):
    plan = PrunePlan(6, "remove", remove=(4,))
    with pytest.raises(LayerLensError, match=message):
        heal(apply_plan(lm.model, plan), lm.tokenizer, *texts, HealConfig(**{**FAST, "steps": 5, **config}),
             teacher=lm.model, plan=plan)


def test_no_training_text_and_a_foreign_teacher_are_refused(lm, texts, tiny_model_factory):
    plan = PrunePlan(6, "remove", remove=(4,))
    with pytest.raises(LayerLensError, match="training text"):
        heal(apply_plan(lm.model, plan), lm.tokenizer, ["short"], texts[1], HealConfig(steps=2, **FAST),
             teacher=lm.model)
    other = load_model(str(tiny_model_factory("gpt2")), device="cpu").model
    other.resize_token_embeddings(other.config.vocab_size + 7)
    with pytest.raises(LayerLensError, match="vocabulary differs"):
        heal(apply_plan(lm.model, plan), lm.tokenizer, *texts, HealConfig(steps=2, **FAST), teacher=other)


def test_targets_are_the_projections_of_the_chosen_layers(lm):
    names = lora_targets(lm.model, (1,))
    assert names and all(".layers.1." in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} >= {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}


def test_a_sweep_heals_every_pruned_point_and_reads_it_back(lm, texts, tmp_path):
    from layerlens.sweep import SweepConfig, sweep

    config = SweepConfig(strategies=("reverse",), ratios=(0.0, 0.34), seq_len=32, max_windows=2,
                         heal=HealConfig(loss="lm", steps=10, lr=3e-3, **FAST))
    first = sweep(lm.model, lm.tokenizer, None, config, ppl_texts=texts[1], heal_texts=texts[0],
                  runs_dir=tmp_path)
    frame = first.frame
    assert list(frame["healed"]) == [False, True, False, True]  # a healed row after each pruned row
    assert frame["perplexity"].iloc[0] == frame["perplexity"].iloc[1]  # nothing removed: nothing to heal
    pruned, healed = frame["perplexity"].iloc[2], frame["perplexity"].iloc[3]
    assert healed < pruned  # the best checkpoint is kept, never worse than the pruned model
    assert first.meta["heal"]["steps"] == 10
    again = sweep(lm.model, lm.tokenizer, None, config, ppl_texts=texts[1], heal_texts=texts[0], runs_dir=tmp_path)
    assert again.frame["cached"].all() and list(again.frame["perplexity"]) == list(frame["perplexity"])
