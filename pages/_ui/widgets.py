"""Drawing helpers shared by the pages: charts, captions, the verdict on a pruned model, the applied-plan
history, the plain-removal baseline, the sidebar's summary of the session."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import streamlit as st

from layerlens import compare, humanize, surgery
from layerlens.defaults import DEFAULT_MODEL_ID
from layerlens.plans import PrunePlan, make_plan

from .keys import SS_APPLIED, SS_HEAL_JOB, SS_HEALED, SS_MODEL_INFO, SS_PLAN, SS_PLAN_ERROR, SS_PRUNED
from .resources import SharedModel, model_lock
from .session import current_report

PLOT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}
HISTORY_SIZE = 3  # applied plans kept for the side-by-side table


def chart(fig: Any, key: str, **kw: Any) -> Any:
    return st.plotly_chart(fig, key=key, config=PLOT_CONFIG, **kw)


def report_caption(report: Any) -> str:
    m = report.meta
    return (f"{m.get('model', '?')} · {report.num_layers} layers · {m.get('samples')} samples × "
            f"{m.get('seq_len')} tokens ({m.get('tokens')} tokens) of {m.get('data')} · CKA {report.cka_estimator} "
            + (f"· first {m['skip_first']} token(s) of each sample skipped " if m.get("skip_first") else "")
            + f"· {m.get('device')} {m.get('dtype')}")


def short_model(spec: str) -> str:
    """A model spec short enough for a title or the sidebar."""
    if spec == DEFAULT_MODEL_ID:
        return "default (SmolLM2-135M)"
    return spec if len(spec) <= 40 else "…" + spec[-38:]


# ----------------------------------------------------------------------------------------------------------
# A pruned model's quick numbers, for people
# ----------------------------------------------------------------------------------------------------------


def speed_text(side: Mapping[str, Any]) -> str:
    """One side's generation speed, with its spread when the measurement has one."""
    return humanize.tokens_per_s(side.get("tokens_per_s"), side.get("tokens_per_s_spread"))


def verdict_of(quick: Mapping[str, Any] | None, original: Mapping[str, Any] | None) -> humanize.Verdict:
    return humanize.verdict((quick or {}).get("perplexity"), (original or {}).get("perplexity"))


def show_verdict(v: humanize.Verdict) -> None:
    """The verdict line: red when degraded or broken, plainly."""
    if v.level == "unknown":
        return
    if v.bad:
        st.error(f"**{v.headline()}**", icon=":material/dangerous:" if v.level == "broken" else ":material/warning:")
    else:
        st.success(v.headline(), icon=":material/check_circle:")


def speed_change(quick: Mapping[str, Any], original: Mapping[str, Any]) -> str | None:
    """The speed-up as a change (``+12.0%``): the measured pruned ÷ original ratio (paired run by run when
    both were timed together), else the ratio of the two medians."""
    if quick.get("speedup"):
        return humanize.change(quick["speedup"], 1.0)
    before = original.get("tokens_per_s")
    return humanize.change(quick.get("tokens_per_s"), before) if before else None


def speed_metric(col: Any, quick: Mapping[str, Any], original: Mapping[str, Any], v: humanize.Verdict,
                 label: str = "Generation speed") -> None:
    """Speed after pruning (the median; its spread is in the help, so the value is never cut off); never
    shown as a win beside a degraded or broken model."""
    if quick.get("generation_measured") is False:  # layer by layer: no model in memory to time, no number
        col.metric(label, "not measured", help="Generating needs the whole model in memory; this one runs "
                                               "layer by layer, so no speed is measured.")
        return
    delta = speed_change(quick, original)
    helptext = f"Pruned: {speed_text(quick)}. Original: {speed_text(original)}."
    value = humanize.tokens_per_s(quick.get("tokens_per_s"))
    if v.bad:
        col.metric(label, value, delta=f"{delta}, no win ({v.level})" if delta else None, delta_color="off",
                   delta_arrow="off", help=helptext + f" The model is {v.level}: a faster model that no longer "
                                                      "works is no saving.")
    else:
        col.metric(label, value, delta=delta, help=helptext)


def perplexity_metric(col: Any, quick: Mapping[str, Any], original: Mapping[str, Any],
                      label: str = "Perplexity") -> None:
    col.metric(label, humanize.perplexity(quick.get("perplexity")),
               delta=f"{humanize.change(quick.get('perplexity'), original.get('perplexity'))} "
                     f"(was {humanize.perplexity(original.get('perplexity'))})",
               delta_color="inverse", help="Lower is better. " + quick_basis(quick))


