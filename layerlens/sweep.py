"""Sweeps: perplexity and MMLU for every (strategy, ratio), fast and resumable, numbers unchanged.

Three things make a sweep fast without changing any number:

1. **No reload, no copy.** Each plan is applied to the one model in place with
   :func:`layerlens.surgery.pruned`, which restores it exactly afterwards.
2. **Shared prefixes are computed once.** The residual state at the input of original layer ``o``
   depends only on what the plan does to layers ``0..o-1``. Plans are run in lexicographic order of their
   per-layer decisions (keep < drop < merge), a depth-first walk of the tree of shared prefixes; a run
   records the layer inputs (every batch, on CPU, in the model dtype) that later plans share with it, and
   a later plan runs only its tail: its first layers are dropped for the call (again with
   :func:`pruned`) and a forward pre-hook on the first remaining layer substitutes the recorded input.
   Substituting the *layer input* leaves everything before the layers untouched (Gemma's embedding
   scaling, GPT-2/OPT position embeddings); masks and rotary tables depend only on positions, which do
   not change. With BI plans (nested sets) the unpruned pass feeds the first tails and each plan feeds
   the next. At most ``cache_bytes`` of states are held; beyond that, the states saving the fewest layer
   passes are not kept (those plans start shallower). Tests check the numbers equal evaluating each
   saved-and-reloaded pruned model from scratch.
3. **Persisted points.** Each (plan, evaluation) result is stored under
   ``runs_dir/sweep/points/<key>.json``, ``key = stable_key(model fingerprint, evaluation identity (exact
   tokens), effective plan (method, removed/merged layers), settings)``. A finished point is read back
   (``cached=True``) and an interrupted sweep resumes where it stopped. The key ignores a plan's strategy
   name: two strategies that remove the same layers share one computation, and ratio 0 is computed once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import decoder_layers, layer_count
from .errors import LayerLensError
from .evaluation import (
    DEFAULT_MMLU_BATCH,
    DEFAULT_PPL_BATCH,
    DEFAULT_SEQ_LEN,
    EvalBatch,
    Forward,
    MMLUResult,
    MMLUTask,
    PerplexityResult,
    PerplexityTask,
    ProgressFn,
    check_window,
    harness_max_length,
    model_logits,
    plain_forward,
)

DEFAULT_STRATEGIES = ("bi", "reverse", "sequential", "magnitude")
DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4)
DEFAULT_MAX_WINDOWS = 16
DEFAULT_CACHE_BYTES = 1 << 30
POINT_FORMAT = 1
COLUMNS = ("strategy", "ratio", "n_removed", "removed_layers", "perplexity", "mmlu_accuracy", "seconds",
           "actual_ratio", "mmlu_prob_correct", "cached")


@dataclass(frozen=True)
class SweepStats:
    """How the last sweep spent its time (for benchmarks and the UI)."""

    units: int
    computed: int
    cached: int
    peak_states: dict[str, int]
    layer_passes: int
    layer_passes_from_scratch: int


# --------------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """A cheap identity of a model: config, dtype and a strided sample of every parameter.

    Hashes up to 4096 values per tensor (shape included), so two models with the same config but
    different weights (another checkpoint, a fine-tune) get different keys, in milliseconds.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.device.type == "meta":  # offloaded weights: shape only
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step][:4096].to("cpu", torch.float64).numpy().tobytes())
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    param = next(model.parameters())
    return {"config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "weights": h.hexdigest()[:16], "dtype": str(param.dtype).removeprefix("torch."),
            "device": param.device.type, "num_layers": layer_count(model)}


def effective_plan(plan: Any) -> dict[str, Any]:
    """The part of ``plan.to_dict()`` that changes the model (not its strategy name or parameters)."""
    d = plan.to_dict()
    return {k: d[k] for k in ("num_layers", "method", "remove", "merge", "merge_formula")} | (
        {} if d["method"] == "merge" else {"merge_formula": None})


def first_affected_layer(plan: Any) -> int:
    """The lowest original layer index the plan removes or changes (``num_layers`` for no change)."""
    idx = list(plan.removed_layers) + [g[0] for g in plan.merge]
    return min(idx) if idx else plan.num_layers


# --------------------------------------------------------------------------------------------------------
# Prefix reuse: a schedule over the tree of shared decision prefixes
# --------------------------------------------------------------------------------------------------------

Ops = tuple[Any, ...]


