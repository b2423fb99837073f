"""Leave-one-out damage: equal to pruning + evaluating each model from scratch; correlations equal slow
hand-written Spearman/Kendall; persisted and resumable; the greedy oracle equals a brute-force greedy."""

from __future__ import annotations

import math
import random

import pytest
import torch

from layerlens import damage
from layerlens.damage import Unit, kendall, leave_one_out, metric_correlations, spearman
from layerlens.data import TextSet
from layerlens.evaluation import perplexity, perplexity_windows
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, analyze
from layerlens.plans import PrunePlan, make_plan
from layerlens.surgery import apply_plan

PPL = dict(seq_len=32, max_windows=5, batch_size=2)


@pytest.fixture(scope="module")
def lm(tiny_model_factory):
    return load_model(str(tiny_model_factory("llama")), device="cpu", dtype="float32")


def _slow_kl(model, pruned_model, windows) -> float:
    """Mean over scored positions of sum_v p log(p/q), float64, one window at a time."""
    total, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            p = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
            q = torch.log_softmax(pruned_model(input_ids=w[None]).logits[0, :-1].double(), -1)
            for t in range(p.shape[0]):
                total += float((p[t].exp() * (p[t] - q[t])).sum())
                n += 1
    return total / n


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_layer_equals_pruned_model_from_scratch(tiny_model_factory, sample_texts, arch):
    lm = load_model(str(tiny_model_factory(arch)), device="cpu", dtype="float32")
    m, t = lm.model, lm.tokenizer
    before = _state(m)
    result = leave_one_out(m, t, sample_texts, **PPL)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched
    L = m.config.num_hidden_layers
    rows = result.of("layer")
    assert [r.unit.index for r in rows] == list(range(L))
    base = perplexity(m, t, sample_texts, seq_len=32, max_windows=5).perplexity
    assert result.baseline_ppl == pytest.approx(base, rel=1e-6)
    windows = perplexity_windows(t, sample_texts, 32, 5)
    for r in rows:
        plan = PrunePlan(L, "remove", remove=(r.unit.index,))
        p = apply_plan(m, plan)
        assert r.ppl == pytest.approx(perplexity(p, t, sample_texts, seq_len=32, max_windows=5).perplexity, rel=1e-5)
        assert r.kl == pytest.approx(_slow_kl(m, p, windows), rel=1e-4, abs=1e-6)
        assert r.kl > 0
    # prefix reuse runs fewer layer passes than evaluating each pruned model from scratch
    s = result.stats
    assert s.layer_passes == L + sum(L - 1 - i if i < L - 1 else 1 for i in range(L))
    assert s.layer_passes_from_scratch == L + L * (L - 1)
    naive = leave_one_out(m, t, sample_texts, reuse=False, **PPL)
    for a, b in zip(naive.of("layer"), rows, strict=True):
        assert a.ppl == pytest.approx(b.ppl, rel=1e-5) and a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-6)
    assert naive.stats.layer_passes == naive.stats.layer_passes_from_scratch


def test_base_plan_and_kl_reference(lm, sample_texts):
    """On top of a base plan, each unit's perplexity is base+unit pruned from scratch and the KL is to the base."""
    m, t = lm.model, lm.tokenizer
    L = m.config.num_hidden_layers
    base = PrunePlan(L, "remove", remove=(2, 5))
    result = leave_one_out(m, t, sample_texts, base=base, **PPL)
    assert [r.unit.index for r in result.of("layer")] == [0, 1, 3, 4]
    windows = perplexity_windows(t, sample_texts, 32, 5)
    base_model = apply_plan(m, base)
    for r in result.of("layer"):
        plan = PrunePlan(L, "remove", remove=(2, 5, r.unit.index))
        p = apply_plan(m, plan)
        assert r.ppl == pytest.approx(perplexity(p, t, sample_texts, seq_len=32, max_windows=5).perplexity, rel=1e-5)
        assert r.kl == pytest.approx(_slow_kl(base_model, p, windows), rel=1e-4, abs=1e-6)


