"""Dashboard plumbing shared by the pages (streamlit side): cached model, session state, long work, errors.

Caching rules (STYLE.md habit 8):

* ``st.cache_resource`` holds ONLY the loaded model (+ a lock), keyed by (id, revision, dtype, device,
  trust_remote_code). Every session shares it; nobody mutates it (surgery returns new models).
* ``st.cache_data`` holds small results (reports read from disk, quick before/after numbers).
* Everything per user -- settings, reports, plans, pruned models, uploads -- lives in ``st.session_state``
  under ``ll_*`` keys and is never put in a cache shared across sessions.

Any forward pass through the shared model (or a model derived from it) runs under the model's lock: hooks
and ``surgery.pruned`` are not safe across threads, and two sessions must not see each other's activations.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import streamlit as st

from layerlens.dashboard_state import (
    AnalysisSettings,
    PlanSettings,
    check_upload,
    confine_path,
    default_model_spec,
    from_query,
    looks_like_hub_id,
    to_query,
)
from layerlens.errors import LayerLensError

log = logging.getLogger("layerlens.dashboard")

# ----------------------------------------------------------------------------------------------------------
# Session state
# ----------------------------------------------------------------------------------------------------------

SS_SETTINGS = "ll_settings"  # AnalysisSettings of the report on screen
SS_REPORT = "ll_report"  # LayerReport on screen
SS_MODEL_INFO = "ll_model_info"  # ModelInfo.to_dict() of the report's model
SS_PLAN_SETTINGS = "ll_plan_settings"  # PlanSettings (Prune page)
SS_PLAN = "ll_plan"  # last valid PrunePlan
SS_PRUNED = "ll_pruned"  # {"plan_json", "model", "quick"}: this session's pruned model
SS_UPLOAD = "ll_upload"  # {"name", "sha", "path"}: this session's uploaded data file
SS_AUTO = "ll_auto_started"
SS_INIT = "ll_init"
SS_CANCELLED = "ll_cancelled"
SS_SWEEP = "ll_sweep_frame"
SS_SWEEP_FINISHED = "ll_sweep_finished"  # {sweep key: progress labels of finished points} for a stopped sweep
SS_SWEEP_RUNNING = "ll_sweep_running"  # threading.Event, set once run_sweep's script run has fully ended
SS_SWEEP_PARTIAL = "ll_sweep_partial"  # {sweep key: finished points of a stopped sweep}, see run_sweep


ROUTE_PARAM = "page"


def require_router(page_file: str) -> None:
    """Pages run through app.py only. On a fresh server Streamlit can run a ``pages/`` file directly for
    the first deep link (its older pages-folder mode: no router, no session set-up, an automatic page
    list): send such a run through app.py, keeping the link's parameters and naming the page to open."""
    if st.session_state.get(SS_INIT):
        return
    params = {k: st.query_params.get(k) for k in st.query_params}
    params[ROUTE_PARAM] = Path(page_file).name
    st.switch_page("app.py", query_params=params)


def init_session() -> None:
    """Once per session: read a share link's query parameters into the session's settings."""
    ss = st.session_state
    if ss.get(SS_INIT):
        return
    ss[SS_INIT] = True
    try:
        params = {k: st.query_params.get(k) for k in st.query_params}
    except Exception:  # noqa: BLE001 - a malformed URL must not break the app
        params = {}
    settings, plan = from_query(params, AnalysisSettings.quick(), None)
    ss["ll_requested"] = settings
    if plan is not None:
        ss[SS_PLAN_SETTINGS] = plan
        ss["ll_plan_from_url"] = True


def requested_settings() -> AnalysisSettings:
    return st.session_state.get("ll_requested") or AnalysisSettings.quick()


def current_report() -> Any | None:
    return st.session_state.get(SS_REPORT)


def current_settings() -> AnalysisSettings | None:
    return st.session_state.get(SS_SETTINGS)


def plan_settings() -> PlanSettings:
    return st.session_state.get(SS_PLAN_SETTINGS) or PlanSettings()


def set_plan_settings(ps: PlanSettings) -> None:
    st.session_state[SS_PLAN_SETTINGS] = ps


