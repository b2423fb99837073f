"""The pruning plan type: which layers go and how, as a frozen, JSON-round-trippable dataclass.

A :class:`PrunePlan` either *removes* layers (``method="remove"``) or *merges* groups of consecutive
layers, each group collapsing into one layer that sits at the group's lowest index, the *base*
(``method="merge"``). Indices are 0-based everywhere and always recorded explicitly.

This module knows nothing of how plans are chosen (see :mod:`layerlens.plans.registry` and the strategy
modules) and runs no model, so :mod:`layerlens.surgery` can import it without a circle.

Ratio -> count: ``k = round(ratio * L)`` with Python's ``round`` (half to even), so the plan's
:attr:`PrunePlan.ratio` is the *actual* ratio ``k / L``; the requested one is kept in
``params["target_ratio"]``.

Sublayers: besides whole layers, a plan may drop the *attention* sublayer (``drop_attn``) or the *MLP*
sublayer (``drop_mlp``) of layers it keeps (0-based ORIGINAL indices; a dropped sublayer adds nothing to
the residual stream). A layer is two sublayers, so :attr:`PrunePlan.ratio` is the fraction of the model's
``2L`` sublayers that go: ``(2 * n_removed + len(drop_attn) + len(drop_mlp)) / (2L)`` -- for whole-layer
plans exactly ``n_removed / L`` as before. A plan without sublayer drops serialises exactly as before
(the two keys are written only when non-empty), so old plan files and persisted run keys stay valid.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PlanError, check_made_for

METHODS = ("remove", "merge")
MERGE_FORMULAS = ("task_vector", "keep_top", "mean")
# What every merge builder uses unless told otherwise: it measured best without healing on the default model
# (bench/bench_merge_defaults.py). A plan file without ``merge_formula`` still means task_vector (see PrunePlan).
DEFAULT_MERGE_FORMULA = "keep_top"
# One line per merge formula, for a face to show beside the choice.
FORMULA_NOTES: dict[str, str] = {
    "task_vector": "The SLM/LaCo papers' formula: it adds up every merged layer's difference from the base, so a "
                   "window of three or more layers lands far from every trained layer and can break the model.",
    "keep_top": "Each window becomes its top layer (what the published SLM and LaCo code compute); the same as "
                "task_vector for two-layer windows, and far better for wider ones.",
    "mean": "The plain average of the window's layers: usually worse than keep_top without healing.",
}
PLAN_FILE = "layerlens_plan.json"
# The strategy names a plan may carry, in registration order: filled by
# :func:`layerlens.plans.registry.register` (the registry imports this module, never the other way round).
STRATEGY_NAMES: dict[str, None] = {}

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

    * ``drop_attn`` / ``drop_mlp``: layers (0-based ORIGINAL indices) that stay but lose their attention /
      MLP sublayer. A layer listed there must be kept: listing a removed layer or a member of a merge group
      is an error (not silently normalised), and so is dropping the attention of every kept layer (the
      model would have no attention at all, and no KV cache to count positions with). A layer may lose
      both sublayers (an identity layer for pre-norm models; it still counts as kept).

    Construction validates (raises :class:`PlanError` with one sentence) and normalises lists to tuples.
    """

    num_layers: int
    method: str
    remove: tuple[int, ...] = ()
    merge: tuple[tuple[int, ...], ...] = ()
    merge_formula: str = "task_vector"
    strategy: str = "manual"
    params: dict[str, Any] = field(default_factory=dict)
    drop_attn: tuple[int, ...] = ()
    drop_mlp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise PlanError(f"num_layers must be an integer (got {self.num_layers!r}).")
        if self.method not in METHODS:
            raise PlanError(f"Unknown plan method '{self.method}'; use 'remove' or 'merge'.")
        if isinstance(self.remove, (str, bytes)) or isinstance(self.merge, (str, bytes)):
            raise PlanError("remove and merge must be lists of integer indices, not strings.")
        remove = tuple(_as_index(i, "remove") for i in self.remove)
        for name in ("drop_attn", "drop_mlp"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise PlanError(f"{name} must be a list of integer layer indices (got {value!r}).")
            object.__setattr__(self, name, tuple(_as_index(i, name) for i in value))
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
        object.__setattr__(self, "drop_attn", tuple(sorted(self.drop_attn)))
        object.__setattr__(self, "drop_mlp", tuple(sorted(self.drop_mlp)))
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
        if self.strategy not in STRATEGY_NAMES:
            raise PlanError(f"Unknown strategy '{self.strategy}'; use one of {', '.join(STRATEGY_NAMES)}.")
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
        self._validate_sublayers(seen)
        if removed >= n:
            raise PlanError(f"The plan removes all {n} layers; keep at least one layer.")
        if not 0.0 <= removed / n < 1.0:  # pragma: no cover - implied by the checks above
            raise PlanError(f"The pruning ratio {removed / n:.3f} is outside [0, 1).")

    def _validate_sublayers(self, touched: set[int]) -> None:
        n = self.num_layers
        in_group = {i for g in self.merge for i in g}
        for name, kind in (("drop_attn", "attention"), ("drop_mlp", "MLP")):
            idx = getattr(self, name)
            for i in idx:
                if not 0 <= i < n:
                    raise PlanError(f"Layer index {i} in `{name}` is out of range for a {n}-layer model "
                                    f"(valid: 0..{n - 1}).")
                if idx.count(i) > 1:
                    raise PlanError(f"Layer {i} is listed twice in `{name}`; give each layer once.")
                if i in in_group:
                    raise PlanError(f"Layer {i} is in a merge group and also in `{name}`; drop the {kind} "
                                    "sublayer of a layer that is kept as it is.")
                if i in touched:
                    raise PlanError(f"Layer {i} is removed whole and also listed in `{name}`; list it once "
                                    "(removing a layer removes both its sublayers).")
        kept = [i for i in range(n) if i not in touched or i in {g[0] for g in self.merge}]
        if kept and self.drop_attn and all(i in self.drop_attn for i in kept):
            raise PlanError("The plan drops the attention of every kept layer; keep at least one attention "
                            "sublayer (a model without attention has no KV cache to count positions with).")

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
    def n_sublayers_dropped(self) -> int:
        """Attention plus MLP sublayers dropped from kept layers (whole-layer removals not counted)."""
        return len(self.drop_attn) + len(self.drop_mlp)

    @property
    def has_sublayers(self) -> bool:
        return bool(self.drop_attn or self.drop_mlp)

    @property
    def changes_model(self) -> bool:
        """Whether applying the plan changes anything (a layer removed or merged, or a sublayer dropped)."""
        return self.n_removed > 0 or self.has_sublayers

    @property
    def ratio(self) -> float:
        """The fraction of the model's 2L sublayers that go (a whole layer counts two): for whole-layer
        plans, layers removed / layers of the model (the actual ratio, after rounding to whole layers)."""
        if not self.has_sublayers:
            return self.n_removed / self.num_layers
        return (2 * self.n_removed + self.n_sublayers_dropped) / (2 * self.num_layers)

    def units_text(self) -> str:
        """Compact list of what goes: ``"3,5,a7,m9"`` (whole layers as numbers, ``a``/``m`` + index for a
        dropped attention/MLP sublayer); for whole-layer plans just the removed layers, ``"3,5"``."""
        return ",".join(str(i) if kind == "layer" else f"{kind[0]}{i}" for kind, i in self.sublayer_units())

    def sublayer_units(self) -> tuple[tuple[str, int], ...]:
        """Every unit the plan takes out, as ``("layer"|"attn"|"mlp", original index)``, sorted by index."""
        units = [("layer", i) for i in self.removed_layers]
        units += [("attn", i) for i in self.drop_attn] + [("mlp", i) for i in self.drop_mlp]
        return tuple(sorted(units, key=lambda u: (u[1], u[0])))

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
        } | ({"drop_attn": list(self.drop_attn)} if self.drop_attn else {}) | (
            {"drop_mlp": list(self.drop_mlp)} if self.drop_mlp else {})

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
                drop_attn=tuple(d.get("drop_attn") or ()),
                drop_mlp=tuple(d.get("drop_mlp") or ()),
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
            path = path / PLAN_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"Could not read the plan file '{path}' ({exc.strerror}); check the path.") from exc
        plan = cls.from_json(text)
        if plan.params.get("replacement"):
            raise PlanError(f"The plan in '{path}' replaced layers with a trained layer that a plan cannot "
                            "rebuild; use the pruned model folder it was saved with instead.")
        check_made_for(f"The plan in '{path}'", plan.num_layers, num_layers, "", PlanError)
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
        if self.has_sublayers:
            subs = [f"{kind} {list(idx)}" for kind, idx in (("drop attention", self.drop_attn),
                                                            ("drop MLP", self.drop_mlp)) if idx]
            what = ", ".join(([what] if self.removed_layers else []) + subs)
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

    ``{"layer": i, "status": "kept" | "removed" | "merged", "into": j | None, "new_index": k | None,
    "attn": "kept" | "dropped" | "removed", "mlp": ...}``:
    every layer of a merge group (its base included) is ``"merged"`` with ``into`` = the group's base
    index in the ORIGINAL numbering; ``new_index`` is the layer's position in the pruned model; ``attn`` /
    ``mlp`` (only for a plan with sublayer drops) say what happens to its two sublayers (``"removed"`` with the
    whole layer, ``"merged"`` with its group).
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
        def part(dropped: tuple[int, ...], status: str = status, i: int = i) -> str:
            return "dropped" if i in dropped else status
        row = {"layer": i, "status": status, "into": into, "new_index": lmap[i]}
        if plan.has_sublayers:
            row.update(attn=part(plan.drop_attn), mlp=part(plan.drop_mlp))
        out.append(row)
    return out


