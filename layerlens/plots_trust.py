"""Plot builders for the evidence behind a ranking: leave-one-out damage and calibration-set comparison.

Pure functions returning a plotly ``Figure``, with the conventions of :mod:`layerlens.plots` (titles,
axis units, 0-based layers, hover text naming the unit, ``uirevision`` keyed by the data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.colors
import plotly.graph_objects as go

from .damage import METRIC_LABELS, METRICS, metric_values
from .plots import _figure, _layout, _revision, _title

_UNIT_ROWS = {"layer": "layers", "attn": "attn", "mlp": "mlp"}
_UNIT_NAMES = {"layer": "layer", "attn": "attention of layer", "mlp": "MLP of layer"}


def _diverging() -> list[list[Any]]:
    """Blue (negative) through white to red (positive), as plotly's validator writes a colorscale."""
    colors = list(reversed(plotly.colors.diverging.RdBu))
    return [[i / (len(colors) - 1), c] for i, c in enumerate(colors)]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def correlation_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``damage.json`` correlations as table rows (metric label, units, n, Spearman, Kendall, and the
    sign that means the metric predicts the damage)."""
    rows = []
    for name, c in doc.get("correlations", {}).items():
        rows.append({"metric": METRIC_LABELS.get(name, name), "key": name, "units": c["units"], "n": c["n"],
                     "Spearman": c["spearman"], "Kendall τ": c["kendall"],
                     "Spearman (KL)": c.get("spearman_kl"), "Kendall τ (KL)": c.get("kendall_kl"),
                     "predicts damage when": "positive" if c["expected_sign"] > 0 else "negative"})
    return rows


def damage_scatter(doc: Mapping[str, Any], report: Any, metric: str = "bi", *, log_y: bool = True) -> go.Figure:
    """Metric value (x) against measured perplexity increase when the unit alone is removed (y), one point
    per unit, labelled with its layer; the title gives Spearman and Kendall tau."""
    kind = METRICS[metric][0]
    rows = doc.get(_UNIT_ROWS[kind]) or []
    values = metric_values(report, metric) if report is not None else None
    if not rows or values is None:
        raise ValueError(f"no damage or no '{metric}' values to plot")
    x = [float(values[r["index"]]) for r in rows]
    y = [float(r["ppl_increase"]) for r in rows]
    idx = [int(r["index"]) for r in rows]
    hover = [f"{_UNIT_NAMES[kind]} {i}<br>{METRIC_LABELS.get(metric, metric)} {a:.4f}<br>perplexity +{b:.4g}"
             f"<br>KL {_fmt(r.get('kl'))}"
             for i, a, b, r in zip(idx, x, y, rows, strict=True)]
    trace = dict(type="scatter", mode="markers+text", x=x, y=y, text=[str(i) for i in idx], textposition="top center",
                 hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
                 marker=dict(size=9, color="#1f77b4"), name=METRIC_LABELS.get(metric, metric))
    c = doc.get("correlations", {}).get(metric)
    sub = None
    if c is not None and c.get("spearman") is not None:
        sub = f"Spearman {c['spearman']:+.2f}, Kendall τ {c['kendall']:+.2f} ({c['n']} units)"
    positive = all(v > 0 for v in y)
    layout = _layout(
        title=_title(f"{METRIC_LABELS.get(metric, metric)} vs measured damage", sub), height=460,
        uirevision=_revision("damage", metric, x, y),
        xaxis=dict(title=_title(f"{METRIC_LABELS.get(metric, metric)} (unitless)")),
        yaxis=dict(title=_title("Perplexity increase, unit alone removed"),
                   type="log" if log_y and positive else "linear"),
        showlegend=False)
    return _figure([trace], layout)


def damage_bars(doc: Mapping[str, Any]) -> go.Figure:
    """Perplexity with each layer (and sublayer) alone removed, one bar group per layer, on a log axis with
    the unpruned model's perplexity as a dashed line (a removal that helps is a bar below it)."""
    data = []
    colors = {"layers": "#1f77b4", "attn": "#ff7f0e", "mlp": "#2ca02c"}
    names = {"layers": "whole layer", "attn": "attention only", "mlp": "MLP only"}
    for key in ("layers", "attn", "mlp"):
        rows = doc.get(key) or []
        if not rows:
            continue
        data.append(dict(type="bar", name=names[key], x=[r["index"] for r in rows], y=[r["ppl"] for r in rows],
                         customdata=[r["ppl_increase"] for r in rows], marker=dict(color=colors[key]),
                         hovertemplate=f"{names[key]} %{{x}} removed<br>perplexity %{{y:.4g}} "
                                       "(%{customdata:+.4g})<extra></extra>"))
    base = doc.get("baseline_ppl")
    layout = _layout(
        title=_title("Leave-one-out damage", f"dashed: unpruned perplexity {base:.3f}" if base is not None else None),
        height=420, barmode="group", uirevision=_revision("damage-bars", [d["y"] for d in data]),
        xaxis=dict(title=_title("Decoder layer removed alone (0-based)"), tickmode="linear", tick0=0,
                   dtick=1 if len(doc.get("layers") or []) <= 32 else 2),
        yaxis=dict(title=_title("Held-out perplexity (log)"), type="log"),
        legend=dict(orientation="h", y=-0.2))
    if base is not None:
        layout["shapes"] = [dict(type="line", xref="paper", x0=0, x1=1, y0=base, y1=base,
                                 line=dict(color="#444", dash="dash", width=1.5))]
    return _figure(data, layout)


