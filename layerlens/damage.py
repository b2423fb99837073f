"""Leave-one-out damage: what removing each layer (or attention / MLP sublayer) alone really costs.

For every unit -- a decoder layer, and with ``sublayers=True`` every attention and every MLP sublayer --
:func:`leave_one_out` measures the held-out perplexity and the mean token KL(original || pruned) of the
model with that unit alone removed (ShortGPT Figure 3). This is the ground truth the redundancy metrics
(BI, magnitude, cosine, CKA, attention/MLP BI) are proxies for; :func:`metric_correlations` says how well
each one predicts it (Spearman and Kendall tau-b against the perplexity increase).

Prefix reuse (as in :mod:`layerlens.sweep`): removing unit ``i`` leaves every state below layer ``i``
unchanged, so one pass of the original records the input of every layer and each removal runs only its
tail from the recorded input of layer ``i`` (:func:`layerlens.prefix_reuse.tail_forward`): ``L + L(L-1)/2``
layer passes instead of ``L(L-1)`` for the whole-layer table.

Perplexity, KL and top-1 agreement are :class:`layerlens.evaluation.PerplexityTask`'s own code path: the
reference pass keeps the task's reference (the input of the output head per batch, ``tokens x hidden``
in the model dtype, see :meth:`~layerlens.evaluation.PerplexityTask.keep_reference`), and every removal's
run of the task compares its logits to it (mean token KL(original || pruned) in nats).

Every unit's result is persisted under ``runs_dir/damage/units/<key>.json`` (key: model fingerprint, the
task's exact tokens, the effective plan and the reference model), so a rerun skips finished units and an
interrupted run resumes.

:func:`greedy_order` / :func:`build_oracle`: the "oracle" strategy -- remove, one at a time, the layer
whose removal hurts perplexity least given the layers already removed (each step is a leave-one-out table
of the current pruned model, with the same prefix reuse). It is the upper reference the metric strategies
are judged against.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import decoder_layers, layer_count
from .errors import LayerLensError, PlanError
from .evaluation import (
    DEFAULT_PPL_BATCH,
    DEFAULT_SEQ_LEN,
    EvalBatch,
    PerplexityTask,
    ProgressFn,
    check_window,
    plain_forward,
)
from .plans import PrunePlan
from .plans.ranking import layer_count_of
from .prefix_reuse import recording, tail_forward
from .runs import atomic_write_json, model_fingerprint, stable_key
from .surgery import private_view, pruned

UNIT_FORMAT = 1
DEFAULT_DAMAGE_WINDOWS = 8
KINDS = ("layer", "attn", "mlp")
# metric -> (unit kind it describes, expected sign of its correlation with damage: +1 when a HIGH value
# means an important unit (BI, magnitude), -1 when a high value means a redundant one (similarities))
METRICS: dict[str, tuple[str, int]] = {
    "bi": ("layer", 1), "magnitude": ("layer", 1), "cosine": ("layer", -1), "cka": ("layer", -1),
    "attn_bi": ("attn", 1), "attn_magnitude": ("attn", 1), "mlp_bi": ("mlp", 1), "mlp_magnitude": ("mlp", 1),
}
METRIC_LABELS = {"bi": "Block Influence", "magnitude": "Relative Magnitude", "cosine": "cosine to next layer",
                 "cka": "CKA to next layer", "attn_bi": "attention BI", "attn_magnitude": "attention magnitude",
                 "mlp_bi": "MLP BI", "mlp_magnitude": "MLP magnitude",
                 "sublayer_bi": "sublayer BI (attention + MLP pooled)"}


def sublayer_plans_available() -> bool:
    """Whether this version's :class:`PrunePlan` can drop attention / MLP sublayers."""
    fields = {f.name for f in dataclasses.fields(PrunePlan)}
    return {"drop_attn", "drop_mlp"} <= fields


