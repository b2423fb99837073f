"""Sweeps: perplexity and MMLU for every (strategy, ratio), fast and resumable, numbers unchanged.

Three things make a sweep fast without changing any number:

1. **No reload, no copy.** Each plan is applied to the one model in place with
   :func:`layerlens.surgery.pruned`, which restores it exactly afterwards.
2. **Shared prefixes are computed once** (:mod:`layerlens.prefix_reuse`). The residual state at the
   input of original layer ``o`` depends only on what the plan does to layers ``0..o-1``. Plans are run
   in lexicographic order of their per-layer decisions (keep < drop < merge), a depth-first walk of the
   tree of shared prefixes; a run records the layer inputs (every batch, on CPU, in the model dtype) that
   later plans share with it, and a later plan runs only its tail from the recorded input. With BI plans
   (nested sets) the unpruned pass feeds the first tails and each plan feeds the next. At most
   ``cache_bytes`` of states are held; beyond that, the states saving the fewest layer passes are not
   kept (those plans start shallower). Tests check the numbers equal evaluating each saved-and-reloaded
   pruned model from scratch.
3. **Persisted points.** Each (plan, evaluation) result is stored under
   ``runs_dir/sweep/points/<key>.json``, ``key = stable_key(model fingerprint, evaluation identity (exact
   tokens and window/shot settings, not the batching), effective plan (method, removed/merged layers))``.
   A finished point is read back (``cached=True``) and an interrupted sweep resumes where it stopped. The
   key ignores a plan's strategy name: two strategies that remove the same layers share one computation,
   and ratio 0 is computed once. ``sweep(..., compute=False)`` reads back the finished points only.

Why one module over ~400 lines: the sweep loop, its persisted points and the healed points share
the same keys and unit bookkeeping; splitting them would spread one contract over two files (prefix
reuse, which is separable, lives in :mod:`layerlens.prefix_reuse`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import decoder_layers, layer_count
from .data import load_texts
from .errors import LayerLensError
from .evaluation import (
    DEFAULT_MMLU_BATCH,
    DEFAULT_PPL_BATCH,
    DEFAULT_SEQ_LEN,
    MMLUResult,
    MMLUTask,
    PerplexityResult,
    PerplexityTask,
    ProgressFn,
    check_window,
    harness_max_length,
    plain_forward,
)
from .harness import HarnessResult, HarnessTask, result_columns
from .heal import HealConfig, heal_key, heal_plan
from .plans import PrunePlan, get_strategy, make_plan, strategy_names
from .prefix_reuse import plan_ops, recording, schedule_reuse, state_bytes, state_key, tail_forward
from .runs import atomic_write_json, model_fingerprint, provenance, stable_key
from .surgery import private_view, pruned

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_STRATEGIES = strategy_names(sweep_default=True)  # the ShortGPT Figure 5 curves
DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4)
DEFAULT_MAX_WINDOWS = 16
DEFAULT_CACHE_BYTES = 1 << 30
POINT_FORMAT = 1
COLUMNS = ("strategy", "ratio", "n_removed", "removed_layers", "perplexity", "mmlu_accuracy", "seconds",
           "actual_ratio", "mmlu_prob_correct", "cached", "kl", "top1_agreement")


@dataclass(frozen=True)
class SweepStats:
    """How the last sweep spent its time (for benchmarks and the UI)."""

    units: int
    computed: int
    cached: int
    peak_states: dict[str, int]
    layer_passes: int
    layer_passes_from_scratch: int


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep evaluates and how: every knob that is not the model, the data or where points persist.

    ``plans`` (ready ``(strategy, ratio, PrunePlan)`` triples) overrides ``strategies``/``ratios``. Lists
    become tuples, so a config stays frozen and hashable. The persisted point keys never include these
    fields: a point is identified by the model, the task's exact tokens and the effective plan.
    """

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    plans: tuple[tuple[str, float, PrunePlan], ...] | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    max_windows: int | None = DEFAULT_MAX_WINDOWS
    ppl_batch_size: int = DEFAULT_PPL_BATCH
    mmlu_batch_size: int = DEFAULT_MMLU_BATCH
    shots: int = 0
    reuse: bool = True
    cache_bytes: int = DEFAULT_CACHE_BYTES
    seed: int = 0
    heal: HealConfig | None = None  # heal every pruned point too: a healed row beside each pruned row
    tasks: tuple[str, ...] = ()  # lm-eval task names / local task YAMLs, run by the harness at every point
    task_shots: int | None = None
    task_limit: int | float | None = None
    task_batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if self.plans is not None:
            object.__setattr__(self, "plans", tuple((s, r, p) for s, r, p in self.plans))