def check_ratio(ratio: float) -> float:
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


def check_threshold(threshold: float) -> float:
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
    k = round(check_ratio(ratio) * num_layers)
    if k >= num_layers:
        raise PlanError(
            f"A ratio of {ratio} removes all {num_layers} layers after rounding; use a smaller ratio."
        )
    return k



_LAYER_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def parse_layers(text: str, num_layers: int | None = None) -> tuple[int, ...]:
    """``"3, 5-7"`` (commas and/or spaces; ranges inclusive, low to high) -> (3, 5, 6, 7), sorted.

    The one parser of layer lists, for the CLI, the share URL and the dashboard. A layer listed twice is
    refused (a typo more often than an intent); with ``num_layers``, so is an index outside 0..L-1.
    """
    out: list[int] = []
    for part in re.split(r"[,\s]+", str(text or "").strip()):
        if not part:
            continue
        m = _LAYER_ITEM.fullmatch(part)
        if not m:
            raise PlanError(f"'{part}' is not a layer index or range; write comma-separated 0-based indices "
                            "or inclusive ranges, e.g. 3,5-7.")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise PlanError(f"The range '{part}' runs backwards; write it low to high, e.g. {hi}-{lo}.")
        out.extend(range(lo, hi + 1))
    for i in sorted(out):
        if num_layers is not None and i >= num_layers:
            raise PlanError(f"Layer {i} is out of range; this model has layers 0..{num_layers - 1}.")
    if len(set(out)) != len(out):
        twice = sorted({i for i in out if out.count(i) > 1})
        raise PlanError(f"Layer {twice[0]} is listed twice; give each layer once.")
    return tuple(sorted(out))
