"""`layerlens sweep --ray`: the same sweep.csv and figures as one process, resumable either way; without
ray installed, one sentence saying how to install it."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from layerlens import cli

pytestmark = pytest.mark.ray
TEXT = str(Path(__file__).parents[1] / "data" / "shakespeare_sample.txt")
MEASURED = ["seconds", "cached"]  # how long a point took and whether it was read back: not results


def _sweep(model: Path, out: Path, runs: Path, *extra: str) -> int:
    return cli.main(["sweep", "--model", str(model), "--device", "cpu", "--dtype", "float32", "--data", TEXT,
                     "--samples", "8", "--seq-len", "48", "--ppl-data", TEXT, "--max-windows", "4", "--mmlu", "none",
                     "--strategies", "bi,reverse", "--ratios", "0,0.2,0.4", "--runs-dir", str(runs),
                     "--out", str(out), *extra])


def test_without_ray_installed_the_flag_says_how_to_install_it(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert _sweep(tiny_llama, tmp_path / "out", tmp_path / "runs", "--ray") == 2
    err = capsys.readouterr().err
    assert "needs the ray package" in err and "pip install 'layerlens[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "sweep" / "points").exists()  # refused before computing anything


def test_ray_sweep_writes_the_same_csv_and_figures_and_resumes_locally(tiny_llama, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             configure_logging=False)
    try:
        assert _sweep(tiny_llama, tmp_path / "ray", tmp_path / "runs-ray", "--ray", "--ray-workers", "2") == 0
    finally:
        ray.shutdown()
    assert _sweep(tiny_llama, tmp_path / "one", tmp_path / "runs-one") == 0
    on_ray = pd.read_csv(tmp_path / "ray" / "sweep.csv")
    single = pd.read_csv(tmp_path / "one" / "sweep.csv")
    pd.testing.assert_frame_equal(on_ray.drop(columns=MEASURED), single.drop(columns=MEASURED), check_exact=True)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    # the Ray run's points are read back by one process: nothing computed again
    assert _sweep(tiny_llama, tmp_path / "again", tmp_path / "runs-ray") == 0
    again = pd.read_csv(tmp_path / "again" / "sweep.csv")
    assert again.cached.all()
    pd.testing.assert_frame_equal(again.drop(columns=MEASURED), single.drop(columns=MEASURED), check_exact=True)
