"""Analysis settings (layerlens.dashboard.settings) and the share link (layerlens.dashboard.share)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from layerlens.dashboard.planning import PlanSettings
from layerlens.dashboard.settings import AnalysisSettings
from layerlens.dashboard.share import from_query, settings_fields, to_query
from layerlens.errors import LayerLensError
from layerlens.metrics import CaptureConfig


def test_query_round_trip_and_defensive_parsing():
    s = AnalysisSettings(model="org/name", revision="main", dtype="bfloat16",
                         capture=CaptureConfig(samples=16, seq_len=256))
    for ps in (
        PlanSettings(mode="strategy", strategy="reverse", ratio=0.3),
        PlanSettings(mode="manual", layers=(2, 5)),
        PlanSettings(mode="slm", slm_by="ratio", target_ratio=0.2, criterion="cosine"),
    ):
        s2, ps2 = from_query(to_query(s, ps), AnalysisSettings.quick())
        assert s2.model_key() == s.model_key() and (s2.capture.samples, s2.capture.seq_len) == (16, 256)
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
    assert ps3 == PlanSettings() and s3.capture.samples == AnalysisSettings.quick().capture.samples \
        and s3.data == "default"
    assert s3.dtype == "auto"
    assert from_query({}, AnalysisSettings.quick()) == (AnalysisSettings.quick(), None)


def test_skip_first_travels_in_share_links_and_names_its_own_analysis():
    s = AnalysisSettings(capture=CaptureConfig(samples=16, seq_len=256, skip_first=1))
    assert from_query(to_query(s, None), AnalysisSettings.quick())[0].capture.skip_first == 1
    assert "skip_first" not in to_query(AnalysisSettings(), None)
    assert from_query({"skip_first": "-3"}, AnalysisSettings.quick())[0].capture.skip_first == 0
    assert s.key() != AnalysisSettings(capture=CaptureConfig(samples=16, seq_len=256)).key()  # another file
    with pytest.raises(LayerLensError, match="Skip-first"):
        AnalysisSettings(capture=CaptureConfig(samples=8, seq_len=64, skip_first=64)).validate()


def test_analysis_keys_are_the_ones_saved_analyses_have():
    """Persisted analyses are found by key: these are the keys the flat settings (before they held a
    CaptureConfig) gave for the same values."""
    assert AnalysisSettings().key() == "8a06bc10cf5acc6d"
    assert AnalysisSettings().key("default|/m|123") == "b8cbfa291a36a4e3"
    full = AnalysisSettings(model="org/name", revision="main", dtype="bfloat16", device="cpu",
                            trust_remote_code=True, data="hub:wikitext", data_label="x", text_field="body",
                            capture=CaptureConfig(samples=16, seq_len=256, batch_size=4, cka_estimator="exact",
                                                  seed=3, skip_first=1))
    assert full.key("fp") == "1db3a5bf5a6d4aaf"
    assert full.key("fp") == AnalysisSettings(model="org/name", revision="main", dtype="bfloat16", device="cpu",
                                              trust_remote_code=True, data="hub:wikitext", data_label="other",
                                              text_field="body", capture=full.capture).key("fp")


def test_validate_speaks_the_dashboard_s_words():
    def message(**capture):
        with pytest.raises(LayerLensError) as info:
            AnalysisSettings(capture=CaptureConfig(**capture)).validate()
        return str(info.value)

    assert message(samples=0) == "Samples must be at least 1 (got 0)."
    assert message(batch_size=0) == "Batch size must be at least 1 (got 0)."
    assert message(seq_len=64, skip_first=64) == \
        "Skip-first tokens must be between 0 and the sequence length - 1 = 63 (got 64)."
    assert message(seq_len=4) == "Sequence length must be at least 8 tokens (got 4)."
    with pytest.raises(LayerLensError, match="Unknown dtype"):
        AnalysisSettings(dtype="int3").validate()
    AnalysisSettings.quick().validate()


def test_settings_fields_name_the_capture_fields_in_place():
    assert settings_fields() == ("model", "revision", "dtype", "device", "trust_remote_code", "data",
                                 "data_label", "text_field", "samples", "seq_len", "batch_size",
                                 "cka_estimator", "seed", "skip_first", "sublayers", "bootstrap", "ci_level",
                                 "rank_k", "last_state", "block_distance")


def test_dashboard_defaults_are_the_merge_that_measured_best():
    """Issue 14: CKA + task_vector merged one 7-layer window on the default model (perplexity 1e12); cosine
    windows with keep_top, at a target ratio of 0.1, are the only merges that stayed under 2x the original
    perplexity (bench/bench_merge_defaults.py). Skipping the first token was a wash, so it stays 0."""
    ps = PlanSettings()
    assert (ps.criterion, ps.formula, ps.target_ratio) == ("cosine", "keep_top", 0.1)
    assert ps.slm_by == "ratio"  # a fixed 0.9 threshold merges 18 of 30 default-model layers: broken
    assert AnalysisSettings.quick().capture.skip_first == 0 == CaptureConfig().skip_first


def test_merge_formula_travels_in_share_links_only_when_not_the_default():
    s = AnalysisSettings.quick()
    default = PlanSettings(mode="slm")
    assert "formula" not in to_query(s, default)
    for formula in ("task_vector", "mean"):
        ps = replace(default, formula=formula)
        q = to_query(s, ps)
        assert q["formula"] == formula and from_query(q, s)[1] == ps
    assert from_query({"mode": "slm", "formula": "evil"}, s)[1].formula == "keep_top"
