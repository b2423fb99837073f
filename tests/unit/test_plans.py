"""PrunePlan validation/serialisation and every strategy against independent reference formulas."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerlens.errors import LayerLensError, PlanError
from layerlens.plans import (
    PrunePlan,
    make_plan,
    plan_summary,
    ratio_to_count,
    slm_plan,
)
from layerlens.report import LayerReport


def synthetic_report(num_layers: int = 8, seed: int = 0, ties: bool = False) -> LayerReport:
    """A report with random but self-consistent numbers (cosine from random states, CKA in [0, 1])."""
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(num_layers + 1, 16))
    states = np.cumsum(states * rng.uniform(0.2, 1.5, size=(num_layers + 1, 1)), axis=0)  # residual-like
    unit = states / np.linalg.norm(states, axis=1, keepdims=True)
    cos = np.clip(unit @ unit.T, -1, 1)
    cka = np.clip(np.abs(cos) ** 1.5 * rng.uniform(0.9, 1.0, size=cos.shape), 0, 1)
    cka = (cka + cka.T) / 2
    np.fill_diagonal(cka, 1.0)
    bi = 1 - np.array([cos[i, i + 1] for i in range(num_layers)])
    mag = rng.uniform(0, 1, size=num_layers)
    if ties:
        bi = np.round(bi, 1)
        mag = np.round(mag, 1)
    block = [
        [math.acos(max(-1.0, min(1.0, cos[i, i + n]))) / math.pi for i in range(num_layers - n + 1)]
        for n in range(1, num_layers + 1)
    ]
    return LayerReport(
        num_layers=num_layers,
        bi=tuple(bi),
        cosine=tuple(map(tuple, cos)),
        cka=tuple(map(tuple, cka)),
        cka_estimator="exact",
        block_distance=tuple(map(tuple, block)),
        magnitude=tuple(mag),
    )


# -- PrunePlan ---------------------------------------------------------------------------------------------
def test_plan_basics_and_json_round_trip():
    p = PrunePlan(
        num_layers=8, method="remove", remove=[5, 1, 3], strategy="bi", params={"target_ratio": 0.4}
    )
    assert p.remove == (1, 3, 5) and p.n_removed == 3 and p.ratio == 3 / 8
    assert p.kept_layers == (0, 2, 4, 6, 7)
    assert p.layer_map == {0: 0, 1: None, 2: 1, 3: None, 4: 2, 5: None, 6: 3, 7: 4}
    q = PrunePlan.from_json(p.to_json())
    assert q == p and hash(q) == hash(p)
    d = json.loads(p.to_json())
    assert d["removed_layers"] == [1, 3, 5] and d["kept_layers"] == [0, 2, 4, 6, 7] and d["ratio"] == 0.375
    assert PrunePlan.from_json(json.dumps({"plan": d, "report": {}})) == p  # a layerlens_plan.json


def test_merge_plan_views_and_summary():
    p = PrunePlan(num_layers=8, method="merge", merge=[(5, 6, 7), (1, 2)], merge_formula="mean")
    assert p.merge == ((1, 2), (5, 6, 7))
    assert p.removed_layers == (2, 6, 7) and p.n_removed == 3 and p.kept_layers == (0, 1, 3, 4, 5)
    assert p.layer_map[5] == 4 and p.layer_map[6] is None
    s = plan_summary(p)
    assert [r["status"] for r in s] == [
        "kept",
        "merged",
        "merged",
        "kept",
        "kept",
        "merged",
        "merged",
        "merged",
    ]
    assert [r["into"] for r in s] == [None, 1, 1, None, None, 5, 5, 5]
    assert [r["new_index"] for r in s] == [0, 1, None, 2, 3, 4, None, None]
    assert plan_summary(PrunePlan(4, "remove", remove=(2,)))[2] == {
        "layer": 2,
        "status": "removed",
        "into": None,
        "new_index": None,
    }
    assert PrunePlan.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=0, method="remove"), "empty model"),
        (dict(num_layers=4, method="remove", remove=(0, 1, 2, 3)), "removes all 4 layers"),
        (dict(num_layers=4, method="remove", remove=(4,)), "out of range"),
        (dict(num_layers=4, method="remove", remove=(-1,)), "out of range"),
        (dict(num_layers=4, method="remove", remove=(1, 1)), "listed twice"),
        (dict(num_layers=6, method="merge", merge=((1, 3),)), "not consecutive"),
        (dict(num_layers=6, method="merge", merge=((1, 2), (2, 3))), "overlaps"),
        (dict(num_layers=6, method="merge", merge=((2,),)), "fewer than two"),
        (dict(num_layers=4, method="merge", merge=((0, 1, 2, 3),)), "removes all"),  # ratio 3/4 is fine...
        (dict(num_layers=4, method="drop"), "Unknown plan method"),
        (dict(num_layers=4, method="remove", remove=(1,), merge=((2, 3),)), "cannot also"),
        (dict(num_layers=4, method="remove", remove=("1",)), "not an integer"),
        (dict(num_layers=4, method="remove", remove=(1.0,)), "not an integer"),
        (dict(num_layers=4, method="merge", merge=((1, 2),), merge_formula="avg"), "Unknown merge formula"),
    ],
)
def test_invalid_plans_raise_one_sentence(kwargs, message):
    if kwargs.get("merge") == ((0, 1, 2, 3),):
        # merging all four into one keeps one layer: valid (ratio 0.75)
        assert PrunePlan(**kwargs).ratio == 0.75
        return
    with pytest.raises(PlanError, match=message) as info:
        PrunePlan(**kwargs)
    text = str(info.value)
    assert text.endswith(".") and "\n" not in text
    assert isinstance(info.value, LayerLensError)


def test_ratio_to_count_is_python_round_and_refuses_bad_ratios():
    assert ratio_to_count(0.25, 6) == 2 and ratio_to_count(0.75, 6) == 4  # 1.5 -> 2, 4.5 -> 4 (half even)
    assert ratio_to_count(0.0, 6) == 0 and ratio_to_count(0.1, 30) == 3
    for bad in (-0.1, 1.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(PlanError, match=r"outside \[0, 1\)"):
            ratio_to_count(bad, 6)
    with pytest.raises(PlanError, match="removes all"):
        ratio_to_count(0.95, 6)  # rounds to 6


# -- strategies against independent references --------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.0, 0.125, 0.25, 0.5, 0.7])
def test_ranking_strategies_match_numpy(seed, ratio):
    rep = synthetic_report(8, seed, ties=seed % 2 == 0)
    L, k = 8, round(ratio * 8)
    for strategy, values in (("bi", rep.bi), ("magnitude", rep.magnitude)):
        plan = make_plan(strategy, rep, ratio=ratio)
        expect = sorted(np.argsort(np.asarray(values), kind="stable")[:k].tolist())
        assert list(plan.remove) == expect and plan.strategy == strategy
        assert plan.ratio == k / L and plan.params["target_ratio"] == ratio
    assert make_plan("reverse", rep, ratio=ratio).remove == tuple(range(L - k, L))
    assert make_plan("sequential", None, ratio=ratio, num_layers=L).remove == tuple(range(k))
    rnd = make_plan("random", None, ratio=ratio, num_layers=L, seed=seed)
    assert rnd.remove == tuple(sorted(random.Random(seed).sample(range(L), k))) and rnd.params["seed"] == seed


def test_bi_ties_go_to_lower_index():
    rep = synthetic_report(6, 0)
    flat = LayerReport(
        6, (0.2, 0.1, 0.1, 0.3, 0.1, 0.5), rep.cosine, rep.cka, "exact", rep.block_distance, rep.magnitude
    )
    assert make_plan("bi", flat, n=2).remove == (1, 2)
    assert make_plan("bi", flat, n=3).remove == (1, 2, 4)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_block_and_streamline_spans(seed, n):
    rep = synthetic_report(8, seed)
    bd = rep.array("block_distance")[n - 1, : 8 - n + 1]
    i_block = int(np.argmin(bd))
    assert make_plan("block", rep, n=n).remove == tuple(range(i_block, i_block + n))
    cos = rep.array("cosine")
    i_stream = int(np.argmax([cos[i, i + n] for i in range(8 - n + 1)]))
    plan = make_plan("streamline", rep, n=n)
    assert plan.remove == tuple(range(i_stream, i_stream + n))
    assert plan.params["cosine"] == pytest.approx(cos[i_stream, i_stream + n])
    assert make_plan("block", rep, ratio=n / 8).remove == tuple(range(i_block, i_block + n))


def reference_slm(sim: np.ndarray, L: int, threshold: float, keep_last: bool) -> list[tuple[int, ...]]:
    """Port of the published SLM loop (high/low), with ``sim(low, high)`` from the report and the last
    window committed when it reaches layer 0."""
    high = L - 2 if keep_last else L - 1
    low = high - 1
    records = []
    while low >= 0:
        if sim[low + 1, high + 1] >= threshold:
            low -= 1
        else:
            if low + 1 != high:
                records.append(tuple(range(low + 1, high + 1)))
                high = low
                low = high - 1
            else:
                high -= 1
                low -= 1
    if high - low >= 2 and high >= 1:
        records.append(tuple(range(low + 1, high + 1)))
    return sorted(records)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("keep_last", [True, False])
@pytest.mark.parametrize("criterion", ["cka", "cosine"])
def test_slm_matches_reference_loop(seed, keep_last, criterion):
    rep = synthetic_report(10, seed)
    sim = rep.array(criterion)
    for t in (-1.0, 0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
        plan = slm_plan(rep, t, criterion=criterion, keep_last=keep_last, formula="keep_top")
        assert list(plan.merge) == reference_slm(sim, 10, t, keep_last), t
        assert plan.method == "merge" and plan.merge_formula == "keep_top" and plan.params["threshold"] == t
        if keep_last:
            assert 9 not in {i for g in plan.merge for i in g}


def test_slm_hand_made_patches():
    # states h0..h6 (6 layers); outputs of layers 1,2,3 very similar; layers 4 and 5 similar too.
    L = 6
    cka = np.full((L + 1, L + 1), 0.2)
    np.fill_diagonal(cka, 1.0)
    for a, b in ((2, 3), (2, 4), (3, 4), (5, 6)):
        cka[a, b] = cka[b, a] = 0.95
    rep = synthetic_report(L, 0)
    rep = LayerReport(
        L, rep.bi, rep.cosine, tuple(map(tuple, cka)), "exact", rep.block_distance, rep.magnitude
    )
    # keep_last: anchor 4 (output h5) vs layer 3 (h4): 0.2 -> no window; anchor 3 (h4): layers 2, 1 merge.
    assert slm_plan(rep, 0.9, criterion="cka").merge == ((1, 2, 3),)
    # without keep_last, anchor 5 (h6) absorbs layer 4 (h5), then anchor 3 absorbs 2 and 1
    assert slm_plan(rep, 0.9, criterion="cka", keep_last=False).merge == ((1, 2, 3), (4, 5))
    assert slm_plan(rep, 0.96, criterion="cka").merge == ()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.0, 0.1, 0.2, 0.3, 0.45, 0.6])
def test_slm_target_ratio_finds_best_reachable_ratio(seed, target):
    rep = synthetic_report(10, seed)
    plan = slm_plan(rep, target_ratio=target, criterion="cka")
    assert plan.ratio <= target + 1e-12
    t = plan.params["threshold"]
    assert plan.params["target_ratio"] == target
    assert slm_plan(rep, t, criterion="cka").merge == plan.merge  # the reported threshold reproduces the plan
    # no threshold on a fine grid (nor any similarity value) gets closer to the target from below
    cka = rep.array("cka")
    grid = set(np.linspace(-1, 1, 801).tolist()) | set(cka.flatten().tolist())
    best = max(
        r for r in (slm_plan(rep, float(g), criterion="cka").ratio for g in grid if -1 <= g <= 1) if r <= target + 1e-12
    )
    assert plan.ratio == pytest.approx(best)


def test_strategy_argument_errors():
    rep = synthetic_report(6, 0)
    with pytest.raises(PlanError, match=r"outside \[-1, 1\]"):
        slm_plan(rep, 1.5)
    with pytest.raises(PlanError, match=r"outside \[-1, 1\]"):
        make_plan("slm", rep, threshold=-2)
    with pytest.raises(PlanError, match=r"outside \[0, 1\)"):
        make_plan("bi", rep, ratio=1.0)
    with pytest.raises(PlanError, match="removes every layer"):
        make_plan("bi", rep, n=6)
    with pytest.raises(PlanError, match="exactly one"):
        make_plan("bi", rep)
    with pytest.raises(PlanError, match="run the analysis"):
        make_plan("bi", None, ratio=0.3, num_layers=6)
    with pytest.raises(PlanError, match="Unknown strategy"):
        make_plan("prune-it", rep, ratio=0.3)
    with pytest.raises(PlanError, match="forward passes"):
        make_plan("slm", rep, threshold=0.9, criterion="output")
    with pytest.raises(PlanError, match="LaCo"):
        make_plan("laco", rep, threshold=0.9)
    with pytest.raises(PlanError, match="does not take"):
        make_plan("bi", rep, ratio=0.3, criterion="cka")
    assert make_plan("manual", None, layers=[4, 2], num_layers=6).remove == (2, 4)
    assert make_plan("manual", rep, merge=[[1, 2]], formula="mean").merge_formula == "mean"


def test_forward_pass_strategies_need_threshold_model_and_data():
    for kwargs, what, fn in [({"criterion": "output"}, "SLM with the output criterion", "slm_output_plan"),
                             ({}, "LaCo", "laco_plan")]:
        strategy = "slm" if kwargs else "laco"
        with pytest.raises(PlanError, match=rf"^{what} needs a similarity threshold"):
            make_plan(strategy, None, num_layers=6, **kwargs)
        with pytest.raises(PlanError, match=rf"^{what} probes the model .*token_lists \(or use {fn}\)\.$"):
            make_plan(strategy, None, threshold=0.9, num_layers=6, tokenizer=None, **kwargs)


# -- property test -------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(0, 9),
    idx=st.lists(st.integers(-2, 10), max_size=10),
    groups=st.lists(st.tuples(st.integers(-1, 9), st.integers(1, 4)), max_size=3),
)
def test_plans_are_valid_or_refused(L, idx, groups):
    for kwargs in (
        dict(method="remove", remove=tuple(idx)),
        dict(method="merge", merge=tuple(tuple(range(s, s + w)) for s, w in groups)),
    ):
        try:
            p = PrunePlan(num_layers=L, **kwargs)
        except PlanError as exc:
            assert str(exc).endswith(".")
            continue
        kept, gone = set(p.kept_layers), set(p.removed_layers)
        assert kept | gone == set(range(L)) and not kept & gone and kept
        assert 0 <= p.ratio < 1 and p.n_removed == len(gone)
        new = [p.layer_map[i] for i in sorted(kept)]
        assert new == list(range(len(kept)))
        assert PrunePlan.from_json(p.to_json()) == p


def test_slm_target_ratio_with_an_identical_pair_records_a_replayable_threshold():
    """A similarity of exactly 1.0 merges at every valid threshold: 'merge nothing' has no threshold in
    [-1, 1], so the plan records None instead of an out-of-range 1.0000000000000002."""
    d = synthetic_report(6).to_dict()
    d["cka"][3][4] = d["cka"][4][3] = 1.0
    report = LayerReport.from_dict(d)
    small = slm_plan(report, target_ratio=0.1, criterion="cka")
    assert small.merge == () and small.params["threshold"] is None
    for target in (0.2, 0.5):
        plan = slm_plan(report, target_ratio=target, criterion="cka")
        t = plan.params["threshold"]
        assert -1.0 <= t <= 1.0 and plan.ratio <= target
        assert slm_plan(report, threshold=t, criterion="cka").merge == plan.merge  # replay gives the same plan


# -- issue 14: the merge defaults, and where CKA and cosine disagree -------------------------------------
def test_merge_defaults_are_cosine_and_keep_top_but_old_plan_files_replay_task_vector():
    from layerlens.plans import DEFAULT_MERGE_FORMULA, FORMULA_NOTES, MERGE_FORMULAS, get_strategy

    rep = synthetic_report(10, 1)
    plan = slm_plan(rep, 0.5)
    assert plan.params["criterion"] == "cosine" and plan.merge_formula == "keep_top" == DEFAULT_MERGE_FORMULA
    assert plan.merge == slm_plan(rep, 0.5, criterion="cosine", formula="keep_top").merge
    made = make_plan("slm", rep, threshold=0.5)
    assert (made.params["criterion"], made.merge_formula) == ("cosine", "keep_top")
    assert make_plan("manual", rep, merge=[[1, 2, 3]]).merge_formula == "keep_top"
    slm = get_strategy("slm")
    assert (slm.param("criterion").default, slm.param("formula").default) == ("cosine", "keep_top")
    assert "task_vector" in slm.param("formula").choices  # the papers' formula stays a named option
    d = plan.to_dict()
    del d["merge_formula"]  # a plan file written before the field existed
    assert PrunePlan.from_dict(d).merge_formula == "task_vector"
    assert PrunePlan(8, "merge", merge=[(1, 2)]).merge_formula == "task_vector"
    assert set(FORMULA_NOTES) == set(MERGE_FORMULAS)
    assert "papers' formula" in FORMULA_NOTES["task_vector"] and "three or more" in FORMULA_NOTES["task_vector"]


def _sinky(report: LayerReport, layers: dict[int, float], skip_first: int = 0) -> LayerReport:
    """``report`` with CKA = cosine everywhere, except ``cka[i][i+1] = v`` (and cosine 0.97) at each layer i."""
    d = report.to_dict()
    d["cka"] = [list(r) for r in d["cosine"]]
    for i, v in layers.items():
        d["cosine"][i][i + 1] = d["cosine"][i + 1][i] = 0.97
        d["cka"][i][i + 1] = d["cka"][i + 1][i] = v
    d["meta"] = {"skip_first": skip_first}
    return LayerReport.from_dict(d)


def test_criteria_disagreement_names_the_sink_layers_and_only_them():
    from layerlens.plans.slm import criteria_disagreement

    base = synthetic_report(8, 2)
    assert criteria_disagreement(_sinky(base, {})) is None
    assert criteria_disagreement(_sinky(base, {3: 0.6})) is None  # lower, but not collapsed
    d = criteria_disagreement(_sinky(base, {2: 0.41, 5: 0.01}))
    assert d.layers == (2, 5) and d.cka == (0.41, 0.01) and d.skip_first == 0
    text = d.describe()
    assert text.startswith("CKA and cosine disagree at layers 2 and 5:") and "0.41 and 0.01" in text
    assert "h2–h3 and h5–h6" in text and "attention sink" in text
    one = criteria_disagreement(_sinky(base, {4: 0.05}, skip_first=1))
    assert one.layers == (4,) and "layer 4:" in one.describe() and "already left out" in one.describe()
    low = _sinky(base, {4: 0.05}).to_dict()
    low["cosine"][4][5] = 0.5  # cosine low too: the layer changes the state, no disagreement
    assert criteria_disagreement(LayerReport.from_dict(low)) is None