def sync_query_params() -> None:
    """Mirror the shareable state (model, data size, plan) into the URL; only writes on change."""
    settings = current_settings() or requested_settings()
    want = to_query(settings, st.session_state.get(SS_PLAN_SETTINGS))
    try:
        have = {k: st.query_params.get(k) for k in st.query_params}
        if have != want:
            st.query_params.from_dict(want)
    except Exception:  # noqa: BLE001 - URL sync is best effort
        log.debug("query param sync failed", exc_info=True)


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def guarded(what: str) -> Iterator[None]:
    """Show a user error as one ``st.error`` sentence (never a traceback); earlier results stay on screen."""
    try:
        yield
    except LayerLensError as exc:
        st.error(str(exc), icon=":material/error:")
    except MemoryError:
        st.error(f"Out of memory while {what}; lower the samples, sequence length or batch size, or load the "
                 "model in bfloat16.", icon=":material/error:")
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback in the UI
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            st.error(f"Out of memory while {what}; lower the samples, sequence length or batch size, or load "
                     "the model in bfloat16.", icon=":material/error:")
        else:
            log.error("unexpected error while %s:\n%s", what, traceback.format_exc())
            first = str(exc).splitlines()[0] if str(exc) else ""
            st.error(f"Unexpected error while {what} ({type(exc).__name__}: {first[:300]}); earlier results are "
                     "kept. Try smaller settings or another model; the server log has the details.", icon=":material/error:")


# ----------------------------------------------------------------------------------------------------------
# The shared model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SharedModel:
    loaded: Any  # layerlens.loading.LoadedModel
    lock: threading.RLock
    per_layer_params: tuple[int, ...]

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def info(self) -> Any:
        return self.loaded.info


@st.cache_resource(max_entries=2, show_spinner=False)
def _shared_model(model: str, revision: str | None, dtype: str, device: str,
                  trust_remote_code: bool) -> SharedModel:
    """The one cached copy of a model for every session (key: id, revision, dtype, device)."""
    from layerlens.adapters import decoder_layers
    from layerlens.loading import load_model

    loaded = load_model(model, revision=revision, dtype=dtype, device=device,
                        trust_remote_code=trust_remote_code)
    per_layer = tuple(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(loaded.model))
    return SharedModel(loaded=loaded, lock=threading.RLock(), per_layer_params=per_layer)


def check_model_spec(spec: str) -> str:
    """Only the bundled default, the server's configured default, hub ids and folders under the data root."""
    spec = (spec or "").strip()
    if spec in ("default", default_model_spec()):
        return spec
    if looks_like_hub_id(spec) and not Path(spec).exists():
        return spec
    return str(confine_path(spec, kind="dir"))


def get_model(settings: AnalysisSettings) -> SharedModel:
    spec = check_model_spec(settings.model)
    return _shared_model(spec, settings.revision or None, settings.dtype, settings.device,
                         bool(settings.trust_remote_code))


@contextlib.contextmanager
def model_lock(shared: SharedModel, note: Any = None, quiet: bool = False) -> Iterator[None]:
    """Hold the model's lock; tell the user when another session is using the model meanwhile."""
    if not shared.lock.acquire(blocking=False):
        if not quiet:
            (note or st).info("Another session is using this model; waiting for it to finish…", icon=":material/hourglass_top:")
        shared.lock.acquire()
    try:
        yield
    finally:
        shared.lock.release()


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def save_upload(uploaded: Any) -> dict[str, str]:
    """Keep an uploaded file for THIS session only (a private temp file), after the size/type check."""
    suffix = check_upload(uploaded.name, uploaded.size)
    data = uploaded.getvalue()
    sha = hashlib.sha256(data).hexdigest()[:16]
    prev = st.session_state.get(SS_UPLOAD)
    if prev and prev["sha"] == sha and Path(prev["path"]).exists():
        return prev
    folder = Path(tempfile.mkdtemp(prefix="layerlens-upload-"))
    path = folder / f"upload{suffix}"
    path.write_bytes(data)
    info = {"name": uploaded.name, "sha": sha, "path": str(path)}
    st.session_state[SS_UPLOAD] = info
    return info


