"""Export: the pruned model (transformers format + plan JSON), figures (HTML/PNG), metrics and sweeps
(CSV/JSON), and a one-page HTML report with provenance. Large files are built only when downloaded."""

from __future__ import annotations

import json

import streamlit as st

from layerlens.dashboard import store
from layerlens.dashboard.planning import params_after, plan_reason
from layerlens.dashboard.tables import current_marker, matrix_csv, metrics_frame
from layerlens.export import (
    PNG_HINT,
    figure_png_bytes,
    png_available,
    safe_name,
    save_figure,
    save_pruned,
    zip_folder,
)
from layerlens.plans import get_strategy
from layerlens.plans.slm import merge_groups
from layerlens.plots import bi_bar, layer_strip, similarity_heatmap
from layerlens.plots_curves import sweep_figure
from pages._ui import errors, healing, jobs, keys, resources, session, widgets

report = jobs.report_page(__file__, "Export")
ss = st.session_state
plan = session.current_plan(report)
pruned = ss.get(keys.SS_PRUNED)
sweep_state = ss.get(keys.SS_SWEEP)
sweep_frame = sweep_state[1] if sweep_state else None
info = ss.get(keys.SS_MODEL_INFO) or {}
short = safe_name(str(info.get("model", "model")).rstrip("/").split("/")[-1], "model")
exports = store.exports_dir()
healed = healing.current(pruned, session.current_settings().model_key())


def _save(model, applied, target, heal=None) -> None:
    """Save ``model`` (the pruned or the healed one) with its plan, under the model's lock."""
    shared = resources.shared_for_report()
    with resources.model_lock(shared):
        # Provenance records only what the plan used: the report's data for a report plan.
        from_report = get_strategy(applied.strategy).uses_report(applied.params.get("criterion"))
        used = report.data_provenance() if from_report else {"data": None}
        if model is None and shared.layerwise:  # over the memory: written tensor by tensor, same folder layout
            from layerlens.layerwise_export import export_pruned

            export_pruned(shared.loaded, applied, target, report=report if from_report else None,
                          meta={"source_model": info, **used})
        else:  # in the checkpoint's own dtype, as `layerlens prune` writes it by default
            save_pruned(model, shared.tokenizer, applied, target, report=report if from_report else None,
                        meta={"source_model": info, **used}, heal=heal,
                        dtype=getattr(shared.loaded, "checkpoint_dtype", None))
    ss[keys.SS_SAVED_MODEL] = str(target)
    st.success(f"Saved to {target}. Load it with AutoModelForCausalLM.from_pretrained('{target}').",
               icon=":material/check_circle:")


# ---- pruned model -----------------------------------------------------------------------------------------
st.subheader("Pruned model")
with st.container(border=True):
    if pruned is None:
        st.info("No pruned model in this session yet: choose a plan on **Prune** and press **Apply plan**.",
                icon=":material/info:")
        st.page_link("pages/3_prune.py", label="Go to Prune", icon=":material/content_cut:")
    else:
        p = pruned["plan"]
        st.markdown(f"Applied plan: `{p.describe()}`")
        verdict = widgets.verdict_of(pruned.get("quick"), pruned.get("original"))
        widgets.show_verdict(verdict)
        if verdict.bad:
            st.caption("Saving it still works (e.g. to heal it by fine-tuning), but do not use it as it is.")
        default_name = f"{short}-{p.strategy}-{p.num_layers_after}L"
        name = safe_name(st.text_input("Folder name", value=default_name, key="ex_name"), default_name)
        target = exports / name
        st.caption(f"Saved on the server under `{target}` in plain transformers format "
                   "(config.json, model.safetensors, tokenizer) plus `layerlens_plan.json`; the weights in the "
                   "checkpoint's own dtype (a bf16 model stays bf16 even when analysed in float32).")
        if st.button("Save pruned model", type="primary", icon=":material/save:", key="ex_save_model"):
            with errors.guarded("saving the pruned model"), st.spinner("Saving…"):
                _save(pruned["model"], p, target)
        if healed is not None:  # issue 15: the healed model (LoRA merged into the weights) beside it
            st.markdown(f"**Healed model**: {healing.describe(healed['record'])}")
            healed_name = safe_name(st.text_input("Folder name (healed)", value=f"{default_name}-healed",
                                                  key="ex_healed_name"), f"{default_name}-healed")
            if st.button("Save healed model", type="primary", icon=":material/healing:", key="ex_save_healed",
                         help="The same format, the LoRA merged into the weights (no peft needed); "
                              "layerlens_plan.json gains a `heal` object (loss, steps, perplexity before/after, "
                              "curve, settings)."):
                with errors.guarded("saving the healed model"), st.spinner("Saving…"):
                    _save(healed["model"], p, exports / healed_name, heal=healed["record"])
        else:
            st.caption("Heal it first on **Heal** to save a healed model too.")
        saved = ss.get(keys.SS_SAVED_MODEL)
        if saved:
            from pathlib import Path

            folder = Path(saved)
            if folder.exists():
                st.download_button("Download the saved model (.zip)", data=lambda: zip_folder(folder),
                                   file_name=f"{folder.name}.zip", mime="application/zip", icon=":material/download:",
                                   key="ex_zip", on_click="ignore")
        st.download_button("Plan JSON", data=json.dumps({"plan": p.to_dict()}, indent=1),
                           file_name="layerlens_plan.json", mime="application/json", key="ex_plan_applied",
                           on_click="ignore")

