"""Sweeps on Ray (local, 2 CPU workers, tiny models): the same rows bit for bit, the same persisted points,
every point exactly once when a worker is killed, and resuming in one process after a Ray sweep stopped.

One module-scoped ``ray.init`` (2 CPUs, no dashboard, a small object store) keeps Ray's start-up cost to
once per module; every test skips cleanly when ray is not installed (CI installs it: requirements-ray.txt).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from layerlens.data import TextSet
from layerlens.distributed import ModelSpec, RayExecutor, prefix_groups, require_ray
from layerlens.errors import LayerLensError
from layerlens.heal import HealConfig
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, analyze
from layerlens.plans import PrunePlan
from layerlens.prefix_reuse import schedule_reuse
from layerlens.questions import load_questions
from layerlens.sweep import SweepConfig, sweep

pytestmark = pytest.mark.ray
DATA = Path(__file__).parents[1] / "data"
sweep_module = importlib.import_module("layerlens.sweep")  # the module (`layerlens.sweep` is also the function)
PPL = dict(seq_len=48, max_windows=6, ppl_batch_size=4, mmlu_batch_size=5)
CONFIG = SweepConfig(["bi", "reverse", "sequential", "magnitude"], [0.0, 0.2, 0.4, 0.6], **PPL)
# the columns that must agree bit for bit (``seconds`` is a measurement, ``cached`` how a row was obtained)
SAME = ["strategy", "ratio", "n_removed", "removed_layers", "perplexity", "mmlu_accuracy", "actual_ratio",
        "mmlu_prob_correct", "kl", "top1_agreement"]


@pytest.fixture(scope="module")
def setup(tiny_model_factory, sample_texts):
    """The tiny llama (float32, CPU, loaded as the workers load it), its report, texts and questions."""
    path = tiny_model_factory("llama")
    lm = load_model(str(path), device="cpu", dtype="float32")
    report = analyze(lm.model, lm.tokenizer, TextSet(tuple(sample_texts[:8]), "t", "t"),
                     CaptureConfig(samples=8, seq_len=48, batch_size=4))
    data = dict(ppl_texts=sample_texts, questions=load_questions(str(DATA / "mmlu_sample.jsonl"), limit=3))
    return lm, report, data


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The single-process sweep (1 torch thread, as the CPU workers) and its persisted points."""
    lm, report, data = setup
    runs = tmp_path_factory.mktemp("single")
    return sweep(lm.model, lm.tokenizer, report, CONFIG, runs_dir=runs, **data), runs


def _executor(lm, **kw) -> RayExecutor:
    return RayExecutor(ModelSpec.of(lm.info), workers=2, **kw)


def _points(runs: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())["result"] for p in (runs / "sweep" / "points").glob("*.json")}


@pytest.fixture
def writes(monkeypatch):
    """Every point the driver persists, by key (a point written twice shows up as a count of 2)."""
    seen: Counter[str] = Counter()
    original = sweep_module._write_point

    def counting(runs, unit, *args, **kwargs):
        seen[unit.key] += 1
        return original(runs, unit, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "_write_point", counting)
    return seen


def test_ray_rows_and_points_equal_the_single_process_bit_for_bit(ray_session, setup, reference, tmp_path, writes):
    lm, report, data = setup
    expected, single_runs = reference
    seen = []
    with _executor(lm) as ex:
        got = sweep(lm.model, lm.tokenizer, report, CONFIG, runs_dir=tmp_path, executor=ex,
                    progress=lambda d, n, _label: seen.append((d, n)), **data)
        pids = ex.worker_pids()
    assert len(set(pids)) == 2 and os.getpid() not in pids  # two worker processes did the work
    assert expected.frame[["perplexity", "mmlu_accuracy", "kl"]].notna().all().all()  # real numbers compared
    pd.testing.assert_frame_equal(got.frame[SAME], expected.frame[SAME], check_exact=True)
    assert list(got.frame.columns) == list(expected.frame.columns) and not got.frame.cached.any()
    # the same persisted points, under the same keys, with the same results (a Ray run resumes locally)
    assert _points(tmp_path) == _points(single_runs)
    assert set(writes) == set(_points(tmp_path)) and set(writes.values()) == {1}
    # one progress bar over all points: every unit counted once, in order
    assert [d for d, _ in seen] == list(range(1, expected.stats.units + 1))
    assert got.stats.units == expected.stats.units and got.stats.computed == expected.stats.computed


