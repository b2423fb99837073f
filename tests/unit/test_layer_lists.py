"""The one parser of layer lists (CLI, share URL, dashboard): layerlens.plans.parse_layers."""

from __future__ import annotations

import pytest

from layerlens.errors import LayerLensError
from layerlens.plans import parse_layers


def test_parse_layers():
    assert parse_layers("3, 5-7 1", 10) == (1, 3, 5, 6, 7)
    assert parse_layers("", 4) == ()
    with pytest.raises(LayerLensError, match="out of range"):
        parse_layers("12", 10)
    with pytest.raises(LayerLensError, match="not a layer index"):
        parse_layers("a", 10)


def test_parse_layers_is_the_clis_and_the_urls_parser():
    assert parse_layers("4-6") == (4, 5, 6) and parse_layers("3,5,7") == (3, 5, 7)
    with pytest.raises(LayerLensError, match="runs backwards.*5-7"):
        parse_layers("7-5")
    with pytest.raises(LayerLensError, match="listed twice"):
        parse_layers("2, 1-3")
    with pytest.raises(LayerLensError, match="comma-separated"):
        parse_layers("two")
