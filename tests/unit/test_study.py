"""Studies (several models and/or calibration sets, one SweepConfig): each entry's rows and persisted points are
those of its own single sweep (computed here independently: load, analyze, sweep), a study resumes from points
any earlier sweep persisted, and the same study on local Ray (2 workers that switch models) is bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from layerlens.data import TextSet, load_texts
from layerlens.distributed import RayExecutor
from layerlens.errors import LayerLensError
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, analyze
from layerlens.study import StudyEntry, study
from layerlens.sweep import SweepConfig, sweep

TEXT = str(Path(__file__).parents[1] / "data" / "shakespeare_sample.txt")
CONFIG = SweepConfig(["bi", "reverse"], [0.0, 0.2, 0.4], seq_len=48, max_windows=4, ppl_batch_size=4)
CAPTURE = CaptureConfig(samples=8, seq_len=48, batch_size=4)
SAME = ["strategy", "ratio", "n_removed", "removed_layers", "perplexity", "actual_ratio", "kl", "top1_agreement"]


@pytest.fixture(scope="module")
def models(tiny_model_factory):
    """Two different tiny models (architecture and weights), saved to folders."""
    return str(tiny_model_factory("llama")), str(tiny_model_factory("qwen2", seed=1))


@pytest.fixture(scope="module")
def ppl(sample_texts):
    return TextSet(tuple(sample_texts[:12]), "ppl", "ppl")


def _single(model: str, data: str, ppl: TextSet, runs: Path):
    """The reference: the entry swept alone, as the CLI does it (load, analyze on the data, sweep)."""
    lm = load_model(model, device="cpu", dtype="float32")
    report = analyze(lm.model, lm.tokenizer, load_texts(data), CAPTURE)
    return sweep(lm.model, lm.tokenizer, report, CONFIG, ppl_texts=ppl, runs_dir=runs,
                 model_id={"model": lm.info.model, "revision": lm.info.revision})


def _study(entries, ppl, runs, **kw):
    return study(entries, CONFIG, ppl_texts=ppl, runs_dir=runs, capture=CAPTURE, dtype="float32", device="cpu", **kw)


def _points(runs: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())["result"] for p in (runs / "sweep" / "points").glob("*.json")}


@pytest.fixture(scope="module")
def in_process(models, ppl, tmp_path_factory):
    """A 2-model x 2-calibration study in this process, and its runs folder."""
    runs = tmp_path_factory.mktemp("study")
    entries = [StudyEntry(m, d) for m in models for d in (TEXT, "prose")]
    return _study(entries, ppl, runs), runs, entries


def test_each_entry_equals_its_single_sweep_row_for_row_and_point_for_point(in_process, ppl, tmp_path):
    got, runs, entries = in_process
    assert list(got.frame.columns[:2]) == ["model", "calibration"]
    assert len(got.frame) == len(entries) * len(CONFIG.strategies) * len(CONFIG.ratios)
    singles = {}
    for i, entry in enumerate(entries):
        single_runs = tmp_path / f"single{i}"
        ref = _single(entry.model, entry.data, ppl, single_runs)
        part = got.frame[(got.frame.model == entry.model) & (got.frame.calibration == entry.data)]
        assert ref.frame.perplexity.notna().all()
        pd.testing.assert_frame_equal(part[SAME].reset_index(drop=True), ref.frame[SAME], check_exact=True)
        assert list(part.columns[2:]) == list(ref.frame.columns)
        singles |= _points(single_runs)
    assert _points(runs) == singles  # the same keys and results: each entry's part resumes as its single sweep
    # the two calibration sets rank the layers differently for BI on at least one model (else the test is vacuous)
    bi = got.frame[got.frame.strategy == "bi"]
    assert any(bi[bi.model == m].groupby("calibration").removed_layers.apply(tuple).nunique() > 1 for m in
               got.frame.model.unique())
    # the two models differ: entries are not one model's rows repeated
    first = got.frame[got.frame.model == entries[0].model].perplexity.to_numpy()
    other = got.frame[got.frame.model == entries[-1].model].perplexity.to_numpy()
    assert (first != other).any()


def test_a_study_resumes_from_points_a_single_sweep_or_study_persisted(models, ppl, in_process, tmp_path):
    a, b = models
    _single(a, TEXT, ppl, tmp_path)  # model a swept alone first
    got = _study([StudyEntry(a, TEXT), StudyEntry(b, TEXT)], ppl, tmp_path)
    assert got.frame[got.frame.model == a].cached.all() and not got.frame[got.frame.model == b].cached.any()
    again = _study([StudyEntry(a, TEXT), StudyEntry(b, TEXT)], ppl, tmp_path)
    assert again.frame.cached.all() and again.stats.computed == 0
    pd.testing.assert_frame_equal(again.frame[SAME], got.frame[SAME], check_exact=True)
    reference = in_process[0].frame
    expected = reference[reference.calibration == TEXT].reset_index(drop=True)
    pd.testing.assert_frame_equal(again.frame[SAME], expected[SAME], check_exact=True)


def test_a_study_refuses_no_entries_and_duplicates(ppl, models, tmp_path):
    with pytest.raises(LayerLensError, match="at least one"):
        _study([], ppl, tmp_path)
    with pytest.raises(LayerLensError, match="twice"):
        _study([StudyEntry(models[0]), StudyEntry(models[0])], ppl, tmp_path)


@pytest.mark.ray
def test_the_study_on_ray_equals_the_in_process_one_bit_for_bit(ray_session, in_process, ppl, tmp_path):
    expected, single_runs, entries = in_process
    pids: dict[str, set[int]] = {}  # model -> the worker processes ready while its points came back
    with RayExecutor(None, workers=2) as ex:  # the study names each model (use) before its sweep
        got = _study(entries, ppl, tmp_path, executor=ex,
                     progress=lambda _d, _n, label: pids.setdefault(label.split("] ")[1].split(":")[0], set()).update(ex.worker_pids()))
        assert ex.replaced == 0 and ex.retried == 0 and len(ex.actors) == 2  # no actor restarted for a model
    assert len(pids) == 2 and all(pids.values())
    assert set.intersection(*pids.values())  # an actor that served the first model switched to the second
    pd.testing.assert_frame_equal(got.frame[["model", "calibration", *SAME]],
                                  expected.frame[["model", "calibration", *SAME]], check_exact=True)
    # computed on Ray, not read back (a later entry reads the points an earlier one shares, e.g. reverse plans)
    assert not got.frame[got.frame.model == entries[0].model].head(len(CONFIG.strategies) * len(CONFIG.ratios)).cached.any()
    assert got.stats.computed == expected.stats.computed > 0 and list(got.frame.cached) == list(expected.frame.cached)
    assert _points(tmp_path) == _points(single_runs)


@pytest.mark.ray
def test_a_worker_that_switches_to_other_weights_is_refused(ray_session, models, tiny_model_factory, ppl, tmp_path):
    from layerlens.distributed import ModelSpec

    a, b = models
    other = load_model(str(tiny_model_factory("llama", seed=5)), device="cpu", dtype="float32")
    with RayExecutor(None, workers=1) as ex:
        _study([StudyEntry(a, TEXT)], ppl, tmp_path, executor=ex)  # the actor holds model a
        ex.use(ModelSpec.of(other.info))  # the workers are told another folder than the driver's model b
        lm = load_model(b, device="cpu", dtype="float32")
        before = _points(tmp_path)
        with pytest.raises(LayerLensError, match="other weights"):
            sweep(lm.model, lm.tokenizer, None, SweepConfig(["reverse"], [0.2], seq_len=48, max_windows=2),
                  ppl_texts=ppl, runs_dir=tmp_path, executor=ex)
    assert _points(tmp_path) == before  # nothing of the refused model persisted