def test_a_killed_worker_still_completes_every_point_exactly_once(ray_session, setup, reference, tmp_path, writes):
    lm, report, data = setup
    expected, _ = reference
    with _executor(lm, point_delay=0.15) as ex:  # slow points: the killed worker is mid-group
        killed = []

        def kill_one(done, total, label):
            if not killed:
                killed.append(ex.worker_pids()[0])
                os.kill(killed[0], signal.SIGKILL)

        got = sweep(lm.model, lm.tokenizer, report, CONFIG, runs_dir=tmp_path, executor=ex, progress=kill_one,
                    **data)
        assert ex.replaced >= 1 and ex.retried >= 1  # the kill really cost work that was sent again
        assert killed[0] not in ex.worker_pids()
    assert "error" not in got.frame
    pd.testing.assert_frame_equal(got.frame[SAME], expected.frame[SAME], check_exact=True)
    assert sum(writes.values()) == len(writes) == expected.stats.units  # each point persisted once
    assert set(writes) == set(_points(tmp_path))


def test_a_point_given_up_is_reported_and_computed_by_the_next_run(ray_session, setup, reference, tmp_path,
                                                                   writes):
    lm, report, data = setup
    expected, _ = reference
    with _executor(lm, point_delay=0.15, max_retries=0) as ex:  # no retry: the point in progress is given up
        killed = []

        def kill_one(done, total, label):
            if not killed:
                killed.append(ex.worker_pids()[0])
                os.kill(killed[0], signal.SIGKILL)

        got = sweep(lm.model, lm.tokenizer, report, CONFIG, runs_dir=tmp_path, executor=ex, progress=kill_one,
                    **data).frame
    failed = got[got.error.astype(bool)]
    assert len(failed) >= 1 and failed.error.str.contains("worker died").all()
    assert failed[["perplexity", "mmlu_accuracy"]].isna().any(axis=1).all() and not failed.cached.any()
    ok = got[~got.error.astype(bool)]
    pd.testing.assert_frame_equal(ok[SAME], expected.frame.loc[ok.index, SAME], check_exact=True)
    n_given_up = sum(1 for _, row in failed.drop_duplicates("removed_layers").iterrows()
                     for col in ("perplexity", "mmlu_accuracy") if pd.isna(row[col]))
    assert sum(writes.values()) == expected.stats.units - n_given_up  # a failed point is not persisted
    writes.clear()
    again = sweep(lm.model, lm.tokenizer, report, CONFIG, runs_dir=tmp_path, **data)
    assert "error" not in again.frame and sum(writes.values()) == again.stats.computed == n_given_up
    pd.testing.assert_frame_equal(again.frame[SAME], expected.frame[SAME], check_exact=True)


class _Stop(KeyboardInterrupt):
    pass


def test_a_stopped_ray_sweep_resumes_in_one_process_without_recomputing(ray_session, setup, reference, tmp_path,
                                                                        writes):
    lm, report, data = setup
    expected, _ = reference

    def stop_after_five(done, total, label):
        if done == 5:
            raise _Stop(label)

    with _executor(lm) as ex:
        with pytest.raises(_Stop):
            sweep(lm.model, lm.tokenizer, report, CONFIG, runs_dir=tmp_path, executor=ex, progress=stop_after_five,
                  **data)
        assert ex.actors == {}  # Ctrl-C stopped the cluster work
    finished = _points(tmp_path)
    assert len(finished) >= 5 and set(writes) == set(finished)
    writes.clear()
    resumed = sweep(lm.model, lm.tokenizer, report, CONFIG, runs_dir=tmp_path, **data)
    assert not set(writes) & set(finished)  # nothing finished on Ray was computed again
    assert resumed.stats.cached == len(finished) and resumed.stats.computed == expected.stats.units - len(finished)
    pd.testing.assert_frame_equal(resumed.frame[SAME], expected.frame[SAME], check_exact=True)
    # and the other way round: a finished single-process sweep is read back whole by a Ray sweep
    with _executor(lm) as ex:
        back = sweep(lm.model, lm.tokenizer, report, CONFIG, runs_dir=tmp_path, executor=ex, **data)
        assert ex.actors == {}  # nothing to compute: no worker was started
    assert back.frame.cached.all() and back.stats.computed == 0