def plan_ops(plan: Any) -> Ops:
    """What the plan does to each original layer: 0 keep, 1 drop, ``(2, size, formula)`` a merged base.

    The residual state at the input of original layer ``o`` depends only on ``ops[:o]`` (exactly: on
    :func:`state_key`).
    """
    bases = {g[0]: g for g in plan.merge}
    gone = set(plan.removed_layers)
    return tuple((2, len(bases[i]), plan.merge_formula) if i in bases else (1 if i in gone else 0)
                 for i in range(plan.num_layers))


def state_key(ops: Ops, o: int) -> tuple:
    """Identity of the residual state at the input of original layer ``o``: the layers applied before it
    (index and operation); dropped layers apply nothing, so plans that differ only in which of them
    they drop share the state."""
    return tuple((i, op) for i, op in enumerate(ops[:o]) if op != 1)


def _sort_key(ops: Ops) -> tuple:
    return tuple((op, 0, "") if isinstance(op, int) else op for op in ops)


@dataclass(frozen=True)
class ReuseStep:
    """One plan's run: substitute the input of original layer ``start`` (0: run from the embeddings) and
    record the inputs of the original layers in ``record`` for later plans; ``release`` lists the states
    no longer needed afterwards (by :func:`state_key`)."""

    plan_index: int
    start: int
    record: tuple[int, ...]
    release: tuple[tuple, ...]
    layer_passes: int


def _simulate(ops: list[Ops], kept: list[tuple[int, ...]], order: list[int],
              banned: set[tuple]) -> tuple[list[int], dict[tuple, int], dict[tuple, list[int]]]:
    computed: dict[tuple, int] = {}  # state key -> position (in order) of the run that computes it
    starts = []
    for pos, i in enumerate(order):
        # () is the embedding output: recomputed, never stored (a plan dropping only leading layers)
        cands = [o for o in kept[i] if state_key(ops[i], o) and state_key(ops[i], o) in computed
                 and state_key(ops[i], o) not in banned]
        start = max(cands, default=0)
        starts.append(start)
        for o in kept[i]:
            if o >= start:
                computed.setdefault(state_key(ops[i], o), pos)
    consumers: dict[tuple, list[int]] = {}
    for pos, i in enumerate(order):
        if starts[pos] > 0:
            consumers.setdefault(state_key(ops[i], starts[pos]), []).append(pos)
    return starts, computed, consumers


