"""Plot builders: pure functions that return a plotly ``Figure`` (no streamlit).

Per-layer figures live here; curves against the pruning ratio or the training step (sweeps, healing) in
:mod:`layerlens.plots_curves`, built with the same helpers. The dashboard draws these figures and the
CLI / Export page save the very same figures with :func:`layerlens.export.save_figure` (which also runs
the PNG renderer). Conventions for every builder:

* a title, axis titles with units, and decoder-layer indices 0-based (as in the CLI and ``LayerReport``);
* hover text that names the layer(s) and the value;
* no global state: the same inputs give the same figure;
* every title line short enough for half a wide page (:data:`TITLE_LINE_MAX` characters; a second line
  goes in ``<sup>``), so no title is cut off;
* ``layout.uirevision`` keyed by the data the figure shows (not by highlights or markers): a dashboard
  rerun that draws the same data keeps the user's zoom and pan.

Figures are built from complete specs (``data`` as trace dicts, ``layout`` as nested dicts, the template
resolved once) with plotly's property validation switched off (:func:`_figure`): validating a figure,
mostly re-validating and deep-copying the template, cost ~20 ms of every Prune-page rerun.
``tests/unit/test_plots.py`` validates every builder's spec instead (a validating ``go.Figure`` rebuilt from
it must give the same JSON).
"""

from __future__ import annotations

import copy
import functools
import hashlib
from typing import Any

import numpy as np
import pandas as pd  # noqa: F401 - imported before any figure can be built; see below
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

STATUS_COLORS = {"kept": "#4c9be8", "removed": "#d9534f", "merged": "#f0ad4e", "dropped": "#8e44ad"}
# The rows of a sublayer chart / strip: whole layer, its attention, its MLP (one colour each in grouped bars).
SUBLAYER_SERIES = {"bi": ("whole layer", "#4c9be8"), "attn_bi": ("attention", "#bcbd22"),
                   "mlp_bi": ("MLP", "#17becf")}
GROUP_COLOR = "#7a4a00"  # outline and bracket of a merge group on the layer strip

TEMPLATE = "plotly_white"

TITLE_LINE_MAX = 56  # characters per title line (tests/unit/test_plots.py checks every builder)


@functools.cache
def _template_spec() -> dict[str, Any]:
    """The registered template as plain JSON, resolved once per process (plotly looks it up and re-validates
    it on every ``template=`` assignment otherwise)."""
    return pio.templates[TEMPLATE].to_plotly_json()


def _layout(**props: Any) -> dict[str, Any]:
    """The common layout (template, margins, font) with ``props`` on top; a private copy of the template."""
    return dict(template=copy.deepcopy(_template_spec()), margin=dict(l=70, r=30, t=70, b=60),
                font=dict(size=13)) | props


def _title(text: str, sub: str | None = None) -> dict[str, str]:
    """A title, with an optional smaller second line."""
    return {"text": text + (f"<br><sup>{sub}</sup>" if sub else "")}


def _revision(*parts: Any) -> str:
    """A ``uirevision`` for the data ``parts`` (what the figure shows): equal data, equal revision."""
    h = hashlib.sha1()
    for part in parts:
        h.update(np.asarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()[:12]


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
    "attn_bi": ("Attention-sublayer BI per layer", "Attention BI = 1 − cos(h_i, m_i) (unitless)"),
    "mlp_bi": ("MLP-sublayer BI per layer", "MLP BI = 1 − cos(m_i, h_i+1) (unitless)"),
    "attn_magnitude": ("Attention Relative Magnitude per layer", "‖m_i − h_i‖ / ‖m_i‖ (unitless)"),
    "mlp_magnitude": ("MLP Relative Magnitude per layer", "‖h_i+1 − m_i‖ / ‖h_i+1‖ (unitless)"),
}
SUBLAYER_METRICS = ("attn_bi", "mlp_bi", "attn_magnitude", "mlp_magnitude")


def error_bounds(report: Any, metric: str) -> tuple[list[float], list[float]] | None:
    """The bootstrap interval ``(low, high)`` per layer of ``bi`` / ``attn_bi`` / ``mlp_bi``, or None."""
    low, high = getattr(report, f"{metric}_ci_low", None), getattr(report, f"{metric}_ci_high", None)
    if low is None or high is None:
        return None
    return [float(x) for x in low], [float(x) for x in high]


def _error_y(values: list[float], bounds: tuple[list[float], list[float]] | None) -> dict[str, Any] | None:
    if bounds is None:
        return None
    low, high = bounds
    return dict(type="data", symmetric=False, array=[max(h - v, 0.0) for v, h in zip(values, high, strict=True)],
                arrayminus=[max(v - lo, 0.0) for v, lo in zip(values, low, strict=True)], thickness=1.2, width=3,
                color="#444")


