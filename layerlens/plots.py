"""Plot builders: pure functions that return a plotly ``Figure`` (no streamlit).

The dashboard draws these figures and the CLI / Export page save the very same figures with
:func:`layerlens.export.save_figure` (which also runs the PNG renderer). Conventions for every builder:

* a title, axis titles with units, and decoder-layer indices 0-based (as in the CLI and ``LayerReport``);
* hover text that names the layer(s) and the value;
* no global state: the same inputs give the same figure.

Figures are built from complete specs (``data`` as trace dicts, ``layout`` as nested dicts, the template
resolved once) with plotly's property validation switched off (:func:`_figure`): validating a figure,
mostly re-validating and deep-copying the template, cost ~20 ms of every Prune-page rerun.
``tests/test_plots.py`` validates every builder's spec instead (a validating ``go.Figure`` rebuilt from
it must give the same JSON).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd  # imported before any figure can be built; see below
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio

from .plans.registry import get_strategy, is_registered

# Plotly converts trace data by looking pandas up in ``sys.modules`` without importing it. When another
# thread is importing pandas for the first time at that moment (two dashboard sessions on a fresh server),
# plotly gets the half-initialised module and fails with "partially initialized module 'pandas' has no
# attribute 'Series'". Importing pandas with this module means every thread that can build a figure finds
# pandas complete.

# Colours of names that are not registered strategies (e.g. a sweep's "current" plan), stable per name.
_FALLBACK_COLORS = ("#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")

STATUS_COLORS = {"kept": "#4c9be8", "removed": "#d9534f", "merged": "#f0ad4e"}

METRIC_LABELS = {
    "perplexity": "Perplexity (lower is better, log scale)",
    "mmlu_accuracy": "MMLU accuracy (%)",
}

TEMPLATE = "plotly_white"


@functools.cache
def _template_spec() -> dict[str, Any]:
    """The registered template as plain JSON, resolved once per process (plotly looks it up and re-validates
    it on every ``template=`` assignment otherwise)."""
    return pio.templates[TEMPLATE].to_plotly_json()


def _layout(**props: Any) -> dict[str, Any]:
    """The common layout (template, margins, font) with ``props`` on top; a private copy of the template."""
    return dict(template=copy.deepcopy(_template_spec()), margin=dict(l=70, r=30, t=70, b=60),
                font=dict(size=13)) | props


def _title(text: str) -> dict[str, str]:
    return {"text": text}


def _figure(data: list[dict[str, Any]], layout: dict[str, Any]) -> go.Figure:
    """A figure from a complete spec without plotly's per-property validation (see the module docstring).

    Write specs as plotly's JSON has them: nested dicts (``xaxis={"title": {"text": ...}}``, no
    ``xaxis_title`` shorthand), ``"type"`` in every trace, lists or numpy arrays for data.
    """
    return go.Figure(data=data, layout=layout, _validate=False)


def strategy_color(name: str) -> str:
    """A strategy's colour from the registry, stable across figures (sweep curves, markers, legend)."""
    if is_registered(name):
        return get_strategy(name).color
    return _FALLBACK_COLORS[sum(map(ord, name)) % len(_FALLBACK_COLORS)]


# ----------------------------------------------------------------------------------------------------------
# Per-layer bars: Block Influence, Relative Magnitude, block distance
# ----------------------------------------------------------------------------------------------------------

BAR_METRICS = {
    "bi": ("Block Influence (BI) per layer", "Block Influence = 1 − cos(h_i, h_i+1) (unitless)"),
    "magnitude": ("Relative Magnitude per layer", "Relative Magnitude = ‖h_i+1 − h_i‖ / ‖h_i+1‖ (unitless)"),
    "block_distance": ("Angular distance across a block of {n} layer(s)",
                       "Angular distance arccos(cos(h_i, h_i+n)) / π (0–1)"),
}


def bar_values(report: Any, metric: str = "bi", block_size: int = 1) -> list[float]:
    """The values :func:`bi_bar` draws: one per layer (bi, magnitude) or per block start (block_distance)."""
    if metric == "bi":
        return [float(x) for x in report.bi]
    if metric == "magnitude":
        return [float(x) for x in report.magnitude]
    if metric == "block_distance":
        n = int(block_size)
        if not 1 <= n <= report.num_layers:
            raise ValueError(f"block_size must be between 1 and {report.num_layers}, got {block_size}")
        return [float(x) for x in report.block_distance[n - 1]]
    raise ValueError(f"metric must be one of {', '.join(BAR_METRICS)}, got {metric!r}")


