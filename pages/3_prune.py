"""Prune: choose layers (by hand, by strategy + ratio, or by sliding merge), see the plan live, apply it.

Moving a slider only rebuilds the plan from the session's report (no forward pass); "Apply" runs surgery
on a NEW model (the cached original is never touched) and measures a quick before/after. An invalid
selection clears the plan everywhere (metrics, strip, sidebar) and disables Apply: no stale plan on screen.
"""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from layerlens import humanize
from layerlens.compare import QUICK_WINDOWS
from layerlens.dashboard.planning import PLAN_MODE_LABELS, PLAN_MODES, build_plan, params_after
from layerlens.plans import FORMULA_NOTES, MERGE_FORMULAS, label_of, plan_summary, strategy_names
from layerlens.plots import bi_bar, layer_strip, similarity_heatmap, sublayer_bars
from pages._ui import errors, jobs, keys, resources, session, widgets

report = jobs.report_page(__file__, "Prune")
ss = st.session_state
L = report.num_layers
ps = session.plan_settings()

shared = jobs.model_or_stop()

FORMULA_LABELS = {"task_vector": "Task vector (the papers')", "keep_top": "Keep the top layer", "mean": "Mean"}


def _on_bar_select() -> None:
    """Box/lasso selection on the bar chart ADDS to the hand-picked layers."""
    ss["pr_layers"] = widgets.add_selection(ss.get("pr_layers", []), ss.get("pr_bar"))


def _clear_picks() -> None:
    ss["pr_layers"] = []
    ss["pr_drop_attn"] = []
    ss["pr_drop_mlp"] = []


def _on_sublayer_select() -> None:
    """Box/lasso selection on the sublayer chart ADDS to the picks of the row it hits (layer, attention, MLP)."""
    points = ((ss.get("pr_sub_bar") or {}).get("selection") or {}).get("points") or []
    for key, curve in (("pr_layers", 0), ("pr_drop_attn", 1), ("pr_drop_mlp", 2)):
        picked = {int(p["x"]) for p in points if p.get("curve_number") == curve and "x" in p}
        if picked:
            ss[key] = sorted(set(map(int, ss.get(key, []))) | picked)


# ---- how to choose ----------------------------------------------------------------------------------------
with st.container(border=True):
    mode = st.radio("How to choose the layers", PLAN_MODES, format_func=PLAN_MODE_LABELS.get, horizontal=True,
                    index=PLAN_MODES.index(ps.mode) if ps.mode in PLAN_MODES else 0, key="pr_mode",
                    persist_state="session")
    count_note = None  # filled once the plan is built: "0.25 → 8 of 30 layers = 26.7%"
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
        count_note, asked = c2.empty(), f"{ratio:.2f}"
        new_ps = replace(ps, mode="strategy", strategy=strategy, ratio=float(ratio))
    elif mode == "manual":
        if "pr_layers" not in ss:
            ss["pr_layers"] = [i for i in ps.layers if 0 <= i < L]
        st.caption("Box- or lasso-select bars on the charts below to **add** layers (or, on the sublayer chart, "
                   "attention and MLP sublayers), or pick them in the lists.")
        p1, p2 = st.columns([6, 1], vertical_alignment="bottom")
        layers = p1.multiselect("Layers to remove (0-based)", list(range(L)), key="pr_layers",
                                persist_state="session")
        p2.button("Clear picks", key="pr_clear", on_click=_clear_picks,
                  disabled=not (layers or ss.get("pr_drop_attn") or ss.get("pr_drop_mlp")),
                  icon=":material/backspace:", help="Remove every hand-picked layer from the list")
        s1, s2 = st.columns(2)
        for key, picks in (("pr_drop_attn", ps.drop_attn), ("pr_drop_mlp", ps.drop_mlp)):
            if key not in ss:
                ss[key] = [i for i in picks if 0 <= i < L]
        drop_attn = s1.multiselect("Attention sublayers to drop (layer stays)", list(range(L)), key="pr_drop_attn",
                                   persist_state="session",
                                   help="The layer keeps its MLP; its attention adds nothing and keeps no KV cache")
        drop_mlp = s2.multiselect("MLP sublayers to drop (layer stays)", list(range(L)), key="pr_drop_mlp",
                                  persist_state="session", help="The layer keeps its attention; its MLP adds nothing")
        new_ps = replace(ps, mode="manual", layers=tuple(sorted(layers)), drop_attn=tuple(sorted(drop_attn)),
                         drop_mlp=tuple(sorted(drop_mlp)))
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
            asked = f"threshold {threshold:.3f}"
        else:
            target = c3.slider("Target ratio (largest merge plan not above it)", 0.0, 0.9, float(ps.target_ratio),
                               0.01, key="pr_target", persist_state="session", format="%.2f")
            asked = f"target {target:.2f}"
        count_note = c3.empty()
        f1, f2 = st.columns([1, 3])
        formula = f1.selectbox("Merge formula", MERGE_FORMULAS, format_func=FORMULA_LABELS.get, key="pr_formula",
                               index=MERGE_FORMULAS.index(ps.formula) if ps.formula in MERGE_FORMULAS else 0,
                               persist_state="session", help="How each window of similar layers becomes one layer")
        if formula == "task_vector":  # the papers' formula: can break the model on wide windows
            f2.warning(FORMULA_NOTES[formula], icon=":material/warning:")
        else:
            f2.caption(FORMULA_NOTES.get(formula, ""))
        new_ps = replace(ps, mode="slm", slm_by=slm_by, threshold=float(threshold), target_ratio=float(target),
                         criterion=criterion, formula=formula)
    session.set_plan_settings(new_ps)