def bar_values(report: Any, metric: str = "bi", block_size: int = 1) -> list[float]:
    """The values :func:`bi_bar` draws: one per layer (bi, magnitude) or per block start (block_distance)."""
    if metric == "bi":
        return [float(x) for x in report.bi]
    if metric == "magnitude":
        return [float(x) for x in report.magnitude]
    if metric in SUBLAYER_METRICS:
        values = getattr(report, metric, None)
        if values is None:
            raise ValueError(f"this report has no {metric} (made before sublayers were measured, or the "
                             "architecture has no residual between attention and MLP)")
        return [float(x) for x in values]
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
    errors = _error_y(values, error_bounds(report, metric)) if n == 1 else None
    if errors is not None:  # bootstrap interval over calibration samples (LayerReport.bi_ci_low/high)
        bar["error_y"] = errors
        level = (getattr(report, "meta", {}).get("bootstrap") or {}).get("level", 0.95)
        bar["hovertemplate"] = bar["hovertemplate"].replace(
            "<extra>", f"<br>{level:.0%} interval: error bar<extra>")
    head, ytitle = BAR_METRICS[metric]
    step = 1 if len(values) <= 24 else 2 if len(values) <= 64 else _tick_step(len(values))
    return _figure([bar], _layout(
        title=_title(title) if title else _title(head.format(n=n), "low = redundant"),
        uirevision=_revision("bar", metric, n, values),
        xaxis=dict(title=_title("Decoder layer index (0-based)" if n == 1
                                else f"First layer of the {n}-layer block (0-based)"),
                   tickmode="linear", tick0=0, dtick=step, range=[-0.6, len(values) - 0.4], tickangle=0),
        yaxis=dict(title=_title(ytitle)), showlegend=False, bargap=0.15, dragmode="select",
    ))


def sublayer_bars(report: Any, highlight: Any = None, title: str | None = None) -> go.Figure:
    """Grouped bars per decoder layer: the whole layer's BI beside its attention and MLP sublayer BIs, with
    bootstrap error bars when the report has them. ``highlight``: a ``plan_summary`` list; bars of removed
    layers / dropped sublayers are outlined in red."""
    if getattr(report, "attn_bi", None) is None or getattr(report, "mlp_bi", None) is None:
        raise ValueError("this report has no attention/MLP BI (made before sublayers were measured, or the "
                         "architecture has no residual between attention and MLP)")
    n = report.num_layers
    marked: dict[str, set[int]] = {"bi": set(), "attn_bi": set(), "mlp_bi": set()}
    for r in highlight or ():
        if r.get("status") in ("removed", "merged") and r.get("into") != r["layer"]:
            marked["bi"].add(int(r["layer"]))
        if r.get("attn") == "dropped":
            marked["attn_bi"].add(int(r["layer"]))
        if r.get("mlp") == "dropped":
            marked["mlp_bi"].add(int(r["layer"]))
    data = []
    for metric, (label, color) in SUBLAYER_SERIES.items():
        values = [float(x) for x in getattr(report, metric)]
        bar = dict(type="bar", x=list(range(n)), y=values, name=label, marker=dict(
            color=color, line=dict(color=[STATUS_COLORS["removed"] if i in marked[metric] else color
                                          for i in range(n)], width=[3 if i in marked[metric] else 0
                                                                     for i in range(n)])),
            customdata=np.array([[i] for i in range(n)]),
            hovertemplate=f"<b>layer %{{x}}: {label}</b><br>BI %{{y:.5f}}<extra></extra>")
        errors = _error_y(values, error_bounds(report, metric))
        if errors is not None:
            bar["error_y"] = errors
        data.append(bar)
    return _figure(data, _layout(
        title=_title(title) if title else _title("BI of each layer and its two sublayers",
                                                 "low = redundant; error bars: bootstrap interval"),
        uirevision=_revision("sublayer-bars", n, report.bi, report.attn_bi, report.mlp_bi),
        xaxis=dict(title=_title("Decoder layer index (0-based)"), tickmode="linear", tick0=0,
                   dtick=1 if n <= 24 else _tick_step(n), range=[-0.6, n - 0.4]),
        yaxis=dict(title=_title("Block Influence = 1 − cosine (unitless)")), barmode="group", bargap=0.2,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
    ))