def bi_bar(report: Any, metric: str = "bi", block_size: int = 1, highlight: Any = (),
           title: str | None = None) -> go.Figure:
    """Bar per decoder layer (0-based): BI, Relative Magnitude, or block distance for ``block_size`` layers.

    Low bars are the redundant layers. ``highlight``: layer indices drawn in red (e.g. the current plan's
    removed layers); for block distance a bar (block start i) is red when its block touches one. The bars
    carry the layer index in ``customdata`` so a box/lasso selection maps back to layers.
    """
    values = bar_values(report, metric, block_size)
    n = int(block_size) if metric == "block_distance" else 1
    marked = {int(i) for i in highlight}
    starts = list(range(len(values)))
    is_marked = [any(j in marked for j in range(i, i + n)) for i in starts]
    colors = [STATUS_COLORS["removed"] if m else STATUS_COLORS["kept"] for m in is_marked]
    labels = [f"layer {i}" if n == 1 else f"layers {i}–{i + n - 1}" for i in starts]
    lowest = sorted(starts, key=lambda i: (values[i], i))
    rank = {i: r + 1 for r, i in enumerate(lowest)}
    bar = dict(
        type="bar", x=starts, y=values, marker=dict(color=colors),
        customdata=np.array([[i, rank[i]] for i in starts]), name=metric,
        hovertext=[f"{lab}{' (selected)' if m else ''}" for lab, m in zip(labels, is_marked, strict=True)],
        hovertemplate="<b>%{hovertext}</b><br>value %{y:.5f}<br>rank %{customdata[1]} (1 = most redundant)"
                      "<extra></extra>",
    )
    head, ytitle = BAR_METRICS[metric]
    step = 1 if len(values) <= 24 else 2 if len(values) <= 64 else _tick_step(len(values))
    return _figure([bar], _layout(
        title=_title(title or head.format(n=n) + " — low = redundant"),
        xaxis=dict(title=_title("Decoder layer index (0-based)" if n == 1
                                else f"First layer of the {n}-layer block (0-based)"),
                   tickmode="linear", tick0=0, dtick=step, range=[-0.6, len(values) - 0.4], tickangle=0),
        yaxis=dict(title=_title(ytitle)), showlegend=False, bargap=0.15, dragmode="select",
    ))


def _tick_step(n: int) -> int:
    return 1 if n <= 32 else 2 if n <= 64 else 4 if n <= 128 else 8


# ----------------------------------------------------------------------------------------------------------
# Similarity heatmaps with runs of consecutive similar layers
# ----------------------------------------------------------------------------------------------------------


HEATMAP_KINDS = {"cosine": "Cosine similarity", "cka": "Linear CKA"}


def similarity_heatmap(report: Any, kind: str = "cosine", threshold: float | None = None,
                       title: str | None = None, groups: Any = None) -> go.Figure:
    """(L+1)x(L+1) heatmap of residual-state similarity, states h_0..h_L labelled 0..L.

    State h_i is the input of decoder layer i (h_L the last layer's output, before the final norm), as in
    ``LayerReport``. ``groups`` (lists of consecutive layer indices) are outlined: layer i's output is
    state h_{i+1}, so a group (a..b) is the square of states a+1..b+1. Pass the groups sliding layer merging
    collapses at a ``threshold`` (:func:`layerlens.plans.slm.merge_groups`) together with that threshold,
    which the title then names, or a plan's own merge groups alone.
    """
    if kind not in HEATMAP_KINDS:
        raise ValueError(f"kind must be one of {', '.join(HEATMAP_KINDS)}, got {kind!r}")
    m = np.asarray(getattr(report, kind), dtype=float)
    size = m.shape[0]
    idx = list(range(size))
    hover = [[f"h_{a} vs h_{b}<br>{HEATMAP_KINDS[kind]} {m[a, b]:.4f}<br>"
              f"{_span_text(a, b)}" for b in idx] for a in idx]
    zmin = 0.0 if kind == "cka" else float(min(0.0, np.nanmin(m)))
    heat = dict(
        type="heatmap", z=m, x=idx, y=idx, text=hover, hovertemplate="%{text}<extra></extra>",
        colorscale=_colorscale("Viridis"), zmin=zmin, zmax=1.0,
        colorbar=dict(title=dict(text=f"{HEATMAP_KINDS[kind]}<br>(unitless)", side="right")),
    )
    runs = [(g[0] + 1, g[-1] + 1) for g in groups or ()]
    shapes = [dict(type="rect", x0=s - 0.5, x1=e + 0.5, y0=s - 0.5, y1=e + 0.5, line=dict(color="red", width=3),
                   fillcolor="rgba(0,0,0,0)", name=f"run {s}-{e}") for s, e in runs]
    head = HEATMAP_KINDS[kind] + " between residual states"
    if threshold is not None:
        head += f" — {len(runs)} run(s) ≥ {threshold:.2f} outlined"
    elif groups is not None:
        head += f" — {len(runs)} merge group(s) outlined"
    step = 1 if size <= 20 else 2 if size <= 48 else _tick_step(size)
    layout = _layout(
        title=_title(title or head), height=560,
        xaxis=dict(title=_title("Residual state h_i (input of layer i; 0-based)"), tickmode="linear", tick0=0,
                   dtick=step, constrain="domain"),
        yaxis=dict(title=_title("Residual state h_j (input of layer j; 0-based)"), tickmode="linear", tick0=0,
                   dtick=step, autorange="reversed", scaleanchor="x", constrain="domain"),
    )
    if shapes:
        layout["shapes"] = shapes
    return _figure([heat], layout)