def schedule_reuse(plans: Sequence[Any], max_states: int | None) -> list[ReuseStep]:
    """The order to run ``plans`` in and, for each, where to start and what to record.

    Plans run in lexicographic order of their decisions (keep before drop), a depth-first walk of the
    tree of shared prefixes; each starts from the deepest state an earlier run recorded, so every
    (prefix, layer) node of the tree is computed once. At most ``max_states`` states (each the inputs of
    one layer for every batch) are held at a time (None: no limit); when the schedule would hold more,
    the states saving the fewest layer passes are not kept and their plans start shallower.
    """
    ops = [plan_ops(p) for p in plans]
    kept = [tuple(p.kept_layers) for p in plans]
    order = sorted(range(len(plans)), key=lambda i: (_sort_key(ops[i]), i))
    banned: set[tuple] = set()
    while True:
        starts, computed, consumers = _simulate(ops, kept, order, banned)
        last_use = {key: max(users) for key, users in consumers.items()}
        live = [sum(1 for key, last in last_use.items() if computed[key] <= pos <= last)
                for pos in range(len(order))]
        if max_states is None or max(live, default=0) <= max_states or not consumers:
            break
        # drop the state whose consumers save the fewest layer passes
        worst = min(consumers, key=lambda key: (len(key) * len(consumers[key]), len(key)))
        banned.add(worst)
    steps = []
    for pos, i in enumerate(order):
        record = tuple(o for o in kept[i] if o > starts[pos] and state_key(ops[i], o) in consumers
                       and computed[state_key(ops[i], o)] == pos)
        release = tuple(key for key, last in last_use.items() if last == pos)
        passes = sum(1 for o in kept[i] if o >= starts[pos])
        steps.append(ReuseStep(i, starts[pos], record, release, passes))
    return steps


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextlib.contextmanager
def _recording(layers: Mapping[int, torch.nn.Module], into: dict[int, list[torch.Tensor]]) -> Iterator[None]:
    """Append the input of each given layer (one entry per forward) to ``into[o]``, on CPU."""
    handles = []

    def make(o: int):
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            into[o].append(_layer_input(args, kwargs).detach().to("cpu", copy=True))

        return hook

    for o, mod in layers.items():
        into.setdefault(o, [])
        handles.append(mod.register_forward_pre_hook(make(o), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def tail_forward(model: torch.nn.Module, skip: int, states: Sequence[torch.Tensor]) -> Forward:
    """A forward for ``model`` as it is now that skips its first ``skip`` decoder layers and feeds the
    next one the recorded ``states[batch_index]`` (the input that layer has in the full pass)."""
    from .plans import PrunePlan
    from .surgery import pruned

    def forward(index: int, batch: EvalBatch) -> torch.Tensor:
        prefix = PrunePlan(layer_count(model), "remove", remove=tuple(range(skip)), strategy="manual")
        with pruned(model, prefix):
            device = next(model.parameters()).device
            cached = states[index]
            handle = decoder_layers(model)[0].register_forward_pre_hook(
                lambda _m, args, kwargs: _replace_hidden(args, kwargs, cached.to(device)), with_kwargs=True)
            try:
                return model_logits(model, batch)
            finally:
                handle.remove()

    return forward


def _batch_bytes(task: Any, hidden: int, elem: int) -> int:
    return sum(b.input_ids.numel() for b in task.batches) * hidden * elem


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


def _result_from_dict(kind: str, d: dict[str, Any]) -> PerplexityResult | MMLUResult:
    if kind == "perplexity":
        return PerplexityResult(**{k: d[k] for k in ("perplexity", "nll", "n_tokens", "n_windows", "seq_len",
                                                     "max_windows")})
    return MMLUResult(accuracy=d["accuracy"], per_subject=dict(d["per_subject"]), n=d["n"],
                      mean_prob_correct=d["mean_prob_correct"], choices=tuple(d.get("choices", ())),
                      correct=tuple(d.get("correct", ())),
                      loglikelihoods=tuple(tuple(x) for x in d.get("loglikelihoods", ())),
                      subjects=tuple(d.get("subjects", ())), shots=d.get("shots", 0),
                      n_multi_token=d.get("n_multi_token", 0), per_subject_n=dict(d.get("per_subject_n", {})))


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


def make_plans(report: Any, strategies: Sequence[str], ratios: Sequence[float], *, num_layers: int,
               seed: int = 0) -> list[tuple[str, float, Any]]:
    """``(strategy, requested ratio, PrunePlan)`` for every combination, in order."""
    from .plans import make_plan

    out = []
    for s in strategies:
        for r in ratios:
            out.append((s, float(r), make_plan(s, report, ratio=float(r), num_layers=num_layers, seed=seed)))
    return out


def sweep(model: torch.nn.Module, tokenizer: Any, report: Any = None,
          strategies: Sequence[str] = DEFAULT_STRATEGIES, ratios: Sequence[float] = DEFAULT_RATIOS, *,
          ppl_texts: Any = None, questions: Any = None, seq_len: int = DEFAULT_SEQ_LEN,
          max_windows: int | None = DEFAULT_MAX_WINDOWS, ppl_batch_size: int = DEFAULT_PPL_BATCH,
          mmlu_batch_size: int = DEFAULT_MMLU_BATCH, shots: int = 0, dev: Any = None,
          plans: Sequence[tuple[str, float, Any]] | None = None, reuse: bool = True,
          cache_bytes: int = DEFAULT_CACHE_BYTES, runs_dir: str | Path | None = None,
          model_id: Mapping[str, Any] | None = None, seed: int = 0,
          progress: ProgressFn | None = None, stats: dict[str, Any] | None = None):
    """Evaluate perplexity (on ``ppl_texts``) and MMLU (on ``questions``) for every (strategy, ratio).

    Returns a pandas DataFrame with :data:`COLUMNS`, one row per requested (strategy, ratio) (``ratio``
    is the requested value, ``n_removed = round(ratio * L)`` layers go, ``actual_ratio = n_removed / L``
    is what the curves are drawn against; ``seconds`` is the compute time of the point, the original time
    for a ``cached`` point). ``plans`` overrides ``strategies``/``ratios`` with ready
    ``(strategy, ratio, PrunePlan)`` triples. ``runs_dir`` enables persisted, resumable points (None: in
    memory only). ``model_id`` is added to the automatic model fingerprint in the keys (e.g.
    ``ModelInfo.to_dict()``). ``progress(done, total, label)`` is called after every (plan, evaluation)
    unit; an exception it raises stops the sweep with finished units kept on disk. ``stats``, when given,
    receives a :class:`SweepStats` under ``"stats"``. The model is the same object, unchanged, afterwards.
    """
    import pandas as pd

    from .runs import atomic_write_json, provenance, stable_key
    from .surgery import private_view, pruned

    if ppl_texts is None and questions is None:
        raise LayerLensError("Nothing to evaluate: give perplexity texts, MMLU questions, or both.")
    num_layers = layer_count(model)
    if plans is None:
        plans = make_plans(report, strategies, ratios, num_layers=num_layers, seed=seed)
    if not plans:
        raise LayerLensError("The sweep has no points; give at least one strategy and one ratio.")
    model = private_view(model)  # in-place pruning below must never be seen by other users of `model`
    model.eval()

    tasks: list[Any] = []
    if ppl_texts is not None:
        check_window(model, seq_len)
        tasks.append(PerplexityTask(tokenizer, ppl_texts, seq_len=seq_len, batch_size=ppl_batch_size,
                                    max_windows=max_windows))
    if questions is not None:
        tasks.append(MMLUTask(tokenizer, questions, shots=shots, dev=dev, batch_size=mmlu_batch_size,
                              max_length=harness_max_length(model, tokenizer)))
    identity = model_fingerprint(model) | {"id": dict(model_id or {})}
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

    total = len(units)
    done = sum(u.cached for u in units.values())
    layer_passes = scratch_passes = 0
    held_states: dict[str, int] = {}
    param = next(model.parameters())
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None) or 0

    def persist(unit: _Unit) -> None:
        nonlocal done
        if runs is not None:
            atomic_write_json(_point_path(runs, unit.key), {
                "format": POINT_FORMAT, "key": unit.key, "kind": unit.task.kind,
                "plan": unit.plan.to_dict(), "task": unit.task.identity(), "model": identity,
                "result": _result_to_dict(unit.result), "seconds": unit.seconds,
                "meta": provenance(model=identity["id"].get("model"), revision=identity["id"].get("revision"),
                                   dtype=identity["dtype"], device=identity["device"], data=data_source,
                                   samples=getattr(unit.result, "n_windows", getattr(unit.result, "n", None)),
                                   seq_len=seq_len, seed=seed)})
        done += 1
        if progress is not None:
            progress(done, total, f"{unit.task.kind} {unit.plan.describe()}")

    for ti, task in enumerate(tasks):
        todo = [units[(ti, pk)] for pk in order if not units[(ti, pk)].cached]
        if not todo:
            continue
        per_state = _batch_bytes(task, hidden, param.element_size())
        max_states = int(cache_bytes // per_state) if reuse and per_state > 0 else 0
        steps = schedule_reuse([u.plan for u in todo], max_states)
        states: dict[tuple, list[torch.Tensor]] = {}
        peak = 0
        for step in steps:
            u = todo[step.plan_index]
            ops = plan_ops(u.plan)
            t0 = time.perf_counter()
            with pruned(model, u.plan):
                kept = list(u.plan.kept_layers)
                mods = decoder_layers(model)
                recorded: dict[int, list[torch.Tensor]] = {}
                with _recording({o: mods[kept.index(o)] for o in step.record}, recorded):
                    if step.start > 0:
                        forward = tail_forward(model, kept.index(step.start),
                                               states[state_key(ops, step.start)])
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
        held_states[task.kind] = peak
        states.clear()

    rows = []
    for strategy, target, plan in plans:
        pk = stable_key(effective_plan(plan))
        row: dict[str, Any] = {"strategy": strategy, "ratio": target, "actual_ratio": plan.ratio,
                               "n_removed": plan.n_removed,
                               "removed_layers": ",".join(str(i) for i in plan.removed_layers),
                               "perplexity": float("nan"), "mmlu_accuracy": float("nan"),
                               "mmlu_prob_correct": float("nan"), "seconds": 0.0, "cached": True}
        for ti in range(len(tasks)):
            u = units[(ti, pk)]
            if isinstance(u.result, PerplexityResult):
                row["perplexity"] = u.result.perplexity
            elif isinstance(u.result, MMLUResult):
                row["mmlu_accuracy"] = u.result.accuracy
                row["mmlu_prob_correct"] = u.result.mean_prob_correct
            row["seconds"] += u.seconds
            row["cached"] = row["cached"] and u.cached
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame.attrs["meta"] = provenance(model=identity["id"].get("model"), revision=identity["id"].get("revision"),
                                     dtype=identity["dtype"], device=identity["device"], data=data_source,
                                     model_fingerprint=identity,
                                     tasks=[t.identity() for t in tasks], seq_len=seq_len,
                                     max_windows=max_windows, shots=shots, seed=seed)
    if stats is not None:
        stats["stats"] = SweepStats(units=total, computed=sum(not u.cached for u in units.values()),
                                    cached=sum(u.cached for u in units.values()), peak_states=held_states,
                                    layer_passes=layer_passes, layer_passes_from_scratch=scratch_passes)
    return frame
