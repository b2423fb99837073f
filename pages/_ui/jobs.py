"""Long work with progress: the analysis (Cancel keeps what is on screen) and the sweep (Stop keeps the
finished points, Run sweep resumes from them). Results are persisted (``layerlens.dashboard.store``)."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import streamlit as st

from layerlens import metrics
from layerlens.dashboard import store
from layerlens.dashboard.settings import AnalysisSettings
from layerlens.data import load_texts
from layerlens.questions import load_questions
from layerlens.report import LayerReport
from layerlens.runs import default_runs_dir
from layerlens.sweep import SweepConfig, make_plans

from .errors import guarded, status_error_on_failure
from .keys import (
    SS_AUTO,
    SS_CANCELLED,
    SS_MODEL_INFO,
    SS_PRUNED,
    SS_REPORT,
    SS_REQUESTED,
    SS_SETTINGS,
    SS_SWEEP,
    SS_SWEEP_PARTIAL,
    SS_SWEEP_RUNNING,
    SS_SWEEP_STOPPED,
)
from .resources import SharedModel, get_model, model_lock, resolve_texts
from .session import current_settings, requested_settings, require_router
from .widgets import report_caption

log = logging.getLogger("layerlens.dashboard")

# ----------------------------------------------------------------------------------------------------------
# Analysis with progress, cancel, disk cache
# ----------------------------------------------------------------------------------------------------------


@st.cache_data(max_entries=32, show_spinner=False)
def _read_report(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _saved_report(path: Path) -> Any:
    """A report persisted by an earlier analysis (parsed once per file version, see :func:`_read_report`)."""
    return LayerReport.from_dict(_read_report(str(path), path.stat().st_mtime_ns))


def _request_cancel() -> None:
    st.session_state[SS_CANCELLED] = True


def run_analysis(settings: AnalysisSettings, *, label: str = "Analyzing") -> bool:
    """Load the model and compute (or reload from disk) its report; True when a new report is on screen.

    On any error the earlier report stays in the session and an ``st.error`` says what to change.
    """
    ss = st.session_state
    ss[SS_CANCELLED] = False
    ok = False
    with guarded("analyzing the model"):
        settings.validate()
        status = st.status(f"{label}: loading {settings.model}…", expanded=True)
        slot = st.empty()  # progress + Cancel live outside the status, so they stay visible however it is folded
        with status, status_error_on_failure(status):
            t0 = time.perf_counter()
            shared = get_model(settings)
            info = shared.info
            status.write(f"Model ready: {info.architecture}, {info.num_layers} layers, "
                         f"{info.num_parameters / 1e6:.1f} M parameters on {info.device} "
                         f"({time.perf_counter() - t0:.1f} s).")
            texts, fingerprint = resolve_texts(settings)
            settings = replace(settings, data_label=texts.source)
            key = settings.key(f"{fingerprint}|{info.source_path}|{info.num_parameters}")
            path = store.analysis_path(key)
            if path.exists():
                report = _saved_report(path)
                status.update(label=f"Loaded the saved analysis ({report.num_layers} layers)", state="complete",
                              expanded=False)
            else:
                config = settings.capture
                status.update(label=f"{label}: {config.samples} samples × {config.seq_len} tokens…",
                              expanded=True)
                box = slot.container()
                bar = box.progress(0.0, text="Starting…")
                box.button("Cancel", key="ll_cancel_analysis", on_click=_request_cancel, icon=":material/stop:",
                           help="Stop the analysis; the results already on screen are kept.")
                t1 = time.perf_counter()

                def progress(done: int, total: int, msg: str) -> None:
                    rate = (time.perf_counter() - t1) / max(done, 1)
                    bar.progress(min(done / max(total, 1), 1.0),
                                 text=f"{msg} · about {rate * (total - done):.0f} s left")

                meta = dict(model=info.model, revision=info.revision, model_type=info.model_type,
                            dtype=info.dtype, device=info.device, source="dashboard")
                with model_lock(shared, status):
                    if path.exists():  # another session ran this very analysis while this one waited
                        report = _saved_report(path)
                        done = f"Loaded the analysis another session just saved ({report.num_layers} layers)"
                    else:
                        report = metrics.analyze(shared.model, shared.tokenizer, texts, config, progress=progress,
                                                 should_stop=lambda: bool(ss.get(SS_CANCELLED)), meta=meta)
                        report.save(path)
                        done = f"Analyzed {report.num_layers} layers in {time.perf_counter() - t1:.1f} s"
                slot.empty()
                status.update(label=done, state="complete", expanded=False)
        ss[SS_REPORT] = report
        ss[SS_SETTINGS] = settings
        ss[SS_MODEL_INFO] = info.to_dict()
        ss[SS_REQUESTED] = settings
        ss.pop(SS_PRUNED, None)  # a pruned model belongs to the previous report's model
        ok = True
    return ok


def ensure_report(auto: bool = True, *, quiet: bool = False) -> Any | None:
    """The report on screen; on a session's first visit (no typing) run the quick default analysis.

    Whatever this shows lives in one slot that every run creates at the same place, so the first visit's
    progress and status do not shift the page's widgets on the next rerun (a shifted widget is remounted:
    a slider being moved with the keyboard would lose focus and briefly show twice).
    ``quiet`` leaves out the "no analysis" hints (for the page that has the Analyze button).
    """
    ss = st.session_state
    area = st.empty()
    if ss.get(SS_REPORT) is not None:
        return ss[SS_REPORT]
    with area.container():
        if ss.get(SS_CANCELLED):
            if not quiet:
                st.warning("Analysis cancelled; press **Analyze** on the Model & data page to start again.")
            return None
        if auto and not ss.get(SS_AUTO):
            ss[SS_AUTO] = True
            note = st.empty()
            note.info("First visit: running a quick analysis of the bundled default model and text "
                      "(small sample) so you can explore right away.", icon=":material/waving_hand:")
            if run_analysis(requested_settings(), label="Quick first analysis"):
                note.empty()
            return ss.get(SS_REPORT)
        if not quiet:
            st.info("No analysis yet: pick a model and data on the **Model & data** page and press **Analyze**.")
    return None


def report_page(page_file: str, title: str) -> Any:
    """The head of a page that shows a report: routing (see :func:`require_router`), its title, the report
    (or a polite stop) and its caption."""
    require_router(page_file)
    st.title(title)
    report = need_report_or_stop()
    st.caption(report_caption(report))
    return report


def need_report_or_stop() -> Any:
    """For pages that need a report: get one (auto-running on first visit) or stop the page politely."""
    report = ensure_report()
    if report is None:
        st.page_link("pages/1_model_data.py", label="Go to Model & data", icon=":material/arrow_forward:")
        st.stop()
    return report


# ----------------------------------------------------------------------------------------------------------
# Sweeps (Evaluate page)
# ----------------------------------------------------------------------------------------------------------
def _request_stop() -> None:
    st.session_state[SS_SWEEP_STOPPED] = True


def run_sweep(shared: SharedModel, report: Any, strategies: Any, ratios: Any, *, windows: int, seq_len: int,
              mmlu_per_subject: int, current_plan: Any, key: str, subjects: Any = ()) -> Any:
    """Run (or resume) a sweep with a per-point progress bar and a Stop button; persist the frame.

    Stop (Streamlit stops this script run at the next progress update) or an error leaves the finished
    points on disk; before the interruption goes on, they are read back (``sweep(..., compute=False)``
    with the same data and config, which never runs the model). A stopped run can no longer touch
    ``st.session_state`` (every access raises StopException again), so they go into a plain dict held
    there, and with ``runner.fastReruns`` the run the Stop click starts is already going meanwhile: it calls
    :func:`collect_stopped_sweep`, which waits for this run to end and moves them into ``SS_SWEEP``.
    """
    running = threading.Event()
    st.session_state[SS_SWEEP_RUNNING] = running
    try:
        return _sweep_with_progress(shared, report, strategies, ratios, windows=windows, seq_len=seq_len,
                                    mmlu_per_subject=mmlu_per_subject, current_plan=current_plan, key=key,
                                    subjects=subjects)
    finally:
        running.set()


def collect_stopped_sweep(key: str, timeout: float = 600.0) -> bool:
    """After a Stop: wait (with a spinner) until the stopped sweep's run has ended, then put the points it
    read back for ``key`` into ``SS_SWEEP``. False if it is still busy after ``timeout`` seconds."""
    ss = st.session_state
    running = ss.get(SS_SWEEP_RUNNING)
    if running is not None and not running.is_set():
        with st.spinner("Stopping the sweep: finishing the evaluation in progress and reading back the points…"):
            if not running.wait(timeout):
                return False
    partial = ss.get(SS_SWEEP_PARTIAL, {}).pop(key, None)
    if partial is not None:
        ss[SS_SWEEP] = (key, partial)
    return True


def _sweep_with_progress(shared: SharedModel, report: Any, strategies: Any, ratios: Any, *, windows: int,
                         seq_len: int, mmlu_per_subject: int, current_plan: Any, key: str, subjects: Any) -> Any:
    from layerlens.sweep import sweep  # at call time: tests replace it to interrupt a sweep

    ss = st.session_state
    ss[SS_SWEEP_STOPPED] = False
    ppl_texts = load_texts("default", role="eval")
    questions = None
    if mmlu_per_subject > 0:
        questions = load_questions("default", limit=mmlu_per_subject, subjects=list(subjects) or None)
    plans = make_plans(report, list(strategies), sorted(float(r) for r in ratios), num_layers=report.num_layers)
    if current_plan is not None:
        plans.append(("current", current_plan.ratio, current_plan))
    status = st.status(f"Sweep: {len(plans)} points…", expanded=True)
    slot = st.empty()
    with status, status_error_on_failure(status):
        box = slot.container()
        bar = box.progress(0.0, text="Preparing the evaluation data…")
        box.button("Stop", key="ll_stop_sweep", on_click=_request_stop, icon=":material/stop_circle:",
                   help="Stop now; finished points stay saved and Run sweep resumes from them.")
        t0 = time.perf_counter()

        partials = ss.setdefault(SS_SWEEP_PARTIAL, {})  # written after a Stop, when ss no longer can be

        def progress(done: int, total: int, label: str) -> None:
            bar.progress(min(done / max(total, 1), 1.0),
                         text=f"{done}/{total} evaluations · {label[:90]} · {time.perf_counter() - t0:.0f} s")

        config = SweepConfig(plans=plans, seq_len=seq_len, max_windows=windows)
        same = dict(ppl_texts=ppl_texts, questions=questions, runs_dir=default_runs_dir(),
                    model_id=shared.info.to_dict())
        with model_lock(shared, status):
            try:
                frame = sweep(shared.model, shared.tokenizer, report, config, progress=progress, **same).frame
            except BaseException:  # Stop (Streamlit's StopException), another widget, or an error
                partial = None
                try:
                    partial = sweep(shared.model, shared.tokenizer, report, config, compute=False, **same).frame
                except Exception:  # noqa: BLE001 - never hide the interruption behind a read-back problem
                    log.warning("could not read back the finished sweep points:\n%s", traceback.format_exc())
                if partial is not None and len(partial):
                    partial.attrs["stopped"] = True  # the page says it is incomplete
                    if questions is not None:
                        partial["mmlu_questions"] = len(questions)
                    partials[key] = partial
                raise
        slot.empty()
        status.update(label=f"Sweep done: {len(frame)} points in {time.perf_counter() - t0:.0f} s",
                      state="complete", expanded=False)
    if questions is not None:
        frame["mmlu_questions"] = len(questions)  # saved with the points: the Summary says what MMLU rests on
    settings = current_settings()
    store.save_sweep(key, frame, model_key=settings.model_key() if settings else None,
                     report_created=report.meta.get("created"), strategies=strategies, ratios=ratios)
    return frame


def saved_sweeps_for(report: Any) -> list[Any]:
    """Every saved sweep frame of this session's model and analysis (newest first): a share link's viewer
    sees the quality numbers someone else measured."""
    settings = current_settings()
    if settings is None:
        return []
    return store.saved_sweeps(settings.model_key(), report.meta.get("created"))