def resolve_texts(settings: AnalysisSettings) -> tuple[Any, str]:
    """(TextSet, fingerprint) for the settings' data; local paths confined, uploads from this session."""
    from layerlens.data import load_texts

    data = settings.data
    if data.startswith("upload:"):
        up = st.session_state.get(SS_UPLOAD)
        if not up or up["sha"] != data.removeprefix("upload:") or not Path(up["path"]).exists():
            raise LayerLensError("The uploaded file is no longer available in this session; upload it again.")
        texts = load_texts(up["path"], role="calibration", field=settings.text_field)
        return replace_source(texts, f"upload:{up['name']}"), up["sha"]
    if data.startswith("path:"):
        path = confine_path(data.removeprefix("path:"), kind="file")
        st_ = path.stat()
        return load_texts(str(path), role="calibration", field=settings.text_field), \
            f"{path}:{st_.st_size}:{st_.st_mtime_ns}"
    if data.startswith("hub:"):
        return load_texts(data, role="calibration", field=settings.text_field), data
    if data in ("default", "prose"):
        return load_texts(data, role="calibration", field=settings.text_field), data
    raise LayerLensError(f"Unknown data source '{data}'; pick one in the Data section.")


def replace_source(texts: Any, source: str) -> Any:
    return replace(texts, source=source, description=texts.description.replace(texts.source, source))


# ----------------------------------------------------------------------------------------------------------
# Analysis with progress, cancel, disk cache
# ----------------------------------------------------------------------------------------------------------


def runs_dir() -> Path:
    from layerlens.runs import default_runs_dir

    return default_runs_dir() / "dashboard"


@st.cache_data(max_entries=32, show_spinner=False)
def _read_report(path: str, mtime_ns: int) -> dict:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def _saved_report(path: Path) -> Any:
    """A report persisted by an earlier analysis (parsed once per file version, see :func:`_read_report`)."""
    from layerlens.report import LayerReport

    return LayerReport.from_dict(_read_report(str(path), path.stat().st_mtime_ns))


def _request_cancel() -> None:
    st.session_state[SS_CANCELLED] = True


