"""The sweep (Evaluate page), long work with progress: an estimate before it starts, the time left while
it runs, Stop keeps the finished points and Run sweep resumes from them; the frame and how fast it ran
are persisted (``layerlens.dashboard.store``)."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

import streamlit as st

from layerlens.dashboard import store, sweeps
from layerlens.data import calibration_tokens, load_texts
from layerlens.errors import LayerLensError
from layerlens.harness import parse_tasks
from layerlens.heal import HealConfig
from layerlens.plans import get_strategy
from layerlens.questions import load_questions
from layerlens.runs import default_runs_dir
from layerlens.sweep import SweepConfig, make_plans

from .errors import status_error_on_failure
from .keys import SS_SWEEP, SS_SWEEP_PARTIAL, SS_SWEEP_RUNNING, SS_SWEEP_STOPPED
from .resources import SharedModel, model_lock, resolve_texts
from .session import current_settings

log = logging.getLogger("layerlens.dashboard")


RUN_ON_KEY, ADDRESS_KEY = "ev_run_on", "ev_ray_address"


def run_on_widget() -> None:
    """Where the sweep computes its points: this process, a local Ray, or a Ray cluster (a choice of this
    machine, so not in share links). The progress, Stop, saved points and curves are the same for all three."""
    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
    run_on = c1.radio("Run on", sweeps.RUN_ON, key=RUN_ON_KEY, horizontal=True, persist_state="session",
                      help="Ray (pip install 'layerlens[ray]') starts one worker per GPU (or CPU), each loading "
                           "the model once; the points are saved here as they finish, under the same keys, so a "
                           "sweep resumes on either. A cluster's workers must reach the model's folder.")
    c2.text_input("Ray cluster address", key=ADDRESS_KEY, placeholder="ray://head-node:10001",
                  disabled=run_on != sweeps.RUN_ON[2], persist_state="session",
                  help="What `ray start --head` printed on the head node (or auto on a node of the cluster)")


def _request_stop() -> None:
    st.session_state[SS_SWEEP_STOPPED] = True


def sweep_plans(report: Any, sweep: sweeps.SweepSettings, current_plan: Any,
                shared: SharedModel | None = None) -> list[tuple[str, float, Any]]:
    """The sweep's ``(strategy, ratio, plan)`` points: every strategy x ratio, then the current plan.

    Strategies that run forward passes (the greedy oracle) get the model and the calibration tokens when
    ``shared`` is given; without it (time estimates, counts) they stand in as a plan of the same size."""
    names = list(sweep.strategies)
    probed = [n for n in names if get_strategy(n).uses_data()]
    probe = None
    if probed and shared is not None:
        texts, _ = resolve_texts(current_settings())
        cap = current_settings().capture
        probe = {"model": shared.model, "tokenizer": shared.tokenizer,
                 "token_lists": calibration_tokens(shared.tokenizer, texts, cap.samples, cap.seq_len),
                 "runs_dir": default_runs_dir()}
    elif probed:
        names = [n if n not in probed else "sequential" for n in names]
    plans = make_plans(report, names, sorted(sweep.ratios), num_layers=report.num_layers, probe=probe)
    plans = [(s, r, p) for s, (_, r, p) in zip([n for n in sweep.strategies for _ in sweep.ratios], plans,
                                              strict=True)]
    if current_plan is not None:
        plans.append(("current", current_plan.ratio, current_plan))
    return plans


def _questions(sweep: sweeps.SweepSettings) -> Any:
    return load_questions("default", limit=sweep.mmlu_per_subject, subjects=list(sweep.subjects) or None)


@st.cache_data(max_entries=16, show_spinner=False)
def _mmlu_tokens(_shared: SharedModel, model_key: tuple, per_subject: int, subjects: tuple[str, ...]) -> int:
    """Tokens one MMLU evaluation of these questions runs (tokenizing only; cached per model and subset)."""
    questions = _questions(sweeps.SweepSettings(mmlu_per_subject=per_subject, subjects=subjects))
    return sweeps.mmlu_tokens(_shared.model, _shared.tokenizer, questions)


def sweep_timing(shared: SharedModel) -> sweeps.SweepTiming:
    """How fast evaluations run on this model here: measured by the earlier sweeps on it (persisted), else
    by timing one short perplexity window now (a few seconds; persisted too)."""
    model_key = current_settings().model_key()
    timing = store.load_timing(model_key)
    if timing is None:
        with st.spinner("Timing one short perplexity window for the sweep's time estimate…"):
            head = sweeps.head_layers(shared.info.hidden_size, int(getattr(shared.model.config, "vocab_size", 0)),
                                      shared.per_layer_params)
            with model_lock(shared, quiet=True):
                timing = sweeps.calibrate(shared.model, shared.tokenizer, load_texts("default", role="eval"),
                                          num_layers=shared.info.num_layers, head=head)
        store.save_timing(model_key, timing)
    return timing


def sweep_estimate(shared: SharedModel, report: Any, sweep: sweeps.SweepSettings, current_plan: Any) -> Any:
    """The estimated seconds of every evaluation of this sweep (:class:`layerlens.dashboard.sweeps.SweepEstimate`)."""
    if shared.layerwise:  # timing a window needs the model in memory; a layer-by-layer sweep has no estimate
        return None
    timing = sweep_timing(shared)
    tokens = _mmlu_tokens(shared, tuple(current_settings().model_key()), sweep.mmlu_per_subject,
                          sweep.subjects) if sweep.mmlu else 0
    plans = [p for _, _, p in sweep_plans(report, sweep, current_plan)]
    return sweeps.estimate(timing, plans, windows=sweep.windows, seq_len=sweep.seq_len, mmlu_tokens=tokens)


def run_sweep(shared: SharedModel, report: Any, sweep: sweeps.SweepSettings, *, current_plan: Any, key: str,
              estimate: Any = None) -> Any:
    """Run (or resume) a sweep with a per-point progress bar, the time left and a Stop button; persist the
    frame, and how fast it ran (the next estimate uses it).

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
        return _sweep_with_progress(shared, report, sweep, current_plan=current_plan, key=key, estimate=estimate)
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