def rank_stability_bar(report: Any, k: int | None = None, title: str | None = None) -> go.Figure:
    """Per layer, how often (over bootstrap resamples of the calibration samples) it is among the ``k`` lowest
    BI (default: the report's ``rank_k``). 100 % or 0 %: a stable call; in between: the data decides."""
    k = k or (report.meta.get("bootstrap") or {}).get("rank_k") or 1
    values = report.stability(int(k))
    if values is None:
        raise ValueError("this report has no bootstrap rank frequencies (analyze with bootstrap > 0)")
    n = report.num_layers
    bar = dict(type="bar", x=list(range(n)), y=[100.0 * v for v in values], name="rank stability",
               marker=dict(color=["#2ca02c" if v >= 0.95 or v <= 0.05 else "#f0ad4e" for v in values]),
               hovertemplate=f"<b>layer %{{x}}</b><br>among the {k} lowest BI in %{{y:.0f}} % of resamples"
                             "<extra></extra>")
    resamples = (report.meta.get("bootstrap") or {}).get("resamples")
    return _figure([bar], _layout(
        title=_title(title) if title else _title(f"How often each layer is among the {k} lowest BI",
                                                 f"{resamples} bootstrap resamples of the calibration samples"),
        uirevision=_revision("stability", n, k, values),
        xaxis=dict(title=_title("Decoder layer index (0-based)"), tickmode="linear", tick0=0,
                   dtick=_tick_step_narrow(n), range=[-0.6, n - 0.4]),
        yaxis=dict(title=_title("Resamples (%)"), range=[0, 105]), showlegend=False,
    ))


def _tick_step(n: int) -> int:
    return 1 if n <= 32 else 2 if n <= 64 else 4 if n <= 128 else 8


