"""Prune: choose layers (by hand, by strategy + ratio, or by sliding merge), see the plan live, apply it.

Moving a slider only rebuilds the plan from the session's report (no forward pass); "Apply" runs surgery
on a NEW model (the cached original is never touched) and measures a quick before/after.
"""

from __future__ import annotations

import streamlit as st

from layerlens.compare import QUICK_WINDOWS
from layerlens.dashboard.planning import (
    PLAN_MODE_LABELS,
    PLAN_MODES,
    PlanSettings,
    build_plan,
    params_after,
)
from layerlens.plans import label_of, strategy_names
from layerlens.plots import bi_bar, layer_strip, similarity_heatmap
from pages._ui import errors, jobs, keys, resources, session, widgets

report = jobs.report_page(__file__, "Prune")
ss = st.session_state
L = report.num_layers
ps = session.plan_settings()

shared = None
with errors.guarded("loading the model"):
    shared = resources.shared_for_report()
if shared is None:  # the model could not be loaded: nothing to prune
    st.stop()


def _on_bar_select() -> None:
    """Box/lasso selection on the bar chart -> the hand-picked layers."""
    event = ss.get("pr_bar")
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    picked = sorted({int(p["x"]) for p in points if "x" in p})
    if picked:
        ss["pr_layers"] = picked


# ---- how to choose ----------------------------------------------------------------------------------------
with st.container(border=True):
    mode = st.radio("How to choose the layers", PLAN_MODES, format_func=PLAN_MODE_LABELS.get, horizontal=True,
                    index=PLAN_MODES.index(ps.mode) if ps.mode in PLAN_MODES else 0, key="pr_mode",
                    persist_state="session")
    new_ps = ps
    if mode == "strategy":
        c1, c2 = st.columns([1, 2])
        choices = strategy_names(on_prune_page=True)
        strategy = c1.selectbox("Strategy", choices, format_func=label_of, key="pr_strategy",
                                index=choices.index(ps.strategy) if ps.strategy in choices else 0,
                                persist_state="session")
        ratio = c2.slider("Pruning ratio (fraction of layers to remove)", 0.0, 0.9, float(ps.ratio), 0.01,
                          key="pr_ratio", persist_state="session", format="%.2f",
                          help="k = round(ratio × layers) layers are removed")
        new_ps = PlanSettings(mode="strategy", strategy=strategy, ratio=float(ratio), layers=ps.layers,
                              slm_by=ps.slm_by, threshold=ps.threshold, target_ratio=ps.target_ratio,
                              criterion=ps.criterion)
    elif mode == "manual":
        if "pr_layers" not in ss:
            ss["pr_layers"] = [i for i in ps.layers if 0 <= i < L]
        st.caption("Box- or lasso-select bars on the chart below, or pick layers in the list.")
        layers = st.multiselect("Layers to remove (0-based)", list(range(L)), key="pr_layers",
                                persist_state="session")
        new_ps = PlanSettings(mode="manual", strategy=ps.strategy, ratio=ps.ratio, layers=tuple(sorted(layers)),
                              slm_by=ps.slm_by, threshold=ps.threshold, target_ratio=ps.target_ratio,
                              criterion=ps.criterion)
    else:
        c1, c2, c3 = st.columns([1, 1, 2])
        criterion = c1.radio("Similarity", ["cka", "cosine"], format_func={"cka": "CKA", "cosine": "Cosine"}.get,
                             index=0 if ps.criterion == "cka" else 1, key="pr_criterion", persist_state="session")
        slm_by = c2.radio("Driven by", ["threshold", "ratio"], index=0 if ps.slm_by == "threshold" else 1,
                          format_func={"threshold": "Threshold", "ratio": "Target ratio"}.get, key="pr_slm_by",
                          persist_state="session")
        threshold, target = ps.threshold, ps.target_ratio
        if slm_by == "threshold":
            threshold = c3.slider("Merge threshold (similarity of layer outputs)", 0.50, 1.00,
                                  min(max(float(ps.threshold), 0.5), 1.0), 0.005, key="pr_threshold",
                                  persist_state="session", format="%.3f",
                                  help="Consecutive layers whose outputs are at least this similar merge into one")
        else:
            target = c3.slider("Target ratio (largest merge plan not above it)", 0.0, 0.9, float(ps.target_ratio),
                               0.01, key="pr_target", persist_state="session", format="%.2f")
        new_ps = PlanSettings(mode="slm", strategy=ps.strategy, ratio=ps.ratio, layers=ps.layers, slm_by=slm_by,
                              threshold=float(threshold), target_ratio=float(target), criterion=criterion)
    session.set_plan_settings(new_ps)

