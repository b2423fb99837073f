"""Numbers for people (layerlens.humanize): the formats the pages and the HTML report share."""

from __future__ import annotations

import math

import pytest

from layerlens import humanize as h


@pytest.mark.parametrize(("x", "want"), [
    (3582230116909.84, "3.6e12"), (511040.0, "511,040"), (23699.2, "23,699"), (1229.4, "1,229"), (936.2, "936"),
    (134.4, "134"), (51.94, "51.9"), (0.25, "0.25"), (8.0, "8"), (2.5, "2.5"), (999.7, "1,000"), (0.0, "0"), (-12.5, "-12.5"),
    (0.00012, "1.2e-4"), (None, "–"), (math.nan, "–"), (math.inf, "–"),
])
def test_number(x, want):
    assert h.number(x) == want


@pytest.mark.parametrize(("x", "want"), [
    (3582230116909.84, "3.6e12"), (51.9234, "51.92"), (12.0, "12.00"), (134.27, "134"), (23699.0, "23,699"),
    (None, "–"),
])
def test_perplexity(x, want):
    assert h.perplexity(x) == want


def test_percent_ratio_change():
    assert h.percent(8 / 30) == "26.7%" and h.percent(0.38, 0, signed=True) == "+38%"
    assert h.percent(-0.27, 0, signed=True) == "-27%" and h.percent(None) == "–"
    assert h.ratio(69.04) == "69×" and h.ratio(1.26) == "1.3×" and h.ratio(6.9e10) == "6.9e10×"
    assert h.change(12.0, 10.0) == "+20.0%" and h.change(9.6, 10.0) == "-4.0%"
    assert h.change(3.6e12, 51.9) == "6.9e10× higher"  # not +6936570000000.0%
    assert h.change(1.0, 0.0) == "–"


def test_params_seconds_speed():
    assert h.params(134_515_008) == "134.5 M" and h.params(1.24e9) == "1.24 B" and h.params(900) == "900"
    assert h.seconds(0.0123) == "12 ms" and h.seconds(4.24) == "4.2 s" and h.seconds(125) == "2 min 05 s"
    assert h.seconds(3900) == "1 h 05 min"
    assert h.tokens_per_s(24.31, 1.24) == "24.3 ± 1.2 tokens/s" and h.tokens_per_s(2.5) == "2.5 tokens/s"
    assert h.tokens_per_s(None, 1.0) == "–"


@pytest.mark.parametrize(("after", "level"), [
    (51.9, "usable"), (103.8, "usable"), (110.0, "degraded"), (519.0, "broken"), (3.6e12, "broken"),
    (math.inf, "broken"), (math.nan, "broken"),
])
def test_verdict_levels(after, level):
    v = h.verdict(after, 51.9)
    assert v.level == level and v.bad == (level != "usable")
    assert v.headline().lower().startswith(level)


def test_verdict_headline_is_plain_and_formatted():
    text = h.verdict(3582230116909.84, 51.9).headline()
    assert "3.6e12" in text and "51.90" in text and "not usable" in text and "3582230116909" not in text
    assert h.verdict(10.0, None).level == "unknown" and not h.verdict(10.0, None).bad
