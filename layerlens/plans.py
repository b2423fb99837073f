"""Pruning plans: which layers go and how, as frozen, JSON-round-trippable dataclasses.

A :class:`PrunePlan` either *removes* layers (``method="remove"``) or *merges* groups of consecutive
layers, each group collapsing into one layer that sits at the group's lowest index, the *base*
(``method="merge"``). Indices are 0-based everywhere and always recorded explicitly.

Strategies (:func:`make_plan`):

* ``bi`` -- remove the k layers with the smallest Block Influence (ShortGPT); ties -> lower index.
* ``magnitude`` -- the k smallest Relative Magnitude; ``reverse`` -- the last k; ``sequential`` -- the
  first k; ``random`` -- ``random.Random(seed).sample(range(L), k)`` (the ShortGPT baselines).
* ``block`` -- the n contiguous layers with the smallest ``block_distance[n-1][i]`` (Gromov et al.).
* ``streamline`` -- the n contiguous layers whose input h_i and output h_{i+n} have the highest
  ``cosine[i][i+n]`` (LLM-Streamline); see :mod:`layerlens.streamline` for the trained replacement.
* ``slm`` -- sliding layer merging (arXiv 2502.19159), :func:`slm_plan` (from the report, instant)
  or :func:`slm_output_plan` (the reference code's functional test, forward passes).
* ``laco`` -- Layer Collapse, :func:`laco_plan` (forward passes).
* ``manual`` -- the caller's own indices.

Ratio -> count: ``k = round(ratio * L)`` with Python's ``round`` (half to even), so the plan's
:attr:`PrunePlan.ratio` is the *actual* ratio ``k / L``; the requested one is kept in
``params["target_ratio"]``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PlanError

if TYPE_CHECKING:
    from .report import LayerReport

Progress = Callable[[int, int, str], None]

STRATEGIES = (
    "bi",
    "reverse",
    "sequential",
    "magnitude",
    "random",
    "block",
    "streamline",
    "slm",
    "laco",
    "manual",
)
METHODS = ("remove", "merge")
MERGE_FORMULAS = ("task_vector", "keep_top", "mean")
SLM_CRITERIA = ("cka", "cosine", "output")
REPORT_STRATEGIES = ("bi", "magnitude", "block", "streamline", "slm")


def _as_index(x: Any, what: str) -> int:
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise PlanError(f"Layer index {x!r} in {what} is not an integer; give 0-based integer indices.")
    return int(x.__index__())


@dataclass(frozen=True)
class PrunePlan:
    """Which layers of an ``num_layers``-layer model disappear, and how (see module docstring).

    * ``remove``: 0-based indices to delete (``method="remove"``); stored sorted.
    * ``merge``: groups of consecutive 0-based indices (``method="merge"``); each group becomes ONE layer
      at the group's lowest index (the base). Stored sorted.
    * ``merge_formula`` (for attention + MLP parameters; norms always keep the base's):
      ``task_vector`` -- theta_base + sum_{j != base} (theta_j - theta_base), from the ORIGINAL weights
      (the SLM/LaCo papers' formula); ``keep_top`` -- the group's top layer's weights, which is what the
      published SLM and LaCo scripts actually compute (they update the base in place inside that sum);
      ``mean`` -- the plain average over the group.

    Construction validates (raises :class:`PlanError` with one sentence) and normalises lists to tuples.
    """

    num_layers: int
    method: str
    remove: tuple[int, ...] = ()
    merge: tuple[tuple[int, ...], ...] = ()
    merge_formula: str = "task_vector"
    strategy: str = "manual"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise PlanError(f"num_layers must be an integer (got {self.num_layers!r}).")
        if self.method not in METHODS:
            raise PlanError(f"Unknown plan method '{self.method}'; use 'remove' or 'merge'.")
        if isinstance(self.remove, (str, bytes)) or isinstance(self.merge, (str, bytes)):
            raise PlanError("remove and merge must be lists of integer indices, not strings.")
        remove = tuple(_as_index(i, "remove") for i in self.remove)
        groups = []
        for g in self.merge:
            if isinstance(g, (str, bytes)) or not isinstance(g, Sequence):
                raise PlanError(f"Merge group {g!r} is not a list of consecutive layer indices.")
            groups.append(tuple(_as_index(i, "a merge group") for i in g))
        object.__setattr__(self, "remove", remove)
        object.__setattr__(self, "merge", tuple(groups))
        if not isinstance(self.params, dict):
            raise PlanError("params must be a dict of strategy parameters.")
        object.__setattr__(self, "params", _jsonable(self.params))  # JSON-safe, so round trips compare equal
        self.validate()
        object.__setattr__(self, "remove", tuple(sorted(remove)))
        object.__setattr__(self, "merge", tuple(sorted(tuple(sorted(g)) for g in groups)))

    def __hash__(self) -> int:
        return hash(self.to_json())

    def validate(self) -> None:
        """Raise :class:`PlanError` (one clear sentence) unless the plan is usable."""
        n = self.num_layers
        if n < 1:
            raise PlanError(f"The plan is for an empty model ({n} layers); a model needs at least one layer.")
        if self.method not in METHODS:
            raise PlanError(f"Unknown plan method '{self.method}'; use 'remove' or 'merge'.")
        if self.merge_formula not in MERGE_FORMULAS:
            raise PlanError(
                f"Unknown merge formula '{self.merge_formula}'; use one of {', '.join(MERGE_FORMULAS)}."
            )
        if self.strategy not in STRATEGIES:
            raise PlanError(f"Unknown strategy '{self.strategy}'; use one of {', '.join(STRATEGIES)}.")
        if self.method == "remove" and self.merge:
            raise PlanError("A 'remove' plan cannot also have merge groups; use method='merge' for merges.")
        if self.method == "merge" and self.remove:
            raise PlanError("A 'merge' plan cannot also remove layers; make two plans instead.")
        seen: set[int] = set()
        for i in self.remove:
            if not 0 <= i < n:
                raise PlanError(f"Layer index {i} is out of range for a {n}-layer model (valid: 0..{n - 1}).")
            if i in seen:
                raise PlanError(f"Layer index {i} is listed twice; give each layer once.")
            seen.add(i)
        for g in self.merge:
            if len(g) < 2:
                raise PlanError(
                    f"Merge group {list(g)} has fewer than two layers; a merge needs two or more."
                )
            for i in g:
                if not 0 <= i < n:
                    raise PlanError(
                        f"Layer index {i} in merge group {list(g)} is out of range for a "
                        f"{n}-layer model (valid: 0..{n - 1})."
                    )
            if len(set(g)) != len(g):
                raise PlanError(f"Merge group {list(g)} lists a layer twice; give each layer once.")
            s = sorted(g)
            if s != list(range(s[0], s[0] + len(s))):
                raise PlanError(
                    f"Merge group {list(g)} is not consecutive; a group must be adjacent layers "
                    "like [4, 5, 6]."
                )
            if seen & set(g):
                raise PlanError(
                    f"Merge group {list(g)} overlaps another group; each layer can be in one group only."
                )
            seen.update(g)
        removed = len(self.remove) if self.method == "remove" else sum(len(g) - 1 for g in self.merge)
        if removed >= n:
            raise PlanError(f"The plan removes all {n} layers; keep at least one layer.")
        if not 0.0 <= removed / n < 1.0:  # pragma: no cover - implied by the checks above
            raise PlanError(f"The pruning ratio {removed / n:.3f} is outside [0, 1).")

    # -- derived views -------------------------------------------------------------------------------
    @property
    def removed_layers(self) -> tuple[int, ...]:
        """Every layer index that disappears (for merges: each group's layers except its base)."""
        if self.method == "remove":
            return self.remove
        return tuple(sorted(i for g in self.merge for i in g[1:]))

    @property
    def n_removed(self) -> int:
        return len(self.removed_layers)

    @property
    def ratio(self) -> float:
        """Layers removed / layers of the model (the actual ratio, after rounding to whole layers)."""
        return self.n_removed / self.num_layers

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Original indices of the layers of the pruned model, in order (merge bases included)."""
        gone = set(self.removed_layers)
        return tuple(i for i in range(self.num_layers) if i not in gone)

    @property
    def merge_bases(self) -> dict[int, tuple[int, ...]]:
        """base index -> its whole group."""
        return {g[0]: g for g in self.merge}

    @property
    def layer_map(self) -> dict[int, int | None]:
        """Original index -> index in the pruned model, or None for a layer that disappears."""
        new = {old: j for j, old in enumerate(self.kept_layers)}
        return {i: new.get(i) for i in range(self.num_layers)}

    @property
    def num_layers_after(self) -> int:
        return self.num_layers - self.n_removed

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Fields plus derived ``ratio``, ``n_removed``, ``removed_layers``, ``kept_layers`` (for readers)."""
        return {
            "num_layers": self.num_layers,
            "method": self.method,
            "remove": list(self.remove),
            "merge": [list(g) for g in self.merge],
            "merge_formula": self.merge_formula,
            "strategy": self.strategy,
            "params": _jsonable(self.params),
            "ratio": self.ratio,
            "n_removed": self.n_removed,
            "removed_layers": list(self.removed_layers),
            "kept_layers": list(self.kept_layers),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePlan:
        try:
            return cls(
                num_layers=d["num_layers"],
                method=d.get("method", "remove"),
                remove=tuple(d.get("remove", ())),
                merge=tuple(tuple(g) for g in d.get("merge", ())),
                merge_formula=d.get("merge_formula", "task_vector"),
                strategy=d.get("strategy", "manual"),
                params=dict(d.get("params", {})),
            )
        except (KeyError, TypeError) as exc:
            raise PlanError(
                f"Not a valid pruning plan ({type(exc).__name__}: {exc}); expected the JSON "
                "written by PrunePlan.to_json."
            ) from exc

    @classmethod
    def read(cls, path: str | Path, *, num_layers: int | None = None) -> PrunePlan:
        """A user-given plan file (or a `layerlens prune` output folder), refusing what cannot be replayed."""
        path = Path(path)
        if path.is_dir():
            path = path / "layerlens_plan.json"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"Could not read the plan file '{path}' ({exc.strerror}); check the path.") from exc
        plan = cls.from_json(text)
        if plan.params.get("replacement"):
            raise PlanError(f"The plan in '{path}' replaced layers with a trained layer that a plan cannot "
                            "rebuild; use the pruned model folder it was saved with instead.")
        if num_layers is not None and plan.num_layers != num_layers:
            raise PlanError(f"The plan in '{path}' is for a {plan.num_layers}-layer model but the model has "
                            f"{num_layers} layers.")
        return plan

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"The plan is not valid JSON ({exc.msg}, line {exc.lineno}).") from exc
        if isinstance(obj, dict) and "plan" in obj and "num_layers" not in obj:
            obj = obj["plan"]  # a layerlens_plan.json
        if not isinstance(obj, dict):
            raise PlanError("The plan JSON must be an object with num_layers, method, remove/merge.")
        return cls.from_dict(obj)

    def describe(self) -> str:
        """One line for humans: strategy, what goes, resulting depth."""
        what = (
            f"remove {list(self.remove)}"
            if self.method == "remove"
            else f"merge {[list(g) for g in self.merge]} ({self.merge_formula})"
        )
        return (
            f"{self.strategy}: {what} -> {self.num_layers_after}/{self.num_layers} layers "
            f"(ratio {self.ratio:.3f})"
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def plan_summary(plan: PrunePlan) -> list[dict[str, Any]]:
    """Per original layer (the dashboard's layer strip).

    ``{"layer": i, "status": "kept" | "removed" | "merged", "into": j | None, "new_index": k | None}``:
    every layer of a merge group (its base included) is ``"merged"`` with ``into`` = the group's base
    index in the ORIGINAL numbering; ``new_index`` is the layer's position in the pruned model.
    """
    bases = {i: g[0] for g in plan.merge for i in g}
    lmap = plan.layer_map
    out = []
    for i in range(plan.num_layers):
        if i in bases:
            status, into = "merged", bases[i]
        elif lmap[i] is None:
            status, into = "removed", None
        else:
            status, into = "kept", None
        out.append({"layer": i, "status": status, "into": into, "new_index": lmap[i]})
    return out


# -- helpers ---------------------------------------------------------------------------------------------
def _check_ratio(ratio: float) -> float:
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not math.isfinite(ratio)
        or not 0.0 <= ratio < 1.0
    ):
        raise PlanError(
            f"The pruning ratio {ratio!r} is outside [0, 1); give e.g. 0.25 to remove a quarter "
            "of the layers."
        )
    return float(ratio)


def _check_threshold(threshold: float) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or not -1.0 <= threshold <= 1.0
    ):
        raise PlanError(f"The similarity threshold {threshold!r} is outside [-1, 1]; give e.g. 0.9.")
    return float(threshold)


def ratio_to_count(ratio: float, num_layers: int) -> int:
    """``round(ratio * L)`` (Python's round: half to even); refuses a count that removes every layer."""
    k = round(_check_ratio(ratio) * num_layers)
    if k >= num_layers:
        raise PlanError(
            f"A ratio of {ratio} removes all {num_layers} layers after rounding; use a smaller ratio."
        )
    return k


def _count(ratio: float | None, n: int | None, num_layers: int, strategy: str) -> tuple[int, dict[str, Any]]:
    if (ratio is None) == (n is None):
        raise PlanError(f"Strategy '{strategy}' needs exactly one of a ratio or a layer count n.")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PlanError(f"The layer count n={n!r} must be a non-negative integer.")
        if n >= num_layers:
            raise PlanError(
                f"Removing n={n} layers from a {num_layers}-layer model removes every layer; "
                f"use n <= {num_layers - 1}."
            )
        return n, {"n": n}
    k = ratio_to_count(ratio, num_layers)  # type: ignore[arg-type]
    return k, {"target_ratio": float(ratio)}  # type: ignore[arg-type]


def _key(value: float) -> float:
    """Sort key that puts NaN last (a layer with no measurement is never the 'least important')."""
    return math.inf if value is None or math.isnan(value) else float(value)


def lowest_k(values: Sequence[float], k: int) -> tuple[int, ...]:
    """Indices of the k smallest values; ties -> lower index first; NaN counts as +inf."""
    order = sorted(range(len(values)), key=lambda i: (_key(values[i]), i))
    return tuple(sorted(order[:k]))


def _need_report(strategy: str, report: LayerReport | None) -> LayerReport:
    if report is None:
        raise PlanError(
            f"Strategy '{strategy}' ranks layers by their measured redundancy; run the analysis "
            "first (layerlens analyze) and pass its report."
        )
    return report


def best_block(report: LayerReport, n: int) -> int:
    """Start i of the n-layer block with the smallest block_distance[n-1][i]; ties -> lower i."""
    row = report.block_distance[n - 1]
    cands = range(report.num_layers - n + 1)
    return min(cands, key=lambda i: (_key(row[i]) if i < len(row) else math.inf, i))


def best_streamline_span(report: LayerReport, n: int) -> int:
    """Start i of the n-layer span with the highest cosine(h_i, h_{i+n}); ties -> lower i."""
    cands = range(report.num_layers - n + 1)
    return min(cands, key=lambda i: (-_key_hi(report.cosine[i][i + n]), i))


def _key_hi(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else float(value)


# -- SLM -------------------------------------------------------------------------------------------------
def _slm_groups(
    sim: Callable[[int, int], float], num_layers: int, threshold: float, keep_last: bool
) -> list[tuple[int, ...]]:
    """Sliding merge, top down. ``sim(j, a)`` compares the outputs of layers j < a.

    The anchor starts at the top layer (L-2 with ``keep_last``); the window [j..anchor] grows downward
    while sim(j, anchor) >= threshold; when it stops (or reaches layer 0) the window is committed as one
    group if it has >= 2 layers, and the next anchor is the layer just below the window.
    """
    groups: list[tuple[int, ...]] = []
    anchor = num_layers - 2 if keep_last else num_layers - 1
    while anchor >= 1:
        j = anchor - 1
        while j >= 0 and sim(j, anchor) >= threshold:
            j -= 1
        if anchor - j >= 2:
            groups.append(tuple(range(j + 1, anchor + 1)))
        anchor = j
    return sorted(groups)


def slm_plan(
    report: LayerReport,
    threshold: float | None = None,
    *,
    target_ratio: float | None = None,
    criterion: str = "cka",
    keep_last: bool = True,
    formula: str = "task_vector",
) -> PrunePlan:
    """Sliding layer merging from the report (SLM's "representation" view; instant).

    Similarity of layer j's and layer a's outputs = ``report.cka[j+1][a+1]`` (or ``cosine``), since the
    output of layer i is state h_{i+1}. With ``target_ratio`` instead of ``threshold`` the threshold is
    searched: the plan only changes where the threshold crosses one of the similarity values it compares,
    so every such value is tried (exact, where a bisection would assume the ratio falls monotonically with
    the threshold, which sliding merging does not guarantee) and the plan with the largest ratio <= target
    wins (ties -> the lowest threshold, i.e. what a bisection converges to). ``params["threshold"]`` is
    the threshold used.
    """
    if criterion not in ("cka", "cosine"):
        if criterion == "output":
            raise PlanError(
                "The 'output' criterion needs forward passes; use slm_output_plan(model, ...) "
                "or the CLI with --criterion output."
            )
        raise PlanError(f"Unknown SLM criterion '{criterion}'; use cka, cosine or output.")
    if formula not in MERGE_FORMULAS:
        raise PlanError(f"Unknown merge formula '{formula}'; use one of {', '.join(MERGE_FORMULAS)}.")
    if (threshold is None) == (target_ratio is None):
        raise PlanError("SLM needs exactly one of a similarity threshold or a target ratio.")
    matrix = report.cka if criterion == "cka" else report.cosine
    n = report.num_layers

    def sim(j: int, a: int) -> float:
        v = matrix[j + 1][a + 1]
        return -math.inf if v is None or math.isnan(v) else v

    params: dict[str, Any] = {"criterion": criterion, "keep_last": keep_last}
    if threshold is not None:
        t = _check_threshold(threshold)
    else:
        target = _check_ratio(target_ratio)  # type: ignore[arg-type]
        top = n - 2 if keep_last else n - 1
        values = sorted({sim(j, a) for a in range(1, top + 1) for j in range(a)} - {-math.inf})
        # Only thresholds in [-1, 1] can be replayed; above the largest similarity nothing merges.
        cands: list[float | None] = [v for v in values if -1.0 <= v <= 1.0]
        if not values or values[-1] < 1.0:
            cands.append(math.nextafter(values[-1], math.inf) if values else 1.0)
        best: tuple[int, float | None] | None = None
        for t in cands:  # ascending: the first t reaching a given count is the lowest
            removed = sum(len(g) - 1 for g in _slm_groups(sim, n, t, keep_last))
            if removed / n <= target and (best is None or removed > best[0]):
                best = (removed, t)
        if best is None:  # every valid threshold merges too much (a similarity of exactly 1.0): no merge
            best = (0, None)
        t = best[1]
        params["target_ratio"] = target
    params["threshold"] = t
    groups = _slm_groups(sim, n, t, keep_last) if t is not None else []
    return PrunePlan(
        num_layers=n,
        method="merge",
        merge=tuple(groups),
        merge_formula=formula,
        strategy="slm",
        params=params,
    )


# -- functional criteria (forward passes): SLM 'output' and LaCo ------------------------------------------
class _FinalStates:
    """The original model's final hidden states (after the final norm) on the calibration batches."""

    def __init__(self, model: Any, tokenizer: Any, token_lists: list[list[int]], batch_size: int):
        import torch

        from .data import batches

        if not token_lists:
            raise PlanError("No calibration tokens were given; pass at least one text.")
        self.device = next(model.parameters()).device
        self.batches = list(batches(tokenizer, token_lists, batch_size, self.device))
        with torch.no_grad():
            self.reference = [self._final(model, b) for b in self.batches]

    @staticmethod
    def _final(model: Any, batch: Any) -> Any:
        out = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        return out.last_hidden_state.float()

    def similarity(self, candidate: Any) -> float:
        """Mean over samples of cos(flattened non-pad final states of the original, of the candidate)."""
        import torch

        sims: list[float] = []
        with torch.no_grad():
            for b, ref in zip(self.batches, self.reference, strict=True):
                got = self._final(candidate, b)
                mask = b.attention_mask.bool()
                for row in range(ref.shape[0]):
                    x, y = ref[row][mask[row]].flatten(), got[row][mask[row]].flatten()
                    sims.append(float(torch.nn.functional.cosine_similarity(x, y, dim=0)))
        return sum(sims) / len(sims)


def _merge_plan(
    num_layers: int, groups: Sequence[Sequence[int]], formula: str, strategy: str, params: dict[str, Any]
) -> PrunePlan:
    return PrunePlan(
        num_layers=num_layers,
        method="merge",
        merge=tuple(tuple(g) for g in groups if len(g) > 1),
        merge_formula=formula,
        strategy=strategy,
        params=params,
    )


def slm_output_plan(
    model: Any,
    tokenizer: Any,
    token_lists: list[list[int]],
    threshold: float,
    *,
    keep_last: bool = True,
    formula: str = "task_vector",
    batch_size: int = 8,
    progress: Progress | None = None,
) -> PrunePlan:
    """SLM with the reference script's functional criterion (forward passes; the model is not mutated).

    As in the published code: anchor = top layer (L-2 with ``keep_last``); the window [low..anchor] is
    merged (with the already committed groups above it) and accepted while the mean cosine between the
    original model's final hidden states and the merged model's stays >= ``threshold``; when it fails, the
    window without ``low`` is committed (if >= 2 layers) and ``low`` becomes the next anchor. Differences
    from the script: the merge uses ``formula`` on the original weights (the script's in-place loop is
    ``keep_top``), ``>=`` instead of ``>``, and a window still growing when it reaches layer 0 is committed
    (the script drops it). Similarity: per sample, cosine of the flattened non-pad final states (after the
    final norm), averaged over samples.
    """
    from .adapters import layer_count
    from .surgery import apply_plan, check_mergeable

    t = _check_threshold(threshold)
    if formula not in MERGE_FORMULAS:
        raise PlanError(f"Unknown merge formula '{formula}'; use one of {', '.join(MERGE_FORMULAS)}.")
    check_mergeable(model)
    n = layer_count(model)
    ref = _FinalStates(model, tokenizer, token_lists, batch_size)
    committed: list[tuple[int, ...]] = []
    high = n - 2 if keep_last else n - 1
    total, done = max(high, 1), 0
    trace: list[dict[str, Any]] = []

    def window_ok(low: int, high: int) -> bool:
        plan = _merge_plan(n, [*committed, tuple(range(low, high + 1))], formula, "slm", {})
        s = ref.similarity(apply_plan(model, plan))
        trace.append({"window": [low, high], "similarity": s})
        return s >= t

    while high >= 1:
        low = high - 1
        while low >= 0 and window_ok(low, high):
            low -= 1
            done += 1
            if progress:
                progress(min(done, total), total, f"SLM: window {low + 1}..{high} accepted")
        if high - low >= 2:
            committed.append(tuple(range(low + 1, high + 1)))
        else:
            done += 1
        if progress:
            progress(min(done, total), total, f"SLM: anchor {high} done")
        high = low
    params = {
        "criterion": "output",
        "threshold": t,
        "keep_last": keep_last,
        "samples": len(token_lists),
        "trace": trace,
    }
    return _merge_plan(n, sorted(committed), formula, "slm", params)


def laco_plan(
    model: Any,
    tokenizer: Any,
    token_lists: list[list[int]],
    threshold: float,
    *,
    m: int = 3,
    interval: int = 1,
    lowest: int = 0,
    highest: int | None = None,
    formula: str = "task_vector",
    batch_size: int = 8,
    progress: Progress | None = None,
) -> PrunePlan:
    """Layer Collapse (LaCo, arXiv 2402.11187): merge the ``m`` layers after layer l into l (RDSC).

    Follows the published loop: l starts at ``highest - (m + 1)`` (``highest`` defaults to L-1, so the top
    layer is left alone); the candidate merges current layer l with the next min(m, len-l-1) current
    layers; it is accepted when the mean cosine between the original and the candidate's final hidden
    states is >= ``threshold``, then l -= ``interval``, otherwise l -= 1; stop below ``lowest``. A merged
    layer may be merged again into a lower one, so groups are tracked in original indices and merged from
    the original weights with ``formula`` (for ``keep_top`` this is exactly the published code's result;
    for ``task_vector`` it is the flat formula over the whole group, not a nested one).
    """
    from .adapters import layer_count
    from .surgery import apply_plan, check_mergeable

    t = _check_threshold(threshold)
    if formula not in MERGE_FORMULAS:
        raise PlanError(f"Unknown merge formula '{formula}'; use one of {', '.join(MERGE_FORMULAS)}.")
    n = layer_count(model)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise PlanError(f"LaCo's m (layers merged into each base) must be a positive integer (got {m!r}).")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise PlanError(f"LaCo's interval must be a positive integer (got {interval!r}).")
    highest = n - 1 if highest is None else highest
    if not 0 <= lowest <= highest < n:
        raise PlanError(
            f"LaCo's layer range lowest={lowest}, highest={highest} must satisfy "
            f"0 <= lowest <= highest <= {n - 1}."
        )
    check_mergeable(model)
    ref = _FinalStates(model, tokenizer, token_lists, batch_size)
    slots: list[tuple[int, ...]] = [(i,) for i in range(n)]
    lay = highest - (m + 1)
    total = max(lay - lowest + 1, 1)
    trace: list[dict[str, Any]] = []
    while lay >= lowest:
        k = min(m, len(slots) - lay - 1)
        cand = [*slots[:lay], tuple(i for s in slots[lay : lay + k + 1] for i in s), *slots[lay + k + 1 :]]
        plan = _merge_plan(n, cand, formula, "laco", {})
        s = ref.similarity(apply_plan(model, plan))
        trace.append({"base": slots[lay][0], "group": list(cand[lay]), "similarity": s, "accepted": s >= t})
        if s >= t and k > 0:
            slots = cand
            lay -= interval
            if lay >= len(slots):
                lay = len(slots) - 1 - (m + 1)
        else:
            lay -= 1
        if progress:
            progress(min(total - max(lay - lowest + 1, 0), total), total, f"LaCo: similarity {s:.4f}")
    params = {
        "threshold": t,
        "m": m,
        "interval": interval,
        "lowest": lowest,
        "highest": highest,
        "samples": len(token_lists),
        "trace": trace,
    }
    return _merge_plan(n, [s for s in slots if len(s) > 1], formula, "laco", params)


# -- the dispatcher --------------------------------------------------------------------------------------
def make_plan(
    strategy: str,
    report: LayerReport | None = None,
    *,
    ratio: float | None = None,
    n: int | None = None,
    threshold: float | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    **kw: Any,
) -> PrunePlan:
    """A plan from a strategy name (see module docstring).

    ``ratio`` (k = round(ratio * L)) or ``n`` choose how many layers go; ``threshold`` drives ``slm`` /
    ``laco``; ``layers`` lists ``manual`` indices. Extra keywords: ``num_layers`` (when there is no
    report), ``criterion``, ``keep_last``, ``formula`` (slm/laco), ``merge`` (manual merge groups), and
    ``model``, ``tokenizer``, ``token_lists`` for the forward-pass criteria (slm ``criterion="output"``,
    laco), plus their own options.
    """
    strategy = str(strategy).lower()
    if strategy not in STRATEGIES:
        raise PlanError(f"Unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}.")
    num_layers = kw.pop("num_layers", None)
    if report is not None:
        if num_layers is not None and num_layers != report.num_layers:
            raise PlanError(
                f"num_layers={num_layers} does not match the report's {report.num_layers} layers."
            )
        num_layers = report.num_layers
    model = kw.pop("model", None)
    if num_layers is None and model is not None:
        from .adapters import layer_count

        num_layers = layer_count(model)
    if num_layers is None:
        raise PlanError(f"Strategy '{strategy}' needs the model's layer count: pass a report or num_layers.")
    L = int(num_layers)
    if L < 1:
        raise PlanError(f"The model has {L} layers; there is nothing to prune.")

    if strategy == "manual":
        merge = kw.pop("merge", None)
        formula = kw.pop("formula", "task_vector")
        _no_extra(strategy, kw)
        if merge:
            if layers:
                raise PlanError("Give either layers to remove or merge groups, not both.")
            return PrunePlan(
                L, "merge", merge=tuple(tuple(g) for g in merge), merge_formula=formula, strategy="manual"
            )
        if layers is None:
            raise PlanError("The manual strategy needs the layers to remove, e.g. --remove 3,5,7.")
        return PrunePlan(L, "remove", remove=tuple(layers), strategy="manual")

    if strategy == "slm":
        criterion = kw.pop("criterion", "cka")
        keep_last = kw.pop("keep_last", True)
        formula = kw.pop("formula", "task_vector")
        if n is not None:
            raise PlanError("SLM takes a threshold or a target ratio, not a layer count.")
        if criterion == "output":
            return _probed_plan(
                slm_output_plan,
                "SLM with the output criterion",
                model,
                threshold,
                kw,
                keep_last=keep_last,
                formula=formula,
            )
        _no_extra(strategy, kw)
        return slm_plan(
            _need_report(strategy, report),
            threshold,
            target_ratio=ratio,
            criterion=criterion,
            keep_last=keep_last,
            formula=formula,
        )

    if strategy == "laco":
        return _probed_plan(laco_plan, "LaCo", model, threshold, kw)

    _no_extra(strategy, kw)
    if threshold is not None:
        raise PlanError(f"Strategy '{strategy}' takes a ratio or n, not a threshold.")
    k, params = _count(ratio, n, L, strategy)
    if strategy == "bi":
        rep = _need_report(strategy, report)
        remove = lowest_k(rep.bi, k)
    elif strategy == "magnitude":
        rep = _need_report(strategy, report)
        remove = lowest_k(rep.magnitude, k)
    elif strategy == "reverse":
        remove = tuple(range(L - k, L))
    elif strategy == "sequential":
        remove = tuple(range(k))
    elif strategy == "random":
        remove = tuple(sorted(random.Random(seed).sample(range(L), k)))
        params["seed"] = seed
    elif strategy == "block":
        rep = _need_report(strategy, report)
        start = best_block(rep, k) if k else 0
        remove = tuple(range(start, start + k))
        if k:
            params["block_distance"] = rep.block_distance[k - 1][start]
    else:  # streamline
        rep = _need_report(strategy, report)
        start = best_streamline_span(rep, k) if k else 0
        remove = tuple(range(start, start + k))
        if k:
            params["cosine"] = rep.cosine[start][start + k]
    return PrunePlan(L, "remove", remove=remove, strategy=strategy, params=params)


def _probed_plan(
    plan_fn: Callable[..., PrunePlan],
    what: str,
    model: Any,
    threshold: float | None,
    kw: dict[str, Any],
    **options: Any,
) -> PrunePlan:
    """``plan_fn(model, tokenizer, token_lists, threshold, ...)`` for a forward-pass criterion (SLM output,
    LaCo), refusing a call that lacks the threshold or the model and data to probe."""
    if threshold is None:
        raise PlanError(f"{what} needs a similarity threshold (e.g. 0.9).")
    if model is None or "token_lists" not in kw:
        raise PlanError(
            f"{what} probes the model with forward passes; pass model, tokenizer and token_lists "
            f"(or use {plan_fn.__name__})."
        )
    return plan_fn(model, kw.pop("tokenizer", None), kw.pop("token_lists"), threshold, **options, **kw)


def _no_extra(strategy: str, kw: dict[str, Any]) -> None:
    if kw:
        raise PlanError(f"Strategy '{strategy}' does not take option(s) {', '.join(sorted(kw))}.")