def mmlu_metric(col: Any, mmlu: Any) -> None:
    """MMLU accuracy of the plan (a :class:`~layerlens.dashboard.mmlu.MMLUComparison` or None). The delta
    stays short enough for a quarter of the page (a long one was cut off at "on 5…"); the why is in help."""
    if mmlu is None:
        col.metric("MMLU accuracy", humanize.MISSING, help="Run a sweep with MMLU on the Evaluate page to fill this in")
        return
    se = mmlu.standard_error_pts()
    was = f"was {humanize.percent(mmlu.before)}" if mmlu.before is not None else "original not measured"
    if mmlu.meaningful and mmlu.before is not None:
        col.metric("MMLU accuracy", humanize.percent(mmlu.after),
                   delta=f"{(mmlu.after - mmlu.before) * 100:+.1f} pts ({was})",
                   help=f"On {mmlu.questions} questions; standard error ±{se:.1f} pts (binomial)")
        return
    # too few questions (or an unknown count): the value, but no difference presented as a result
    if mmlu.questions is None:
        delta, why = f"{was}; question count unknown", "Re-run the sweep to record how many questions it asked."
    else:
        delta = f"{was} on {mmlu.questions} question{'s' if mmlu.questions != 1 else ''}: too few"
        why = (f"{mmlu.delta_text()}. More MMLU questions per subject on the Evaluate page make this comparison "
               "meaningful" + (f" (now ±{se:.1f} pts)." if se else "."))
    col.metric("MMLU accuracy", humanize.percent(mmlu.after), delta=delta, delta_color="off", delta_arrow="off",
               help=why)


def quick_basis(quick: Mapping[str, Any]) -> str:
    """What the quick numbers rest on, in one sentence (whatever the measurement recorded)."""
    ppl = f"perplexity on {quick.get('windows', '?')} held-out windows of {quick.get('seq_len', '?')} tokens"
    speed = f"speed from {quick.get('new_tokens', '?')} greedy tokens"
    if quick.get("runs"):
        speed = f"speed: median of {quick['runs']} timed runs of {quick.get('new_tokens', '?')} greedy tokens"
    if quick.get("prompt_tokens"):
        speed += f" after a {quick['prompt_tokens']}-token prompt"
    where = " ".join(str(quick[k]) for k in ("device", "dtype") if quick.get(k))
    if where:
        speed += f", on {where}"
    if quick.get("threads"):
        speed += f" with {quick['threads']} thread{'s' if quick['threads'] != 1 else ''}"
    if quick.get("tokens_per_s_spread") is not None:
        speed += f" (± {quick.get('spread', 'spread of the runs')})"
    if quick.get("speedup_paired") is False:
        speed += "; the original's runs were timed earlier (same settings), not interleaved with these"
    if quick.get("generation_measured") is False:
        speed = ("both models scored in one layer-by-layer pass; generation not measured (needs the whole model "
                 "in memory)")
    return (f"Quick check: {ppl}; {speed}. A first impression, not a benchmark: the Evaluate page measures "
            "more text and MMLU.")


# ----------------------------------------------------------------------------------------------------------
# Merge vs plain removal of as many layers
# ----------------------------------------------------------------------------------------------------------


@st.cache_data(max_entries=32, show_spinner=False)
def _removal_perplexity(_shared: SharedModel, model_key: tuple, plan_json: str) -> float:
    """Quick perplexity of a removal plan, measured as Apply measures (cached per model + plan)."""
    plan = PrunePlan.from_json(plan_json)
    if _shared.layerwise:  # over the memory: scored layer by layer, like Apply there
        with model_lock(_shared, quiet=True):
            return compare.layerwise_quick(_shared.loaded, plan)["pruned"]["perplexity"]
    with model_lock(_shared, quiet=True):
        return compare.quick_perplexity(surgery.apply_plan(_shared.model, plan), _shared.tokenizer)


def removal_baseline(shared: SharedModel, model_key: tuple, report: Any, n: int) -> tuple[Any, float]:
    """(plan, quick perplexity) of removing the ``n`` lowest-BI layers: what a merge must beat."""
    plan = make_plan("bi", report, n=n)
    return plan, _removal_perplexity(shared, model_key, plan.to_json())