def _surgery_of(description: str) -> str:
    """``PrunePlan.describe()`` without the strategy: the sweep evaluates equal surgeries once, under the
    first strategy's name, and every row with that surgery shares the result."""
    return description.split(": ", 1)[-1]


def _mark_computed(frame: Any, plans: Any, computed: set[str]) -> None:
    """A stopped sweep's points come back through a read-back, which marks them all ``cached``; the rows
    whose evaluations this run computed (named in its progress labels) are set back to not cached."""
    for strategy, ratio, plan in plans:
        if _surgery_of(plan.describe()) in computed:
            frame.loc[(frame["strategy"] == strategy) & (frame["ratio"] == ratio), "cached"] = False


def _check_layerwise(s: sweeps.SweepSettings, run_on: str) -> None:
    """Refuse, in one sentence each, what a layer-by-layer sweep cannot do (it needs the model in memory)."""
    if run_on != sweeps.RUN_ON[0]:
        raise LayerLensError(f"This model runs layer by layer (it does not fit in memory here), so the sweep runs "
                             f"in this process: choose **{sweeps.RUN_ON[0]}** under Run on, not Ray.")
    probed = [n for n in s.strategies if get_strategy(n).uses_data()]
    if probed:
        raise LayerLensError(f"Strategies that probe the model with forward passes ({', '.join(probed)}) need it "
                             "in memory; this one runs layer by layer, so leave them out of the sweep.")
    if s.heal_seconds:
        raise LayerLensError("Healing needs the model in memory; this one runs layer by layer, so set "
                             "`heal` (Heal every point for) to 0.")
    if s.tasks:
        raise LayerLensError("lm-eval tasks run the whole model in the harness; this one runs layer by layer, "
                             "so leave `tasks` empty (perplexity, KL and MMLU work).")