@dataclass(frozen=True)
class SweepResult:
    """A sweep's rows (:data:`COLUMNS`, one per requested point), their provenance and how it spent its time."""

    frame: pd.DataFrame
    meta: dict[str, Any]
    stats: SweepStats


# --------------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------------


def effective_plan(plan: Any) -> dict[str, Any]:
    """The part of ``plan.to_dict()`` that changes the model (not its strategy name or parameters)."""
    d = plan.to_dict()
    return {k: d[k] for k in ("num_layers", "method", "remove", "merge", "merge_formula")} | (
        {} if d["method"] == "merge" else {"merge_formula": None}) | {
        k: d[k] for k in ("drop_attn", "drop_mlp") if d.get(k)}  # only when set: old keys stay valid


# --------------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------------


def _point_path(runs_dir: Path, key: str) -> Path:
    return runs_dir / "sweep" / "points" / f"{key}.json"


def _read_point(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("format") != POINT_FORMAT or "result" not in obj:
        return None
    return obj


def _result_from_dict(kind: str, d: dict[str, Any]) -> PerplexityResult | MMLUResult | HarnessResult:
    if kind == "harness":
        return HarnessResult(d["tasks"], d.get("meta", {}), d.get("seconds", 0.0))
    if kind == "perplexity":
        return PerplexityResult(**{k: d[k] for k in ("perplexity", "nll", "n_tokens", "n_windows", "seq_len",
                                                     "max_windows")}, kl=d.get("kl"),
                                top1_agreement=d.get("top1_agreement"))
    return MMLUResult(accuracy=d["accuracy"], per_subject=dict(d["per_subject"]), n=d["n"],
                      mean_prob_correct=d["mean_prob_correct"], choices=tuple(d.get("choices", ())),
                      correct=tuple(d.get("correct", ())),
                      loglikelihoods=tuple(tuple(x) for x in d.get("loglikelihoods", ())),
                      subjects=tuple(d.get("subjects", ())), shots=d.get("shots", 0),
                      n_multi_token=d.get("n_multi_token", 0), per_subject_n=dict(d.get("per_subject_n", {})),
                      fewshot_excluded=d.get("fewshot_excluded", 0))


def _result_to_dict(result: PerplexityResult | MMLUResult) -> dict[str, Any]:
    if isinstance(result, MMLUResult):
        return result.to_dict(per_question=True) | {"subjects": list(result.subjects)}
    return result.to_dict()


# --------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    task: Any
    plan: Any
    key: str
    result: PerplexityResult | MMLUResult | None = None
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None  # why an executor gave up on it (the row's ``error`` column); never persisted


def make_plans(report: Any, strategies: Sequence[str], ratios: Sequence[float], *, num_layers: int,
               seed: int = 0, probe: Mapping[str, Any] | None = None) -> list[tuple[str, float, Any]]:
    """``(strategy, requested ratio, PrunePlan)`` for every combination, in order. ``probe`` (``model``,
    ``tokenizer``, ``token_lists``) goes to the strategies that run forward passes on calibration data
    (e.g. the greedy ``oracle``)."""
    out = []
    for s in strategies:
        extra = dict(probe or {}) if get_strategy(s).uses_data() else {}
        for r in ratios:
            out.append((s, float(r), make_plan(s, report, ratio=float(r), num_layers=num_layers, seed=seed,
                                               **extra)))
    return out


def sweep(model: torch.nn.Module, tokenizer: Any, report: Any = None, config: SweepConfig = SweepConfig(), *,
          ppl_texts: Any = None, questions: Any = None, dev: Any = None, runs_dir: str | Path | None = None,
          model_id: Mapping[str, Any] | None = None, progress: ProgressFn | None = None,
          compute: bool = True, heal_texts: Any = None, executor: Any = None) -> SweepResult:
    """Evaluate perplexity (on ``ppl_texts``) and MMLU (on ``questions``) for every point of ``config``.

    The frame has :data:`COLUMNS`, one row per requested (strategy, ratio) (``ratio`` is the requested
    value, ``n_removed = round(ratio * L)`` layers go, ``actual_ratio = n_removed / L`` is what the curves
    are drawn against; ``seconds`` is the compute time of the point, the original time for a ``cached``
    point). ``runs_dir`` enables persisted, resumable points (None: in memory only). ``model_id`` is added
    to the automatic model fingerprint in the keys (e.g. ``ModelInfo.to_dict()``). ``progress(done, total,
    label)`` is called after every computed (plan, evaluation) unit; an exception it raises stops the sweep
    with finished units kept on disk. ``compute=False`` only reads back what is persisted and never runs
    the model (an interrupted sweep's finished points): one row per point with at least one evaluation
    finished (NaN for the others), in request order; an empty frame when none is. With ``config.heal``
    every pruned plan is also healed (:func:`layerlens.heal.heal_plan` on ``heal_texts``, default the
    bundled calibration plays; held-out perplexity on ``ppl_texts``) and evaluated on the same tasks: the
    frame gets a ``healed`` column and a healed row after each pruned row. ``executor`` (e.g.
    :class:`layerlens.distributed.RayExecutor`) computes the unfinished units elsewhere, with the same keys,
    persistence and progress; a unit it gives up on leaves NaN and a reason in an ``error`` column (only
    then present), is not persisted, and is computed by the next run. The model is the same object,
    unchanged, afterwards.
    """
    import pandas as pd  # heavy (~0.3 s): only when a sweep runs, not at `import layerlens`

    if not isinstance(config, SweepConfig):
        raise TypeError(f"sweep's fourth argument is a SweepConfig, not {type(config).__name__}.")
    if ppl_texts is None and questions is None and not config.tasks:
        raise LayerLensError("Nothing to evaluate: give perplexity texts, MMLU questions, harness tasks, or some.")
    num_layers = layer_count(model)
    plans = config.plans
    if plans is None:
        plans = make_plans(report, config.strategies, config.ratios, num_layers=num_layers, seed=config.seed)
    if not plans:
        raise LayerLensError("The sweep has no points; give at least one strategy and one ratio.")
    model = private_view(model)  # in-place pruning below must never be seen by other users of `model`
    model.eval()

    tasks: list[Any] = []
    if ppl_texts is not None:
        check_window(model, config.seq_len)
        tasks.append(PerplexityTask(tokenizer, ppl_texts, seq_len=config.seq_len,
                                    batch_size=config.ppl_batch_size, max_windows=config.max_windows, kl=True))
    if questions is not None:
        tasks.append(MMLUTask(tokenizer, questions, shots=config.shots, dev=dev, batch_size=config.mmlu_batch_size,
                              max_length=harness_max_length(model, tokenizer)))
    if config.tasks:  # the harness runs each pruned model itself (no prefix reuse: it owns the forwards)
        tasks.append(HarnessTask(tokenizer, config.tasks, num_fewshot=config.task_shots, limit=config.task_limit,
                                 batch_size=config.task_batch_size, seed=config.seed))
    identity = model_fingerprint(model) | {"id": dict(model_id or {})}
    if executor is not None:  # the points are keyed by the device they are computed on (the workers')
        identity = executor.key_identity(identity)
    data_source = {"perplexity": getattr(ppl_texts, "source", None), "mmlu": getattr(questions, "source", None)}
    runs = Path(runs_dir) if runs_dir is not None else None

    unique: dict[str, Any] = {}  # one computation per distinct pruned model
    for _, _, plan in plans:
        unique.setdefault(stable_key(effective_plan(plan)), plan)
    order = list(unique)
    units: dict[tuple[int, str], _Unit] = {}
    for ti, task in enumerate(tasks):
        tid = task.identity()
        for pk in order:
            key = stable_key({"format": POINT_FORMAT, "model": identity, "task": tid,
                              "plan": effective_plan(unique[pk])})
            unit = _Unit(task, unique[pk], key)
            if runs is not None:
                saved = _read_point(_point_path(runs, key))
                if saved is not None:
                    unit.result = _result_from_dict(task.kind, saved["result"])
                    unit.seconds, unit.cached = float(saved.get("seconds", 0.0)), True
            units[(ti, pk)] = unit

    if compute and ppl_texts is not None and (config.heal is not None or
                                              not all(units[(0, pk)].cached for pk in order)):
        tasks[0].keep_reference(model)  # the original's view, one pass: KL and top-1 agreement of every point
    healing = 0 if config.heal is None else len(tasks) * sum(p.changes_model for p in unique.values())
    total = len(units) + healing  # each healed plan's evaluations count as units too
    done = sum(u.cached for u in units.values())
    layer_passes = scratch_passes = 0
    held_states: dict[str, int] = {}
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None) or 0

    def persist(unit: _Unit) -> None:
        nonlocal done
        if runs is not None and not unit.cached:
            _write_point(runs, unit, identity, data_source, config)
        done += 1
        if progress is not None:
            progress(done, total, f"{unit.task.kind} {unit.plan.describe()}")

    remote: list[Any] | None = [] if executor is not None and compute else None  # healings for the executor
    for ti, task in enumerate(tasks if compute and remote is None else ()):
        todo = [units[(ti, pk)] for pk in order if not units[(ti, pk)].cached]
        if todo:
            held_states[task.kind], passes, scratch = _run_task(model, task, todo, config, hidden, persist)
            layer_passes += passes
            scratch_passes += scratch

    healed = {} if config.heal is None else _heal_units(
        model, tokenizer, tasks, units, unique, config.heal, heal_texts, ppl_texts, runs, identity, compute, persist,
        remote)
    if remote is not None:
        todo = [[units[(ti, pk)] for pk in order if not units[(ti, pk)].cached] for ti in range(len(tasks))]
        held_states, layer_passes, scratch_passes = executor.run(model, tasks, todo, remote, config, persist)
    failed = any(u.error for u in units.values()) or any(u.error for us in healed.values() for u in us)
    rows = []
    for strategy, target, plan in plans:
        pk = stable_key(effective_plan(plan))
        mine = [units[(ti, pk)] for ti in range(len(tasks))]
        if compute or any(u.cached for u in mine):
            rows.append(_row(strategy, target, plan, mine) | ({"healed": False} if healed else {})
                        | (_failure(mine) if failed else {}))
        if healed and (compute or any(u.cached for u in healed[pk])):
            rows.append(_row(strategy, target, plan, healed[pk]) | {"healed": True}
                        | (_failure(healed[pk]) if failed else {}))
    meta = provenance(model=identity["id"].get("model"), revision=identity["id"].get("revision"),
                      dtype=identity["dtype"], device=identity["device"], data=data_source,
                      model_fingerprint=identity, tasks=[t.identity() for t in tasks], seq_len=config.seq_len,
                      max_windows=config.max_windows, shots=config.shots, seed=config.seed)
    stats = SweepStats(units=total, computed=sum(u.result is not None and not u.cached for u in units.values()),
                       cached=sum(u.cached for u in units.values()), peak_states=held_states,
                       layer_passes=layer_passes, layer_passes_from_scratch=scratch_passes)
    if config.heal is not None:
        meta["heal"] = asdict(config.heal)
    harness_cols = list(dict.fromkeys(k for r in rows for k in r if "/" in k))  # task/metric, first-seen order
    return SweepResult(pd.DataFrame(rows, columns=[*COLUMNS, *(("healed",) if healed else ()),
                                                   *(("error",) if failed else ()), *harness_cols]), meta, stats)