def merge_vs_removal(plan: Any, quick: Mapping[str, Any], shared: SharedModel, model_key: tuple,
                     report: Any) -> None:
    """Say plainly whether this merge plan measures worse than removing as many layers outright."""
    if plan.method != "merge" or not plan.n_removed:
        return
    base_plan, base_ppl = removal_baseline(shared, model_key, report, plan.n_removed)
    merged = quick.get("perplexity")
    layers = ", ".join(map(str, base_plan.removed_layers))
    both = (f"perplexity {humanize.perplexity(merged)} with this merge vs {humanize.perplexity(base_ppl)} when "
            f"the same number of layers ({plan.n_removed}: {layers}, lowest Block Influence) is simply removed")
    if merged is None or not base_ppl < merged:
        st.caption(f"Merging measures no worse than plain removal of the same number of layers: {both}.")
        return
    st.warning(f"**Merging measures worse than plain removal of the same number of layers**: {both}. Choose "
             "**Strategy + ratio** with Block Influence, or another merge formula.", icon=":material/warning:")


# ----------------------------------------------------------------------------------------------------------
# Applied plans, side by side
# ----------------------------------------------------------------------------------------------------------


def remember_applied(plan: Any, quick: Mapping[str, Any], original: Mapping[str, Any]) -> None:
    """Keep the last :data:`HISTORY_SIZE` applied plans' quick numbers (newest first, one row per plan)."""
    row = {"plan_json": plan.to_json(), "describe": plan.describe(), "strategy": plan.strategy,
           "layers_after": plan.num_layers_after, "num_layers": plan.num_layers,
           "quick": dict(quick), "original": dict(original)}
    old = [r for r in st.session_state.get(SS_APPLIED, []) if r["plan_json"] != row["plan_json"]]
    st.session_state[SS_APPLIED] = [row, *old][:HISTORY_SIZE]


def history_rows(history: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The side-by-side table: one row per applied plan, numbers formatted with their units."""
    rows = []
    for r in history:
        q, o = r["quick"], r["original"]
        v = verdict_of(q, o)
        rows.append({
            "Plan": r["describe"],
            "Layers kept": f"{r['layers_after']} of {r['num_layers']}",
            "Perplexity": f"{humanize.perplexity(q.get('perplexity'))} (was {humanize.perplexity(o.get('perplexity'))})",
            "Speed": f"{speed_text(q)} ({speed_change(q, o) or humanize.MISSING})",
            "Verdict": v.level,
        })
    return rows


def history_table() -> None:
    """The last applied plans side by side (shown from two on)."""
    history = st.session_state.get(SS_APPLIED, [])
    if len(history) < 2:
        return
    st.markdown(f"**Last {len(history)} applied plans, side by side** (newest first)")
    st.table(history_rows(history))


# ----------------------------------------------------------------------------------------------------------
# Hand-picked layers from a chart selection
# ----------------------------------------------------------------------------------------------------------


def add_selection(current: Sequence[int], event: Mapping[str, Any] | None) -> list[int]:
    """The hand-picked layers after a box/lasso selection: ADDED to the earlier picks (a new box used to
    replace them silently); "Clear picks" is the way back to none."""
    points = ((event or {}).get("selection") or {}).get("points") or []
    picked = {int(p["x"]) for p in points if "x" in p}
    return sorted(set(map(int, current)) | picked)


# ----------------------------------------------------------------------------------------------------------
# Sidebar
# ----------------------------------------------------------------------------------------------------------


def sidebar_status() -> None:
    """What is on screen for this session: model, analysis, plan (a glance from any page)."""
    with st.sidebar:
        st.caption("This session")
        report = current_report()
        info = st.session_state.get(SS_MODEL_INFO)
        if report is None or info is None:
            st.caption("No analysis yet.")
            return
        st.markdown(f"**Model** `{short_model(info['model'])}` · {info['num_layers']} layers")
        m = report.meta
        st.markdown(f"**Analysis** {m.get('samples')} × {m.get('seq_len')} tokens, {m.get('data')}")
        plan = st.session_state.get(SS_PLAN)
        if st.session_state.get(SS_PLAN_ERROR):
            st.markdown("**Plan** :red[not valid — fix the selection on Prune]")
        elif plan is not None:
            st.markdown(f"**Plan** {plan.strategy}: −{plan.n_removed} layers ({humanize.percent(plan.ratio, 0)})")
        pruned = st.session_state.get(SS_PRUNED)
        if pruned is not None:
            v = verdict_of(pruned.get("quick"), pruned.get("original"))
            word = f" · :red[{v.level}]" if v.bad else f" · {v.level}" if v.level != "unknown" else ""
            st.markdown(f"**Pruned model** applied :material/check_circle:{word}")
            job, healed = st.session_state.get(SS_HEAL_JOB), st.session_state.get(SS_HEALED)
            if job is not None and not job.done.is_set():
                st.markdown("**Healing** in progress (Heal page)")
            elif healed is not None and healed["plan_json"] == pruned["plan_json"]:
                st.markdown("**Healed model** ready :material/healing:")
