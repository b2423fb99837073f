"""Plot builders: pure functions that return a plotly ``Figure`` (no streamlit).

The dashboard draws these figures and the CLI / Export page save the very same figures with
:func:`save_figure`. Conventions for every builder:

* a title, axis titles with units, and decoder-layer indices 0-based (as in the CLI and ``LayerReport``);
* hover text that names the layer(s) and the value;
* no global state: the same inputs give the same figure.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

log = logging.getLogger(__name__)

# One color per strategy, stable across figures (sweep curves, markers, legend).
STRATEGY_COLORS = {
    "bi": "#1f77b4", "reverse": "#ff7f0e", "sequential": "#2ca02c", "magnitude": "#d62728",
    "block": "#9467bd", "streamline": "#8c564b", "slm": "#e377c2", "random": "#7f7f7f",
    "manual": "#17becf",
}
_FALLBACK_COLORS = ("#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")

STATUS_COLORS = {"kept": "#4c9be8", "removed": "#d9534f", "merged": "#f0ad4e"}

METRIC_LABELS = {
    "perplexity": "Perplexity (lower is better, log scale)",
    "mmlu_accuracy": "MMLU accuracy (%)",
}

_LAYOUT = dict(template="plotly_white", margin=dict(l=70, r=30, t=70, b=60), font=dict(size=13))


def strategy_color(name: str) -> str:
    if name in STRATEGY_COLORS:
        return STRATEGY_COLORS[name]
    return _FALLBACK_COLORS[sum(map(ord, name)) % len(_FALLBACK_COLORS)]


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

    ``frame``: a pandas DataFrame (or records) with columns ``strategy``, ``ratio`` (fraction of layers
    removed, 0..1), ``n_removed``, ``removed_layers`` and the ``metric`` column (``perplexity`` or
    ``mmlu_accuracy``, the latter a fraction 0..1 shown in %). Perplexity uses a log y axis.

    ``current``: the plan on screen, as a mapping ``{"ratio", "strategy"?, "value"?, "label"?}``, an object
    with a ``.ratio`` attribute (e.g. ``PrunePlan``) or a bare ratio. With a ``value`` it is drawn as a
    star; otherwise as a vertical dashed line at its ratio.
    """
    import pandas as pd

    if metric not in METRIC_LABELS:
        raise ValueError(f"metric must be one of {', '.join(METRIC_LABELS)}, got {metric!r}")
    df = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(list(frame))
    scale = 100.0 if metric == "mmlu_accuracy" else 1.0
    fig = go.Figure()
    if len(df) and metric in df.columns:
        df = df[pd.notna(df[metric])] if metric in df else df
        for strategy in sorted(df["strategy"].astype(str).unique()) if len(df) else []:
            part = df[df["strategy"].astype(str) == strategy].sort_values("ratio")
            removed = [_layers_text(v) for v in part.get("removed_layers", [None] * len(part))]
            n_removed = list(part["n_removed"]) if "n_removed" in part else [""] * len(part)
            fig.add_trace(go.Scatter(
                x=100.0 * part["ratio"].astype(float), y=scale * part[metric].astype(float),
                mode="lines+markers", name=strategy,
                line=dict(color=strategy_color(strategy), width=2), marker=dict(size=7),
                customdata=np.array(list(zip(n_removed, removed, strict=True)), dtype=object),
                hovertemplate=(f"<b>{strategy}</b><br>removed %{{x:.1f}}%% of layers (%{{customdata[0]}})"
                               f"<br>layers %{{customdata[1]}}<br>{_short(metric)} %{{y:.4g}}<extra></extra>"),
            ))
    cur = _current_point(current)
    if cur is not None and cur.get("ratio") is not None:
        x = 100.0 * float(cur["ratio"])
        label = str(cur.get("label") or "current plan")
        value = cur.get("value")
        if value is not None and np.isfinite(float(value)):
            fig.add_trace(go.Scatter(
                x=[x], y=[scale * float(value)], mode="markers", name=label,
                marker=dict(symbol="star", size=18, color="gold", line=dict(color="black", width=1.5)),
                hovertemplate=f"<b>{label}</b><br>removed %{{x:.1f}}%%<br>{_short(metric)} %{{y:.4g}}<extra></extra>",
            ))
        else:
            fig.add_vline(x=x, line=dict(color="black", dash="dash", width=1.5),
                          annotation_text=label, annotation_position="top")
    fig.update_layout(
        title=title or f"{_short(metric).capitalize()} vs. pruning ratio",
        xaxis_title="Pruning ratio (% of decoder layers removed)",
        yaxis_title=METRIC_LABELS[metric], legend_title="Strategy", hovermode="closest", **_LAYOUT,
    )
    fig.update_xaxes(ticksuffix="%", rangemode="tozero")
    if metric == "perplexity":
        fig.update_yaxes(type="log")
    else:
        fig.update_yaxes(ticksuffix="%")
    if not fig.data:
        fig.add_annotation(text="No sweep points yet", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper", font=dict(size=16, color="gray"))
    return fig


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


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------


def _chromium_for_kaleido() -> None:
    """Kaleido 1.x drives a Chrome; point it at a system Chromium when none is configured."""
    if os.environ.get("BROWSER_PATH"):
        return
    for candidate in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(candidate)
        if found:
            os.environ["BROWSER_PATH"] = found
            return


PNG_HINT = ("PNG export needs kaleido>=1 and a Chrome/Chromium: `pip install kaleido` and install "
            "chromium (or set BROWSER_PATH to a Chrome binary); the HTML file was written.")


def figure_png_bytes(fig: go.Figure, width: int = 1100, height: int = 650, scale: float = 2.0) -> bytes | None:
    """The figure as PNG bytes via kaleido, or ``None`` (and a logged hint) when it cannot be rendered."""
    _chromium_for_kaleido()
    try:
        return fig.to_image(format="png", width=width, height=height, scale=scale)
    except Exception as exc:  # kaleido missing, no Chrome, sandbox problems: all mean "no PNG"
        log.warning("%s (%s: %s)", PNG_HINT, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def save_figure(fig: go.Figure, path: str | Path, png: bool = True, width: int = 1100,
                height: int = 650) -> list[Path]:
    """Write ``<path>.html`` (always, self-contained) and ``<path>.png`` (when kaleido can render).

    ``path`` is taken without suffix (a ``.html``/``.png`` suffix is stripped). Returns the files
    written; a missing PNG is logged with :data:`PNG_HINT`. Files are written atomically.
    """
    from .runs import atomic_write_bytes, atomic_write_text

    path = Path(path)
    if path.suffix.lower() in (".html", ".png"):
        path = path.with_suffix("")
    written = [atomic_write_text(path.with_name(path.name + ".html"),
                                 fig.to_html(include_plotlyjs=True, full_html=True))]
    if png:
        data = figure_png_bytes(fig, width=width, height=height)
        if data is not None:
            written.append(atomic_write_bytes(path.with_name(path.name + ".png"), data))
    return written


__all__ = [
    "STRATEGY_COLORS", "STATUS_COLORS", "PNG_HINT", "strategy_color", "sweep_figure", "save_figure",
    "figure_png_bytes",
]