@dataclass(frozen=True)
class Unit:
    """One removable unit: a whole decoder layer, or its attention or MLP sublayer (0-based original index)."""

    kind: str
    index: int

    def label(self) -> str:
        return {"layer": "layer", "attn": "attention of layer", "mlp": "MLP of layer"}[self.kind] + f" {self.index}"


def units_of(num_layers: int, sublayers: bool = False) -> list[Unit]:
    out = [Unit("layer", i) for i in range(num_layers)]
    if sublayers:
        out += [Unit(k, i) for k in ("attn", "mlp") for i in range(num_layers)]
    return out


def _base_fields(base: PrunePlan) -> dict[str, tuple[int, ...]]:
    return {"remove": tuple(base.remove), "drop_attn": tuple(getattr(base, "drop_attn", ())),
            "drop_mlp": tuple(getattr(base, "drop_mlp", ()))}


def unit_plan(base: PrunePlan, unit: Unit) -> PrunePlan:
    """``base`` with ``unit`` removed too (a plan of the original model)."""
    f = _base_fields(base)
    key = {"layer": "remove", "attn": "drop_attn", "mlp": "drop_mlp"}[unit.kind]
    if unit.kind != "layer" and not sublayer_plans_available():
        raise LayerLensError("Sublayer damage needs plans that drop attention/MLP sublayers (PrunePlan.drop_attn"
                             " / drop_mlp), which this version lacks; leave out `sublayers`.")
    f[key] = tuple(sorted({*f[key], unit.index}))
    extra = {k: v for k, v in f.items() if k != "remove" and v}
    return PrunePlan(base.num_layers, "remove", remove=f["remove"], strategy="manual", **extra)


def _plan_identity(plan: PrunePlan) -> dict[str, Any]:
    return {"num_layers": plan.num_layers, **{k: list(v) for k, v in _base_fields(plan).items()}}


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitDamage:
    """Perplexity (and mean token KL to the reference, None when not computed) with ``unit`` removed."""

    unit: Unit
    ppl: float
    nll: float
    kl: float | None
    seconds: float
    cached: bool = False
    top1: float | None = None  # top-1 agreement with the reference (None when KL was not computed)

    def to_dict(self, baseline_ppl: float) -> dict[str, Any]:
        return {"index": self.unit.index, "ppl": self.ppl, "kl": self.kl, "ppl_increase": self.ppl - baseline_ppl,
                "top1_agreement": self.top1, "nll": self.nll, "seconds": round(self.seconds, 4), "cached": self.cached}


@dataclass(frozen=True)
class DamageStats:
    """How the run spent its work: layer passes run vs evaluating every pruned model from scratch."""

    computed: int
    cached: int
    layer_passes: int
    layer_passes_from_scratch: int
    seconds: float


@dataclass(frozen=True)
class DamageResult:
    baseline_ppl: float
    baseline_nll: float
    units: tuple[UnitDamage, ...]
    task: dict[str, Any]
    stats: DamageStats

    def of(self, kind: str) -> list[UnitDamage]:
        return sorted((u for u in self.units if u.unit.kind == kind), key=lambda u: u.unit.index)

    def increase(self, kind: str) -> np.ndarray:
        return np.array([u.ppl - self.baseline_ppl for u in self.of(kind)], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"baseline_ppl": self.baseline_ppl, "baseline_nll": self.baseline_nll,
                             "layers": [u.to_dict(self.baseline_ppl) for u in self.of("layer")]}
        for kind in ("attn", "mlp"):
            if self.of(kind):
                d[kind] = [u.to_dict(self.baseline_ppl) for u in self.of(kind)]
        d["stats"] = dataclasses.asdict(self.stats)
        d["task"] = dict(self.task)
        return d


# --------------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------------


def _unit_path(runs: Path, key: str) -> Path:
    return runs / "damage" / "units" / f"{key}.json"


def _read_unit(path: Path, need_kl: bool) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("format") != UNIT_FORMAT or "ppl" not in obj:
        return None
    if need_kl and obj.get("kl") is None:
        return None
    return obj


# --------------------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------------------