def run_analysis(settings: AnalysisSettings, *, label: str = "Analyzing") -> bool:
    """Load the model and compute (or reload from disk) its report; True when a new report is on screen.

    On any error the earlier report stays in the session and an ``st.error`` says what to change.
    """
    from layerlens.metrics import CaptureConfig, analyze

    ss = st.session_state
    ss[SS_CANCELLED] = False
    ok = False
    with guarded("analyzing the model"):
        settings.validate()
        status = st.status(f"{label}: loading {settings.model}…", expanded=True)
        slot = st.empty()  # progress + Cancel live outside the status, so they stay visible however it is folded
        with status, _status_error_on_failure(status):
            t0 = time.perf_counter()
            shared = get_model(settings)
            info = shared.info
            status.write(f"Model ready: {info.architecture}, {info.num_layers} layers, "
                         f"{info.num_parameters / 1e6:.1f} M parameters on {info.device} "
                         f"({time.perf_counter() - t0:.1f} s).")
            texts, fingerprint = resolve_texts(settings)
            settings = replace(settings, data_label=texts.source)
            key = settings.key(f"{fingerprint}|{info.source_path}|{info.num_parameters}")
            path = runs_dir() / "analyze" / f"{key}.json"
            if path.exists():
                report = _saved_report(path)
                status.update(label=f"Loaded the saved analysis ({report.num_layers} layers)", state="complete",
                              expanded=False)
            else:
                config = CaptureConfig(samples=settings.samples, seq_len=settings.seq_len,
                                       batch_size=settings.batch_size, cka_estimator=settings.cka_estimator,
                                       seed=settings.seed, skip_first=settings.skip_first)
                status.update(label=f"{label}: {settings.samples} samples × {settings.seq_len} tokens…",
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
                        report = analyze(shared.model, shared.tokenizer, texts, config, progress=progress,
                                         should_stop=lambda: bool(ss.get(SS_CANCELLED)), meta=meta)
                        report.save(path)
                        done = f"Analyzed {report.num_layers} layers in {time.perf_counter() - t1:.1f} s"
                slot.empty()
                status.update(label=done, state="complete", expanded=False)
        ss[SS_REPORT] = report
        ss[SS_SETTINGS] = settings
        ss[SS_MODEL_INFO] = info.to_dict()
        ss["ll_requested"] = settings
        ss.pop(SS_PRUNED, None)  # a pruned model belongs to the previous report's model
        ok = True
    return ok


@contextlib.contextmanager
def _status_error_on_failure(status: Any) -> Iterator[None]:
    try:
        yield
    except Exception:
        status.update(label="Failed — see the message below; earlier results are kept.", state="error",
                      expanded=False)
        raise


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


def shared_for_report() -> SharedModel | None:
    settings = current_settings()
    if settings is None:
        return None
    return get_model(settings)


# ----------------------------------------------------------------------------------------------------------
# Small cached evaluations (quick before/after)
# ----------------------------------------------------------------------------------------------------------

QUICK_WINDOWS = 4
QUICK_SEQ_LEN = 128
QUICK_NEW_TOKENS = 16


def eval_texts() -> Any:
    from layerlens.data import load_texts

    return load_texts("default", role="eval")


def _generate(model: Any, tokenizer: Any, enc: dict, new_tokens: int) -> tuple[float, str]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
        dt = time.perf_counter() - t
    n_new = int(out.shape[1] - enc["input_ids"].shape[1])
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return (n_new / dt if dt > 0 else float("nan")), text


@st.cache_data(max_entries=16, show_spinner=False)
def _cached_ppl(_shared: SharedModel, model_key: tuple) -> float:
    """Quick perplexity of the ORIGINAL model (the same for every session and plan)."""
    from layerlens.evaluation import perplexity

    with model_lock(_shared, quiet=True):
        res = perplexity(_shared.model, _shared.tokenizer, eval_texts(), seq_len=QUICK_SEQ_LEN,
                         max_windows=QUICK_WINDOWS)
    return float(res.perplexity)


@st.cache_data(max_entries=64, show_spinner=False)
def cached_quick_compare(_shared: SharedModel, model_key: tuple, plan_json: str, prompt: str) -> dict[str, Any]:
    """Quick before/after for a plan: perplexity on a few held-out windows, and greedy generation of
    ``prompt`` by both models, timed back to back (interleaved, after a warm-up) so machine load hits both
    alike. Keyed by model key + plan + prompt, so a share link reuses the numbers; nothing per user inside."""
    from layerlens.evaluation import perplexity
    from layerlens.plans import PrunePlan
    from layerlens.surgery import apply_plan

    plan = PrunePlan.from_json(plan_json)
    ppl_before = _cached_ppl(_shared, model_key)
    tok = _shared.tokenizer
    with model_lock(_shared, quiet=True):
        t = time.perf_counter()
        pruned = apply_plan(_shared.model, plan)
        surgery_s = time.perf_counter() - t
        ppl = perplexity(pruned, tok, eval_texts(), seq_len=QUICK_SEQ_LEN, max_windows=QUICK_WINDOWS)
        device = next(pruned.parameters()).device
        enc = {k: v.to(device) for k, v in tok(prompt, return_tensors="pt").items()}
        for m in (_shared.model, pruned):  # warm-up
            _generate(m, tok, enc, 1)
        speed_o, text_o = _generate(_shared.model, tok, enc, QUICK_NEW_TOKENS)
        speed_p, text_p = _generate(pruned, tok, enc, QUICK_NEW_TOKENS)
    common = {"windows": QUICK_WINDOWS, "seq_len": QUICK_SEQ_LEN, "new_tokens": QUICK_NEW_TOKENS}
    return {"original": common | {"perplexity": ppl_before, "tokens_per_s": speed_o, "generation": text_o},
            "pruned": common | {"perplexity": float(ppl.perplexity), "tokens_per_s": speed_p,
                                "generation": text_p, "surgery_s": surgery_s}}


def apply_only(shared: SharedModel, plan: Any) -> Any:
    """Surgery on a NEW model for this session (shares unchanged weights; the cached original is untouched)."""
    from layerlens.surgery import apply_plan

    with model_lock(shared):
        return apply_plan(shared.model, plan)


# ----------------------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------------------

PLOT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def chart(fig: Any, key: str, **kw: Any) -> Any:
    return st.plotly_chart(fig, key=key, config=PLOT_CONFIG, **kw)


def human_params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def report_caption(report: Any) -> str:
    m = report.meta
    return (f"{m.get('model', '?')} · {report.num_layers} layers · {m.get('samples')} samples × "
            f"{m.get('seq_len')} tokens ({m.get('tokens')} tokens) of {m.get('data')} · CKA {report.cka_estimator} "
            + (f"· first {m['skip_first']} token(s) of each sample skipped " if m.get("skip_first") else "")
            + f"· {m.get('device')} {m.get('dtype')}")


def need_report_or_stop() -> Any:
    """For pages that need a report: get one (auto-running on first visit) or stop the page politely."""
    report = ensure_report()
    if report is None:
        st.page_link("pages/1_model_data.py", label="Go to Model & data", icon=":material/arrow_forward:")
        st.stop()
    return report


Callback = Callable[[], None]


def sidebar_status() -> None:
    """What is on screen for this session: model, analysis, plan (a glance from any page)."""
    with st.sidebar:
        st.caption("This session")
        report = current_report()
        info = st.session_state.get(SS_MODEL_INFO)
        if report is None or info is None:
            st.caption("No analysis yet.")
            return
        st.markdown(f"**Model** `{_short_model(info['model'])}` · {info['num_layers']} layers")
        m = report.meta
        st.markdown(f"**Analysis** {m.get('samples')} × {m.get('seq_len')} tokens, {m.get('data')}")
        plan = st.session_state.get(SS_PLAN)
        if plan is not None:
            st.markdown(f"**Plan** {plan.strategy}: −{plan.n_removed} layers ({plan.ratio:.0%})")
        pruned = st.session_state.get(SS_PRUNED)
        if pruned is not None:
            st.markdown("**Pruned model** applied :material/check_circle:")


def _short_model(spec: str) -> str:
    from layerlens.defaults import DEFAULT_MODEL_ID

    if spec == DEFAULT_MODEL_ID:
        return "default (SmolLM2-135M)"
    return spec if len(spec) <= 40 else "…" + spec[-38:]


# ----------------------------------------------------------------------------------------------------------
# Sweeps (Evaluate page)
# ----------------------------------------------------------------------------------------------------------


def sweep_key(settings: AnalysisSettings | None, report: Any, strategies: Any, ratios: Any, windows: int,
              seq_len: int, mmlu: Any, current_plan_json: str) -> str:
    from layerlens.runs import stable_key

    return stable_key({"model": settings.model_key() if settings else None, "report": report.meta.get("created"),
                       "strategies": sorted(strategies), "ratios": sorted(float(r) for r in ratios),
                       "windows": windows, "seq_len": seq_len, "mmlu": mmlu,
                       "current": current_plan_json})


def _sweep_csv(key: str) -> Path:
    return runs_dir() / "sweeps" / f"{key}.csv"


def load_saved_sweep(key: str) -> Any | None:
    import pandas as pd

    path = _sweep_csv(key)
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path, dtype={"removed_layers": str})
    except (OSError, ValueError):
        return None
    frame["removed_layers"] = frame["removed_layers"].fillna("")
    return frame