# ---- the plan, live (or none: no stale plan on screen) ----------------------------------------------------
plan = None
with errors.guarded("building the plan"):
    plan = build_plan(report, new_ps)
if plan is not None and plan.num_layers != L:
    plan = None
ss[keys.SS_PLAN] = plan
ss[keys.SS_PLAN_ERROR] = plan is None

if count_note is not None:
    verb = "merged away" if mode == "slm" else "removed"
    if plan is not None and plan.has_sublayers:
        count_note.caption(f"{asked} → {plan.n_sublayers_dropped} of {2 * L} sublayers dropped = "
                           f"{humanize.percent(plan.ratio)}")
    else:
        count_note.caption(f"{asked} → {plan.n_removed} of {L} layers {verb} = {humanize.percent(plan.ratio)}"
                           if plan is not None else f"{asked} → no valid plan")

m1, m2, m3, m4 = st.columns(4)
if plan is not None:
    total = shared.info.num_parameters
    after = params_after(total, shared.per_layer_params, plan,
                         shared.sublayer_params() if plan.has_sublayers else None)
    m1.metric("Layers", f"{plan.num_layers_after} / {L}", delta=f"-{plan.n_removed}" if plan.n_removed else "0",
              delta_color="off")
    m2.metric("Pruning ratio", humanize.percent(plan.ratio),
              help="Layers removed / layers of the model (whole layers); with dropped sublayers, the fraction of "
                   "the 2L attention and MLP sublayers that go (a whole layer counts two)")
    m3.metric("Parameters", humanize.params(after),
              delta=f"-{humanize.percent((total - after) / total)}" if after < total else "0",
              delta_color="off", help=f"{total:,} → {after:,}")
    m4.metric("Strategy", plan.strategy)
    st.markdown(f"**Plan:** `{plan.describe()}`")
    widgets.chart(layer_strip(plan_summary(plan)), key="pr_strip")
else:
    for col, label in zip((m1, m2, m3, m4), ("Layers", "Pruning ratio", "Parameters", "Strategy"), strict=True):
        col.metric(label, humanize.MISSING)
    st.caption("No valid plan: the metrics, the layer strip and **Apply** come back once the selection is valid.")

if mode == "slm":
    if plan is not None:
        widgets.chart(similarity_heatmap(report, new_ps.criterion, groups=plan.merge), key="pr_heat")
else:
    metric = "magnitude" if mode == "strategy" and new_ps.strategy == "magnitude" else "bi"
    marked = plan.removed_layers if plan is not None else new_ps.layers if mode == "manual" else ()
    bars = bi_bar(report, metric, highlight=marked)
    if report.has_sublayers and (mode == "manual"
                                 or (mode == "strategy" and new_ps.strategy in ("attn_bi", "mlp_bi"))):
        sub = sublayer_bars(report, highlight=plan_summary(plan) if plan is not None else None)
        if mode == "manual":  # selecting bars picks layers (blue), attention (olive) or MLP (teal) sublayers
            widgets.chart(sub.update_layout(dragmode="select"), key="pr_sub_bar", on_select=_on_sublayer_select,
                          selection_mode=("box", "lasso"))
        else:
            widgets.chart(sub, key="pr_sub_bar")
    if mode == "manual":  # selecting bars picks layers
        widgets.chart(bars, key="pr_bar", on_select=_on_bar_select, selection_mode=("box", "lasso"))
    else:
        widgets.chart(bars.update_layout(dragmode="zoom"), key="pr_bar")

