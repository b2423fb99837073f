"""`layerlens sweep --model A --model B` / `--data X --data Y`: a study in one sweep.csv with model and calibration
columns, each entry's rows those of its single sweep; one --model and one --data behave as before; --ray gives
the same file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from layerlens import cli

TEXT = str(Path(__file__).parents[1] / "data" / "shakespeare_sample.txt")
MEASURED = ["seconds", "cached"]  # how long a point took and whether it was read back: not results


def _sweep(out: Path, runs: Path, *extra: str) -> int:
    return cli.main(["sweep", "--device", "cpu", "--dtype", "float32", "--samples", "8", "--seq-len", "48",
                     "--ppl-data", TEXT, "--max-windows", "4", "--mmlu", "none", "--strategies", "bi,reverse",
                     "--ratios", "0,0.4", "--runs-dir", str(runs), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def two(tiny_model_factory):
    return str(tiny_model_factory("llama")), str(tiny_model_factory("llama", seed=3))


@pytest.fixture(scope="module")
def study_csv(two, tmp_path_factory):
    """Two models x two calibration sets, in this process."""
    tmp = tmp_path_factory.mktemp("cli-study")
    a, b = two
    assert _sweep(tmp / "out", tmp / "runs", "--model", a, "--model", b, "--data", TEXT, "--data", "prose") == 0
    return pd.read_csv(tmp / "out" / "sweep.csv"), tmp


def test_a_study_csv_is_each_single_sweep_with_model_and_calibration_columns(two, study_csv, tmp_path):
    frame, tmp = study_csv
    assert list(frame.columns[:2]) == ["model", "calibration"]
    for model in two:
        for data in (TEXT, "prose"):
            out = tmp_path / f"{Path(model).name}-{Path(data).name}"
            assert _sweep(out, tmp_path / "runs", "--model", model, "--data", data) == 0  # one of each: as before
            single = pd.read_csv(out / "sweep.csv")
            assert "model" not in single and "calibration" not in single  # the single sweep's columns unchanged
            part = frame[(frame.model == model) & (frame.calibration == data)].drop(columns=["model", "calibration"])
            assert len(part) == 4
            pd.testing.assert_frame_equal(part.drop(columns=MEASURED).reset_index(drop=True),
                                          single.drop(columns=MEASURED), check_exact=True)
    files = sorted(p.name for p in (tmp / "out").iterdir())
    assert "sweep.csv" in files and "sweep.json" in files
    assert sum(f.startswith("perplexity-") and f.endswith(".html") for f in files) == 4  # one figure per entry
    assert "perplexity.html" in sorted(p.name for p in out.iterdir())  # the single sweep's file names


def test_a_study_resumes_everything_and_refuses_a_report(two, study_csv, tmp_path, capsys):
    frame, tmp = study_csv
    a, b = two
    assert _sweep(tmp_path / "again", tmp / "runs", "--model", a, "--model", b, "--data", TEXT, "--data", "prose") == 0
    again = pd.read_csv(tmp_path / "again" / "sweep.csv")
    assert again.cached.all()
    pd.testing.assert_frame_equal(again.drop(columns=MEASURED), frame.drop(columns=MEASURED), check_exact=True)
    assert _sweep(tmp_path / "r", tmp / "runs", "--model", a, "--model", b, "--report", str(tmp_path / "x.json")) == 2
    assert "--report belongs to one model" in capsys.readouterr().err


@pytest.mark.ray
def test_a_study_on_ray_writes_the_same_csv(two, study_csv, tmp_path):
    ray = pytest.importorskip("ray")
    frame, _ = study_csv
    a, b = two
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             configure_logging=False)
    try:
        assert _sweep(tmp_path / "ray", tmp_path / "runs", "--model", a, "--model", b, "--data", TEXT, "--data",
                      "prose", "--ray", "--ray-workers", "2") == 0
    finally:
        ray.shutdown()
    on_ray = pd.read_csv(tmp_path / "ray" / "sweep.csv")
    pd.testing.assert_frame_equal(on_ray.drop(columns=MEASURED), frame.drop(columns=MEASURED), check_exact=True)
