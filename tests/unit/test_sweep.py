"""Sweeps: numbers equal to evaluating every pruned model from scratch; reuse; persistence and resume."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from layerlens.data import TextSet
from layerlens.evaluation import mmlu, perplexity
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, analyze
from layerlens.plans import PrunePlan
from layerlens.prefix_reuse import first_affected_layer, plan_ops, schedule_reuse, state_key
from layerlens.questions import load_questions
from layerlens.runs import stable_key
from layerlens.surgery import apply_plan
from layerlens.sweep import SweepConfig, sweep

DATA = Path(__file__).parents[1] / "data"
STRATEGIES = ["bi", "reverse", "sequential", "magnitude"]
RATIOS = [0.0, 0.2, 0.4, 0.6]
PPL = dict(seq_len=48, max_windows=6, ppl_batch_size=4)


@pytest.fixture(scope="module")
def questions():
    return load_questions(str(DATA / "mmlu_sample.jsonl"), limit=3)  # 12 questions, 4 subjects


def _setup(path, sample_texts):
    lm = load_model(str(path), device="cpu", dtype="float32")
    report = analyze(lm.model, lm.tokenizer, TextSet(tuple(sample_texts[:8]), "t", "t"),
                     CaptureConfig(samples=8, seq_len=48, batch_size=4))
    return lm, report


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_sweep_equals_each_pruned_model_from_scratch(tiny_model_factory, sample_texts, questions, arch, tmp_path):
    lm, report = _setup(tiny_model_factory(arch), sample_texts)
    m, t = lm.model, lm.tokenizer
    before, config_before = _state(m), m.config.to_dict()
    result = sweep(m, t, report, SweepConfig(STRATEGIES, RATIOS, mmlu_batch_size=5, **PPL), ppl_texts=sample_texts,
                   questions=questions)
    frame = result.frame
    assert list(frame.columns[:7]) == ["strategy", "ratio", "n_removed", "removed_layers", "perplexity",
                                       "mmlu_accuracy", "seconds"]
    assert sorted(set(frame.ratio)) == sorted(RATIOS)  # one row per requested (strategy, ratio)
    assert len(frame) == len(STRATEGIES) * len(RATIOS)
    # the model is the same object, unchanged
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.config.to_dict() == config_before and len(lm.model.model.layers if arch != "gpt2" else m.transformer.h) == 6
    # prefix reuse really happened and saved layer passes
    s = result.stats
    assert all(n > 0 for n in s.peak_states.values())
    assert s.layer_passes < s.layer_passes_from_scratch
    from layerlens.plans import make_plan

    scratch_results: dict = {}
    for _, row in frame.iterrows():
        plan = make_plan(row.strategy, report, ratio=row.ratio)
        if plan.removed_layers not in scratch_results:  # each distinct pruned model, saved and reloaded
            saved = tmp_path / f"pruned-{len(scratch_results)}"
            apply_plan(m, plan).save_pretrained(saved)
            t.save_pretrained(saved)
            scratch = load_model(str(saved), device="cpu", dtype="float32").model
            scratch_results[plan.removed_layers] = (
                perplexity(scratch, t, sample_texts, seq_len=48, max_windows=6, batch_size=4),
                mmlu(scratch, t, questions, batch_size=5))
        ppl, acc = scratch_results[plan.removed_layers]
        assert row.perplexity == pytest.approx(ppl.perplexity, rel=1e-5)
        assert row.mmlu_accuracy == acc.accuracy
        assert row.mmlu_prob_correct == pytest.approx(acc.mean_prob_correct, rel=1e-5)
        assert row.n_removed == plan.n_removed
        assert row.actual_ratio == pytest.approx(plan.ratio) and row.n_removed == round(row.ratio * 6)
    # ratio 0 is one computation shared by all strategies
    zero = frame[frame.ratio == 0]
    assert zero.perplexity.nunique() == 1


def test_merge_plans_and_no_cache_budget_give_the_same_numbers(tiny_llama, sample_texts, questions):
    lm, report = _setup(tiny_llama, sample_texts)
    m, t = lm.model, lm.tokenizer
    plans = [("manual", 0.0, PrunePlan(6, "remove", remove=())),
             ("manual", 0.33, PrunePlan(6, "merge", merge=((3, 4, 5),))),
             ("manual", 0.17, PrunePlan(6, "merge", merge=((2, 3),), merge_formula="mean")),
             ("manual", 0.33, PrunePlan(6, "remove", remove=(4, 5))),
             ("manual", 0.17, PrunePlan(6, "remove", remove=(1,))),
             ("manual", 0.33, PrunePlan(6, "remove", remove=(1, 2))),  # shares layer 3's input with (1,)
             ("manual", 0.5, PrunePlan(6, "remove", remove=(0, 1, 4))),
             ("manual", 0.33, PrunePlan(6, "remove", remove=(0, 3)))]
    data = dict(ppl_texts=sample_texts, questions=questions)
    fast = sweep(m, t, config=SweepConfig(plans=plans, **PPL), **data).frame
    slow = sweep(m, t, config=SweepConfig(plans=plans, cache_bytes=0, **PPL), **data)
    assert slow.stats.layer_passes == slow.stats.layer_passes_from_scratch
    slow = slow.frame
    # room for one perplexity state (6 windows x 48 tokens x 32 dims x 4 bytes), no MMLU state
    tight = sweep(m, t, config=SweepConfig(plans=plans, cache_bytes=40_000, **PPL), **data)
    assert tight.stats.peak_states["perplexity"] == 1 and tight.stats.peak_states["mmlu"] == 0
    tight = tight.frame
    for (_, a), (_, b), (_, c) in zip(fast.iterrows(), slow.iterrows(), tight.iterrows(), strict=True):
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5) == c.perplexity
        assert a.mmlu_prob_correct == pytest.approx(b.mmlu_prob_correct, rel=1e-5) == c.mmlu_prob_correct
    for (_, row), (_, _, plan) in zip(fast.iterrows(), plans, strict=True):
        ref = perplexity(apply_plan(m, plan), t, sample_texts, seq_len=48, max_windows=6)
        assert row.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
    assert first_affected_layer(plans[1][2]) == 3 and first_affected_layer(plans[0][2]) == 6


class _Stop(Exception):
    pass


def test_interrupted_sweep_resumes_without_recomputing(tiny_llama, sample_texts, questions, tmp_path):
    lm, report = _setup(tiny_llama, sample_texts)
    m, t = lm.model, lm.tokenizer
    calls = {"n": 0}
    m.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    config = SweepConfig(["bi", "reverse"], [0.0, 0.2, 0.4], **PPL)
    kw = dict(ppl_texts=sample_texts, questions=questions, runs_dir=tmp_path)
    reference = sweep(m, t, report, config, **kw).frame
    fresh_calls = calls["n"]
    runs = tmp_path / "resume"
    kw["runs_dir"] = runs

    def stop_after_two(done, total, label):
        if done == 2:
            raise _Stop(label)

    with pytest.raises(_Stop):
        sweep(m, t, report, config, progress=stop_after_two, **kw)
    points = sorted((runs / "sweep" / "points").glob("*.json"))
    assert len(points) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in points}

    calls["n"] = 0
    seen = []
    resumed = sweep(m, t, report, config, progress=lambda d, n, label: seen.append(d), **kw)
    s, resumed = resumed.stats, resumed.frame
    assert (s.cached, s.computed) == (2, s.units - 2)
    assert seen[0] == 3 and seen[-1] == s.units
    assert 0 < calls["n"] < fresh_calls
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in points)  # finished points were not rewritten
    for col in ("perplexity", "mmlu_accuracy", "mmlu_prob_correct"):
        assert list(resumed[col]) == pytest.approx(list(reference[col]), rel=1e-6)

    calls["n"] = 0
    again = sweep(m, t, report, config, **kw).frame
    assert calls["n"] == 0 and again.cached.all()
    assert list(again.perplexity) == pytest.approx(list(reference.perplexity), rel=1e-12)
    # another model (different weights) never reads these points
    other = load_model(str(tiny_llama), device="cpu", dtype="float32").model
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    third = sweep(other, t, report, SweepConfig(["reverse"], [0.2], **PPL), **kw).frame
    assert not third.cached.any()


META_KEYS = {"model", "revision", "dtype", "device", "data", "model_fingerprint", "tasks", "seq_len",
             "max_windows", "shots", "seed", "layerlens_version", "git_commit", "created"}


def test_sweep_config_normalises_lists_and_is_frozen():
    plan = PrunePlan(6, "remove", remove=(1,))
    config = SweepConfig(["bi", "reverse"], [0, 0.2], plans=[["manual", 0.17, plan]], seq_len=32)
    assert config.strategies == ("bi", "reverse") and config.ratios == (0.0, 0.2)
    assert config.plans == (("manual", 0.17, plan),)
    assert config == SweepConfig(("bi", "reverse"), (0.0, 0.2), plans=(("manual", 0.17, plan),), seq_len=32)
    assert hash(SweepConfig(["bi"], [0.1])) == hash(SweepConfig(("bi",), (0.1,)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seq_len = 64
    with pytest.raises(TypeError, match="SweepConfig"):
        sweep(None, None, None, ["bi"])


def test_read_back_returns_finished_points_only_and_runs_no_layer(tiny_llama, sample_texts, questions, tmp_path):
    """compute=False: an interrupted sweep's finished points, in request order, without any forward pass."""
    lm, report = _setup(tiny_llama, sample_texts)
    m, t = lm.model, lm.tokenizer
    config = SweepConfig(["bi", "reverse"], [0.0, 0.2, 0.4], **PPL)
    kw = dict(ppl_texts=sample_texts, questions=questions, runs_dir=tmp_path / "points")
    full = sweep(m, t, report, config, **{**kw, "runs_dir": tmp_path / "reference"})
    reference = full.frame
    assert set(full.meta) == META_KEYS and "meta" not in reference.attrs
    assert (full.meta["seq_len"], full.meta["max_windows"], full.meta["shots"], full.meta["seed"]) == (48, 6, 0, 0)
    distinct = reference.drop_duplicates("removed_layers")
    n = len(distinct)  # distinct pruned models: one perplexity and one MMLU evaluation each

    def refuse(module, _args):
        raise AssertionError(f"read-back ran {type(module).__name__}")

    def read_back():
        handle = torch.nn.modules.module.register_module_forward_pre_hook(refuse)
        try:
            with pytest.raises(AssertionError, match="read-back ran"):  # the hook is live
                m(torch.ones(1, 4, dtype=torch.long))
            return sweep(m, t, report, config, compute=False, **kw)
        finally:
            handle.remove()

    nothing = read_back()
    assert list(nothing.frame.columns) == list(reference.columns) and nothing.frame.empty
    for stop_at in (2, n + 1):  # in the perplexity phase, then one evaluation into MMLU
        def stop(done, total, label, stop_at=stop_at):
            if done == stop_at:
                raise _Stop(label)

        with pytest.raises(_Stop):
            sweep(m, t, report, config, progress=stop, **kw)
        got = read_back()
        assert (got.stats.computed, got.stats.cached, got.stats.layer_passes) == (0, stop_at, 0)
        assert {k: v for k, v in got.meta.items() if k != "created"} == {
            k: v for k, v in full.meta.items() if k != "created"}
        rows = got.frame
        assert rows["cached"].all() and rows["perplexity"].notna().all()
        assert rows["removed_layers"].nunique() == min(stop_at, n)
        if stop_at <= n:
            assert rows["mmlu_accuracy"].isna().all()
        else:  # one MMLU evaluation finished: the rows of one pruned model (each strategy making it)
            assert len(rows) == len(reference)
            assert rows.loc[rows["mmlu_accuracy"].notna(), "removed_layers"].nunique() == 1
        # the same rows, values and order as the finished sweep (request order)
        expect = reference[reference["removed_layers"].isin(set(rows["removed_layers"]))].reset_index(drop=True)
        assert list(rows["strategy"]) == list(expect["strategy"]) and list(rows["ratio"]) == list(expect["ratio"])
        assert list(rows["perplexity"]) == list(expect["perplexity"])
        done_mmlu = rows["mmlu_accuracy"].notna()
        assert list(rows["mmlu_accuracy"][done_mmlu]) == list(expect["mmlu_accuracy"][done_mmlu])
    # the persisted keys: format, model fingerprint, the task's exact tokens and the effective plan only
    for path in (tmp_path / "points" / "sweep" / "points").glob("*.json"):
        point = json.loads(path.read_text())
        plan = point["plan"]
        effective = {k: plan[k] for k in ("num_layers", "method", "remove", "merge")} | {
            "merge_formula": plan["merge_formula"] if plan["method"] == "merge" else None}
        assert path.stem == point["key"] == stable_key(
            {"format": 1, "model": point["model"], "task": point["task"], "plan": effective})


