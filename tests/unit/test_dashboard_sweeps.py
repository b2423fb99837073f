"""The Evaluate page's sweep logic (layerlens.dashboard.sweeps): the time estimate and the share link."""

from __future__ import annotations

import pytest

from layerlens.dashboard.settings import AnalysisSettings
from layerlens.dashboard.share import sweep_from_query, sweep_query, to_query
from layerlens.dashboard.sweeps import (
    SweepEstimate,
    SweepSettings,
    SweepTiming,
    estimate,
    head_layers,
    measured,
    rough_seconds,
)
from layerlens.plans import PrunePlan


def _remove(*layers: int, n: int = 10) -> PrunePlan:
    return PrunePlan(num_layers=n, method="remove", remove=tuple(layers))


def test_estimate_counts_the_layer_passes_of_the_sweeps_own_schedule():
    """Plans that share a prefix run it once (prefix reuse); the unembedding costs `head` layers per
    perplexity token; MMLU counts its own tokens and no unembedding; strategies of one model count once."""
    timing = SweepTiming(layer_token_s=0.001, head=2.0)
    plans = [_remove(), _remove(8, 9), _remove(9), _remove(8, 9)]  # the last one is the second again
    est = estimate(timing, plans, windows=2, seq_len=50, mmlu_tokens=300)
    # 3 distinct models x 2 tasks. The full model runs from scratch (10 layers) and records the input the
    # others share: each of them runs one layer from it (layer 8, or the head alone from 8's input).
    ppl_full, ppl_tail = (10 + 2) * 100 * 0.001, (1 + 2) * 100 * 0.001
    assert est.unit_seconds == pytest.approx((ppl_full, ppl_tail, ppl_tail, 10 * 300 * 0.001, 0.3, 0.3))
    assert est.seconds == pytest.approx(sum(est.unit_seconds))
    no_mmlu = estimate(timing, plans, windows=2, seq_len=50, mmlu_tokens=0)
    assert no_mmlu.unit_seconds == pytest.approx((ppl_full, ppl_tail, ppl_tail))
    middle = estimate(timing, [_remove(), _remove(3)], windows=1, seq_len=10)
    assert middle.unit_seconds == pytest.approx((12 * 10 * 0.001, (6 + 2) * 10 * 0.001))  # layers 4..9 rerun


def test_estimate_never_counts_more_windows_than_the_text_holds():
    timing = SweepTiming(layer_token_s=0.001, head=0.0, eval_tokens=1000)
    few = estimate(timing, [_remove()], windows=256, seq_len=100)
    assert few.unit_seconds == (pytest.approx(10 * 10 * 100 * 0.001),)  # 10 windows, not 256


def test_time_left_follows_the_measured_pace():
    est = SweepEstimate((10.0, 10.0, 20.0), SweepTiming(0.001))
    assert est.left(0, 4.0) == pytest.approx(36.0)  # nothing done: the estimate minus the time spent
    assert est.left(1, 20.0) == pytest.approx(60.0)  # twice as slow as estimated so far: twice the rest
    assert est.left(3, 50.0) == 0.0


def test_a_finished_sweep_teaches_the_next_estimate():
    est = SweepEstimate((10.0, 30.0), SweepTiming(0.002, head=3.0, eval_tokens=500))
    t = measured(est, seconds=80.0, computed=2)
    assert t.source == "earlier sweeps" and t.layer_token_s == pytest.approx(0.004)
    assert (t.head, t.eval_tokens) == (3.0, 500)
    assert measured(est, seconds=5.0, computed=0) is None
    assert SweepTiming.from_dict(t.to_dict()) == t


def test_head_layers_and_durations_for_people():
    assert head_layers(hidden=4, vocab=100, per_layer_params=[100, 300]) == pytest.approx(2.0)
    assert [rough_seconds(s) for s in (0.3, 7, 42, 89, 150, 3599, 3900)] == [
        "1 s", "7 s", "40 s", "90 s", "2 min", "1 h 00 min", "1 h 05 min"]


def test_evaluate_settings_travel_in_share_links():
    strategies, subjects = ("bi", "reverse", "random", "taylor"), ("astronomy", "virology", "marketing")
    s = SweepSettings(strategies=("random", "bi"), ratios=(0.0, 0.25), windows=3, seq_len=128, mmlu=True,
                      mmlu_per_subject=2, subjects=("virology",), include_current=False, heal_seconds=30)
    q = to_query(AnalysisSettings.quick(), None, s)
    assert q["ev_heal"] == "30"  # issue 15: heal every point for 30 s
    assert q["model"] and q["ev_strategies"] == "random,bi" and q["ev_ratios"] == "0,0.25"
    assert sweep_from_query(q, strategies, subjects) == s
    assert sweep_query(SweepSettings()) == {}  # defaults say nothing
    assert sweep_from_query({"model": "default"}, strategies, subjects) is None
    off = sweep_from_query({"ev_mmlu": "off"}, strategies, subjects)
    assert off == SweepSettings(mmlu=False)
    hostile = {"ev_strategies": "nope,<script>", "ev_ratios": "0.33,-1,nan,abc", "ev_windows": "9999",
               "ev_seq_len": "x", "ev_mmlu": "1000", "ev_subjects": "not_a_subject", "ev_current": "yes",
               "ev_heal": "1e9"}
    assert sweep_from_query(hostile, strategies, subjects) == SweepSettings()


def test_lm_eval_task_names_travel_in_share_links_but_never_paths():
    strategies, subjects = ("bi", "reverse"), ("astronomy",)
    s = SweepSettings(tasks="hellaswag,arc_easy")
    q = to_query(AnalysisSettings.quick(), None, s)
    assert q["ev_tasks"] == "hellaswag,arc_easy"
    assert sweep_from_query(q, strategies, subjects) == s
    local = SweepSettings(tasks="/home/me/task.yaml,arc_easy")
    assert sweep_query(local)["ev_tasks"] == "arc_easy"  # a local file path stays on this machine
    hostile = sweep_from_query({"ev_tasks": "../../etc/x.yaml,<script>,piqa"}, strategies, subjects)
    assert hostile.tasks == "piqa"
