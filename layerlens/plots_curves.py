"""Curve figures: quality against the pruning ratio (sweeps, ShortGPT Figure 5 style) and healing's
training loss and held-out perplexity against the step. Pure plotly, the conventions and helpers of
:mod:`layerlens.plots`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .plots import _figure, _layout, _revision, _title, strategy_color

METRIC_LABELS = {
    "perplexity": "Perplexity (lower is better, log scale)",
    "mmlu_accuracy": "MMLU accuracy (%)",
    "kl": "KL(original ‖ pruned), nats per token",
    "top1_agreement": "Top-1 agreement with the original (%)",
}
PERCENT_METRICS = ("mmlu_accuracy", "top1_agreement")
_HEADS = {"perplexity": "Perplexity", "mmlu_accuracy": "MMLU accuracy", "kl": "KL to the original",
          "top1_agreement": "Top-1 agreement with the original"}

MMLU_CHANCE = 25.0  # % accuracy of guessing among four answers

# ----------------------------------------------------------------------------------------------------------
# Sweep curves
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


def healed_rows(frame: pd.DataFrame) -> pd.Series:
    """Which rows of a sweep frame are healed points (its ``healed`` column: bools, or their text in a
    frame read back from CSV); all False without the column."""
    if "healed" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["healed"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))


def _curve(part: pd.DataFrame, x_col: str, metric: str, scale: float, strategy: str, healed: bool) -> dict:
    removed = [_layers_text(v) for v in part.get("removed_layers", [None] * len(part))]
    n_removed = list(part["n_removed"]) if "n_removed" in part else [""] * len(part)
    name = f"{strategy} (healed)" if healed else strategy
    return dict(
        type="scatter", x=100.0 * part[x_col].to_numpy(dtype=float), y=scale * part[metric].to_numpy(dtype=float),
        mode="lines+markers", name=name, legendgroup=strategy,
        line=dict(color=strategy_color(strategy), width=2) | (dict(dash="dash") if healed else {}),
        marker=dict(size=7) | (dict(symbol="diamond") if healed else {}),
        customdata=np.array(list(zip(n_removed, removed, strict=True)), dtype=object),
        hovertemplate=(f"<b>{name}</b><br>removed %{{x:.1f}}% of layers (%{{customdata[0]}})"
                       f"<br>layers %{{customdata[1]}}<br>{_short(metric)} %{{y:.4g}}<extra></extra>"),
    )


def sweep_figure(frame: Any, metric: str = "perplexity", current: Any = None,
                 title: str | None = None) -> go.Figure:
    """Metric against pruning ratio, one curve per strategy; the current plan marked.

    ``frame``: a pandas DataFrame (or records) with columns ``strategy``, ``actual_ratio`` (fraction of
    layers removed, 0..1; frames without it are drawn against ``ratio``), ``n_removed``, ``removed_layers``
    and the ``metric`` column (``perplexity``, ``mmlu_accuracy``, ``kl`` or ``top1_agreement``; accuracy and
    agreement are fractions 0..1 shown in %). Perplexity uses a log y axis; KL (0 for the unpruned model, smooth
    where MMLU sits at chance) a linear one. A frame with a ``healed`` column (a sweep that healed every point) gets a
    second curve per strategy for its healed rows, dashed in the strategy's colour ("bi (healed)"): the
    pruned and healed points of one ratio are never joined into one zigzag line.

    ``current``: the plan on screen, as a mapping ``{"ratio", "strategy"?, "value"?, "label"?}``, an object
    with a ``.ratio`` attribute (e.g. ``PrunePlan``) or a bare ratio. With a ``value`` it is drawn as a
    star; otherwise as a vertical dashed line at its ratio.

    MMLU is drawn on a range that always includes the 25 % chance line (0–50 %, or up to the data): a
    range zoomed to the data (21–26 %) made noise around chance look like a trend.
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"metric must be one of {', '.join(METRIC_LABELS)}, got {metric!r}")
    df = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(list(frame))
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    traces: list[dict[str, Any]] = []
    has_healed = bool(len(df)) and bool(healed_rows(df).any())
    head = f"{_HEADS[metric]} vs. pruning ratio"
    layout = _layout(
        title=_title(title) if title else _title(head, "dashed: after healing" if has_healed else None),
        xaxis=dict(title=_title("Pruning ratio (% of layers removed; a sublayer counts ½)"), ticksuffix="%",
                   rangemode="tozero"),
        yaxis=dict(title=_title(METRIC_LABELS[metric])) | (
            dict(type="log") if metric == "perplexity" else dict(ticksuffix="%") if metric in PERCENT_METRICS
            else dict(rangemode="tozero")),
        legend=dict(title=_title("Strategy")), hovermode="closest",
    )
    if len(df) and metric in df.columns:
        df = df[pd.notna(df[metric])]
        x_col = "actual_ratio" if "actual_ratio" in df else "ratio"  # the removed fraction, when known
        healed = healed_rows(df)
        for strategy in sorted(df["strategy"].astype(str).unique()) if len(df) else []:
            mine = df["strategy"].astype(str) == strategy
            for is_healed in (False, True):
                part = df[mine & (healed == is_healed)].sort_values(x_col)
                if len(part):
                    traces.append(_curve(part, x_col, metric, scale, strategy, is_healed))
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
    curves = [t for t in traces if t.get("mode") == "lines+markers"]
    layout["uirevision"] = _revision("sweep", metric, [(t["name"], list(t["x"]), list(t["y"])) for t in curves])
    if metric == "mmlu_accuracy":
        ys = [float(y) for t in traces for y in t["y"] if np.isfinite(float(y))]
        top = max(50.0, 10.0 * np.ceil((max(ys, default=0.0) + 5.0) / 10.0))
        layout["yaxis"]["range"] = [0.0, min(top, 100.0)]
        layout.setdefault("shapes", []).append(dict(
            type="line", x0=0, x1=1, xref="paper", y0=MMLU_CHANCE, y1=MMLU_CHANCE, yref="y",
            line=dict(color="gray", dash="dot", width=1.5), name="chance"))
        layout.setdefault("annotations", []).append(dict(
            text=f"chance ({MMLU_CHANCE:.0f}%)", showarrow=False, x=0.01, xref="paper", y=MMLU_CHANCE, yref="y",
            xanchor="left", yanchor="bottom", font=dict(color="gray", size=12)))
    if not traces:
        layout.setdefault("annotations", []).append(dict(
            text="No sweep points yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
            font=dict(size=16, color="gray")))
    return _figure(traces, layout)


