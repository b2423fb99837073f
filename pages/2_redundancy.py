"""Redundancy: per-layer bars (BI / Relative Magnitude / block distance) and similarity heatmaps.

Sliders only re-draw: the metrics come from the session's report and are never recomputed here.
"""

from __future__ import annotations

import streamlit as st

from layerlens.plans import plan_summary
from layerlens.plans.slm import criteria_disagreement, merge_groups
from layerlens.plots import bi_bar, rank_stability_bar, similarity_heatmap, sublayer_bars
from pages._ui import jobs, keys, trust, widgets

report = jobs.report_page(__file__, "Redundancy")

L = report.num_layers
BAR_LABELS = {"bi": "Block Influence (BI)", "magnitude": "Relative Magnitude", "block_distance": "Block distance"}
if report.has_sublayers:
    BAR_LABELS |= {"attn_bi": "Attention BI", "mlp_bi": "MLP BI"}

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
    if plan is not None and metric in ("attn_bi", "mlp_bi"):
        highlight = plan.drop_attn if metric == "attn_bi" else plan.drop_mlp
    widgets.chart(bi_bar(report, metric, block_size=block, highlight=highlight), key="rd_bar")
    lowest = sorted(range(len(report.bi)), key=lambda i: report.bi[i])[:5]
    st.caption(f"Most redundant by BI (lowest first): layers {', '.join(map(str, lowest))}."
               + (f" Red: the current plan's removed layers {list(highlight)}." if highlight else ""))

with st.container(border=True):
    st.markdown("**Attention and MLP sublayers, and how sure the ranking is**")
    s1, s2 = st.columns([3, 2])
    with s1:
        if report.has_sublayers:
            widgets.chart(sublayer_bars(report, highlight=plan_summary(plan) if plan is not None else None),
                          key="rd_sublayers")
            attn_low = sorted(range(L), key=lambda i: (report.attn_bi[i], i))[:5]
            st.caption(f"Attention sublayers with the lowest BI: {', '.join(map(str, attn_low))}. A dropped "
                       "sublayer stops adding to the residual stream; its layer stays. Red outline: the current "
                       "plan's removed layers and dropped sublayers.")
        else:
            st.info("No attention/MLP split for this report: "
                    + str(report.meta.get("sublayers", "it was made before LayerLens measured sublayers.")))
    with s2:
        if report.bi_rank_freq is not None:
            default_k = (report.meta.get("bootstrap") or {}).get("rank_k") or 1
            k = st.slider("k lowest BI", 1, max(1, L - 1), min(int(default_k), max(1, L - 1)), key="rd_rank_k",
                          help="How often each layer is among the k lowest BI when the calibration samples are "
                               "resampled (bootstrap): near 100 % or 0 % the call is stable.")
            widgets.chart(rank_stability_bar(report, k), key="rd_stability")
        else:
            st.caption("No bootstrap in this report (analyze with bootstrap resamples > 0 for error bars and "
                       "rank stability).")

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

trust.damage_section(report)  # ground truth: leave-one-out damage and how well each metric predicts it
trust.calibration_section(report)  # the same model on several calibration sets