def _colorscale(name: str) -> list[list[Any]]:
    """A named sequential colorscale as plotly's validator writes it: [[i / (n - 1), color], ...]."""
    colors = getattr(plotly.colors.sequential, name)
    return [[i / (len(colors) - 1), c] for i, c in enumerate(colors)]


def _span_text(a: int, b: int) -> str:
    lo, hi = min(a, b), max(a, b)
    if lo == hi:
        return "same state"
    if hi - lo == 1:
        return f"across layer {lo}"
    return f"across layers {lo}–{hi - 1} ({hi - lo} layers)"


# ----------------------------------------------------------------------------------------------------------
# Layer strip: kept / removed / merged per layer
# ----------------------------------------------------------------------------------------------------------


def layer_strip(summary: Any, title: str | None = None) -> go.Figure:
    """One cell per decoder layer (0-based) colored kept / removed / merged, from ``plan_summary(plan)``.

    ``summary``: a list of ``{"layer": i, "status": "kept"|"removed"|"merged", "into": j or None}``.
    Merged cells read ``i→j`` (merged into layer j).
    """
    rows = sorted((dict(r) for r in summary), key=lambda r: int(r["layer"]))
    bars = []
    for status in ("kept", "removed", "merged"):
        part = [r for r in rows if r.get("status") == status]
        if not part:
            continue
        text = [f"{r['layer']}→{r['into']}" if status == "merged" and r.get("into") not in (None, r["layer"])
                else str(r["layer"]) for r in part]
        hover = [f"layer {r['layer']}: " + (
            "kept" if status == "kept" else "removed" if status == "removed"
            else "merge base (the group's weights are merged here)" if r.get("into") == r["layer"]
            else f"merged into layer {r['into']}") for r in part]
        bars.append(dict(
            type="bar", x=[int(r["layer"]) for r in part], y=[1] * len(part), name=f"{status} ({len(part)})",
            marker=dict(color=STATUS_COLORS[status], line=dict(color="white", width=1)),
            text=text, textposition="inside", insidetextanchor="middle", textangle=0,
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", width=0.95,
        ))
    n = len(rows)
    n_removed = sum(r.get("status") == "removed" for r in rows)
    merged = [r for r in rows if r.get("status") == "merged"]
    groups = {r.get("into") for r in merged}
    gone = n_removed + len(merged) - len(groups)
    parts = [f"{n_removed} removed"] if n_removed or not merged else []
    if merged:
        parts.append(f"{len(merged)} merged into {len(groups)}")
    return _figure(bars, _layout(
        title=_title(title or f"Layer plan: {n - gone} of {n} layers remain ({', '.join(parts)})"),
        xaxis=dict(title=_title("Decoder layer index (0-based)"), tickmode="linear", tick0=0, dtick=_tick_step(n),
                   range=[-0.6, max(n, 1) - 0.4], showgrid=False),
        yaxis=dict(visible=False, range=[0, 1]), barmode="overlay", height=230,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
        margin=dict(l=30, r=30, t=80, b=50), uniformtext=dict(minsize=8, mode="hide"),
    ))


# ----------------------------------------------------------------------------------------------------------
# Sweep curves (ShortGPT Figure 5 style)
# ----------------------------------------------------------------------------------------------------------


def _current_point(current: Any) -> dict[str, Any] | None:
    """Normalise ``current`` (a mapping, a plan-like object with ``.ratio``, or a bare ratio)."""
    if current is None:
        return None
    if isinstance(current, (int, float)):
        return {"ratio": float(current)}
    if isinstance(current, Mapping):
        return dict(current)
    out: dict[str, Any] = {}
    for key in ("ratio", "strategy", "n_removed", "label"):
        if hasattr(current, key):
            out[key] = getattr(current, key)
    return out if "ratio" in out else None