def _short(metric: str) -> str:
    return {"perplexity": "perplexity", "mmlu_accuracy": "MMLU accuracy", "kl": "KL",
            "top1_agreement": "top-1 agreement"}.get(metric, metric)


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
# Healing: training loss per step, held-out perplexity per checkpoint
# ----------------------------------------------------------------------------------------------------------

LOSS_COLOR = "#4c9be8"
PPL_COLOR = "#d9534f"


def heal_curve(curve: Sequence[Sequence[float]], evals: Sequence[Sequence[float]],
               best_step: int | None = None, title: str | None = None) -> go.Figure:
    """Healing's progress: the training loss of every step (left axis) and the held-out perplexity of
    every checkpoint (right axis, log scale; step 0 is the pruned model before healing).

    ``curve``: ``[[step, loss], ...]`` and ``evals``: ``[[step, perplexity, seconds], ...]`` as
    :class:`layerlens.heal.HealResult` has them (also while training: the figure is redrawn as they grow).
    ``best_step``: the checkpoint kept, ringed. The two losses' units differ (next-token loss in nats per
    token; distillation is KL × T²), so the axis says "training loss" only.
    """
    steps = [float(c[0]) for c in curve]
    losses = [float(c[1]) for c in curve]
    e_steps = [float(e[0]) for e in evals]
    ppls = [float(e[1]) for e in evals]
    secs = [float(e[2]) if len(e) > 2 else float("nan") for e in evals]
    traces: list[dict[str, Any]] = [
        dict(type="scatter", x=steps, y=losses, mode="lines", name="training loss", yaxis="y",
             line=dict(color=LOSS_COLOR, width=1.5),
             hovertemplate="step %{x}<br>training loss %{y:.4f}<extra></extra>"),
        dict(type="scatter", x=e_steps, y=ppls, mode="lines+markers", name="held-out perplexity", yaxis="y2",
             line=dict(color=PPL_COLOR, width=2), marker=dict(size=8), customdata=np.array(secs),
             hovertemplate="step %{x} (%{customdata:.0f} s)<br>held-out perplexity %{y:.4g}<extra></extra>"),
    ]
    if best_step is not None and int(best_step) in [int(s) for s in e_steps]:
        i = [int(s) for s in e_steps].index(int(best_step))
        traces.append(dict(type="scatter", x=[e_steps[i]], y=[ppls[i]], mode="markers", name="kept (best)",
                           yaxis="y2", marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color="black", width=2)),
                           hovertemplate="kept: step %{x}<br>held-out perplexity %{y:.4g}<extra></extra>"))
    sub = f"{len(curve)} steps · {len(evals)} checkpoints" if curve or evals else "waiting for the first step"
    layout = _layout(
        title=_title(title) if title else _title("Healing: loss and held-out perplexity", sub),
        uirevision=_revision("heal", ppls[:1]),
        xaxis=dict(title=_title("Optimizer step"), rangemode="tozero"),
        yaxis=dict(title=_title("Training loss"), rangemode="tozero", color=LOSS_COLOR),
        yaxis2=dict(title=_title("Held-out perplexity (log scale)"), type="log", overlaying="y", side="right",
                    showgrid=False, color=PPL_COLOR),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1), hovermode="closest",
        margin=dict(l=70, r=80, t=90, b=60),
    )
    return _figure(traces, layout)


__all__ = ["MMLU_CHANCE", "METRIC_LABELS", "PERCENT_METRICS", "heal_curve", "healed_rows", "sweep_figure"]