def _tick_step_narrow(n: int) -> int:
    """Tick step for a chart drawn in a third of the page (30 labels at step 1 ran into each other)."""
    return 1 if n <= 12 else 2 if n <= 24 else 5 if n <= 60 else 10


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
        # As tall as the heatmap: the plot area is not constrained to squares, so it fills the height the
        # colour bar spans (square cells left white space beside a small map and a taller colour bar).
        colorbar=dict(title=dict(text=f"{HEATMAP_KINDS[kind]}<br>(unitless)", side="right"), len=1.0,
                      lenmode="fraction", y=0.5, yanchor="middle", thickness=16),
    )
    runs = [(g[0] + 1, g[-1] + 1) for g in groups or ()]
    shapes = [dict(type="rect", x0=s - 0.5, x1=e + 0.5, y0=s - 0.5, y1=e + 0.5, line=dict(color="red", width=3),
                   fillcolor="rgba(0,0,0,0)", name=f"run {s}-{e}") for s, e in runs]
    head = HEATMAP_KINDS[kind] + " between residual states"
    sub = None
    if threshold is not None:
        sub = f"{len(runs)} run(s) ≥ {threshold:.2f} outlined in red"
    elif groups is not None:
        sub = f"{len(runs)} merge group(s) outlined in red"
    step = 1 if size <= 20 else 2 if size <= 48 else _tick_step(size)
    layout = _layout(
        title=_title(title) if title else _title(head, sub), height=560, margin=dict(l=70, r=20, t=80, b=60),
        uirevision=_revision("heatmap", kind, m),
        xaxis=dict(title=_title("Residual state h_i (input of layer i; 0-based)"), tickmode="linear", tick0=0,
                   dtick=step),
        yaxis=dict(title=_title("Residual state h_j (input of layer j; 0-based)"), tickmode="linear", tick0=0,
                   dtick=step, autorange="reversed"),
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
    Each cell reads its layer index; each merge group is outlined and spanned by a bracket labelled
    ``a–b → 1`` (arrows inside narrow cells were unreadable and left the group boundaries invisible).
    """
    rows = sorted((dict(r) for r in summary), key=lambda r: int(r["layer"]))
    if any("attn" in r or "mlp" in r for r in rows):
        return _sublayer_strip(rows, title)
    bars = []
    for status in ("kept", "removed", "merged"):
        part = [r for r in rows if r.get("status") == status]
        if not part:
            continue
        hover = [f"layer {r['layer']}: " + (
            "kept" if status == "kept" else "removed" if status == "removed"
            else "merge base (the group's weights are merged here)" if r.get("into") == r["layer"]
            else f"merged into layer {r['into']}") for r in part]
        bars.append(dict(
            type="bar", x=[int(r["layer"]) for r in part], y=[1] * len(part), name=f"{status} ({len(part)})",
            marker=dict(color=STATUS_COLORS[status], line=dict(color="white", width=1)),
            text=[str(r["layer"]) for r in part], textposition="inside", insidetextanchor="middle", textangle=0,
            textfont=dict(color="white", size=12),
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>", width=0.95,
        ))
    n = len(rows)
    n_removed = sum(r.get("status") == "removed" for r in rows)
    merged = [r for r in rows if r.get("status") == "merged"]
    groups: dict[Any, list[int]] = {}
    for r in merged:
        groups.setdefault(r.get("into"), []).append(int(r["layer"]))
    gone = n_removed + len(merged) - len(groups)
    parts = [f"{n_removed} removed"] if n_removed or not merged else []
    if merged:
        parts.append(f"{len(merged)} merged into {len(groups)}")
    shapes, notes = [], []
    for layers in sorted(groups.values()):
        a, b = min(layers), max(layers)
        edge = dict(color=GROUP_COLOR, width=2.5)
        shapes.append(dict(type="rect", x0=a - 0.5, x1=b + 0.5, y0=0, y1=1, xref="x", yref="y", line=edge,
                           fillcolor="rgba(0,0,0,0)", name=f"merge group {a}-{b}"))
        shapes.append(dict(type="path", path=f"M {a - 0.4},1.05 L {a - 0.4},1.14 L {b + 0.4},1.14 L {b + 0.4},1.05",
                           xref="x", yref="y", line=edge, name=f"bracket {a}-{b}"))
        notes.append(dict(text=f"{a}–{b} → 1", x=(a + b) / 2, y=1.16, xref="x", yref="y", showarrow=False,
                          xanchor="center", yanchor="bottom", font=dict(size=12, color=GROUP_COLOR)))
    layout = _layout(
        title=_title(title) if title else _title(f"Layer plan: {n - gone} of {n} layers remain", ", ".join(parts)),
        uirevision=_revision("strip", n),
        xaxis=dict(title=_title("Decoder layer index (0-based)"), tickmode="linear", tick0=0, dtick=_tick_step(n),
                   range=[-0.6, max(n, 1) - 0.4], showgrid=False),
        yaxis=dict(visible=False, range=[0, 1.42 if groups else 1], fixedrange=True), barmode="overlay",
        height=270 if groups else 240,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
        margin=dict(l=30, r=30, t=90, b=50), uniformtext=dict(minsize=8, mode="hide"),
    )
    if shapes:
        layout["shapes"] = shapes
        layout["annotations"] = notes
    return _figure(bars, layout)


def _sublayer_strip(rows: list[dict[str, Any]], title: str | None) -> go.Figure:
    """The layer strip with two more rows: each layer's attention and MLP sublayer (kept / dropped, or
    removed / merged with the layer). Rows from the top: whole layer, attention, MLP."""
    n = len(rows)
    bars = []
    for key, base, label in (("status", 2, "layer"), ("attn", 1, "attention"), ("mlp", 0, "MLP")):
        for status in ("kept", "removed", "merged", "dropped"):
            part = [r for r in rows if r.get(key, r["status"]) == status]
            if not part:
                continue
            legend = key == "status" or status == "dropped"
            bars.append(dict(
                type="bar", x=[int(r["layer"]) for r in part], y=[0.92] * len(part), base=[base + 0.04] * len(part),
                name=f"{label} {status} ({len(part)})" if key != "status" else f"{status} ({len(part)})",
                showlegend=legend, legendgroup=status,
                marker=dict(color=STATUS_COLORS[status], line=dict(color="white", width=1)),
                text=[str(r["layer"]) for r in part] if key == "status" else None,
                textposition="inside", insidetextanchor="middle", textangle=0, textfont=dict(color="white", size=12),
                hovertext=[f"layer {r['layer']} {label}: {status}" for r in part],
                hovertemplate="%{hovertext}<extra></extra>", width=0.95,
            ))
    removed = sum(r["status"] == "removed" for r in rows)
    merged = [r for r in rows if r["status"] == "merged"]
    gone = removed + len(merged) - len({r.get("into") for r in merged})
    attn = sum(r.get("attn") == "dropped" for r in rows)
    mlp = sum(r.get("mlp") == "dropped" for r in rows)
    parts = ([f"{removed} removed"] if removed else []) + ([f"{len(merged)} merged"] if merged else [])
    parts += [f"{attn} attention, {mlp} MLP sublayers dropped"]
    layout = _layout(
        title=_title(title) if title else _title(f"Layer plan: {n - gone} of {n} layers remain", ", ".join(parts)),
        uirevision=_revision("strip-sub", n),
        xaxis=dict(title=_title("Decoder layer index (0-based)"), tickmode="linear", tick0=0, dtick=_tick_step(n),
                   range=[-0.6, max(n, 1) - 0.4], showgrid=False),
        yaxis=dict(range=[0, 3], fixedrange=True, tickmode="array", tickvals=[0.5, 1.5, 2.5],
                   ticktext=["MLP", "attention", "layer"], showgrid=False),
        barmode="overlay", height=320, legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
        margin=dict(l=80, r=30, t=90, b=50), uniformtext=dict(minsize=8, mode="hide"),
    )
    return _figure(bars, layout)


__all__ = [
    "STATUS_COLORS", "SUBLAYER_METRICS", "strategy_color", "bar_values", "bi_bar", "error_bounds",
    "rank_stability_bar", "similarity_heatmap", "layer_strip", "sublayer_bars",
]

