"""Results as tables for download and markers for figures: per-layer metrics, a state matrix as CSV, the
current plan's point on a sweep figure."""

from __future__ import annotations

from typing import Any

import pandas as pd


def metrics_frame(report: Any) -> pd.DataFrame:
    """Per-layer metrics as a DataFrame (one row per decoder layer, 0-based) for CSV export."""
    n = report.num_layers
    return pd.DataFrame({
        "layer": range(n), "bi": report.bi, "magnitude": report.magnitude,
        "cosine_next": [report.cosine[i][i + 1] for i in range(n)],
        "cka_next": [report.cka[i][i + 1] for i in range(n)],
    })


def matrix_csv(matrix: Any) -> str:
    """An (L+1)x(L+1) state matrix as CSV with h_0..h_L headers."""
    n = len(matrix)
    names = [f"h_{i}" for i in range(n)]
    return pd.DataFrame([list(r) for r in matrix], index=names, columns=names).to_csv(index_label="state")


def current_marker(frame: Any, plan: Any, metric: str) -> dict[str, Any] | None:
    """The ``current=`` argument of :func:`layerlens.plots_curves.sweep_figure` for ``plan``: its ratio, and its
    value when the sweep evaluated it (a row with strategy ``current`` removing the same layers)."""
    if plan is None:
        return None
    value = None
    if frame is not None and len(frame) and metric in frame:
        layers = ",".join(map(str, plan.removed_layers))
        rows = frame[(frame["strategy"] == "current") & (frame["removed_layers"].fillna("").astype(str) == layers)]
        if len(rows) and rows[metric].notna().iloc[0]:
            value = float(rows[metric].iloc[0])
    return {"ratio": plan.ratio, "label": f"current plan ({plan.strategy})", "value": value}


__all__ = ["current_marker", "matrix_csv", "metrics_frame"]