def _distinct_layer_calls(plans):
    """Distinct (state entering layer o, layer o, what is done to it) over all plans: the least work."""
    return len({(state_key(plan_ops(p), o), o, plan_ops(p)[o]) for p in plans for o in p.kept_layers})


def test_schedule_computes_each_shared_prefix_once_and_respects_memory():
    rng = random.Random(0)
    for _ in range(40):
        L = rng.randrange(3, 10)
        order = rng.sample(range(L), L)  # BI-like: each plan removes the next lowest-scoring layer too
        plans = [PrunePlan(L, "remove", remove=())]
        for _ in range(rng.randrange(1, 8)):
            plans.append(PrunePlan(L, "remove", remove=tuple(rng.sample(range(L), rng.randrange(1, L)))))
        if L > 4:
            plans.append(PrunePlan(L, "merge", merge=((1, 2),)))
        steps = schedule_reuse(plans, None)
        assert sorted(s.plan_index for s in steps) == list(range(len(plans)))
        least = _distinct_layer_calls(plans)
        assert least <= sum(s.layer_passes for s in steps) <= least + len(plans)
        nested = [PrunePlan(L, "remove", remove=tuple(order[:k])) for k in range(L)]
        least = _distinct_layer_calls(nested)
        assert least <= sum(s.layer_passes for s in schedule_reuse(nested, None)) <= least + L
        # replay: every start state was recorded by an earlier run and not yet released
        held, peak = set(), 0
        for s in steps:
            ops = plan_ops(plans[s.plan_index])
            if s.start:
                assert state_key(ops, s.start) in held and s.start in plans[s.plan_index].kept_layers
            held |= {state_key(ops, o) for o in s.record}
            peak = max(peak, len(held))
            held -= set(s.release)
        assert not held
        limited = schedule_reuse(plans, 1)
        held, peak = set(), 0
        for s in limited:
            ops = plan_ops(plans[s.plan_index])
            assert not s.start or state_key(ops, s.start) in held
            held |= {state_key(ops, o) for o in s.record}
            peak = max(peak, len(held))
            held -= set(s.release)
        assert peak <= 1
        assert sum(s.layer_passes for s in schedule_reuse(plans, 0)) == sum(p.num_layers_after for p in plans)
    # the bundled model's BI order, 9 ratios 0..0.4: 134 layer calls instead of 216, the least possible
    bi_order = [14, 13, 25, 17, 15, 12, 26, 16, 3, 2, 11, 4]
    plans = [PrunePlan(30, "remove", remove=tuple(bi_order[:round(r * 30)]))
             for r in (0, .05, .1, .15, .2, .25, .3, .35, .4)]
    assert sum(s.layer_passes for s in schedule_reuse(plans, None)) == _distinct_layer_calls(plans) == 134