# ---- figures ----------------------------------------------------------------------------------------------
st.subheader("Figures")
highlight = plan.removed_layers if plan is not None else ()
figures = {
    "bi": ("Block Influence per layer", lambda: bi_bar(report, "bi", highlight=highlight)),
    "magnitude": ("Relative Magnitude per layer", lambda: bi_bar(report, "magnitude", highlight=highlight)),
    "cosine": ("Cosine heatmap", lambda: similarity_heatmap(report, "cosine", threshold=0.9, groups=merge_groups(report, "cosine", 0.9))),
    "cka": ("CKA heatmap", lambda: similarity_heatmap(report, "cka", threshold=0.9, groups=merge_groups(report, "cka", 0.9))),
}
if plan is not None:
    from layerlens.plans import plan_summary

    figures["plan"] = ("Layer plan strip", lambda: layer_strip(plan_summary(plan)))
if sweep_frame is not None:
    curves = sweep_frame[sweep_frame["strategy"] != "current"]
    figures["sweep_ppl"] = ("Perplexity vs ratio", lambda: sweep_figure(
        curves, "perplexity", current=current_marker(sweep_frame, plan, "perplexity")))
    if sweep_frame["mmlu_accuracy"].notna().any():
        figures["sweep_mmlu"] = ("MMLU vs ratio", lambda: sweep_figure(
            curves, "mmlu_accuracy", current=current_marker(sweep_frame, plan, "mmlu_accuracy")))
png_ok = png_available()
with st.container(border=True):
    for key, (label, make) in figures.items():
        c1, c2, c3 = st.columns([3, 1, 1])
        c1.markdown(label)
        c2.download_button("HTML", data=lambda make=make: make().to_html(include_plotlyjs=True),
                           file_name=f"{key}.html", mime="text/html", key=f"ex_fig_html_{key}", on_click="ignore")
        c3.download_button("PNG", data=lambda make=make: figure_png_bytes(make()) or b"",
                           file_name=f"{key}.png", mime="image/png", key=f"ex_fig_png_{key}", on_click="ignore",
                           disabled=not png_ok, help=None if png_ok else PNG_HINT)
    if st.button("Save all figures on the server (HTML + PNG)", key="ex_save_figs", icon=":material/image:"):
        with errors.guarded("saving the figures"), st.spinner("Rendering…"):
            folder = exports / f"{short}-figures"
            written = []
            for key, (_, make) in figures.items():
                written += save_figure(make(), folder / key)
            n_png = sum(p.suffix == ".png" for p in written)
            st.success(f"Wrote {len(written)} files to {folder}.", icon=":material/check_circle:")
            if n_png == 0:
                st.warning(PNG_HINT, icon=":material/warning:")

# ---- data -------------------------------------------------------------------------------------------------
st.subheader("Metrics and sweeps")
with st.container(border=True):
    d1, d2, d3, d4 = st.columns(4)
    d1.download_button("Report (JSON)", data=report.to_json(), file_name="report.json", mime="application/json",
                       key="ex_report_json", on_click="ignore")
    d2.download_button("Per-layer metrics (CSV)", data=metrics_frame(report).to_csv(index=False),
                       file_name="layer_metrics.csv", mime="text/csv", key="ex_metrics_csv", on_click="ignore")
    d3.download_button("Cosine matrix (CSV)", data=matrix_csv(report.cosine), file_name="cosine.csv",
                       mime="text/csv", key="ex_cos_csv", on_click="ignore")
    d4.download_button("CKA matrix (CSV)", data=matrix_csv(report.cka), file_name="cka.csv", mime="text/csv",
                       key="ex_cka_csv", on_click="ignore")
    if plan is not None:
        st.download_button("Current plan (JSON)", data=json.dumps({"plan": plan.to_dict()}, indent=1),
                           file_name="plan.json", mime="application/json", key="ex_plan_json", on_click="ignore")
    if sweep_frame is not None:
        s1, s2 = st.columns(2)
        s1.download_button("Sweep (CSV)", data=sweep_frame.to_csv(index=False), file_name="sweep.csv",
                           mime="text/csv", key="ex_sweep_csv", on_click="ignore")
        s2.download_button("Sweep (JSON)", data=sweep_frame.to_json(orient="records", indent=1),
                           file_name="sweep.json", mime="application/json", key="ex_sweep_json", on_click="ignore")
    else:
        st.caption("Run a sweep on **Evaluate** to export its points here.")

# ---- one-page report --------------------------------------------------------------------------------------
st.subheader("One-page HTML report")


_shared = resources.shared_for_report()
_before = _shared.info.num_parameters if _shared else None
_after = params_after(_before, _shared.per_layer_params, plan) if _shared and plan is not None else None
_applied = pruned if pruned is not None and plan is not None and pruned["plan_json"] == plan.to_json() else None


def _report_html() -> str:
    """Built only when the button is clicked (runs outside the script: no session access in here)."""
    from layerlens.report_html import build_report_html

    return build_report_html(
        report, plan=plan, model_info=info, quick=_applied["quick"] if _applied else None,
        original=_applied["original"] if _applied else None, sweep_frame=sweep_frame,
        reason=plan_reason(report, plan) if plan is not None else None, params_before=_before,
        params_after=_after, title=f"LayerLens report — {info.get('model', 'model')}")


with st.container(border=True):
    st.caption("Model card, plan and why, before/after numbers, the figures (interactive, works offline) and "
               "full provenance: model, data, settings, versions, git commit.")
    st.download_button("Download the HTML report", data=_report_html, file_name="layerlens_report.html",
                       mime="text/html", icon=":material/description:", key="ex_html_report", type="primary", on_click="ignore")