# ---- apply ------------------------------------------------------------------------------------------------
st.subheader("Apply and compare")
with st.container(border=True):
    prompt = st.text_input("Prompt for the side-by-side generation", value="The king said to his daughter,",
                           key="pr_prompt", persist_state="session")
    model_key = session.current_settings().model_key()
    resources.prewarm_original(shared, model_key, prompt)  # the first Apply then measures the pruned model only
    apply = st.button("Apply plan", type="primary", icon=":material/content_cut:", key="pr_apply",
                      disabled=plan is None or not plan.changes_model,
                      help="Builds the pruned model (a new object; the cached original is untouched) and "
                           f"measures perplexity on {QUICK_WINDOWS} held-out windows and generation speed.")
    if plan is None:
        st.caption("Fix the selection above to apply a plan.")
    elif not plan.changes_model:
        st.caption("The plan removes no layer yet: move a slider or pick layers.")
    if apply and plan is not None:
        with errors.guarded("applying the plan"), resources.quick_progress("Pruning and measuring") as progress:
            if shared.layerwise:  # over the memory: both perplexities in one layer-by-layer pass, no model kept
                new_model, both = None, resources.cached_layerwise_quick(shared, model_key, plan.to_json(), progress)
            else:
                resources.wait_original(model_key, prompt, progress)
                new_model = resources.apply_only(shared, plan)
                both = resources.cached_quick_compare(shared, model_key, plan.to_json(), prompt, progress)
            quick, original = both["pruned"], both["original"]
            ss[keys.SS_PRUNED] = {"plan_json": plan.to_json(), "plan": plan, "model": new_model, "quick": quick,
                                "original": original, "prompt": prompt}
            widgets.remember_applied(plan, quick, original)

    pruned = ss.get(keys.SS_PRUNED)
    if pruned is not None:
        if plan is None or pruned["plan_json"] != plan.to_json():
            st.info(f"Showing the last applied plan ({pruned['plan'].describe()}); press **Apply plan** to apply "
                    "the one above.", icon=":material/info:")
        o, q = pruned["original"], pruned["quick"]
        verdict = widgets.verdict_of(q, o)
        widgets.show_verdict(verdict)
        a1, a2, a3 = st.columns(3)
        widgets.perplexity_metric(a1, q, o)
        widgets.speed_metric(a2, q, o, verdict)
        if q.get("generation_measured") is False:  # layer by layer: KL in the pass, no model to time
            a3.metric("KL to the original", humanize.number(q.get("kl")),
                      help="Mean token KL(original ‖ pruned) in nats on the same windows; top-1 agreement "
                           f"{humanize.percent(q.get('top1_agreement'))}")
        else:
            a3.metric("Surgery time", humanize.seconds(q.get("surgery_s")))
        st.caption(widgets.quick_basis(q))
        with errors.guarded("measuring plain removal"), st.spinner("Measuring plain removal of as many layers…"):
            widgets.merge_vs_removal(pruned["plan"], q, shared, session.current_settings().model_key(), report)
        if o.get("generation") is None:  # layer by layer: generating needs the whole model in memory
            st.info("Generation speed and text are not measured in layer-by-layer mode: generating needs the "
                    "whole model in memory, which this one does not fit. Save the pruned model on **Export** "
                    "and run it where it fits (it may fit here once pruned).", icon=":material/info:")
        else:
            g1, g2 = st.columns(2)
            with g1, st.container(border=True):
                st.markdown(f"**Original** ({L} layers)")
                st.text(pruned["prompt"] + o["generation"])
            with g2, st.container(border=True):
                st.markdown(f"**Pruned** ({pruned['plan'].num_layers_after} layers)")
                st.text(pruned["prompt"] + q["generation"])
        widgets.history_table()
        st.page_link("pages/7_heal.py", label="Heal the pruned model (LoRA, distillation from the original) on "
                     "**Heal**", icon=":material/healing:")
        st.page_link("pages/5_export.py", label="Save or download the pruned model on **Export**", icon=":material/save:")