def _request_stop() -> None:
    st.session_state["ll_sweep_stopped"] = True


def run_sweep(shared: SharedModel, report: Any, strategies: Any, ratios: Any, *, windows: int, seq_len: int,
              mmlu_per_subject: int, current_plan: Any, key: str, subjects: Any = ()) -> Any:
    """Run (or resume) a sweep with a per-point progress bar and a Stop button; persist the frame.

    Stop (Streamlit stops this script run at the next progress update) or an error leaves the finished
    points on disk; before the interruption goes on, they are read back (which points finished is known
    from the progress labels of this session's runs of ``key``:
    :func:`layerlens.dashboard_state.finished_sweep_points`). A stopped run can no longer touch
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
    from layerlens.dashboard_state import finished_sweep_points
    from layerlens.data import load_texts
    from layerlens.runs import atomic_write_json, atomic_write_text, default_runs_dir
    from layerlens.sweep import make_plans, sweep

    ss = st.session_state
    ss["ll_sweep_stopped"] = False
    ppl_texts = load_texts("default", role="eval")
    questions = None
    if mmlu_per_subject > 0:
        from layerlens.questions import load_questions

        questions = load_questions("default", limit=mmlu_per_subject, subjects=list(subjects) or None)
    plans = make_plans(report, list(strategies), sorted(float(r) for r in ratios), num_layers=report.num_layers)
    if current_plan is not None:
        plans.append(("current", current_plan.ratio, current_plan))
    status = st.status(f"Sweep: {len(plans)} points…", expanded=True)
    slot = st.empty()
    with status, _status_error_on_failure(status):
        box = slot.container()
        bar = box.progress(0.0, text="Preparing the evaluation data…")
        box.button("Stop", key="ll_stop_sweep", on_click=_request_stop, icon=":material/stop_circle:",
                   help="Stop now; finished points stay saved and Run sweep resumes from them.")
        t0 = time.perf_counter()

        finished = ss.setdefault(SS_SWEEP_FINISHED, {}).setdefault(key, set())
        partials = ss.setdefault(SS_SWEEP_PARTIAL, {})  # written after a Stop, when ss no longer can be

        def progress(done: int, total: int, label: str) -> None:
            finished.add(label)  # first: the progress bar below is where a Stop click interrupts the script
            bar.progress(min(done / max(total, 1), 1.0),
                         text=f"{done}/{total} evaluations · {label[:90]} · {time.perf_counter() - t0:.0f} s")

        same = dict(ppl_texts=ppl_texts, questions=questions, seq_len=seq_len, max_windows=windows,
                    runs_dir=default_runs_dir(), model_id=shared.info.to_dict())
        with model_lock(shared, status):
            try:
                frame = sweep(shared.model, shared.tokenizer, report, plans=plans, progress=progress, **same)
            except BaseException:  # Stop (Streamlit's StopException), another widget, or an error
                partial = None
                try:
                    partial = finished_sweep_points(shared.model, shared.tokenizer, report, plans, finished, **same)
                except Exception:  # noqa: BLE001 - never hide the interruption behind a read-back problem
                    log.warning("could not read back the finished sweep points:\n%s", traceback.format_exc())
                if partial is not None:
                    partial.attrs["stopped"] = True  # the page says it is incomplete
                    if questions is not None:
                        partial["mmlu_questions"] = len(questions)
                    partials[key] = partial
                raise
        ss[SS_SWEEP_FINISHED].pop(key, None)
        slot.empty()
        status.update(label=f"Sweep done: {len(frame)} points in {time.perf_counter() - t0:.0f} s",
                      state="complete", expanded=False)
    if questions is not None:
        frame["mmlu_questions"] = len(questions)  # saved with the points: the Summary says what MMLU rests on
    atomic_write_text(_sweep_csv(key), frame.to_csv(index=False))
    atomic_write_json(_sweep_csv(key).with_suffix(".json"), {
        "model_key": list(current_settings().model_key()) if current_settings() else None,
        "report_created": report.meta.get("created"), "strategies": list(strategies),
        "ratios": [float(r) for r in ratios]})
    return frame


def saved_sweeps_for(report: Any) -> list[Any]:
    """Every saved sweep frame of this session's model and analysis (newest first): a share link's viewer
    sees the quality numbers someone else measured."""
    import json

    settings = current_settings()
    if settings is None:
        return []
    want = [list(settings.model_key()), report.meta.get("created")]
    folder = runs_dir() / "sweeps"
    out = []
    for meta_path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if [meta.get("model_key"), meta.get("report_created")] == want:
            frame = load_saved_sweep(meta_path.stem)
            if frame is not None:
                out.append(frame)
    return out


def current_plan(report: Any) -> Any | None:
    """The session's plan; built from the plan settings (defaults or a share link) when none exists yet."""
    from layerlens.dashboard_state import build_plan

    plan = st.session_state.get(SS_PLAN)
    if plan is not None and plan.num_layers == report.num_layers:
        return plan
    plan = None
    with guarded("building the plan"):
        plan = build_plan(report, plan_settings())
        st.session_state[SS_PLAN] = plan
    return plan
