"""Healing the session's pruned model, with a live loss curve and Stop; the healed result in the session.

Healing runs in a thread of its own (:class:`HealJob`), like the analysis: a click (Stop, another page)
ends the script run at its next Streamlit call, which would end a heal running inside it and lose what it
trained. The thread never touches ``st``; it holds the model's lock for the whole heal and the
measurements after it, so the cached original (the teacher, whose tensors the pruned model shares and
whose ``requires_grad`` flags healing sets and restores) is never seen half-changed by another session.
Stop sets the job's event, which :func:`layerlens.heal.heal_plan`'s ``stop()`` reads: training ends at the
next step and the best checkpoint so far is kept and measured. The next script run (on any visit of the
Heal page) follows the job and takes its result into the session.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from layerlens import humanize, surgery
from layerlens.compare import QUICK_SEQ_LEN, QUICK_WINDOWS, eval_texts
from layerlens.dashboard.healing import SIDE_LABELS, SIDES, comparison_frame, gap_recovered, measure_three
from layerlens.errors import LayerLensError
from layerlens.heal import HealConfig, heal_plan
from layerlens.plots_curves import heal_curve
from layerlens.questions import load_questions
from layerlens.runs import default_runs_dir

from .errors import guarded, run_job
from .keys import SS_HEAL_JOB, SS_HEALED
from .resources import SharedModel, quick_store
from .widgets import PLOT_CONFIG, chart


@dataclass
class HealJob:
    """One heal of the session's applied plan, then the three-way measurement, in a thread; the script
    run that follows it reads the fields below (the live ``curve`` and ``evals`` are heal's own lists)."""

    shared: SharedModel
    plan: Any
    pruned_model: Any  # the session's applied model (None: rebuilt from the plan)
    config: HealConfig
    train: Any  # TextSet
    prompt: str
    known: dict[str, dict[str, Any]]  # numbers already measured per side (quick perplexity, cached MMLU)
    mmlu_per_subject: int
    model_key: tuple
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    curve: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    fraction: float = 0.0
    text: str = "Waiting for the model…"
    result: Any = None  # layerlens.heal.HealResult
    numbers: dict[str, dict[str, Any]] | None = None
    questions: int = 0
    error: Exception | None = None
    taken: bool = False

    def run(self) -> None:
        run_job(self, self._heal)

    def _watch(self, curve: list, evals: list) -> None:
        self.curve, self.evals = curve, evals

    def _progress(self, phase: str) -> Any:
        def progress(done: int, total: int, label: str) -> None:
            self.fraction = min(done / total, 1.0) if total else 0.0
            self.text = f"{phase}{label}"
        return progress

    def _heal(self) -> None:
        shared = self.shared
        if not shared.lock.acquire(blocking=False):
            self.text = "Another session is using this model; waiting for it to finish…"
            shared.lock.acquire()
        shared.busy = "healing run (Heal page)"  # what other pages say while they wait for the model
        try:
            self.text = "Healing: measuring the pruned model's held-out perplexity (step 0)…"
            result = heal_plan(shared.model, shared.tokenizer, self.plan, self.train, eval_texts(), self.config,
                               runs_dir=default_runs_dir(), progress=self._progress(""), stop=self.stop.is_set,
                               watch=self._watch)
            self.curve, self.evals, self.result = result.curve, result.evals, result
            self.fraction, self.text = 0.0, "Measuring the original, pruned and healed models…"
            questions = None
            if self.mmlu_per_subject > 0:
                questions = load_questions("default", limit=self.mmlu_per_subject)
                self.questions = len(questions)
            pruned = self.pruned_model if self.pruned_model is not None else surgery.apply_plan(shared.model, self.plan)
            models = {"original": shared.model, "pruned": pruned, "healed": result.model}
            self.numbers = measure_three(models, shared.tokenizer, self.prompt, questions=questions, known=self.known,
                                         progress=self._progress("Measuring: "))
        finally:
            shared.busy = ""
            shared.lock.release()


def _mmlu_key(model_key: tuple, plan_json: str, n: int) -> tuple:
    return ("heal-mmlu", model_key, plan_json, n)


def start(shared: SharedModel, pruned: dict[str, Any], config: HealConfig, train: Any, *, model_key: tuple,
          mmlu_per_subject: int) -> HealJob:
    """Start healing the session's applied plan (``pruned``: ``SS_PRUNED``) in a thread; the original's and
    the pruned model's numbers already measured (the Prune page's, MMLU scores of an earlier heal) are
    reused. The job goes into the session before its thread starts."""
    store, plan_json = quick_store(), pruned["plan_json"]
    known: dict[str, dict[str, Any]] = {
        "original": {"perplexity": (pruned.get("original") or {}).get("perplexity")},
        "pruned": {"perplexity": (pruned.get("quick") or {}).get("perplexity")}}
    for side, key in (("original", ""), ("pruned", plan_json)):
        known[side].update(store.get(_mmlu_key(model_key, key, mmlu_per_subject)) or {})
    job = HealJob(shared, pruned["plan"], pruned.get("model"), config, train, pruned.get("prompt") or "",
                  known, mmlu_per_subject, model_key)
    old = st.session_state.get(SS_HEAL_JOB)
    if old is not None and not old.done.is_set():
        raise LayerLensError("A heal is still running in this session; stop it or wait for it to finish.")
    st.session_state[SS_HEAL_JOB] = job
    threading.Thread(target=job.run, name="layerlens-heal", daemon=True).start()
    return job


def running() -> bool:
    job = st.session_state.get(SS_HEAL_JOB)
    return job is not None and not job.done.is_set()


def _request_stop() -> None:
    job = st.session_state.get(SS_HEAL_JOB)
    if job is not None:
        job.stop.set()


def follow(job: HealJob, poll: float = 0.25) -> bool:
    """Show a job's progress, live curve and Stop until it ends, then put the healed model and its numbers
    in the session (once). True when a new healed result is on screen. Safe to be cut short at any point
    (a click): the next run follows the same job again."""
    if job.taken:
        return False
    ok = False
    with guarded("healing the pruned model"):
        box = st.empty()
        with box.container(border=True):
            bar = st.progress(job.fraction, text=job.text)
            st.button("Stop", key="hl_stop", on_click=_request_stop, icon=":material/stop_circle:",
                      help="Stop training now: the best checkpoint so far is kept, measured and shown.")
            plot = st.empty()
        shown, drawn, beat = (job.fraction, job.text), (0, 0, 0.0), time.monotonic()
        while True:
            finished = job.done.wait(poll)
            now = time.monotonic()
            if (job.fraction, job.text) != shown or now - beat > 1.0:  # also a heartbeat: where a click stops
                shown, beat = (job.fraction, job.text), now
                bar.progress(job.fraction, text=job.text[:160])
            curve, evals = list(job.curve), list(job.evals)  # one snapshot: the thread keeps appending
            sizes = (len(curve), len(evals))
            if sizes != (0, 0) and sizes != drawn[:2] and (finished or now - drawn[2] > 1.0):
                plot.plotly_chart(heal_curve(curve, evals), config=PLOT_CONFIG, key=f"hl_live_{sizes[0]}_{sizes[1]}")
                drawn = (*sizes, now)
            if finished:
                break
        box.empty()
        if job.error is not None:
            raise job.error
        if job.result is None or job.numbers is None:
            raise LayerLensError("Healing stopped without a result; press Heal to start again.")
        _take(job)
        ok = True
    job.taken = job.done.is_set()
    return ok


def _take(job: HealJob) -> None:
    """The finished job's healed model and numbers into the session; its MMLU scores of the original and
    the pruned model into the shared store (the next heal of this plan does not score them again)."""
    plan_json = job.plan.to_json()
    store = quick_store()
    for side, key in (("original", ""), ("pruned", plan_json)):
        n = job.numbers[side]
        if n.get("mmlu_prob_correct") is not None:
            store.put(_mmlu_key(job.model_key, key, job.mmlu_per_subject),
                      {k: n[k] for k in ("mmlu_prob_correct", "mmlu_accuracy", "mmlu_questions")})
    st.session_state[SS_HEALED] = {
        "plan_json": plan_json, "model_key": job.model_key, "model": job.result.model,
        "record": job.result.record(), "numbers": job.numbers, "prompt": job.prompt,
        "cached": bool(job.result.meta.get("cached")), "questions": job.questions,
        "mmlu_per_subject": job.mmlu_per_subject,
        "layers": {"original": job.plan.num_layers, "pruned": job.plan.num_layers_after,
                   "healed": job.plan.num_layers_after}}


def current(pruned: dict[str, Any] | None, model_key: tuple | None) -> dict[str, Any] | None:
    """The session's healed result when it heals the applied plan of this model (else None: stale). A heal
    that finished while the user was on another page is taken into the session here (Export, Summary)."""
    job = st.session_state.get(SS_HEAL_JOB)
    if job is not None and not job.taken and job.done.is_set() and job.error is None and job.numbers is not None:
        _take(job)
        job.taken = True
    healed = st.session_state.get(SS_HEALED)
    if healed is None or pruned is None or healed["plan_json"] != pruned["plan_json"]:
        return None
    return healed if model_key is None or healed["model_key"] == model_key else None


# ----------------------------------------------------------------------------------------------------------
# The result, for people
# ----------------------------------------------------------------------------------------------------------


def describe(record: dict[str, Any]) -> str:
    """One line: what healing did (steps, tokens, time, loss) and the held-out perplexity before/after."""
    config = record.get("config", {})
    return (f"{record['steps']} steps · {record['tokens']:,} tokens · {humanize.seconds(record['seconds'])} · "
            f"loss {record['loss']} · LoRA rank {config.get('lora_rank')} on {config.get('targets')} · held-out "
            f"perplexity {humanize.perplexity(record['ppl_before'])} → {humanize.perplexity(record['ppl_after'])} "
            f"(best checkpoint: step {record['best_step']})")


def show_comparison(healed: dict[str, Any]) -> None:
    """The before/after table (original, pruned, healed), what it rests on, and the three generations side
    by side."""
    numbers = healed["numbers"]
    st.table(comparison_frame(numbers, healed["layers"]))
    gap = gap_recovered(numbers)
    speed = numbers["healed"]
    mmlu = (f"MMLU: mean probability of the correct answer letter on {healed['questions']} bundled test "
            f"questions ({healed['mmlu_per_subject']} per subject; chance is 25%)" if healed.get("questions")
            else "MMLU not measured")
    st.caption((f"Healing recovered **{humanize.percent(gap, 0)}** of the pruned model's log-perplexity gap. "
                if gap is not None else "")
               + f"Perplexity on {QUICK_WINDOWS} held-out windows of {QUICK_SEQ_LEN} tokens "
               "(the evaluation plays; training used other text, and the checkpoint kept is the one with the best "
               "held-out perplexity, so these windows helped choose it); " + mmlu + "; speed: median of "
               f"{speed.get('runs', '?')} timed runs of {speed.get('new_tokens', '?')} greedy tokens per model, "
               "the three models' runs interleaved.")
    cols = st.columns(3)
    for col, side in zip(cols, SIDES, strict=True):
        with col, st.container(border=True):
            st.markdown(f"**{SIDE_LABELS[side]}** ({healed['layers'][side]} layers)")
            st.text(healed["prompt"] + numbers[side].get("generation", ""))


def show_curve(record: dict[str, Any], key: str) -> None:
    chart(heal_curve(record["curve"], record["evals"], best_step=record["best_step"]), key=key)
