"""Summary (stakeholder demo): one screen -- model, layers removed and why, size and speed saved, quality kept,
the heatmap that motivated it. The URL carries the state (model, data size, strategy, ratio): share it."""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st

from layerlens.dashboard.mmlu import mmlu_comparison
from layerlens.dashboard.planning import params_after, plan_reason
from layerlens.dashboard.share import to_query
from layerlens.plans import plan_summary
from layerlens.plans.slm import merge_groups
from layerlens.plots import bi_bar, layer_strip, similarity_heatmap
from pages._ui import errors, jobs, keys, resources, session, widgets

session.require_router(__file__)

ss = st.session_state
report = jobs.need_report_or_stop()
info = ss.get(keys.SS_MODEL_INFO) or {}
shared = None
with errors.guarded("loading the model"):
    shared = resources.shared_for_report()
if shared is None:
    st.stop()

plan = session.current_plan(report)
if plan is None:
    st.stop()

model_name = widgets.short_model(info.get("model", "model"))
st.title(f"{model_name}: {plan.num_layers_after} of {plan.num_layers} layers kept")
st.caption(widgets.report_caption(report))

# ---- quality and speed (cached per model + plan: a shared link reuses them) ------------------------------
pruned = ss.get(keys.SS_PRUNED)
quick = original = None
if pruned is not None and pruned["plan_json"] == plan.to_json():
    quick, original, prompt = pruned["quick"], pruned["original"], pruned["prompt"]
elif plan.n_removed > 0:
    prompt = "The king said to his daughter,"
    with errors.guarded("measuring the pruned model"), st.spinner("Measuring perplexity and speed (a few seconds)…"):
        key = session.current_settings().model_key()
        both = resources.cached_quick_compare(shared, key, plan.to_json(), prompt)
        quick, original = both["pruned"], both["original"]


def _frames() -> list:
    saved = ss.get(keys.SS_SWEEP)
    return ([saved[1]] if saved else []) + jobs.saved_sweeps_for(report)


total = shared.info.num_parameters
after = params_after(total, shared.per_layer_params, plan)
c1, c2, c3, c4, c5 = st.columns(5)
c1.metric("Layers removed", f"{plan.n_removed} of {plan.num_layers}", delta=f"-{plan.ratio:.0%} depth",
          delta_color="off")
c2.metric("Parameters", widgets.human_params(after), delta=f"-{(total - after) / total:.1%} ({widgets.human_params(total)})",
          delta_color="off")
if quick and original and original["tokens_per_s"] > 0:
    c3.metric("Generation speed", f"{quick['tokens_per_s']:.1f} tok/s",
              delta=f"{quick['tokens_per_s'] / original['tokens_per_s'] - 1:+.0%}")
    c4.metric(f"Perplexity ({quick['windows']}×{quick['seq_len']} tok)", f"{quick['perplexity']:.2f}",
              delta=f"{quick['perplexity'] - original['perplexity']:+.2f} (was {original['perplexity']:.2f})",
              delta_color="inverse")
else:
    c3.metric("Generation speed", "–")
    c4.metric("Perplexity", "–")
mmlu = mmlu_comparison(_frames(), plan.removed_layers)
if mmlu is not None:
    se = mmlu.standard_error_pts()
    if mmlu.meaningful and mmlu.before is not None:
        c5.metric("MMLU accuracy", f"{mmlu.after:.1%}", delta=mmlu.delta_text(),
                  help=f"Standard error ±{se:.1f} pts at {mmlu.questions} questions (binomial)")
    else:  # too few questions (or an unknown count): the value, but no difference presented as a result
        c5.metric("MMLU accuracy", f"{mmlu.after:.1%}", delta=mmlu.delta_text(), delta_color="off",
                  delta_arrow="off", help="More MMLU questions per subject on the Evaluate page make this "
                                          "comparison meaningful" + (f" (now ±{se:.1f} pts)" if se else ""))
else:
    c5.metric("MMLU accuracy", "–", help="Run a sweep with MMLU on the Evaluate page to fill this in")

# ---- which layers and why ---------------------------------------------------------------------------------
with st.container(border=True):
    st.markdown(f"**Removed:** layers {', '.join(map(str, plan.removed_layers)) or 'none'} "
                f"· strategy **{plan.strategy}**")
    st.markdown(plan_reason(report, plan))
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

if quick and original:
    g1, g2 = st.columns(2)
    with g1, st.container(border=True):
        st.markdown(f"**Original** ({plan.num_layers} layers)")
        st.text(prompt + original["generation"])
    with g2, st.container(border=True):
        st.markdown(f"**Pruned** ({plan.num_layers_after} layers)")
        st.text(prompt + quick["generation"])

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
