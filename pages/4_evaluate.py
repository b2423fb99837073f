"""Evaluate: perplexity, MMLU and KL to the original (with top-1 agreement) against pruning ratio, one curve
per strategy (ShortGPT Figure 5 style); optional lm-eval tasks add their metric columns to the table.

Every finished point is persisted by ``layerlens.sweep`` (runs/sweep/points); a stopped sweep resumes where
it stopped, and the last sweep of these settings reappears after a restart.
"""

from __future__ import annotations

import streamlit as st

from layerlens.dashboard import store
from layerlens.dashboard.sweeps import RATIO_CHOICES, SweepSettings, rough_seconds, unique_plans
from layerlens.dashboard.tables import current_marker
from layerlens.defaults import MMLU_SUBJECTS
from layerlens.harness import parse_tasks
from layerlens.plans import label_of
from layerlens.plots_curves import sweep_figure
from pages._ui import errors, jobs, keys, session, sweeping, widgets

report = jobs.report_page(__file__, "Evaluate")
ss = st.session_state

shared = jobs.model_or_stop()

start = session.requested_sweep()  # a share link's settings, else the defaults (widgets keep their own after)
with st.container(border=True):
    c1, c2 = st.columns(2)
    choices = session.sweep_strategies()
    strategies = c1.multiselect("Strategies (one curve each)", choices,
                                default=[x for x in start.strategies if x in choices],
                                format_func=label_of, key="ev_strategies", persist_state="session")
    ratios = c2.multiselect("Pruning ratios", RATIO_CHOICES, default=list(start.ratios), key="ev_ratios",
                            format_func=lambda r: f"{r:.0%}", persist_state="session")
    d1, d2, d3, d4 = st.columns(4)
    windows = d1.number_input("Perplexity windows", 1, 256, start.windows, key="ev_windows", persist_state="session",
                              help="Held-out Shakespeare windows (plays disjoint from the calibration plays)")
    seq_len = d2.number_input("Window length (tokens)", 16, 4096, start.seq_len, step=64, key="ev_seq_len",
                              persist_state="session")
    use_mmlu = d3.checkbox("MMLU", value=start.mmlu, key="ev_mmlu", persist_state="session",
                           help="Bundled MMLU test questions, scored by answer-letter log-likelihood")
    per_subject = d4.number_input("MMLU questions per subject (57 subjects)", 1, 100, start.mmlu_per_subject,
                                  key="ev_mmlu_n", persist_state="session", disabled=not use_mmlu)
    subjects = st.multiselect("MMLU subjects (empty = all 57)", MMLU_SUBJECTS, default=list(start.subjects),
                              key="ev_subjects", persist_state="session", disabled=not use_mmlu,
                              format_func=lambda s: s.replace("_", " "))
    e1, e2 = st.columns([3, 1], vertical_alignment="bottom")
    include_current = e1.checkbox("Also evaluate the current plan from the Prune page", value=start.include_current,
                                  key="ev_current", persist_state="session")
    heal_s = e2.number_input("Heal every point for (s, 0 = off)", 0, 3600, int(start.heal_seconds), step=10,
                             key="ev_heal", persist_state="session",
                             help="LoRA with distillation from the original (the Heal page's defaults) for this "
                                  "many seconds per pruned point, then the same evaluations: a dashed healed curve "
                                  "beside each strategy's. Healed points are saved and read back like the others.")
    sweeping.run_on_widget()  # this process / local Ray / a Ray cluster (layerlens.distributed)
    tasks = st.text_input("lm-eval tasks (optional)", start.tasks, key="ev_tasks", persist_state="session",
                          placeholder="e.g. hellaswag,arc_easy or /path/to/my_task.yaml",
                          help="lm-evaluation-harness tasks run by the harness itself on every pruned model (its metric "
                               "names, with standard errors): comma-separated task names whose data the harness "
                               "finds offline (your datasets cache) or local task YAML files. The sweep's reuse of "
                               "shared layers cannot apply inside the harness, so each point costs a full run of "
                               "every task.")
    sweep = SweepSettings(tuple(strategies), tuple(sorted(ratios)), int(windows), int(seq_len), bool(use_mmlu),
                          int(per_subject), tuple(subjects), bool(include_current), float(heal_s),
                          tasks=",".join(parse_tasks(tasks)))
    session.set_sweep_settings(sweep)  # the URL carries them: a link copied now opens these settings
    plan = session.current_plan(report)
    current = plan if include_current else None
    estimate = None
    if strategies and ratios:
        with errors.guarded("estimating the sweep's time"):
            estimate = sweeping.sweep_estimate(shared, report, sweep, current)
    b1, b2 = st.columns([1, 5])
    run = b1.button("Run sweep", type="primary", icon=":material/play_arrow:", key="ev_run")
    guess = ""
    if estimate is not None:
        how = ("as fast as the earlier sweeps on this model ran" if estimate.timing.source == "earlier sweeps"
               else "from timing one short perplexity window on this machine")
        healing = ""
        if heal_s:
            n_heal = len([p for p in unique_plans([p for _, _, p in sweeping.sweep_plans(report, sweep, current)])
                          if p.n_removed])
            healing = (f" plus **{rough_seconds(n_heal * heal_s)}** of healing ({n_heal} pruned point{'s' if n_heal != 1 else ''} × {heal_s} s; "
                       "each healed point is then evaluated too)")
        guess = (f"Estimated time: **about {rough_seconds(estimate.seconds)}** for "
                 f"{len(estimate.unit_seconds)} evaluations{healing} ({how}; points finished earlier are read back "
                 "at once). ")
    if shared.layerwise:
        b2.caption("This model runs layer by layer: every point is computed in one pass over the weights, in this "
                   "process (no time estimate). The points are saved when the pass ends and read back by a later "
                   "sweep; **Stop** discards the pass in progress.")
    else:
        b2.caption(guess + "Finished points are saved as they complete; **Stop** keeps them and pressing Run sweep "
                   "again resumes where it stopped.")

