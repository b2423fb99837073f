"""Calibration-set comparison: the same model analyzed on two or more data sets, rankings side by side.

The calibration set can change a redundancy ranking more than the pruning algorithm does. Given reports
of one model on different data (:func:`compare_reports`), this module ranks the layers by one metric in
each (rank 1 = the most redundant: the lowest BI or magnitude, the highest similarity to the next layer),
and says how far the rankings agree: Kendall tau-b between every pair of reports, and how many of the k
layers a ranking would remove first they share. :func:`layerlens.plots_trust.rank_difference_heatmap`
draws each report's rank of every layer minus the layer's mean rank over the reports.

Not to be confused with :mod:`layerlens.compare` (the original vs the pruned model, before and after).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .damage import METRIC_LABELS, METRICS, average_ranks, kendall, metric_values
from .errors import LayerLensError
from .report import LayerReport

DEFAULT_METRIC = "bi"


@dataclass(frozen=True)
class CalibrationComparison:
    """``values[r][i]``: metric of layer i in report r; ``ranks[r][i]``: its rank there (1 = most redundant,
    ties share their average rank); ``tau[r][s]``: Kendall tau-b between reports r and s; ``overlap[r][s]``:
    how many of the ``k`` most redundant layers of r are among those of s."""

    labels: tuple[str, ...]
    metric: str
    values: np.ndarray
    ranks: np.ndarray
    tau: np.ndarray
    k: int
    overlap: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.values.shape[1])

    def lowest(self, r: int) -> tuple[int, ...]:
        """The ``k`` most redundant layers of report ``r`` (ties: lower index)."""
        order = sorted(range(self.num_layers), key=lambda i: (self.ranks[r][i], i))
        return tuple(sorted(order[: self.k]))

    def rank_difference(self) -> np.ndarray:
        """Each report's rank of each layer minus the layer's mean rank over all reports."""
        return self.ranks - self.ranks.mean(axis=0, keepdims=True)

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: its value and rank in every report (keys ``<label> value`` / ``<label> rank``)."""
        out = []
        for i in range(self.num_layers):
            row: dict[str, Any] = {"layer": i}
            for r, label in enumerate(self.labels):
                row[f"{label} value"] = float(self.values[r][i])
                row[f"{label} rank"] = float(self.ranks[r][i])
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "metric_label": METRIC_LABELS.get(self.metric, self.metric),
                "labels": list(self.labels), "values": self.values.tolist(), "ranks": self.ranks.tolist(),
                "kendall_tau": [[None if np.isnan(x) else float(x) for x in row] for row in self.tau],
                "k": self.k, "top_k_overlap": self.overlap.astype(int).tolist(),
                "top_k": [list(self.lowest(r)) for r in range(len(self.labels))]}


def report_label(report: LayerReport, fallback: str) -> str:
    """A short name for a report's calibration data (its data source, else ``fallback``)."""
    m = report.meta
    data = m.get("data")
    return f"{data}" if data else fallback


def _unique(labels: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} ({seen[lab]})")
    return tuple(out)


def compare_reports(reports: Sequence[LayerReport], labels: Sequence[str] | None = None, *,
                    metric: str = DEFAULT_METRIC, k: int | None = None) -> CalibrationComparison:
    """Rankings of ``metric`` in each report, Kendall tau between them and the top-``k`` overlap
    (default ``k = max(1, round(L / 4))``)."""
    if len(reports) < 2:
        raise LayerLensError("Comparing calibration sets needs at least two reports.")
    if metric not in METRICS:
        raise LayerLensError(f"Unknown `metric` '{metric}'; use one of {', '.join(METRICS)}.")
    sizes = {r.num_layers for r in reports}
    if len(sizes) != 1:
        raise LayerLensError(f"The reports are of models with different layer counts ({sorted(sizes)}); compare "
                             "reports of the same model.")
    num_layers = sizes.pop()
    labels = _unique(labels if labels is not None else [report_label(r, f"report {i + 1}") for i, r in enumerate(reports)])
    if len(labels) != len(reports):
        raise LayerLensError("Give one label per report.")
    rows = []
    for r, lab in zip(reports, labels, strict=True):
        v = metric_values(r, metric)
        if v is None:
            raise LayerLensError(f"The report '{lab}' has no '{metric}' values; analyze it again with this version.")
        rows.append(v)
    values = np.asarray(rows, dtype=float)
    sign = METRICS[metric][1]  # +1: a low value is redundant; -1: a high value is
    ranks = np.stack([average_ranks(sign * v) for v in values])
    n = len(reports)
    tau = np.array([[kendall(values[a], values[b]) for b in range(n)] for a in range(n)])
    k = max(1, round(num_layers / 4)) if k is None else int(k)
    if not 1 <= k <= num_layers:
        raise LayerLensError(f"`k` must be between 1 and {num_layers} (got {k}).")
    comp = CalibrationComparison(labels, metric, values, ranks, tau, k, np.zeros((n, n)))
    sets = [set(comp.lowest(r)) for r in range(n)]
    overlap = np.array([[len(sets[a] & sets[b]) for b in range(n)] for a in range(n)])
    return CalibrationComparison(labels, metric, values, ranks, tau, k, overlap)


def load_reports(paths: Sequence[str | Path]) -> tuple[list[LayerReport], list[str]]:
    """Reports read from ``report.json`` files (or folders holding one) and a label for each: the data
    source, else the file's folder name."""
    reports = [LayerReport.read(p) for p in paths]
    labels = []
    for p, r in zip(paths, reports, strict=True):
        path = Path(p)
        fallback = path.name if path.is_dir() else (path.parent.name or path.stem)
        labels.append(report_label(r, fallback))
    if len(set(labels)) < len(labels):  # same data: tell them apart by file
        labels = [f"{lab} [{Path(p).parent.name if not Path(p).is_dir() else Path(p).name}]"
                  for lab, p in zip(labels, paths, strict=True)]
    return reports, labels


def format_comparison(comp: CalibrationComparison) -> str:
    """The rankings side by side (rank per report, lowest first), tau between reports, top-k overlap."""
    w = max(8, *(len(lab) for lab in comp.labels))
    lines = [f"{METRIC_LABELS.get(comp.metric, comp.metric)} ranks (1 = most redundant)"]
    lines.append(f"{'layer':>5}  " + "  ".join(f"{lab:>{w}}" for lab in comp.labels))
    for i in range(comp.num_layers):
        cells = [f"{comp.ranks[r][i]:>{w - 12}g} ({comp.values[r][i]:.4f})" if w >= 18 else f"{comp.ranks[r][i]:>{w}g}"
                 for r in range(len(comp.labels))]
        lines.append(f"{i:>5}  " + "  ".join(f"{c:>{w}}" for c in cells))
    lines.append("Kendall tau between the rankings:")
    for a, lab in enumerate(comp.labels):
        lines.append(f"  {lab:>{w}}  " + "  ".join("   -  " if a == b else f"{comp.tau[a][b]:+.3f}"
                                                 for b in range(len(comp.labels))))
    lines.append(f"the {comp.k} most redundant layers: " + "; ".join(
        f"{lab}: {','.join(map(str, comp.lowest(r)))}" for r, lab in enumerate(comp.labels)))
    return "\n".join(lines)