def rank_difference_heatmap(comp: Any) -> go.Figure:
    """Rows: calibration sets; columns: layers; colour: the layer's rank there minus its mean rank over the
    sets (blue: more redundant than on average, red: less); the cell text is the rank itself."""
    diff = np.asarray(comp.rank_difference(), dtype=float)
    ranks = np.asarray(comp.ranks, dtype=float)
    labels = list(comp.labels)
    layers = list(range(comp.num_layers))
    span = float(np.nanmax(np.abs(diff))) if diff.size else 1.0
    hover = [[f"{labels[r]}<br>layer {i}: rank {ranks[r][i]:g}<br>{diff[r][i]:+.1f} vs the mean rank"
              for i in layers] for r in range(len(labels))]
    heat = dict(type="heatmap", z=diff, x=layers, y=labels, text=[[f"{v:g}" for v in row] for row in ranks],
                texttemplate="%{text}", hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
                colorscale=_diverging(), zmid=0.0, zmin=-max(span, 1.0), zmax=max(span, 1.0),
                colorbar=dict(title=dict(text="rank − mean<br>(layers)", side="right"), thickness=16))
    tau = np.asarray(comp.tau, dtype=float)
    n = len(labels)
    off = [tau[a][b] for a in range(n) for b in range(a + 1, n) if np.isfinite(tau[a][b])]
    sub = (f"Kendall τ {off[0]:+.2f}" if n == 2 and off else
           f"Kendall τ {min(off):+.2f} to {max(off):+.2f}" if off else None)
    layout = _layout(
        title=_title(f"{METRIC_LABELS.get(comp.metric, comp.metric)} rank by calibration set", sub),
        height=max(260, 90 + 48 * n), uirevision=_revision("calib", ranks),
        xaxis=dict(title=_title("Decoder layer (0-based); cell: rank (1 = most redundant)"), tickmode="linear",
                   tick0=0, dtick=1 if len(layers) <= 32 else 2),
        yaxis=dict(title=_title("Calibration set"), autorange="reversed"))
    return _figure([heat], layout)


def rank_table(comp: Any) -> list[dict[str, Any]]:
    """Rankings side by side: one row per rank position, the layer each calibration set puts there."""
    out = []
    orders = [sorted(range(comp.num_layers), key=lambda i, r=r: (comp.ranks[r][i], i)) for r in range(len(comp.labels))]
    for pos in range(comp.num_layers):
        out.append({"rank": pos + 1, **{lab: orders[r][pos] for r, lab in enumerate(comp.labels)}})
    return out


def tau_rows(comp: Any) -> list[dict[str, Any]]:
    """Kendall tau between every pair of calibration sets, with the overlap of their k most redundant layers."""
    n = len(comp.labels)
    return [{"set A": comp.labels[a], "set B": comp.labels[b], "Kendall τ": float(comp.tau[a][b]),
             f"shared of the {comp.k} most redundant": int(comp.overlap[a][b])}
            for a in range(n) for b in range(a + 1, n)]


def metrics_with_damage(doc: Mapping[str, Any]) -> Sequence[str]:
    """The metrics ``damage.json`` has correlations for (the scatter's choices)."""
    return [m for m in doc.get("correlations", {}) if m in METRICS]