def test_healing_sweep_on_ray_equals_the_single_process(ray_session, setup, tmp_path):
    lm, report, data = setup
    heal = HealConfig(steps=2, seconds=None, seq_len=32, batch_size=2, eval_windows=1, eval_every=10)
    config = SweepConfig(["reverse"], [0.0, 0.2, 0.4], heal=heal, **PPL)
    texts = data["ppl_texts"]
    kw = dict(ppl_texts=texts[20:], heal_texts=texts[:20])  # disjoint: held-out perplexity after healing
    single = sweep(lm.model, lm.tokenizer, report, config, runs_dir=tmp_path / "a", **kw).frame
    with _executor(lm) as ex:
        ray = sweep(lm.model, lm.tokenizer, report, config, runs_dir=tmp_path / "b", executor=ex, **kw).frame
    assert list(ray.healed) == [False, True] * 3  # ratio 0 is its own healed row
    pd.testing.assert_frame_equal(ray[SAME + ["healed"]], single[SAME + ["healed"]], check_exact=True)
    assert _points(tmp_path / "a") == _points(tmp_path / "b")


def test_an_error_raised_on_a_worker_is_retried_then_reported(ray_session, setup, tmp_path, writes):
    """A work item that raises (here healing on texts that overlap the held-out ones) is sent again, then
    given up with the worker's sentence in the ``error`` column; the other points are unaffected."""
    lm, report, data = setup
    heal = HealConfig(steps=1, seconds=None, seq_len=32, batch_size=2, eval_windows=1)
    texts = data["ppl_texts"]
    config = SweepConfig(["reverse"], [0.0, 0.2], heal=heal, **PPL)
    with _executor(lm, max_retries=1) as ex:
        got = sweep(lm.model, lm.tokenizer, report, config, runs_dir=tmp_path, executor=ex, ppl_texts=texts,
                    heal_texts=texts).frame
        assert ex.retried == 1 and ex.replaced == 0  # sent once more; the worker itself survived
    bad = got[got.error.astype(bool)]
    assert list(bad.healed) == [True] and bad.ratio.tolist() == [0.2] and bad.perplexity.isna().all()
    assert bad.error.str.contains("failed 2 times: LayerLensError: The held-out texts overlap").all()
    assert got[~got.error.astype(bool)].perplexity.notna().all()
    assert sum(writes.values()) == 2  # the two pruned points; nothing for the given-up one


def test_a_worker_with_other_weights_is_refused(ray_session, setup, tiny_model_factory, tmp_path):
    lm, report, data = setup
    other = ModelSpec.of(load_model(str(tiny_model_factory("llama", seed=1)), device="cpu", dtype="float32").info)
    with RayExecutor(other, workers=1) as ex, pytest.raises(LayerLensError, match="other weights"):
        sweep(lm.model, lm.tokenizer, report, SweepConfig(["reverse"], [0.2], **PPL), executor=ex,
              ppl_texts=data["ppl_texts"])


def test_workers_that_cannot_load_the_model_say_so(ray_session, setup, tmp_path):
    lm, report, data = setup
    missing = ModelSpec(str(tmp_path / "not-there"), "float32")
    with RayExecutor(missing, workers=1) as ex, pytest.raises(LayerLensError, match="could not load the model"):
        sweep(lm.model, lm.tokenizer, report, SweepConfig(["reverse"], [0.2], **PPL), executor=ex,
              ppl_texts=data["ppl_texts"])


def test_prefix_groups_cut_the_reuse_order_into_contiguous_balanced_groups():
    plans = [PrunePlan(8, "remove", remove=r) for r in
             [(), (7,), (6, 7), (5, 6, 7), (1,), (1, 2), (1, 2, 3), (0,), (0, 4), (3, 4, 5)]]
    steps = schedule_reuse(plans, None)
    order = [s.plan_index for s in steps]
    cost = {s.plan_index: s.layer_passes for s in steps}  # layer passes with reuse
    for n in (1, 2, 3, 4, 20):
        groups = prefix_groups(plans, n)
        assert [i for g in groups for i in g] == order  # the reuse order, each plan once, cut in place
        assert 1 <= len(groups) <= min(n, len(plans)) and all(groups)
        # about equal cost: no group costs more than its share plus one plan
        share = sum(cost.values()) / n
        assert all(sum(cost[i] for i in g) <= share + max(cost.values()) for g in groups)
    assert len(prefix_groups(plans, 2)) == 2 and len(prefix_groups(plans, 1)) == 1
    assert prefix_groups([], 2) == []


def test_without_ray_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(LayerLensError, match=r"pip install 'layerlens\[ray\]'"):
        require_ray()


def test_points_are_keyed_by_the_workers_device(ray_session, setup):
    lm, _, _ = setup
    ex = _executor(lm)
    try:
        assert ex.key_identity({"device": "cuda", "weights": "w"}) == {"device": "cpu", "weights": "w"}
    finally:
        ex.close()
    assert torch.get_num_threads() == 1  # the driver's threads equal the workers' (bit-identical CPU kernels)