def _heal_units(model: torch.nn.Module, tokenizer: Any, tasks: list[Any], units: dict[tuple[int, str], _Unit],
                unique: dict[str, Any], heal: HealConfig, heal_texts: Any, eval_texts: Any, runs: Path | None,
                identity: dict[str, Any], compute: bool, persist: Any,
                remote: list[Any] | None = None) -> dict[str, list[_Unit]]:
    """Every distinct plan healed and evaluated on every task (persisted and read back like the pruned
    points, keyed by the healing request too). Healed models run from scratch: prefix reuse cannot apply,
    since healing changes every layer LoRA touches. A plan that removes nothing is its own healed row."""
    heal_texts = heal_texts if heal_texts is not None else load_texts("default", role="calibration")
    eval_texts = eval_texts if eval_texts is not None else load_texts("default", role="eval")
    out: dict[str, list[_Unit]] = {}
    for pk, plan in unique.items():
        if not plan.changes_model:
            out[pk] = [units[(ti, pk)] for ti in range(len(tasks))]
            continue
        hkey = heal_key(model, plan, tokenizer, heal_texts, eval_texts, heal)
        mine = []
        for task in tasks:
            key = stable_key({"format": POINT_FORMAT, "model": identity, "task": task.identity(),
                              "plan": effective_plan(plan), "heal": hkey})
            unit = _Unit(task, plan, key)
            saved = _read_point(_point_path(runs, key)) if runs is not None else None
            if saved is not None:
                unit.result = _result_from_dict(task.kind, saved["result"])
                unit.seconds, unit.cached = float(saved.get("seconds", 0.0)), True
            mine.append(unit)
        out[pk] = mine
        for unit in mine:
            if unit.cached:
                persist(unit)  # counted as done (read back, not written again)
        if compute and not all(u.cached for u in mine):
            pending = [u for u in mine if not u.cached]
            if remote is not None:  # an executor heals it (the same function, on a worker)
                remote.append((plan, pending, heal_texts, eval_texts, heal))
                continue
            heal_and_evaluate(model, tokenizer, plan, heal_texts, eval_texts, heal, runs, pending, persist)
    return out