def test_persisted_and_resumable(lm, sample_texts, tmp_path):
    m, t = lm.model, lm.tokenizer
    calls = []

    def stop_after_two(done, total, label):
        calls.append(label)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        leave_one_out(m, t, sample_texts, runs_dir=tmp_path, progress=stop_after_two, **PPL)
    assert len(list((tmp_path / "damage" / "units").glob("*.json"))) == 3  # baseline + 2 units
    seen = []
    resumed = leave_one_out(m, t, sample_texts, runs_dir=tmp_path, progress=lambda d, n, s: seen.append(d), **PPL)
    assert resumed.stats.cached == 2 and resumed.stats.computed == 4
    assert seen == [3, 4, 5, 6]
    fresh = leave_one_out(m, t, sample_texts, **PPL)
    for a, b in zip(resumed.units, fresh.units, strict=True):
        assert a.ppl == pytest.approx(b.ppl, rel=1e-6) and a.kl == pytest.approx(b.kl, rel=1e-6)
    again = leave_one_out(m, t, sample_texts, runs_dir=tmp_path, **PPL)
    assert again.stats.computed == 0 and all(u.cached for u in again.units)
    assert again.stats.layer_passes == 0
    # a run without KL does not satisfy one that needs it, but one with KL satisfies one without
    other = leave_one_out(m, t, sample_texts, runs_dir=tmp_path, kl=False, **PPL)
    assert other.stats.computed == 0


def _slow_ranks(x):
    return [sum(1 for y in x if y < v) + (sum(1 for y in x if y == v) + 1) / 2 for v in x]


def _slow_spearman(a, b):
    ra, rb = _slow_ranks(a), _slow_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def _slow_kendall(a, b):
    conc = disc = tx = ty = 0
    n = len(a)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = a[i] - a[j], b[i] - b[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


def test_rank_correlations_equal_slow_references():
    rng = random.Random(0)
    for trial in range(30):
        n = rng.randint(3, 25)
        a = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]  # ties
        b = [rng.random() if trial % 2 else rng.randint(0, 3) for _ in range(n)]
        if len(set(a)) < 2 or len(set(b)) < 2:
            continue
        assert spearman(a, b) == pytest.approx(_slow_spearman(a, b), abs=1e-12)
        assert kendall(a, b) == pytest.approx(_slow_kendall(a, b), abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall([1, 1, 1], [1, 2, 3]))


def test_metric_correlations_against_the_report(lm, sample_texts):
    m, t = lm.model, lm.tokenizer
    report = analyze(m, t, TextSet(tuple(sample_texts[:8]), "t", "t"), CaptureConfig(samples=8, seq_len=32))
    result = leave_one_out(m, t, sample_texts, **PPL)
    corr = metric_correlations(result, report)
    L = report.num_layers
    inc = [r.ppl - result.baseline_ppl for r in result.of("layer")]
    kls = [r.kl for r in result.of("layer")]
    values = {"bi": list(report.bi), "magnitude": list(report.magnitude),
              "cosine": [report.cosine[i][i + 1] for i in range(L)], "cka": [report.cka[i][i + 1] for i in range(L)]}
    assert {"bi", "magnitude", "cosine", "cka"} <= set(corr)
    for name, v in values.items():
        assert corr[name]["spearman"] == pytest.approx(_slow_spearman(v, inc), abs=1e-9)
        assert corr[name]["kendall"] == pytest.approx(_slow_kendall(v, inc), abs=1e-9)
        assert corr[name]["kendall_kl"] == pytest.approx(_slow_kendall(v, kls), abs=1e-9)
        assert corr[name]["n"] == L
    assert corr["bi"]["expected_sign"] == 1 and corr["cosine"]["expected_sign"] == -1
    name, score = damage.best_predictor(corr)
    assert score == max(c["expected_sign"] * c["spearman"] for c in corr.values())
    assert name in values


@pytest.mark.skipif(not damage.sublayer_plans_available(), reason="PrunePlan has no drop_attn/drop_mlp yet")
def test_sublayers_equal_pruned_model_from_scratch(lm, sample_texts):
    m, t = lm.model, lm.tokenizer
    L = m.config.num_hidden_layers
    result = leave_one_out(m, t, sample_texts, sublayers=True, **PPL)
    assert len(result.of("attn")) == L and len(result.of("mlp")) == L
    for r in result.of("attn") + result.of("mlp"):
        plan = PrunePlan(L, "remove", **{"drop_" + r.unit.kind: (r.unit.index,)})
        p = apply_plan(m, plan)
        assert r.ppl == pytest.approx(perplexity(p, t, sample_texts, seq_len=32, max_windows=5).perplexity, rel=1e-5)
        assert r.ppl != pytest.approx(result.baseline_ppl, rel=1e-6) and r.kl > 0  # the sublayer really went
    windows = perplexity_windows(t, sample_texts, 32, 5)
    r = result.of("attn")[3]
    assert r.kl == pytest.approx(_slow_kl(m, apply_plan(m, PrunePlan(L, "remove", drop_attn=(3,))), windows), rel=1e-4)
    # every sublayer's tail starts at its own layer: 2 * sum(L - i) passes besides the layer table
    s = result.stats
    assert s.layer_passes == L + sum(L - 1 - i if i < L - 1 else 1 for i in range(L)) + 2 * sum(L - i for i in range(L))