stopped = ss.pop(keys.SS_SWEEP_STOPPED, False)
settings = session.current_settings()
sweep_key = store.sweep_key(settings, report, sweep.strategies, sweep.ratios, sweep.windows, sweep.seq_len,
                            (sweep.mmlu_per_subject, tuple(sorted(sweep.subjects))) if sweep.mmlu else 0,
                            plan.to_json() if include_current and plan is not None else "", sweep.heal_seconds,
                            tasks=sweep.tasks)

if run:
    if not strategies or not ratios:
        st.error("Pick at least one strategy and one ratio.", icon=":material/error:")
    else:
        with errors.guarded("running the sweep"):
            frame = sweeping.run_sweep(shared, report, sweep, current_plan=current, key=sweep_key, estimate=estimate)
            ss[keys.SS_SWEEP] = (sweep_key, frame)

# A sweep stopped (Stop, any other widget) or failed: take the points it read back. After a click the
# stopped run may still be finishing while this one already runs; this waits for it.
still_busy = not sweeping.collect_stopped_sweep(sweep_key)
saved = ss.get(keys.SS_SWEEP)
frame = saved[1] if saved and saved[0] == sweep_key else store.load_sweep(sweep_key)
if stopped:
    st.warning("Sweep stopped. " + (f"The {len(frame)} point(s) that finished are shown below; all finished "
                                    "points are saved" if frame is not None else "Finished points are saved")
               + ": press **Run sweep** with the same settings to compute the rest."
               + (" (The evaluation in progress is still finishing.)" if still_busy else ""),
               icon=":material/stop_circle:")
if frame is None and saved:
    frame = saved[1]
    st.caption("Showing the last sweep of this session (its settings differ from the ones above).")
if frame is None:
    st.info("No sweep for these settings yet: press **Run sweep**"
            + (f" (about {rough_seconds(estimate.seconds)} on this machine)." if estimate is not None else "."),
            icon=":material/info:")
    session.stop_page()

curves = frame[frame["strategy"] != "current"]


def _current(metric: str):
    return current_marker(frame, plan, metric)


f1, f2 = st.columns(2)
with f1:
    widgets.chart(sweep_figure(curves, "perplexity", current=_current("perplexity")), key="ev_ppl")
with f2:
    if frame["mmlu_accuracy"].notna().any():
        widgets.chart(sweep_figure(curves, "mmlu_accuracy", current=_current("mmlu_accuracy")), key="ev_mmlu_fig")
    elif frame.attrs.get("stopped") and use_mmlu:
        st.info("No MMLU evaluation finished before the Stop (perplexity runs first).")
    else:
        st.info("MMLU was not part of this sweep.")
if "kl" in frame and frame["kl"].notna().any():
    g1, g2 = st.columns(2)
    with g1:
        widgets.chart(sweep_figure(curves, "kl", current=_current("kl")), key="ev_kl_fig")
    with g2:
        widgets.chart(sweep_figure(curves, "top1_agreement", current=_current("top1_agreement")), key="ev_top1_fig")
    st.caption("KL(original ‖ pruned): mean over the held-out tokens of how far the pruned model's next-token "
               "distribution is from the original's (0 = unchanged), computed in the perplexity pass; top-1 "
               "agreement: how often both predict the same next token. Smooth where MMLU on a small model sits at "
               "chance, and what healing by distillation optimises.")
n_cached = int(frame["cached"].sum()) if "cached" in frame else 0
head = (f"{len(frame)} points · **a stopped sweep**: only the finished evaluations are shown, Run sweep computes "
        "the rest" if frame.attrs.get("stopped") else f"{len(frame)} points ({n_cached} read back from earlier runs)")
st.caption(f"{head} · perplexity on held-out plays (lower is better) · MMLU chance level is 25%.")
show = frame.copy()
show["ratio"] = (100 * show["ratio"]).round(1)
columns = ["strategy", "ratio", "n_removed", "removed_layers", *(["healed"] if "healed" in show else []),
           "perplexity", *[c for c in ("kl", "top1_agreement") if c in show], "mmlu_accuracy",
           *[c for c in show.columns if "/" in c], "seconds", "cached"]  # "task/metric": lm-eval tasks
columns = [c for c in columns if c not in ("kl", "top1_agreement", "mmlu_accuracy") or show[c].notna().any()]
num = st.column_config.NumberColumn  # display only: the frame keeps full precision (and sorts as numbers)
st.dataframe(show[columns].rename(columns={"ratio": "ratio (%)"}), hide_index=True, width="stretch",
             column_config={"ratio (%)": num(format="%.1f"),
                            "perplexity": num(format="%.4g", help="4 significant digits; lower is better"),
                            "kl": num("KL (nats/token)", format="%.3f"),
                            "top1_agreement": num("top-1 agreement", format="percent"),
                            "mmlu_accuracy": num("MMLU accuracy", format="percent"),
                            "seconds": num("seconds", format="%.1f")})