def heal_and_evaluate(model: torch.nn.Module, tokenizer: Any, plan: Any, heal_texts: Any, eval_texts: Any,
                      heal: HealConfig, runs: Path | None, pending: Sequence[_Unit], persist: Any) -> None:
    """Heal ``plan`` on ``model`` and evaluate the healed model on each pending unit's task (the first
    unit's seconds include the healing's)."""
    result = heal_plan(model, tokenizer, plan, heal_texts, eval_texts, heal, runs_dir=runs)
    for i, unit in enumerate(pending):
        t0 = time.perf_counter()
        unit.result = unit.task.run(plain_forward(result.model))
        unit.seconds = time.perf_counter() - t0 + (result.seconds if i == 0 else 0.0)
        persist(unit)


def _run_task(model: torch.nn.Module, task: Any, todo: list[_Unit], config: SweepConfig, hidden: int,
              persist: Any) -> tuple[int, int, int]:
    """Compute one task's unfinished units with prefix reuse, persisting each as it finishes.

    Returns the most states held at once, the layer passes run and those evaluating from scratch would.
    """
    per_state = state_bytes(task, hidden, next(model.parameters()).element_size())
    # a task whose batches continue a cached prompt prefix (few-shot MMLU) reuses the prefix's KV cache per
    # plan instead of layer inputs (the prefix is most of its tokens): every plan runs from the embeddings
    layer_reuse = config.reuse and per_state > 0 and not getattr(task, "prefix_cached", False)
    max_states = int(config.cache_bytes // per_state) if layer_reuse else 0
    steps = schedule_reuse([u.plan for u in todo], max_states)
    states: dict[tuple, list[torch.Tensor]] = {}
    peak = layer_passes = scratch_passes = 0
    for step in steps:
        u = todo[step.plan_index]
        ops = plan_ops(u.plan)
        t0 = time.perf_counter()
        with pruned(model, u.plan):
            kept = list(u.plan.kept_layers)
            mods = decoder_layers(model)
            recorded: dict[int, list[torch.Tensor]] = {}
            with recording({o: mods[kept.index(o)] for o in step.record}, recorded):
                if step.start > 0:
                    forward = tail_forward(model, kept.index(step.start), states[state_key(ops, step.start)])
                else:
                    forward = plain_forward(model)
                u.result = task.run(forward)
        for o, tensors in recorded.items():
            states[state_key(ops, o)] = tensors
        peak = max(peak, len(states))
        for key in step.release:
            states.pop(key, None)
        u.seconds = time.perf_counter() - t0
        layer_passes += step.layer_passes
        scratch_passes += u.plan.num_layers_after
        persist(u)
    return peak, layer_passes, scratch_passes


def _write_point(runs: Path, unit: _Unit, identity: dict[str, Any], data_source: dict[str, Any],
                 config: SweepConfig) -> None:
    atomic_write_json(_point_path(runs, unit.key), {
        "format": POINT_FORMAT, "key": unit.key, "kind": unit.task.kind,
        "plan": unit.plan.to_dict(), "task": unit.task.identity(), "model": identity,
        "result": _result_to_dict(unit.result), "seconds": unit.seconds,
        "meta": provenance(model=identity["id"].get("model"), revision=identity["id"].get("revision"),
                           dtype=identity["dtype"], device=identity["device"], data=data_source,
                           samples=getattr(unit.result, "n_windows", getattr(unit.result, "n", None)),
                           seq_len=config.seq_len, seed=config.seed)})


def _failure(units: Sequence[_Unit]) -> dict[str, Any]:
    """The ``error`` column of a row: why its failed evaluations have no result (empty when none failed)."""
    errors = [f"{u.task.kind}: {u.error}" for u in units if u.error]
    return {"error": "; ".join(errors)} | ({"cached": False} if errors else {})


def _row(strategy: str, target: float, plan: Any, units: Sequence[_Unit]) -> dict[str, Any]:
    """One frame row: a plan's results over the tasks (NaN for a task without one); ``cached`` when every
    result was read back (a read-back row, with units not finished, is cached too)."""
    row: dict[str, Any] = {"strategy": strategy, "ratio": target, "actual_ratio": plan.ratio,
                           "n_removed": plan.n_removed, "removed_layers": plan.units_text(),
                           "perplexity": float("nan"), "mmlu_accuracy": float("nan"),
                           "mmlu_prob_correct": float("nan"), "seconds": 0.0, "cached": True,
                           "kl": float("nan"), "top1_agreement": float("nan")}
    for u in units:
        if isinstance(u.result, PerplexityResult):
            row["perplexity"] = u.result.perplexity
            if u.result.kl is not None:
                row["kl"], row["top1_agreement"] = u.result.kl, u.result.top1_agreement
        elif isinstance(u.result, MMLUResult):
            row["mmlu_accuracy"] = u.result.accuracy
            row["mmlu_prob_correct"] = u.result.mean_prob_correct
        elif isinstance(u.result, HarnessResult):
            row.update(result_columns(u.result))  # "task/metric" columns, harness names
        row["seconds"] += u.seconds
        row["cached"] = row["cached"] and (u.cached or u.result is None)
    return row