def test_sublayers_refused_clearly_without_support(lm, sample_texts, monkeypatch):
    monkeypatch.setattr(damage, "sublayer_plans_available", lambda: False)
    with pytest.raises(damage.LayerLensError, match="sublayers"):
        leave_one_out(lm.model, lm.tokenizer, sample_texts, units=[Unit("attn", 0)], **PPL)


def test_oracle_equals_brute_force_greedy(lm, sample_texts):
    m, t = lm.model, lm.tokenizer
    L = m.config.num_hidden_layers
    tokens = [t(x)["input_ids"][:24] for x in sample_texts[:6]]
    windows = damage.windows_from_token_lists(tokens)
    assert windows.shape == (6, 24)

    def ppl(removed):
        p = apply_plan(m, PrunePlan(L, "remove", remove=tuple(removed)))
        with torch.no_grad():
            logits = p(input_ids=windows).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        return float(nll)

    order: list[int] = []
    for _ in range(3):
        cands = [i for i in range(L) if i not in order]
        order.append(min(cands, key=lambda i: (round(ppl(order + [i]), 9), i)))
    damage._ORDERS.clear()
    plan = make_plan("oracle", None, n=3, model=m, tokenizer=t, token_lists=tokens, num_layers=L)
    assert plan.params["order"] == order and plan.remove == tuple(sorted(order))
    smaller = make_plan("oracle", None, ratio=0.34, model=m, tokenizer=t, token_lists=tokens, num_layers=L)
    assert smaller.remove == tuple(sorted(order[:2]))  # the same greedy path (memoised)
    with pytest.raises(damage.PlanError, match="oracle"):
        make_plan("oracle", None, n=2, num_layers=L)


@pytest.mark.skipif(not damage.sublayer_plans_available(), reason="PrunePlan has no drop_attn/drop_mlp yet")
def test_sublayer_metric_correlations(lm, sample_texts):
    m, t = lm.model, lm.tokenizer
    report = analyze(m, t, TextSet(tuple(sample_texts[:8]), "t", "t"), CaptureConfig(samples=8, seq_len=32))
    if getattr(report, "attn_bi", None) is None:
        pytest.skip("the report has no attention/MLP BI yet")
    result = leave_one_out(m, t, sample_texts, sublayers=True, kl=False, **PPL)
    corr = metric_correlations(result, report)
    attn = [r.ppl - result.baseline_ppl for r in result.of("attn")]
    mlp = [r.ppl - result.baseline_ppl for r in result.of("mlp")]
    assert corr["attn_bi"]["spearman"] == pytest.approx(_slow_spearman(list(report.attn_bi), attn), abs=1e-9)
    assert corr["mlp_bi"]["kendall"] == pytest.approx(_slow_kendall(list(report.mlp_bi), mlp), abs=1e-9)
    pooled = corr["sublayer_bi"]
    assert pooled["n"] == 2 * report.num_layers
    assert pooled["kendall"] == pytest.approx(_slow_kendall(list(report.attn_bi) + list(report.mlp_bi), attn + mlp),
                                              abs=1e-9)
    assert "kendall_kl" not in pooled  # no KL measured


def test_oracle_persists_its_measurements(lm, sample_texts, tmp_path, monkeypatch):
    m, t = lm.model, lm.tokenizer
    tokens = [t(x)["input_ids"][:24] for x in sample_texts[:4]]
    damage._ORDERS.clear()
    first = make_plan("oracle", None, n=2, model=m, tokenizer=t, token_lists=tokens, num_layers=6, runs_dir=tmp_path)
    damage._ORDERS.clear()  # a new process: nothing memoised, every measurement read back from the runs folder

    def boom(*a, **k):
        raise AssertionError("a persisted removal was measured again")

    monkeypatch.setattr(damage, "tail_forward", boom)
    monkeypatch.setattr(damage, "plain_forward", boom)
    again = make_plan("oracle", None, n=2, model=m, tokenizer=t, token_lists=tokens, num_layers=6, runs_dir=tmp_path)
    assert again.remove == first.remove and again.params["order"] == first.params["order"]