class WindowTask(PerplexityTask):
    """A perplexity task over given ``[n, W]`` token windows (e.g. calibration tokens for the oracle)."""

    def __init__(self, windows: torch.Tensor, batch_size: int = DEFAULT_PPL_BATCH):  # noqa: D107
        if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
            raise LayerLensError("The damage windows must be at least one window of at least 2 tokens.")
        self.windows = windows.long()
        self.seq_len, self.max_windows, self.kl, self.reference = int(windows.shape[1]), None, False, None
        self.batches = [EvalBatch(w) for w in self.windows.split(batch_size)]


def windows_from_token_lists(token_lists: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """Calibration token lists joined into one stream and cut into windows of ``width`` tokens (default:
    the longest list; the tail is dropped, or the whole stream is one window when shorter than that)."""
    stream = [int(t) for toks in token_lists for t in toks]
    width = int(width or max((len(t) for t in token_lists), default=0))
    if len(stream) < 2 or width < 2:
        raise PlanError("No calibration tokens were given; pass at least one text of two tokens or more.")
    n = len(stream) // width
    if n == 0:
        return torch.tensor([stream], dtype=torch.long)
    return torch.tensor(stream[: n * width], dtype=torch.long).view(n, width)


def _start(base: PrunePlan, unit: Unit) -> int:
    """The original layer whose recorded input (in the base model) the unit's tail starts from."""
    kept = list(base.kept_layers)
    if unit.index not in kept:
        raise PlanError(f"Layer {unit.index} is already removed by the base plan.")
    if unit.kind == "layer" and kept[-1] == unit.index:
        if len(kept) == 1:
            raise PlanError("Removing the only remaining layer leaves no model.")
        return kept[-2]  # the last kept layer has no successor to feed: start one layer earlier
    return unit.index


def leave_one_out(model: torch.nn.Module, tokenizer: Any = None, texts: Any = None, *,
                  task: PerplexityTask | None = None, units: Sequence[Unit] | None = None,
                  sublayers: bool = False, base: PrunePlan | None = None,
                  seq_len: int = DEFAULT_SEQ_LEN, max_windows: int | None = DEFAULT_DAMAGE_WINDOWS,
                  batch_size: int = DEFAULT_PPL_BATCH, kl: bool = True, reuse: bool = True,
                  runs_dir: str | Path | None = None, model_id: Mapping[str, Any] | None = None,
                  progress: ProgressFn | None = None) -> DamageResult:
    """Perplexity and KL with each unit alone removed (on top of ``base``, default nothing removed).

    The perplexity windows come from ``texts`` (``seq_len``, ``max_windows``, ``batch_size`` as in
    :func:`layerlens.evaluation.perplexity`) or a ready ``task``. ``units`` default: every layer, plus every
    attention and MLP sublayer with ``sublayers=True``. KL is against the ``base`` model (the original when
    no base is given). ``reuse=False`` evaluates every pruned model from scratch (same numbers, for
    benchmarks). ``runs_dir`` persists each finished unit and reads finished ones back. ``progress(done,
    total, label)`` after every unit; an exception it raises stops the run with finished units kept. The
    model is unchanged afterwards.
    """
    t_start = time.perf_counter()
    num_layers = layer_count(model)
    base = base if base is not None else PrunePlan(num_layers, "remove", strategy="manual")
    if base.method != "remove" or base.num_layers != num_layers:
        raise PlanError(f"The base plan must remove layers of this {num_layers}-layer model.")
    if task is None:
        if tokenizer is None or texts is None:
            raise LayerLensError("leave_one_out needs perplexity texts (with the tokenizer) or a ready task.")
        check_window(model, seq_len)
        task = PerplexityTask(tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows)
    if kl and not hasattr(task, "keep_reference"):
        raise LayerLensError("This version's perplexity evaluation cannot compute KL; pass `kl=False`.")
    gone = set(base.removed_layers)
    units = [u for u in (units if units is not None else units_of(num_layers, sublayers)) if u.index not in gone]
    plans = {u: unit_plan(base, u) for u in units}  # validates (and refuses sublayers without support) early
    model = private_view(model)
    model.eval()

    runs = Path(runs_dir) if runs_dir is not None else None
    identity = model_fingerprint(model) | {"id": dict(model_id or {})}
    tid = {k: v for k, v in task.identity().items() if k != "kl"}  # KL or not, the same windows
    ref_id = _plan_identity(base)

    def key_of(plan: PrunePlan) -> str:
        return stable_key({"format": UNIT_FORMAT, "model": identity, "task": tid, "plan": _plan_identity(plan),
                           "reference": ref_id})

    done: dict[Unit | None, UnitDamage] = {}
    for u in [None, *units]:
        saved = _read_unit(_unit_path(runs, key_of(plans[u] if u else base)), kl and u is not None) if runs else None
        if saved is not None:
            done[u] = UnitDamage(u or Unit("layer", -1), float(saved["ppl"]), float(saved["nll"]),
                                 saved.get("kl"), float(saved.get("seconds", 0.0)), cached=True,
                                 top1=saved.get("top1_agreement"))
    todo = [u for u in units if u not in done]
    total, finished = len(units), len(units) - len(todo)
    passes = scratch = 0

    def persist(u: Unit | None, plan: PrunePlan, res: Any, seconds: float) -> UnitDamage:
        nonlocal finished
        kl_value, top1 = getattr(res, "kl", None), getattr(res, "top1_agreement", None)
        ud = UnitDamage(u or Unit("layer", -1), res.perplexity, res.nll, kl_value, seconds, top1=top1)
        if runs is not None:
            key = key_of(plan)
            atomic_write_json(_unit_path(runs, key), {
                "format": UNIT_FORMAT, "key": key, "unit": None if u is None else dataclasses.asdict(u),
                "plan": plan.to_dict(), "reference": ref_id, "task": tid, "model": identity,
                "ppl": res.perplexity, "nll": res.nll, "n_tokens": res.n_tokens, "kl": kl_value,
                "top1_agreement": top1, "seconds": seconds})
        if u is not None:
            finished += 1
            if progress is not None:
                progress(finished, total, u.label())
        return ud

    if todo or None not in done:
        # the reference pass: the base model, recording the input of every layer a tail starts from and
        # (for KL) what the evaluation needs to recompute its logits (the task's kept reference)
        t0 = time.perf_counter()
        states: dict[int, list[torch.Tensor]] = {}
        kept = list(base.kept_layers)
        starts = {_start(base, u) for u in todo} if reuse else set()
        task.kl, task.reference = bool(kl and todo), None
        with pruned(model, base):
            mods = decoder_layers(model)
            with recording({o: mods[kept.index(o)] for o in sorted(starts)}, states):
                if task.kl:
                    ref = task.keep_reference(model)
                    device = next(model.parameters()).device
                    res = task.run(lambda i, _b: ref.logits(i, device))  # the same logits, the head re-run
                else:
                    res = task.run(plain_forward(model))
        passes += len(kept)
        scratch += len(kept)
        done[None] = persist(None, base, res, time.perf_counter() - t0) if None not in done else done[None]
        # ascending start layer; a state is released once no later unit needs it
        todo.sort(key=lambda u: (_start(base, u), KINDS.index(u.kind)))
        last_use = {s: max(i for i, u in enumerate(todo) if _start(base, u) == s) for s in starts}
        for i, u in enumerate(todo):
            plan = plans[u]
            t0 = time.perf_counter()
            with pruned(model, plan):
                if reuse:
                    start = _start(base, u)
                    skip = kept.index(start)  # layers before `start` are the same in the base and the plan
                    forward = tail_forward(model, skip, states[start])
                    passes += len(plan.kept_layers) - skip
                else:
                    forward = plain_forward(model)
                    passes += len(plan.kept_layers)
                scratch += len(plan.kept_layers)
                res = task.run(forward)
            done[u] = persist(u, plan, res, time.perf_counter() - t0)
            for s in [s for s, last in last_use.items() if last == i]:
                states.pop(s, None)
        task.reference = None  # the kept reference is n_tokens x hidden: not held past this call
    baseline = done.pop(None)
    stats = DamageStats(computed=len(todo), cached=total - len(todo), layer_passes=passes,
                        layer_passes_from_scratch=scratch, seconds=time.perf_counter() - t_start)
    return DamageResult(baseline.ppl, baseline.nll, tuple(done[u] for u in units), tid, stats)


# --------------------------------------------------------------------------------------------------------
# How well each metric predicts the damage
# --------------------------------------------------------------------------------------------------------


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (NaN when either side is constant)."""
    ra, rb = average_ranks(a), average_ranks(b)
    if len(ra) < 2:
        return math.nan
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either ranking corrected; NaN when either side is constant)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), k=1)
    s = float((dx * dy)[iu].sum())
    nx, ny = float((dx[iu] != 0).sum()), float((dy[iu] != 0).sum())
    return s / math.sqrt(nx * ny) if nx > 0 and ny > 0 else math.nan


def metric_values(report: Any, name: str) -> list[float] | None:
    """The per-unit values of metric ``name`` from a report (None when the report lacks it)."""
    if name == "cosine":
        m = report.cosine
        return [float(m[i][i + 1]) for i in range(report.num_layers)]
    if name == "cka":
        m = report.cka
        return [float(m[i][i + 1]) for i in range(report.num_layers)]
    values = getattr(report, name, None)
    if values is None and isinstance(report, Mapping):
        values = report.get(name)
    return None if values is None else [float(v) for v in values]


def _nan_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _pair(values: Sequence[float], target: Sequence[float]) -> dict[str, float | None]:
    return {"spearman": _nan_none(spearman(values, target)), "kendall": _nan_none(kendall(values, target))}


def metric_correlations(result: DamageResult, report: Any) -> dict[str, dict[str, Any]]:
    """Per metric: Spearman and Kendall tau-b between its values and the measured perplexity increase of
    the units it describes (``spearman_kl``/``kendall_kl``: against the KL instead, when measured);
    ``expected_sign`` says which sign means "predicts the damage" (+1 for BI and magnitudes, -1 for the
    similarities). ``sublayer_bi`` pools attention and MLP BI over all 2L sublayers."""
    out: dict[str, dict[str, Any]] = {}
    pooled_v: list[float] = []
    pooled_d: list[float] = []
    pooled_k: list[float | None] = []
    for name, (kind, sign) in METRICS.items():
        rows = result.of(kind)
        values = metric_values(report, name)
        if not rows or values is None:
            continue
        v = [values[r.unit.index] for r in rows]
        d = [r.ppl - result.baseline_ppl for r in rows]
        entry: dict[str, Any] = {"units": kind, "n": len(rows), "expected_sign": sign, **_pair(v, d)}
        kls = [r.kl for r in rows]
        if all(k is not None for k in kls):
            entry |= {f"{k}_kl": val for k, val in _pair(v, kls).items()}  # type: ignore[arg-type]
        out[name] = entry
        if name in ("attn_bi", "mlp_bi"):
            pooled_v += v
            pooled_d += d
            pooled_k += kls
    if "attn_bi" in out and "mlp_bi" in out:
        entry = {"units": "sublayer", "n": len(pooled_v), "expected_sign": 1, **_pair(pooled_v, pooled_d)}
        if all(k is not None for k in pooled_k):
            entry |= {f"{k}_kl": val for k, val in _pair(pooled_v, pooled_k).items()}  # type: ignore[arg-type]
        out["sublayer_bi"] = entry
    return out


def best_predictor(correlations: Mapping[str, Mapping[str, Any]], units: str | None = "layer") -> tuple[str, float] | None:
    """The metric whose ranking agrees best with the measured damage (highest sign-adjusted Spearman among
    the metrics of ``units``; None for all), with that value; None when nothing was measured."""
    best: tuple[str, float] | None = None
    for name, c in correlations.items():
        if units is not None and c.get("units") != units or c.get("spearman") is None:
            continue
        score = float(c["expected_sign"]) * float(c["spearman"])
        if best is None or score > best[1]:
            best = (name, score)
    return best


# --------------------------------------------------------------------------------------------------------
# The oracle strategy: greedy by measured damage
# --------------------------------------------------------------------------------------------------------

_ORDERS: dict[str, list[int]] = {}  # (model, windows) -> the greedy removal order found so far


def greedy_order(model: torch.nn.Module, task: PerplexityTask, k: int, *,
                 progress: ProgressFn | None = None, runs_dir: str | Path | None = None) -> list[int]:
    """The first ``k`` layers removed greedily: each step removes the layer whose removal (on top of the
    ones already removed) gives the lowest perplexity on ``task`` (ties: lower index). Memoised per model
    and windows, so a sweep's ratios share one greedy path; with ``runs_dir`` every measured removal is
    persisted too, so an interrupted or repeated greedy (another process) reads them back."""
    num_layers = layer_count(model)
    if not 0 <= k < num_layers:
        raise PlanError(f"The oracle can remove 0..{num_layers - 1} layers of this model, not {k}.")
    memo = stable_key({"model": model_fingerprint(model), "task": task.identity()})
    order = _ORDERS.setdefault(memo, [])
    while len(order) < k:
        base = PrunePlan(num_layers, "remove", remove=tuple(order), strategy="manual")
        step = len(order)

        def tick(done: int, total: int, label: str, step: int = step) -> None:
            if progress is not None:
                progress(step * num_layers + done, k * num_layers, f"step {step + 1}/{k}: {label}")

        res = leave_one_out(model, task=task, base=base, kl=False, progress=tick, runs_dir=runs_dir)
        best = min(res.of("layer"), key=lambda u: (u.ppl if math.isfinite(u.ppl) else math.inf, u.unit.index))
        order.append(best.unit.index)
    return list(order[:k])


def build_oracle(req: Any) -> PrunePlan:
    """Registry builder of the ``oracle`` strategy (needs the model, ``tokenizer`` and ``token_lists``;
    optional ``runs_dir`` persists every measured removal, ``batch_size``, ``progress``)."""
    k, params = layer_count_of(req)
    tokenizer = req.option("tokenizer")
    token_lists = req.option("token_lists")
    batch_size = int(req.option("batch_size", DEFAULT_PPL_BATCH) or DEFAULT_PPL_BATCH)
    progress = req.option("progress")
    runs_dir = req.option("runs_dir")
    req.no_extra()
    if req.model is None or token_lists is None:
        raise PlanError("Strategy 'oracle' measures the damage of each removal with forward passes; pass the "
                        "model and calibration tokens (model=, tokenizer=, token_lists=).")
    del tokenizer  # the windows are the calibration tokens themselves
    task = WindowTask(windows_from_token_lists(token_lists), batch_size=batch_size)
    order = greedy_order(req.model, task, k, progress=progress, runs_dir=runs_dir)
    params = params | {"order": order}
    return PrunePlan(req.num_layers, "remove", remove=tuple(order), strategy=req.strategy, params=params)




def damage_document(result: DamageResult, report: Any = None, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``damage.json`` document: ``baseline_ppl``, ``layers`` (and ``attn``/``mlp``), ``correlations``
    against ``report``'s metrics (empty without a report), ``best_predictor`` and ``meta``."""
    doc = result.to_dict()
    corr = metric_correlations(result, report) if report is not None else {}
    best = best_predictor(corr)
    doc["correlations"] = corr
    doc["best_predictor"] = None if best is None else {"metric": best[0], "label": METRIC_LABELS.get(best[0], best[0]),
                                                      "signed_spearman": best[1]}
    doc["meta"] = dict(meta or {})
    return doc
