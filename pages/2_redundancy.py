"""Redundancy: per-layer bars (BI / Relative Magnitude / block distance) and similarity heatmaps.

Sliders only re-draw: the metrics come from the session's report and are never recomputed here.
"""

from __future__ import annotations

import streamlit as st

from layerlens.plans.slm import criteria_disagreement, merge_groups
from layerlens.plots import bi_bar, similarity_heatmap
from pages._ui import jobs, keys, widgets

report = jobs.report_page(__file__, "Redundancy")

L = report.num_layers
BAR_LABELS = {"bi": "Block Influence (BI)", "magnitude": "Relative Magnitude", "block_distance": "Block distance"}

with st.container(border=True):
    c1, c2 = st.columns([2, 1])
    metric = c1.radio("Per-layer metric", list(BAR_LABELS), format_func=BAR_LABELS.get, horizontal=True,
                      key="rd_metric", persist_state="session")
    block = 1
    if metric == "block_distance":
        block = c2.slider("Block size n (layers)", 1, max(1, L - 1), min(4, max(1, L - 1)), key="rd_block",
                          persist_state="session",
                          help="Angular distance between the input of layer i and the output of layer i+n−1")
    plan = st.session_state.get(keys.SS_PLAN)
    highlight = plan.removed_layers if plan is not None else ()
    widgets.chart(bi_bar(report, metric, block_size=block, highlight=highlight), key="rd_bar")
    lowest = sorted(range(len(report.bi)), key=lambda i: report.bi[i])[:5]
    st.caption(f"Most redundant by BI (lowest first): layers {', '.join(map(str, lowest))}."
               + (f" Red: the current plan's removed layers {list(highlight)}." if highlight else ""))

with st.container(border=True):
    t1, t2 = st.columns([2, 1])
    threshold = t1.slider("Similarity threshold: outline runs of consecutive layers at or above it",
                          0.50, 1.00, 0.90, 0.01, key="rd_threshold", persist_state="session",
                          help="Outlines the runs of consecutive layers whose outputs stay at least this similar "
                               "(sliding layer merging's rule, from the top layer down): the patch-like blocks "
                               "SLM collapses into one layer each.")
    kinds = t2.multiselect("Matrices", ["cosine", "cka"], default=["cosine", "cka"], key="rd_kinds",
                           format_func={"cosine": "Cosine", "cka": "Linear CKA"}.get, persist_state="session")
    disagreement = criteria_disagreement(report) if "cka" in kinds else None
    if disagreement is not None:
        fix = ("" if disagreement.skip_first else
               " To see CKA without that token, set Skip first tokens to 1 on Model & data and analyse again (it "
               "still runs as context). Sliding merge on Prune compares by cosine by default for this reason.")
        st.info(disagreement.describe() + fix)
    cols = st.columns(max(1, len(kinds)))
    for col, kind in zip(cols, kinds, strict=False):
        with col:
            groups = merge_groups(report, kind, threshold)
            widgets.chart(similarity_heatmap(report, kind, threshold=threshold, groups=groups), key=f"rd_heat_{kind}")
            name = "CKA" if kind == "cka" else "Cosine"
            if groups:
                text = ", ".join(f"{g[0]}–{g[-1]}" for g in groups)
                st.caption(f"{name} runs ≥ {threshold:.2f}: layers {text} — sliding merge would turn "
                           f"{sum(len(g) for g in groups)} layers into {len(groups)} "
                           f"(−{sum(len(g) - 1 for g in groups)} layers).")
            else:
                st.caption(f"{name}: no two consecutive layers' outputs reach {threshold:.2f}; lower the "
                           "threshold.")
st.caption("States: h_i is the input of decoder layer i, so layer i's output is h_i+1 and h_L is the last "
           "layer's output (before the final norm). Hover any cell for the exact value and the layers it spans.")