def _sweep_with_progress(shared: SharedModel, report: Any, sweep_settings: sweeps.SweepSettings, *,
                         current_plan: Any, key: str, estimate: Any) -> Any:
    from layerlens.sweep import sweep  # at call time: tests replace it to interrupt a sweep

    ss = st.session_state
    ss[SS_SWEEP_STOPPED] = False
    s = sweep_settings
    ppl_texts = load_texts("default", role="eval")
    questions = _questions(s) if s.mmlu else None
    if shared.layerwise:
        _check_layerwise(s, ss.get(RUN_ON_KEY, sweeps.RUN_ON[0]))
    if any(get_strategy(n).uses_data() for n in s.strategies):
        with st.spinner("Finding the oracle's removals (each step measures every remaining layer's damage)…"), \
                model_lock(shared, quiet=True):
            plans = sweep_plans(report, s, current_plan, shared)
    else:
        plans = sweep_plans(report, s, current_plan)
    guess = f" (estimated {sweeps.rough_seconds(estimate.seconds)})" if estimate is not None else ""
    status = st.status(f"Sweep: {len(plans)} points{guess}…", expanded=True)
    slot = st.empty()
    with status, status_error_on_failure(status):
        box = slot.container()
        bar = box.progress(0.0, text="Preparing the evaluation data…" + guess)
        box.button("Stop", key="ll_stop_sweep", on_click=_request_stop, icon=":material/stop_circle:",
                   help="Stop now; finished points stay saved and Run sweep resumes from them.")
        t0 = time.perf_counter()
        read_back: list[int] = []  # evaluations finished by earlier runs (known at the first progress call)

        partials = ss.setdefault(SS_SWEEP_PARTIAL, {})  # written after a Stop, when ss no longer can be

        computed: set[str] = set()  # what the evaluations this run computed (not read back) did to the model

        def progress(done: int, total: int, label: str) -> None:
            computed.add(_surgery_of(label.split(" ", 1)[-1]))
            if not read_back:
                read_back.append(done - 1)
            elapsed = time.perf_counter() - t0
            left = ""
            if estimate is not None and done < total:
                left = f" · about {sweeps.rough_seconds(estimate.left(done - read_back[0], elapsed))} left"
            healing = f" · healing every point for {s.heal_seconds:g} s" if s.heal_seconds else ""
            bar.progress(min(done / max(total, 1), 1.0),
                         text=f"{done}/{total} evaluations{healing} · {label[:90]} · {elapsed:.0f} s{left}")

        heal = HealConfig(seconds=s.heal_seconds) if s.heal_seconds else None  # the Heal page's defaults
        config = SweepConfig(plans=plans, seq_len=s.seq_len, max_windows=s.windows, heal=heal,
                             tasks=tuple(parse_tasks(s.tasks)))
        run_on, address = ss.get(RUN_ON_KEY, sweeps.RUN_ON[0]), ss.get(ADDRESS_KEY) or ""
        executor = sweeps.sweep_executor(run_on, address, shared.info)  # None: this process
        same = dict(ppl_texts=ppl_texts, questions=questions, runs_dir=default_runs_dir(),
                    model_id=shared.info.to_dict(), executor=executor)
        if executor is not None:
            bar.progress(0.0, text=f"Starting the Ray workers ({run_on}; each loads the model once)…" + guess)
        if shared.layerwise:  # over the memory: every point in one pass over the weights, points persisted
            from layerlens.layerwise import sweep as layerwise_sweep

            def layer_progress(done: int, total: int, label: str) -> None:
                # units are layer runs (LM-head scoring counted in layers): their rate so far gives the time left
                elapsed = time.perf_counter() - t0
                left = f" · about {sweeps.rough_seconds(elapsed / done * (total - done))} left" \
                    if 0 < done < total and elapsed > 2 else ""
                bar.progress(min(done / max(total, 1), 1.0), text=f"Layer by layer, every point in one pass: "
                             f"{label} · {elapsed:.0f} s{left}")

            same.pop("executor")
            with model_lock(shared, status):
                result = layerwise_sweep(shared.loaded, report, config, progress=layer_progress, **same)
            frame = result.frame
        else:
            with model_lock(shared, status):
                try:
                    result = sweep(shared.model, shared.tokenizer, report, config, progress=progress, **same)
                    frame = result.frame
                except BaseException:  # Stop (Streamlit's StopException), another widget, or an error
                    partial = None
                    try:
                        partial = sweep(shared.model, shared.tokenizer, report, config, compute=False, **same).frame
                    except Exception:  # noqa: BLE001 - never hide the interruption behind a read-back problem
                        log.warning("could not read back the finished sweep points:\n%s", traceback.format_exc())
                    if partial is not None and len(partial):
                        partial.attrs["stopped"] = True  # the page says it is incomplete
                        _mark_computed(partial, plans, computed)
                        if questions is not None:
                            partial["mmlu_questions"] = len(questions)
                        partials[key] = partial
                    raise
                finally:
                    if executor is not None:
                        executor.close()  # the actors (and the models they hold) go; a local Ray stays up
        slot.empty()
        elapsed = time.perf_counter() - t0
        status.update(label=f"Sweep done: {len(frame)} points in {elapsed:.0f} s" + guess.replace("(", "(was "),
                      state="complete", expanded=False)
    if questions is not None:
        frame["mmlu_questions"] = len(questions)  # saved with the points: the Summary says what MMLU rests on
    settings = current_settings()
    store.save_sweep(key, frame, model_key=settings.model_key() if settings else None,
                     report_created=report.meta.get("created"), strategies=s.strategies, ratios=s.ratios)
    # how fast evaluations ran (healing's seconds would make the next estimate of a plain sweep far too long)
    timing = sweeps.measured(estimate, elapsed, result.stats.computed) if estimate is not None and \
        not s.heal_seconds and executor is None else None  # Ray's speed is not this process's
    if timing is not None and settings is not None:
        store.save_timing(settings.model_key(), timing)
    return frame
