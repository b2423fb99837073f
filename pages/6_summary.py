"""Summary (stakeholder demo): one screen a non-expert reads in 30 seconds -- whether the pruned model is
usable (a verdict from its perplexity against the original's), what was removed and why, what it costs in
quality, what it saves, and what the quick numbers rest on. The URL carries the state (model, data size,
strategy, ratio): share it."""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st

from layerlens import humanize
from layerlens.dashboard.mmlu import mmlu_comparison
from layerlens.dashboard.planning import params_after, plan_reason
from layerlens.dashboard.share import to_query
from layerlens.plans import label_of, plan_summary
from layerlens.plans.slm import merge_groups
from layerlens.plots import bi_bar, layer_strip, similarity_heatmap
from pages._ui import errors, healing, jobs, keys, resources, session, trust, widgets

session.require_router(__file__)

ss = st.session_state
report = jobs.need_report_or_stop()
info = ss.get(keys.SS_MODEL_INFO) or {}
shared = jobs.model_or_stop()

plan = session.current_plan(report)
if plan is None:
    st.info("No valid plan to summarise: fix the selection on **Prune**.", icon=":material/info:")
    st.page_link("pages/3_prune.py", label="Go to Prune", icon=":material/content_cut:")
    session.stop_page()

model_name = widgets.short_model(info.get("model", "model"))
st.title(f"{model_name}: {plan.num_layers_after} of {plan.num_layers} layers kept")
st.caption(widgets.report_caption(report))

# ---- quality and speed (cached per model + plan: a shared link reuses them) ------------------------------
pruned = ss.get(keys.SS_PRUNED)
quick = original = None
model_key = session.current_settings().model_key()
if pruned is not None and pruned["plan_json"] == plan.to_json():
    quick, original, prompt = pruned["quick"], pruned["original"], pruned["prompt"]
elif plan.changes_model:
    prompt = "The king said to his daughter,"
    with errors.guarded("measuring the pruned model"), st.spinner("Measuring perplexity and speed (a few seconds)…"):
        both = resources.cached_quick_compare(shared, model_key, plan.to_json(), prompt)
        quick, original = both["pruned"], both["original"]


def _frames() -> list:
    saved = ss.get(keys.SS_SWEEP)
    return ([saved[1]] if saved else []) + jobs.saved_sweeps_for(report)


# ---- the verdict: is the result usable? -------------------------------------------------------------------
verdict = widgets.verdict_of(quick, original)
if not plan.changes_model:
    st.info("This plan removes no layer: the model is unchanged.", icon=":material/info:")
else:
    widgets.show_verdict(verdict)

# ---- what was removed, and why ----------------------------------------------------------------------------
with st.container(border=True):
    removed = ", ".join(map(str, plan.removed_layers)) or "none"
    how = "merged away" if plan.method == "merge" else "removed"
    st.markdown(f"**What was {how}:** {plan.n_removed} of {plan.num_layers} layers "
                f"({humanize.percent(plan.ratio)}) — layers {removed} · strategy **{label_of(plan.strategy)}**")
    if plan.has_sublayers:
        st.markdown(f"**Sublayers dropped (the layers stay):** attention of layers "
                    f"{', '.join(map(str, plan.drop_attn)) or 'none'}; MLP of layers "
                    f"{', '.join(map(str, plan.drop_mlp)) or 'none'}")
    st.markdown(plan_reason(report, plan))
    evidence = trust.best_predictor_line(report)  # leave-one-out damage measured on the Redundancy page
    if evidence:
        st.markdown(evidence)

# ---- what it costs, what it saves -------------------------------------------------------------------------
total = shared.info.num_parameters
after = params_after(total, shared.per_layer_params, plan,
                     shared.sublayer_params() if plan.has_sublayers else None)
cost, save = st.columns(2, border=True)
with cost:
    st.markdown("**What it costs in quality**")
    k1, k2 = st.columns(2)
    if quick and original:
        widgets.perplexity_metric(k1, quick, original)
    else:
        k1.metric("Perplexity", humanize.MISSING)
    widgets.mmlu_metric(k2, mmlu_comparison(_frames(), plan.removed_layers))
with save:
    st.markdown("**What it saves**")
    s1, s2, s3 = st.columns([0.8, 0.9, 1.5])  # the speed ("19.1 tokens/s") was cut off at a third of the width
    s1.metric("Layers removed", f"{plan.n_removed} of {plan.num_layers}",
              delta=f"-{humanize.percent(plan.ratio, 0)} depth", delta_color="off")
    s2.metric("Parameters", humanize.params(after), delta=f"-{humanize.percent((total - after) / total)}",
              delta_color="off", help=f"{total:,} → {after:,} ({humanize.params(total)} before)")
    if quick and original and original.get("tokens_per_s"):
        widgets.speed_metric(s3, quick, original, verdict)
    else:
        s3.metric("Generation speed", humanize.MISSING)
if quick:
    st.caption(widgets.quick_basis(quick))
    with errors.guarded("measuring plain removal"), st.spinner("Measuring plain removal of as many layers…"):
        widgets.merge_vs_removal(plan, quick, shared, model_key, report)

# ---- healed (issue 15): original, pruned and healed side by side ------------------------------------------
healed = healing.current(pruned, model_key) if quick is not None and pruned is not None \
    and pruned["plan_json"] == plan.to_json() else None
if healed is not None:
    with st.container(border=True):
        st.markdown(f"**Healed** with LoRA ({healing.describe(healed['record'])})")
        healing.show_comparison(healed)

# ---- the pictures -----------------------------------------------------------------------------------------
widgets.chart(layer_strip(plan_summary(plan)), key="sm_strip")
f1, f2 = st.columns(2)
with f1:
    if plan.strategy == "slm":
        crit = plan.params.get("criterion", "cka")
        widgets.chart(similarity_heatmap(report, crit, groups=plan.merge), key="sm_heat")
    else:
        widgets.chart(similarity_heatmap(report, "cosine", threshold=0.9, groups=merge_groups(report, "cosine", 0.9)), key="sm_heat")
with f2:
    metric = "magnitude" if plan.strategy == "magnitude" else "bi"
    widgets.chart(bi_bar(report, metric, highlight=plan.removed_layers), key="sm_bar")

if quick and original and healed is None:  # healed: the three generations are in the comparison above
    g1, g2 = st.columns(2)
    with g1, st.container(border=True):
        st.markdown(f"**Original** ({plan.num_layers} layers)")
        st.text(prompt + original["generation"])
    with g2, st.container(border=True):
        st.markdown(f"**Pruned** ({plan.num_layers_after} layers)")
        st.text(prompt + quick["generation"])

widgets.history_table()

# ---- share ------------------------------------------------------------------------------------------------
settings = session.current_settings()
query = urlencode(to_query(settings, session.plan_settings()))
base = ""
try:
    base = (st.context.url or "").split("?")[0]
except Exception:  # noqa: BLE001 - AppTest has no URL
    base = ""
st.markdown("**Share this summary** (opens the same model, analysis size and plan):")
st.code(f"{base}?{query}" if base else f"?{query}", language=None)
