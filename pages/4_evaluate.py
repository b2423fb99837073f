"""Evaluate: perplexity and MMLU against pruning ratio, one curve per strategy (ShortGPT Figure 5 style).

Every finished point is persisted by ``layerlens.sweep`` (runs/sweep/points); a stopped sweep resumes where
it stopped, and the last sweep of these settings reappears after a restart.
"""

from __future__ import annotations

import streamlit as st

from layerlens.dashboard import store
from layerlens.dashboard.tables import current_marker
from layerlens.plans import label_of, strategy_names
from layerlens.plots import sweep_figure
from pages._ui import errors, jobs, keys, resources, session, widgets

report = jobs.report_page(__file__, "Evaluate")
ss = st.session_state

shared = None
with errors.guarded("loading the model"):
    shared = resources.shared_for_report()
if shared is None:
    st.stop()

STRATS = strategy_names(size="count")  # sized by a ratio alone, from the report or none: one curve each
RATIOS = tuple(round(0.05 * i, 2) for i in range(0, 15))

with st.container(border=True):
    c1, c2 = st.columns(2)
    strategies = c1.multiselect("Strategies (one curve each)", STRATS, default=["bi", "reverse"],
                                format_func=label_of, key="ev_strategies", persist_state="session")
    ratios = c2.multiselect("Pruning ratios", RATIOS, default=[0.0, 0.1, 0.2, 0.3, 0.4], key="ev_ratios",
                            format_func=lambda r: f"{r:.0%}", persist_state="session")
    d1, d2, d3, d4 = st.columns(4)
    windows = d1.number_input("Perplexity windows", 1, 256, 8, key="ev_windows", persist_state="session",
                              help="Held-out Shakespeare windows (plays disjoint from the calibration plays)")
    seq_len = d2.number_input("Window length (tokens)", 16, 4096, 256, step=64, key="ev_seq_len",
                              persist_state="session")
    use_mmlu = d3.checkbox("MMLU", value=True, key="ev_mmlu", persist_state="session",
                           help="Bundled MMLU test questions, scored by answer-letter log-likelihood")
    per_subject = d4.number_input("MMLU questions per subject (57 subjects)", 1, 100, 1, key="ev_mmlu_n",
                                  persist_state="session", disabled=not use_mmlu)
    from layerlens.defaults import MMLU_SUBJECTS

    subjects = st.multiselect("MMLU subjects (empty = all 57)", MMLU_SUBJECTS, default=[], key="ev_subjects",
                              persist_state="session", disabled=not use_mmlu,
                              format_func=lambda s: s.replace("_", " "))
    include_current = st.checkbox("Also evaluate the current plan from the Prune page", value=True,
                                  key="ev_current", persist_state="session")
    b1, b2 = st.columns([1, 5])
    run = b1.button("Run sweep", type="primary", icon=":material/play_arrow:", key="ev_run")
    b2.caption("Finished points are saved as they complete; **Stop** keeps them and pressing Run sweep again "
               "resumes where it stopped.")

stopped = ss.pop(keys.SS_SWEEP_STOPPED, False)
plan = session.current_plan(report)
settings = session.current_settings()
sweep_key = store.sweep_key(settings, report, strategies, ratios, int(windows), int(seq_len),
                         (int(per_subject), tuple(sorted(subjects))) if use_mmlu else 0,
                         plan.to_json() if include_current and plan is not None else "")

if run:
    if not strategies or not ratios:
        st.error("Pick at least one strategy and one ratio.", icon=":material/error:")
    else:
        with errors.guarded("running the sweep"):
            frame = jobs.run_sweep(shared, report, strategies, ratios, windows=int(windows), seq_len=int(seq_len),
                                 mmlu_per_subject=int(per_subject) if use_mmlu else 0, subjects=subjects,
                                 current_plan=plan if include_current else None, key=sweep_key)
            ss[keys.SS_SWEEP] = (sweep_key, frame)

# A sweep stopped (Stop, any other widget) or failed: take the points it read back. After a click the
# stopped run may still be finishing while this one already runs; this waits for it.
still_busy = not jobs.collect_stopped_sweep(sweep_key)
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
    st.info("No sweep for these settings yet: press **Run sweep**. With the defaults it takes about a minute "
            "on a CPU.", icon=":material/info:")
    st.stop()

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
n_cached = int(frame["cached"].sum()) if "cached" in frame else 0
head = (f"{len(frame)} points · **a stopped sweep**: only the finished evaluations are shown, Run sweep computes "
        "the rest" if frame.attrs.get("stopped") else f"{len(frame)} points ({n_cached} read back from earlier runs)")
st.caption(f"{head} · perplexity on held-out plays (lower is better) · MMLU chance level is 25%.")
show = frame.copy()
show["ratio"] = (100 * show["ratio"]).round(1)
st.dataframe(show[["strategy", "ratio", "n_removed", "removed_layers", "perplexity", "mmlu_accuracy", "seconds",
                   "cached"]].rename(columns={"ratio": "ratio (%)"}), hide_index=True, width="stretch")