def sweep_figure(frame: Any, metric: str = "perplexity", current: Any = None,
                 title: str | None = None) -> go.Figure:
    """Metric against pruning ratio, one curve per strategy; the current plan marked.

    ``frame``: a pandas DataFrame (or records) with columns ``strategy``, ``actual_ratio`` (fraction of
    layers removed, 0..1; frames without it are drawn against ``ratio``), ``n_removed``, ``removed_layers``
    and the ``metric`` column (``perplexity`` or ``mmlu_accuracy``, the latter a fraction 0..1 shown in %).
    Perplexity uses a log y axis.

    ``current``: the plan on screen, as a mapping ``{"ratio", "strategy"?, "value"?, "label"?}``, an object
    with a ``.ratio`` attribute (e.g. ``PrunePlan``) or a bare ratio. With a ``value`` it is drawn as a
    star; otherwise as a vertical dashed line at its ratio.
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"metric must be one of {', '.join(METRIC_LABELS)}, got {metric!r}")
    df = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(list(frame))
    scale = 100.0 if metric == "mmlu_accuracy" else 1.0
    traces: list[dict[str, Any]] = []
    layout = _layout(
        title=_title(title or f"{ {'perplexity': 'Perplexity', 'mmlu_accuracy': 'MMLU accuracy'}[metric]} vs. "
                     "pruning ratio"),
        xaxis=dict(title=_title("Pruning ratio (% of decoder layers removed)"), ticksuffix="%", rangemode="tozero"),
        yaxis=dict(title=_title(METRIC_LABELS[metric])) | (
            dict(type="log") if metric == "perplexity" else dict(ticksuffix="%")),
        legend=dict(title=_title("Strategy")), hovermode="closest",
    )
    if len(df) and metric in df.columns:
        df = df[pd.notna(df[metric])] if metric in df else df
        x_col = "actual_ratio" if "actual_ratio" in df else "ratio"  # the removed fraction, when known
        for strategy in sorted(df["strategy"].astype(str).unique()) if len(df) else []:
            part = df[df["strategy"].astype(str) == strategy].sort_values(x_col)
            removed = [_layers_text(v) for v in part.get("removed_layers", [None] * len(part))]
            n_removed = list(part["n_removed"]) if "n_removed" in part else [""] * len(part)
            traces.append(dict(
                type="scatter", x=100.0 * part[x_col].to_numpy(dtype=float),
                y=scale * part[metric].to_numpy(dtype=float), mode="lines+markers", name=strategy,
                line=dict(color=strategy_color(strategy), width=2), marker=dict(size=7),
                customdata=np.array(list(zip(n_removed, removed, strict=True)), dtype=object),
                hovertemplate=(f"<b>{strategy}</b><br>removed %{{x:.1f}}% of layers (%{{customdata[0]}})"
                               f"<br>layers %{{customdata[1]}}<br>{_short(metric)} %{{y:.4g}}<extra></extra>"),
            ))
    cur = _current_point(current)
    if cur is not None and cur.get("ratio") is not None:
        x = 100.0 * float(cur["ratio"])
        label = str(cur.get("label") or "current plan")
        value = cur.get("value")
        if value is not None and np.isfinite(float(value)):
            traces.append(dict(
                type="scatter", x=[x], y=[scale * float(value)], mode="markers", name=label,
                marker=dict(symbol="star", size=18, color="gold", line=dict(color="black", width=1.5)),
                hovertemplate=f"<b>{label}</b><br>removed %{{x:.1f}}%<br>{_short(metric)} %{{y:.4g}}<extra></extra>",
            ))
        else:  # a vertical line across the plot, labelled above it (what fig.add_vline draws)
            layout["shapes"] = [dict(type="line", x0=x, x1=x, xref="x", y0=0, y1=1, yref="y domain",
                                     line=dict(color="black", dash="dash", width=1.5))]
            layout["annotations"] = [dict(text=label, showarrow=False, x=x, xref="x", y=1, yref="y domain",
                                          xanchor="center", yanchor="bottom")]
    if not traces:
        layout.setdefault("annotations", []).append(dict(
            text="No sweep points yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
            font=dict(size=16, color="gray")))
    return _figure(traces, layout)


def _short(metric: str) -> str:
    return {"perplexity": "perplexity", "mmlu_accuracy": "MMLU accuracy"}.get(metric, metric)


def _layers_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value or "-"
    try:
        items = [int(v) for v in value]
    except TypeError:
        return str(value)
    return ", ".join(map(str, items)) if items else "none"


__all__ = [
    "STATUS_COLORS", "strategy_color", "bar_values", "bi_bar",
    "similarity_heatmap", "layer_strip", "sweep_figure",
]

