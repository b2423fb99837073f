"""AppTest: a page's widgets keep their place in the element tree between the first visit and later reruns.

The first visit runs the quick analysis (a status box, progress, a note); if those pushed the widgets down
only on that run, the next rerun would remount every widget at a new place: a slider moved with the
keyboard loses focus and the browser briefly shows two of it (the CI flake this test pins down).
"""

from __future__ import annotations

import pytest

PAGE_WIDGETS = [
    ("pages/1_model_data.py", "md_model_source"),
    ("pages/2_redundancy.py", "rd_metric"),
    ("pages/3_prune.py", "pr_ratio"),
    ("pages/4_evaluate.py", "ev_strategies"),
    ("pages/5_export.py", "ex_save_figs"),
]


def tree_path(node, key: str, prefix: tuple[int, ...] = ()) -> tuple[int, ...] | None:
    """Indices from the main block down to the widget with ``key`` (Streamlit's delta path)."""
    for i, child in (getattr(node, "children", None) or {}).items():
        if getattr(child, "key", None) == key:
            return (*prefix, i)
        found = tree_path(child, key, (*prefix, i))
        if found:
            return found
    return None


@pytest.mark.parametrize(("page", "key"), PAGE_WIDGETS, ids=[k for _, k in PAGE_WIDGETS])
def test_first_visit_does_not_shift_widgets(open_app, page, key):
    at = open_app(page)
    at.run()
    assert not at.exception and not at.error
    first = tree_path(at.main, key)
    assert first is not None, f"{key} not on {page}"
    at.run()
    assert not at.exception and not at.error
    assert tree_path(at.main, key) == first
