"""Sweeps: perplexity and MMLU for every (strategy, ratio), fast and resumable, numbers unchanged.

Three things make a sweep fast without changing any number:

1. **No reload, no copy.** Each plan is applied to the one model in place with
   :func:`layerlens.surgery.pruned`, which restores it exactly afterwards.
2. **Prefix reuse.** A plan whose first affected layer is ``k`` keeps layers ``0..k-1``, so the input of
   layer ``j <= k`` is the same as in the unpruned model. The unpruned pass (ratio 0, needed anyway)
   records the input of a few layers ``j`` for every evaluation batch (CPU, model dtype, within
   ``cache_bytes``); each plan then runs only its tail: the prefix ``0..j-1`` is dropped for the call
   (again with :func:`pruned`) and a forward pre-hook on the first remaining layer substitutes the recorded
   input. Substituting the *layer input* leaves everything before the layers (Gemma's embedding scaling,
   GPT-2/OPT position embeddings) untouched; masks and rotary tables depend only on positions, which
   are unchanged. The recorded layers are chosen by a small dynamic program that maximises the number of
   layer passes saved. Tests check the numbers equal evaluating each pruned model from scratch.
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
import math
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
    harness_max_length,
    model_logits,
    plain_forward,
)

DEFAULT_STRATEGIES = ("bi", "reverse", "sequential", "magnitude")
DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4)
DEFAULT_MAX_WINDOWS = 16
DEFAULT_CACHE_BYTES = 1 << 30
POINT_FORMAT = 1
COLUMNS = ("strategy", "ratio", "target_ratio", "n_removed", "removed_layers", "perplexity", "mmlu_accuracy",
           "mmlu_prob_correct", "seconds", "cached")


@dataclass(frozen=True)
class SweepStats:
    """How the last sweep spent its time (for benchmarks and the UI)."""

    units: int
    computed: int
    cached: int
    capture_passes: int
    cached_layers: dict[str, tuple[int, ...]]
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
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float64)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
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
# Prefix reuse
# --------------------------------------------------------------------------------------------------------


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


class LayerInputCache:
    """The input of chosen decoder layers for every batch of one evaluation (CPU, model dtype)."""

    def __init__(self, layers: Sequence[int]):
        self.layers = tuple(sorted(set(layers)))
        self.states: dict[int, list[torch.Tensor]] = {j: [] for j in self.layers}
        self.nbytes = 0

    @contextlib.contextmanager
    def recording(self, model: torch.nn.Module) -> Iterator[None]:
        mods = decoder_layers(model)
        handles = []

        def make(j: int):
            def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                saved = hidden.detach().to("cpu", copy=True)
                self.states[j].append(saved)
                self.nbytes += saved.numel() * saved.element_size()

            return hook

        for j in self.layers:
            handles.append(mods[j].register_forward_pre_hook(make(j), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def best(self, limit: int) -> int:
        """The deepest recorded layer ``<= limit`` (0: none, run the whole model)."""
        usable = [j for j in self.layers if j <= limit]
        return max(usable) if usable else 0

    def tail_forward(self, model: torch.nn.Module, j: int) -> Forward:
        """A forward for the model *as it is now* (pruned, with layers ``0..j-1`` intact) that runs only
        layers ``j..``, starting from the recorded input of original layer ``j``."""
        from .plans import PrunePlan
        from .surgery import pruned

        states = self.states[j]

        def forward(index: int, batch: EvalBatch) -> torch.Tensor:
            n = layer_count(model)
            prefix = PrunePlan(n, "remove", remove=tuple(range(j)), strategy="manual")
            with pruned(model, prefix):
                first = decoder_layers(model)[0]
                cached = states[index]
                device = next(model.parameters()).device

                def pre(_module: torch.nn.Module, args: tuple, kwargs: dict):
                    return _replace_hidden(args, kwargs, cached.to(device))

                handle = first.register_forward_pre_hook(pre, with_kwargs=True)
                try:
                    return model_logits(model, batch)
                finally:
                    handle.remove()

        return forward


def choose_cached_layers(limits: Sequence[int], max_layers: int) -> tuple[int, ...]:
    """At most ``max_layers`` layer indices S maximising sum over plans of max{j in S, j <= limit}.

    ``limits``: for each plan, the deepest layer whose input it may reuse. Exact dynamic program over the
    distinct limits (a 1-D facility location), small: one entry per plan.
    """
    cands = sorted({x for x in limits if x > 0})
    if not cands or max_layers < 1:
        return ()
    m = min(max_layers, len(cands))

    n = len(cands)
    # table[lo][hi]: plans served by cands[lo] when the next chosen candidate is cands[hi] (hi = n: none)
    table = [[sum(cands[lo] for x in limits if cands[lo] <= x < (cands[hi] if hi < n else math.inf))
              for hi in range(n + 1)] for lo in range(n)]

    def gain(lo: int, hi: int) -> int:
        return table[lo][hi]

    # best[c][r]: best total for candidates >= c when cands[c] is chosen and r more may be chosen after it
    best = [[0] * (m + 1) for _ in range(n)]
    nxt: list[list[int | None]] = [[None] * (m + 1) for _ in range(n)]
    for c in range(n - 1, -1, -1):
        for r in range(m + 1):
            best[c][r] = gain(c, n)
            if r > 0:
                for d in range(c + 1, n):
                    v = gain(c, d) + best[d][r - 1]
                    if v > best[c][r]:
                        best[c][r], nxt[c][r] = v, d
    start = max(range(n), key=lambda c: (best[c][m - 1], -c))
    chosen, c, r = [], start, m - 1
    while c is not None:
        chosen.append(cands[c])
        c, r = nxt[c][r], r - 1
    return tuple(chosen)


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

    Returns a pandas DataFrame with :data:`COLUMNS` (``ratio`` is the actual fraction of layers removed,
    ``target_ratio`` the requested one; ``seconds`` is the compute time of the point, the original time
    for a ``cached`` point). ``plans`` overrides ``strategies``/``ratios`` with ready
    ``(strategy, ratio, PrunePlan)`` triples. ``runs_dir`` enables persisted, resumable points (None: in
    memory only). ``model_id`` is added to the automatic model fingerprint in the keys (e.g.
    ``ModelInfo.to_dict()``). ``progress(done, total, label)`` is called after every (plan, evaluation)
    unit; an exception it raises stops the sweep with finished units kept on disk. ``stats``, when given,
    receives a :class:`SweepStats` under ``"stats"``. The model is the same object, unchanged, afterwards.
    """
    import pandas as pd

    from .runs import atomic_write_json, provenance, stable_key
    from .surgery import pruned

    if ppl_texts is None and questions is None:
        raise LayerLensError("Nothing to evaluate: give perplexity texts, MMLU questions, or both.")
    num_layers = layer_count(model)
    if plans is None:
        plans = make_plans(report, strategies, ratios, num_layers=num_layers, seed=seed)
    if not plans:
        raise LayerLensError("The sweep has no points; give at least one strategy and one ratio.")
    model_was_training = model.training
    model.eval()

    tasks: list[Any] = []
    if ppl_texts is not None:
        tasks.append(PerplexityTask(tokenizer, ppl_texts, seq_len=seq_len, batch_size=ppl_batch_size,
                                    max_windows=max_windows))
    if questions is not None:
        tasks.append(MMLUTask(tokenizer, questions, shots=shots, dev=dev, batch_size=mmlu_batch_size,
                              max_length=harness_max_length(model, tokenizer)))
    identity = model_fingerprint(model) | {"id": dict(model_id or {})}
    runs = Path(runs_dir) if runs_dir is not None else None

    # Unique effective plans, baseline (no change) first.
    unique: dict[str, Any] = {}
    for _, _, plan in plans:
        unique.setdefault(stable_key(effective_plan(plan)), plan)
    order = sorted(unique, key=lambda k: first_affected_layer(unique[k]) < num_layers)
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
    capture_passes = layer_passes = scratch_passes = 0
    chosen_layers: dict[str, tuple[int, ...]] = {}
    param = next(model.parameters())
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None) or 0

    def persist(unit: _Unit) -> None:
        nonlocal done
        if runs is not None:
            atomic_write_json(_point_path(runs, unit.key), {
                "format": POINT_FORMAT, "key": unit.key, "kind": unit.task.kind,
                "plan": unit.plan.to_dict(), "task": unit.task.identity(), "model": identity,
                "result": _result_to_dict(unit.result), "seconds": unit.seconds,
                "meta": provenance(model=identity.get("id", {}).get("model"), dtype=identity["dtype"],
                                   device=identity["device"], seq_len=seq_len, seed=seed)})
        done += 1
        if progress is not None:
            progress(done, total, f"{unit.task.kind} {unit.plan.describe()}")

    try:
        for ti, task in enumerate(tasks):
            todo = [units[(ti, pk)] for pk in order if not units[(ti, pk)].cached]
            if not todo:
                continue
            base = [u for u in todo if first_affected_layer(u.plan) >= num_layers]
            rest = [u for u in todo if first_affected_layer(u.plan) < num_layers]
            limits = [min(first_affected_layer(u.plan), u.plan.num_layers_after - 1) for u in rest]
            per_layer = _batch_bytes(task, hidden, param.element_size())
            max_layers = int(cache_bytes // per_layer) if reuse and per_layer > 0 else 0
            layers = choose_cached_layers(limits, max_layers)
            saving = sum(max([j for j in layers if j <= x], default=0) for x in limits)
            if not base and saving <= num_layers:  # a capture pass alone would cost more than it saves
                layers = ()
            cache = LayerInputCache(layers)
            chosen_layers[task.kind] = layers
            if base or layers:
                t0 = time.perf_counter()
                with cache.recording(model):
                    result = task.run(plain_forward(model))
                capture_passes += 1
                layer_passes += num_layers
                scratch_passes += num_layers * len(base)
                for u in base:
                    u.result, u.seconds = result, time.perf_counter() - t0
                    persist(u)
            for u in rest:
                t0 = time.perf_counter()
                j = cache.best(min(first_affected_layer(u.plan), u.plan.num_layers_after - 1))
                with pruned(model, u.plan):
                    forward = cache.tail_forward(model, j) if j > 0 else plain_forward(model)
                    u.result = task.run(forward)
                u.seconds = time.perf_counter() - t0
                layer_passes += u.plan.num_layers_after - j
                scratch_passes += u.plan.num_layers_after
                persist(u)
            del cache
    finally:
        model.train(model_was_training)

    rows = []
    for strategy, target, plan in plans:
        pk = stable_key(effective_plan(plan))
        row: dict[str, Any] = {"strategy": strategy, "ratio": plan.ratio, "target_ratio": target,
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
    frame.attrs["meta"] = provenance(model=identity.get("id", {}).get("model"), model_fingerprint=identity,
                                     tasks=[t.identity() for t in tasks], seq_len=seq_len,
                                     max_windows=max_windows, shots=shots, seed=seed)
    if stats is not None:
        stats["stats"] = SweepStats(units=total, computed=sum(not u.cached for u in units.values()),
                                    cached=sum(u.cached for u in units.values()),
                                    capture_passes=capture_passes, cached_layers=chosen_layers,
                                    layer_passes=layer_passes, layer_passes_from_scratch=scratch_passes)
    return frame