# ---- the plan, live ---------------------------------------------------------------------------------------
plan = ss.get(keys.SS_PLAN)
with errors.guarded("building the plan"):
    plan = build_plan(report, new_ps)
    ss[keys.SS_PLAN] = plan
if plan is None or plan.num_layers != L:
    st.stop()

total = shared.info.num_parameters
after = params_after(total, shared.per_layer_params, plan)
m1, m2, m3, m4 = st.columns(4)
m1.metric("Layers", f"{plan.num_layers_after} / {L}", delta=f"-{plan.n_removed}" if plan.n_removed else "0",
          delta_color="off")
m2.metric("Pruning ratio", f"{plan.ratio:.1%}", help="Layers removed / layers of the model (whole layers)")
m3.metric("Parameters", widgets.human_params(after), delta=f"-{(total - after) / total:.1%}" if after < total else "0",
          delta_color="off", help=f"{total:,} → {after:,}")
m4.metric("Strategy", plan.strategy)
st.markdown(f"**Plan:** `{plan.describe()}`")
from layerlens.plans import plan_summary  # noqa: E402

widgets.chart(layer_strip(plan_summary(plan)), key="pr_strip")

if mode == "slm":
    widgets.chart(similarity_heatmap(report, new_ps.criterion, groups=plan.merge), key="pr_heat")
else:
    metric = "magnitude" if mode == "strategy" and new_ps.strategy == "magnitude" else "bi"
    widgets.chart(bi_bar(report, metric, highlight=plan.removed_layers), key="pr_bar", on_select=_on_bar_select,
             selection_mode=("box", "lasso"))

# ---- apply ------------------------------------------------------------------------------------------------
st.subheader("Apply and compare")
with st.container(border=True):
    prompt = st.text_input("Prompt for the side-by-side generation", value="The king said to his daughter,",
                           key="pr_prompt", persist_state="session")
    apply = st.button("Apply plan", type="primary", icon=":material/content_cut:", key="pr_apply", disabled=plan.n_removed == 0,
                      help="Builds the pruned model (a new object; the cached original is untouched) and "
                           f"measures perplexity on {QUICK_WINDOWS} held-out windows and generation speed.")
    if plan.n_removed == 0:
        st.caption("The plan removes no layer yet: move a slider or pick layers.")
    if apply:
        with errors.guarded("applying the plan"), st.spinner("Pruning and measuring…"):
            model_key = session.current_settings().model_key()
            new_model = resources.apply_only(shared, plan)
            both = resources.cached_quick_compare(shared, model_key, plan.to_json(), prompt)
            quick, original = both["pruned"], both["original"]
            ss[keys.SS_PRUNED] = {"plan_json": plan.to_json(), "plan": plan, "model": new_model, "quick": quick,
                                "original": original, "prompt": prompt}

    pruned = ss.get(keys.SS_PRUNED)
    if pruned is not None:
        if pruned["plan_json"] != plan.to_json():
            st.info(f"Showing the last applied plan ({pruned['plan'].describe()}); press **Apply plan** to apply "
                    "the one above.", icon=":material/info:")
        o, q = pruned["original"], pruned["quick"]
        a1, a2, a3 = st.columns(3)
        a1.metric(f"Perplexity ({q['windows']} windows × {q['seq_len']} tokens)", f"{q['perplexity']:.2f}",
                  delta=f"{q['perplexity'] - o['perplexity']:+.2f} vs {o['perplexity']:.2f}", delta_color="inverse")
        a2.metric("Generation speed", f"{q['tokens_per_s']:.1f} tokens/s",
                  delta=f"{q['tokens_per_s'] / o['tokens_per_s'] - 1:+.0%} vs {o['tokens_per_s']:.1f}"
                  if o["tokens_per_s"] > 0 else None)
        a3.metric("Surgery time", f"{q.get('surgery_s', 0) * 1000:.0f} ms")
        g1, g2 = st.columns(2)
        with g1, st.container(border=True):
            st.markdown(f"**Original** ({L} layers)")
            st.text(pruned["prompt"] + o["generation"])
        with g2, st.container(border=True):
            st.markdown(f"**Pruned** ({pruned['plan'].num_layers_after} layers)")
            st.text(pruned["prompt"] + q["generation"])
        st.page_link("pages/5_export.py", label="Save or download the pruned model on **Export**", icon=":material/save:")
