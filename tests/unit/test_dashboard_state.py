"""Unit tests of the dashboard's non-UI helpers (layerlens.dashboard_state): confinement, uploads, URL state."""

from __future__ import annotations

import os

import pytest

from layerlens.dashboard_state import (
    AnalysisSettings,
    PlanSettings,
    check_upload,
    confine_path,
    from_query,
    parse_layers,
    safe_name,
    to_query,
    zip_folder,
)
from layerlens.errors import LayerLensError


def test_confine_path_allows_inside_and_refuses_escapes(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("x")
    (tmp_path / "secret.txt").write_text("s")
    monkeypatch.setenv("LAYERLENS_DATA_ROOT", str(root))
    assert confine_path("sub/a.txt") == (root / "sub" / "a.txt").resolve()
    assert confine_path(str(root / "sub"), kind="dir") == (root / "sub").resolve()
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd", "sub/../../secret.txt"):
        with pytest.raises(LayerLensError, match="outside the allowed data folder"):
            confine_path(bad)
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    with pytest.raises(LayerLensError, match="outside"):
        confine_path("link.txt")
    with pytest.raises(LayerLensError, match="does not exist"):
        confine_path("nope.txt")
    with pytest.raises(LayerLensError, match="is a folder"):
        confine_path("sub")
    with pytest.raises(LayerLensError):
        confine_path("")


def test_check_upload_limits():
    assert check_upload("data.JSONL", 100) == ".jsonl"
    with pytest.raises(LayerLensError, match="upload limit"):
        check_upload("big.txt", 51 * 2**20)
    with pytest.raises(LayerLensError, match="not a supported"):
        check_upload("model.bin", 10)
    with pytest.raises(LayerLensError, match="empty"):
        check_upload("a.txt", 0)


def test_parse_layers():
    assert parse_layers("3, 5-7 1", 10) == (1, 3, 5, 6, 7)
    assert parse_layers("", 4) == ()
    with pytest.raises(LayerLensError, match="out of range"):
        parse_layers("12", 10)
    with pytest.raises(LayerLensError, match="not a layer index"):
        parse_layers("a", 10)


def test_query_round_trip_and_defensive_parsing():
    s = AnalysisSettings(model="org/name", revision="main", dtype="bfloat16", samples=16, seq_len=256)
    for ps in (
        PlanSettings(mode="strategy", strategy="reverse", ratio=0.3),
        PlanSettings(mode="manual", layers=(2, 5)),
        PlanSettings(mode="slm", slm_by="ratio", target_ratio=0.2, criterion="cosine"),
    ):
        s2, ps2 = from_query(to_query(s, ps), AnalysisSettings.quick())
        assert s2.model_key() == s.model_key() and (s2.samples, s2.seq_len) == (16, 256)
        assert ps2 == ps
    s3, ps3 = from_query(
        {
            "ratio": "nan",
            "strategy": "evil",
            "threshold": "3",
            "samples": "0",
            "dtype": "x",
            "data": "/etc/passwd",
            "layers": "a,b",
        },
        AnalysisSettings.quick(),
    )
    assert ps3 == PlanSettings() and s3.samples == AnalysisSettings.quick().samples and s3.data == "default"
    assert s3.dtype == "auto"
    assert from_query({}, AnalysisSettings.quick()) == (AnalysisSettings.quick(), None)


def test_safe_name_and_zip(tmp_path):
    assert safe_name("../../etc") == "etc"
    assert "/" not in safe_name("a/b c")
    assert safe_name("///") == "pruned-model"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(zip_folder(tmp_path / "m"))).namelist()
    assert names == ["m/config.json"]


def test_mmlu_comparison_counts_questions_and_flags_tiny_samples():
    import pandas as pd

    from layerlens.dashboard_state import MIN_MMLU_QUESTIONS, mmlu_comparison

    def frame(n):
        f = pd.DataFrame({"strategy": ["bi", "bi"], "removed_layers": ["", "3,4"], "mmlu_accuracy": [0.30, 0.25]})
        if n is not None:
            f["mmlu_questions"] = n
        return f

    big = mmlu_comparison([frame(57)], (3, 4))
    assert big.meaningful and big.questions == 57
    assert big.delta_text() == "-5.0 pts (was 30.0%) on 57 questions"
    assert big.standard_error_pts() == pytest.approx(100 * (0.25 * 0.75 / 57) ** 0.5)
    tiny = mmlu_comparison([frame(MIN_MMLU_QUESTIONS - 1)], (3, 4))
    assert not tiny.meaningful and "pts" not in tiny.delta_text() and "too few" in tiny.delta_text()
    unknown = mmlu_comparison([frame(None)], [3, 4])  # a sweep saved before the count was recorded
    assert unknown.questions is None and not unknown.meaningful and "unknown" in unknown.delta_text()
    assert mmlu_comparison([frame(57)], (1,)) is None


def test_skip_first_travels_in_share_links_and_names_its_own_analysis():
    s = AnalysisSettings(samples=16, seq_len=256, skip_first=1)
    assert from_query(to_query(s, None), AnalysisSettings.quick())[0].skip_first == 1
    assert "skip_first" not in to_query(AnalysisSettings(), None)
    assert from_query({"skip_first": "-3"}, AnalysisSettings.quick())[0].skip_first == 0
    assert s.key() != AnalysisSettings(samples=16, seq_len=256).key()  # another analysis, another file
    with pytest.raises(LayerLensError, match="Skip-first"):
        AnalysisSettings(seq_len=64, skip_first=64).validate()
