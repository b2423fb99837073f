"""The Redundancy page's evidence sections: leave-one-out damage (how well each metric predicts it) and the
same model analyzed on several calibration sets (rankings side by side, Kendall tau, a difference heatmap).

Widgets -> one library call (:func:`layerlens.damage.leave_one_out`, :func:`layerlens.metrics.analyze`,
:func:`layerlens.calibration_compare.compare_reports`) -> builders from :mod:`layerlens.plots_trust`.
Results are kept by the dashboard's run store (:mod:`layerlens.dashboard.store`): the damage documents under
``dashboard/damage``, the extra analyses as ordinary saved analyses (the Model & data page finds them too).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import streamlit as st

from layerlens.calibration_compare import compare_reports
from layerlens.damage import (
    METRIC_LABELS,
    damage_document,
    leave_one_out,
    sublayer_plans_available,
)
from layerlens.dashboard import store
from layerlens.data import load_texts
from layerlens.plots_trust import (
    correlation_rows,
    damage_bars,
    damage_scatter,
    metrics_with_damage,
    rank_difference_heatmap,
    rank_table,
    tau_rows,
)
from layerlens.report import LayerReport
from layerlens.runs import default_runs_dir, provenance, stable_key

from . import jobs, session, widgets
from .resources import model_lock, resolve_texts

DATA_CHOICES = {"default": "Shakespeare plays (bundled)", "prose": "Python docs prose (bundled)"}


def _damage_key(settings: Any, report: Any, windows: int, seq_len: int, sublayers: bool) -> str:
    return stable_key({"model": list(settings.model_key()), "report": report.meta.get("created"),
                       "data": "default:eval", "windows": windows, "seq_len": seq_len, "sublayers": sublayers})


def _compute_damage(report: Any, windows: int, seq_len: int, sublayers: bool) -> dict[str, Any]:
    shared = jobs.model_or_stop()
    info = shared.info
    texts = load_texts("default", role="eval")
    n_units = report.num_layers * (3 if sublayers else 1)
    with st.status(f"Removing each of {n_units} units alone and measuring perplexity…", expanded=True) as status:
        bar = st.progress(0.0, text="Running the original once (its states are reused by every removal)…")
        t0 = time.perf_counter()

        def progress(done: int, total: int, label: str) -> None:
            rate = (time.perf_counter() - t0) / max(done, 1)
            what = f"{label} removed" if not shared.layerwise else f"all removals in one pass, {label}"
            bar.progress(min(done / max(total, 1), 1.0),
                         text=f"{done}/{total}: {what} · about {rate * (total - done):.0f} s left")

        with model_lock(shared):
            if shared.layerwise:  # over the memory: every removal in one pass over the weights
                from layerlens.layerwise import leave_one_out as layerwise_leave_one_out

                result = layerwise_leave_one_out(shared.loaded, texts, sublayers=sublayers, seq_len=seq_len,
                                                 max_windows=windows, progress=progress)
            else:
                result = leave_one_out(shared.model, shared.tokenizer, texts, sublayers=sublayers, seq_len=seq_len,
                                       max_windows=windows, runs_dir=default_runs_dir(), model_id=info.to_dict(),
                                       progress=progress)
        status.update(label=f"Measured {n_units} removals in {time.perf_counter() - t0:.1f} s", state="complete")
    s = result.stats
    meta = provenance(model=info.model, revision=info.revision, dtype=info.dtype, device=info.device,
                      data=texts.source, calibration=report.data_provenance(), samples=result.task.get("n_windows"),
                      seq_len=seq_len, max_windows=windows, sublayers=sublayers, kl=True, source="dashboard",
                      layer_passes=s.layer_passes, layer_passes_from_scratch=s.layer_passes_from_scratch,
                      seconds=round(s.seconds, 3))
    return damage_document(result, report, meta)


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:+.3f}"


def damage_section(report: Any) -> None:
    """Leave-one-out damage: a button computes it (progress, persisted, resumable); then the table of
    Spearman/Kendall per metric, the best predictor, a scatter of a metric against the damage and the bars."""
    settings = session.current_settings()
    with st.container(border=True):
        st.subheader("Ground truth: what removing each layer really costs")
        st.caption("Each layer (optionally each attention and MLP sublayer) is removed alone and the held-out "
                   "perplexity measured (ShortGPT's Figure 3). The table says how well each redundancy metric "
                   "ranks the layers like that real damage does.")
        c1, c2, c3 = st.columns(3)
        windows = c1.select_slider("Held-out windows", [2, 4, 8, 16], value=4, key="rd_dmg_windows",
                                   persist_state="session")
        seq_len = c2.select_slider("Tokens per window", [64, 128, 256], value=128, key="rd_dmg_seq",
                                   persist_state="session")
        sublayers = c3.checkbox("Attention and MLP sublayers too", value=False, key="rd_dmg_sub",
                                disabled=not sublayer_plans_available(), persist_state="session",
                                help="Also remove each attention and each MLP sublayer alone (3× the removals).")
        if settings is None:
            return
        key = _damage_key(settings, report, int(windows), int(seq_len), bool(sublayers))
        doc = store.load_damage(key)
        if doc is None:
            if not st.button("Measure the damage of each layer", key="rd_dmg_run", icon=":material/science:",
                             help="Finished removals are saved: a stopped run resumes where it stopped."):
                st.caption("Not measured yet for these settings.")
                return
            doc = _compute_damage(report, int(windows), int(seq_len), bool(sublayers))
            store.save_damage(key, doc, model_key=settings.model_key(), report_created=report.meta.get("created"))
        _show_damage(doc, report)


def _show_damage(doc: dict[str, Any], report: Any) -> None:
    best = doc.get("best_predictor")
    if best:
        st.success(f"Best predictor of the real damage on this model: **{best['label']}** "
                   f"(Spearman {best['signed_spearman']:+.2f} in the direction that means 'important').",
                   icon=":material/verified:")
    rows = correlation_rows(doc)
    if rows:
        st.dataframe([{k: (_fmt(v) if isinstance(v, float) or v is None else v) for k, v in r.items() if k != "key"}
                      for r in rows], hide_index=True, width="stretch")
    choices = list(metrics_with_damage(doc))
    if choices:
        metric = st.radio("Scatter: metric against the damage", choices, format_func=METRIC_LABELS.get,
                          horizontal=True, key="rd_dmg_metric")
        widgets.chart(damage_scatter(doc, report, metric), key="rd_dmg_scatter")
    widgets.chart(damage_bars(doc), key="rd_dmg_bars")
    meta = doc.get("meta", {})
    st.caption(f"Baseline perplexity {doc['baseline_ppl']:.3f} on {meta.get('samples')} held-out windows × "
               f"{meta.get('seq_len')} tokens; {meta.get('layer_passes')} layer passes with prefix reuse "
               f"({meta.get('layer_passes_from_scratch')} from scratch).")


def _report_on(settings: Any, data: str) -> LayerReport:
    """The analysis of the current model on ``data`` with the current capture settings: the saved one when
    there is one (any page may have saved it), else computed now and saved."""
    shared = jobs.model_or_stop()
    info = shared.info
    s2 = replace(settings, data=data, data_label=DATA_CHOICES.get(data, data))
    texts, fingerprint = resolve_texts(s2)
    path = store.analysis_path(s2.key(f"{fingerprint}|{info.source_path}|{info.num_parameters}"))
    if path.exists():
        return LayerReport.load(path)
    bar = st.progress(0.0, text=f"Analyzing on {s2.data_label}…")

    def progress(done: int, total: int, msg: str) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{s2.data_label}: {msg}")

    meta = dict(model=info.model, revision=info.revision, model_type=info.model_type, dtype=info.dtype,
                device=info.device, source="dashboard")
    with model_lock(shared):
        report = shared.analyze(texts, s2.capture, progress=progress, meta=meta)  # layer by layer when over memory
    report.save(path)
    bar.empty()
    return report


def calibration_section(report: Any) -> None:
    """The same model on two or more calibration sets: rankings side by side, tau, a rank-difference heatmap."""
    settings = session.current_settings()
    if settings is None:
        return
    with st.container(border=True):
        st.subheader("Does the calibration set change the ranking?")
        options = dict(DATA_CHOICES)
        if settings.data not in options:
            options[settings.data] = f"{settings.data_label} (current)"
        c1, c2 = st.columns([3, 1])
        chosen = c1.multiselect("Calibration sets (two or more)", list(options), default=list(DATA_CHOICES),
                                format_func=options.get, key="rd_cal_sets", persist_state="session")
        metric = c2.radio("Rank by", ["bi", "magnitude"], format_func=METRIC_LABELS.get, key="rd_cal_metric",
                          persist_state="session")
        if len(chosen) < 2:
            st.caption("Pick at least two calibration sets.")
            return
        labels = [options[d] for d in chosen]
        run_key = ("rd_cal", tuple(chosen), settings.model_key(), settings.capture)
        ready = st.session_state.get("rd_cal_ready") == run_key
        if not ready and not st.button("Analyze on these sets", key="rd_cal_run", icon=":material/compare_arrows:",
                                       help="Saved analyses are reused; missing ones run now "
                                            f"({settings.capture.samples} samples × {settings.capture.seq_len} tokens)."):
            return
        reports = [_report_on(settings, d) for d in chosen]
        st.session_state["rd_cal_ready"] = run_key
        comp = compare_reports(reports, labels, metric=metric)
        a, b = st.columns([1, 1])
        with a:
            st.markdown("**Rankings side by side** (layer at each rank; 1 = most redundant)")
            st.dataframe(rank_table(comp), hide_index=True, width="stretch", height=300)
        with b:
            st.markdown("**Agreement between the sets**")
            st.dataframe(tau_rows(comp), hide_index=True, width="stretch")
        widgets.chart(rank_difference_heatmap(comp), key="rd_cal_heat")


def best_predictor_line(report: Any) -> str | None:
    """One sentence for the Summary naming the metric that best predicts the measured damage on this model
    (from the newest damage measured on the Redundancy page), or None when none was measured."""
    settings = session.current_settings()
    if settings is None:
        return None
    doc = store.latest_damage(settings.model_key(), report.meta.get("created"))
    best = (doc or {}).get("best_predictor")
    if not best:
        return None
    bi = (doc.get("correlations") or {}).get("bi") or {}
    tail = (f"; Block Influence ranks the layers with Kendall τ {bi['kendall']:+.2f} against it"
            if best["metric"] != "bi" and bi.get("kendall") is not None else "")
    return (f"**Best predictor of the real damage on this model:** {best['label']} (Spearman "
            f"{best['signed_spearman']:+.2f} against each layer's measured perplexity increase){tail}.")
