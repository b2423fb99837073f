"""The analysis, long work with progress: a thread of its own (a page change does not lose it), followed
by whichever script run comes next; Cancel keeps what is on screen. Reports are persisted
(``layerlens.dashboard.store``). The sweep's long work is :mod:`.sweeping`."""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from layerlens import metrics
from layerlens.dashboard import store
from layerlens.dashboard.settings import AnalysisSettings
from layerlens.errors import LayerLensError
from layerlens.report import LayerReport

from .errors import guarded, run_job, status_error_on_failure
from .keys import (
    SS_CANCELLED,
    SS_JOB,
    SS_MODEL_INFO,
    SS_PRUNED,
    SS_REPORT,
    SS_REQUESTED,
    SS_SETTINGS,
    SS_UPLOAD,
)
from .resources import SharedModel, get_model, resolve_texts, shared_for_report
from .session import current_settings, requested_settings, require_router, stop_page
from .widgets import report_caption

log = logging.getLogger("layerlens.dashboard")



@st.cache_data(max_entries=32, show_spinner=False)
def _read_report(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _saved_report(path: Path) -> Any:
    """A report persisted by an earlier analysis (parsed once per file version, see :func:`_read_report`)."""
    return LayerReport.from_dict(_read_report(str(path), path.stat().st_mtime_ns))


@dataclass
class AnalysisJob:
    """One analysis in a thread of its own. A click on another page stops the script run that started
    it (Streamlit's fast reruns), never the thread: the next run, on whichever page, shows its progress
    (:func:`follow`) and takes its result into the session. The thread never touches ``st``; it only
    writes the fields below, which the following run reads."""

    settings: AnalysisSettings
    texts: Any
    fingerprint: str
    label: str
    first_visit: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    heading: str = ""  # the status box's label now
    notes: list[str] = field(default_factory=list)  # lines of the status box, in order
    fraction: float | None = None  # the progress bar (None: no bar yet)
    bar_text: str = ""
    final: str = ""  # the status box's label once done
    result: tuple[Any, AnalysisSettings, dict] | None = None  # (report, settings, model info)
    error: Exception | None = None
    taken: bool = False  # a script run put the result in the session (or showed the error)

    def run(self) -> None:
        run_job(self, self._analyze)

    def _analyze(self) -> None:
        settings = self.settings
        t0 = time.perf_counter()
        shared = get_model(settings)
        info = shared.info
        self.notes.append(f"Model ready: {info.architecture}, {info.num_layers} layers, "
                          f"{info.num_parameters / 1e6:.1f} M parameters on {info.device} "
                          f"({time.perf_counter() - t0:.1f} s).")
        key = settings.key(f"{self.fingerprint}|{info.source_path}|{info.num_parameters}")
        path = store.analysis_path(key)
        if path.exists():
            report = _saved_report(path)
            self.final = f"Loaded the saved analysis ({report.num_layers} layers)"
        else:
            config = settings.capture
            self.heading = f"{self.label}: {config.samples} samples × {config.seq_len} tokens…"
            self.fraction, self.bar_text = 0.0, "Starting…"
            t1 = time.perf_counter()

            def progress(done: int, total: int, msg: str) -> None:
                rate = (time.perf_counter() - t1) / max(done, 1)
                self.fraction = min(done / max(total, 1), 1.0)
                self.bar_text = f"{msg} · about {rate * (total - done):.0f} s left"

            meta = dict(model=info.model, revision=info.revision, model_type=info.model_type,
                        dtype=info.dtype, device=info.device, source="dashboard")
            if not shared.lock.acquire(blocking=False):
                self.notes.append("Another session is using this model; waiting for it to finish…")
                shared.lock.acquire()
            try:
                if path.exists():  # another session ran this very analysis while this one waited
                    report = _saved_report(path)
                    self.final = f"Loaded the analysis another session just saved ({report.num_layers} layers)"
                else:
                    report = shared.analyze(self.texts, config, progress=progress, should_stop=self.cancel.is_set,
                                            meta=meta)
                    report.save(path)
                    self.final = f"Analyzed {report.num_layers} layers in {time.perf_counter() - t1:.1f} s"
            finally:
                shared.lock.release()
        self.result = (report, settings, info.to_dict())


def _texts(settings: AnalysisSettings) -> tuple[Any, str]:
    """:func:`resources.resolve_texts`, with an upload's problems told by the user's file name (the copy
    this session keeps is a temp file whose path means nothing to them)."""
    try:
        return resolve_texts(settings)
    except LayerLensError as exc:
        up = st.session_state.get(SS_UPLOAD)
        if not up or not settings.data.startswith("upload:"):
            raise
        text = str(exc)
        for temp in (up["path"], str(Path(up["path"]).parent)):
            text = text.replace(temp, up["name"])
        named = copy.copy(exc)  # the same error class (DataError, ...), told in the user's words
        named.args = (text,)
        raise named from exc


def start_analysis(settings: AnalysisSettings, *, label: str = "Analyzing", first_visit: bool = False) -> AnalysisJob:
    """Check the settings and the data here (a user error is shown at once), then analyze in a thread.

    The job goes into the session before its thread starts: a run stopped in between leaves no thread
    that nobody follows. A job still running for this session is cancelled (the newest request wins).
    """
    settings.validate()
    texts, fingerprint = _texts(settings)
    settings = replace(settings, data_label=texts.source)
    job = AnalysisJob(settings, texts, fingerprint, label, first_visit, heading=f"{label}: loading {settings.model}…")
    ss = st.session_state
    old = ss.get(SS_JOB)
    if old is not None and not old.done.is_set():
        old.cancel.set()
    ss[SS_CANCELLED] = False
    ss[SS_JOB] = job
    thread = threading.Thread(target=job.run, name="layerlens-analysis", daemon=True)
    add_script_run_ctx(thread, get_script_run_ctx())  # the cached model loader runs in it
    thread.start()
    return job


def _request_cancel() -> None:
    ss = st.session_state
    ss[SS_CANCELLED] = True
    job = ss.get(SS_JOB)
    if job is not None:
        job.cancel.set()


def follow(job: AnalysisJob, poll: float = 0.2) -> bool:
    """Show a job's progress (and Cancel) until it ends, then put its report in the session (once).

    True when a new report is on screen. On any error the earlier report stays and an ``st.error`` says
    what to change. Safe to be cut short at any point: the next run follows the same job again.
    """
    if job.taken:
        return False
    ok = False
    with guarded("analyzing the model"):
        status = st.status(job.heading, expanded=True)
        slot = st.empty()  # progress + Cancel live outside the status, so they stay visible however it is folded
        with status, status_error_on_failure(status):
            heading, shown, bar, drawn, beat = job.heading, 0, None, None, time.monotonic()
            while True:
                finished = job.done.wait(poll)
                for note in job.notes[shown:]:
                    status.write(note)
                shown = max(shown, len(job.notes))
                if job.heading != heading or time.monotonic() - beat > 1.0:
                    # also a heartbeat: an st call is where a click elsewhere stops this run (the job goes on)
                    heading, beat = job.heading, time.monotonic()
                    status.update(label=heading)
                if finished:
                    break
                if job.fraction is not None and (job.fraction, job.bar_text) != drawn:
                    drawn = (job.fraction, job.bar_text)
                    if bar is None:
                        box = slot.container()
                        bar = box.progress(job.fraction, text=job.bar_text)
                        box.button("Cancel", key="ll_cancel_analysis", on_click=_request_cancel,
                                   icon=":material/stop:",
                                   help="Stop the analysis; the results already on screen are kept.")
                    else:
                        bar.progress(job.fraction, text=job.bar_text)
            slot.empty()
            if isinstance(job.error, metrics.Cancelled):  # the user's own Cancel: one warning says so (the page's)
                status.update(label="Cancelled: nothing was saved; earlier results are kept", state="error",
                              expanded=False)
                job.taken = True
                return False
            if job.error is not None:
                raise job.error
            if job.result is None:
                raise LayerLensError("The analysis stopped without a result; press Analyze to start again.")
            report, settings, info = job.result
            status.update(label=job.final, state="complete", expanded=False)
        ss = st.session_state
        ss[SS_REPORT] = report
        ss[SS_SETTINGS] = settings
        ss[SS_MODEL_INFO] = info
        ss[SS_REQUESTED] = settings
        ss.pop(SS_PRUNED, None)  # a pruned model belongs to the previous report's model
        ok = True
    job.taken = job.done.is_set()  # only now: a run cut short above leaves it to the next run
    return ok


def run_analysis(settings: AnalysisSettings, *, label: str = "Analyzing") -> bool:
    """Load the model and compute (or reload from disk) its report; True when a new report is on screen.

    On any error the earlier report stays in the session and an ``st.error`` says what to change.
    """
    job = None
    with guarded("analyzing the model"):
        job = start_analysis(settings, label=label)
    return job is not None and follow(job)


def ensure_report(auto: bool = True, *, quiet: bool = False) -> Any | None:
    """The report on screen; on a session's first visit (no typing) start the quick default analysis.
    An analysis still running (started on this page or another) is followed here until it ends.

    Whatever this shows lives in one slot that every run creates at the same place, so the first visit's
    progress and status do not shift the page's widgets on the next rerun (a shifted widget is remounted:
    a slider being moved with the keyboard would lose focus and briefly show twice).
    ``quiet`` leaves out the "no analysis" hints (for the page that has the Analyze button).
    """
    ss = st.session_state
    area = st.empty()
    with area.container():
        job = ss.get(SS_JOB)
        if job is None and auto and ss.get(SS_REPORT) is None:
            with guarded("starting the analysis"):
                job = start_analysis(requested_settings(), label="Quick first analysis", first_visit=True)
        if job is not None and not job.taken:
            note = st.empty()
            if job.first_visit:
                note.info("First visit: running a quick analysis of the bundled default model and text "
                          "(small sample) so you can explore right away.", icon=":material/waving_hand:")
            if follow(job):
                note.empty()
        if ss.get(SS_REPORT) is not None:
            return ss[SS_REPORT]
        if quiet:
            return None
        if ss.get(SS_CANCELLED):
            st.warning("Analysis cancelled; press **Analyze** on the Model & data page to start again.")
        else:
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


def model_or_stop() -> SharedModel:
    """The report's model (one cached copy for every session), or end the page: the error is on screen."""
    shared = None
    with guarded("loading the model"):
        shared = shared_for_report()
    if shared is None:
        stop_page()
    return shared


def need_report_or_stop() -> Any:
    """For pages that need a report: get one (auto-running on first visit) or stop the page politely."""
    report = ensure_report()
    if report is None:
        st.page_link("pages/1_model_data.py", label="Go to Model & data", icon=":material/arrow_forward:")
        stop_page()
    return report


def saved_sweeps_for(report: Any) -> list[Any]:
    """Every saved sweep frame of this session's model and analysis (newest first): a share link's viewer
    sees the quality numbers someone else measured."""
    settings = current_settings()
    if settings is None:
        return []
    return store.saved_sweeps(settings.model_key(), report.meta.get("created"))
