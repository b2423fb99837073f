"""Sliding layer merging (SLM, arXiv 2502.19159) from the report: instant, no forward pass.

The forward-pass variant (the reference code's functional test) is
:func:`layerlens.plans.probed.slm_output_plan`, which also holds the registry's builder for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from .plan import DEFAULT_MERGE_FORMULA, MERGE_FORMULAS, PrunePlan, check_ratio, check_threshold

if TYPE_CHECKING:
    from ..report import LayerReport

# SLM's default similarity: on the default model cosine windows were the only merges that stayed under 2x the
# original perplexity without healing (at ratio 0.1; bench/bench_merge_defaults.py), and an attention sink
# drives CKA there (see criteria_disagreement below).
DEFAULT_SLM_CRITERION = "cosine"


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
    criterion: str = DEFAULT_SLM_CRITERION,
    keep_last: bool = True,
    formula: str = DEFAULT_MERGE_FORMULA,
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
                "or make_plan with the model, tokenizer and token_lists."
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
        t = check_threshold(threshold)
    else:
        target = check_ratio(target_ratio)  # type: ignore[arg-type]
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



def reason_slm(report: Any, plan: PrunePlan) -> str:
    groups = ", ".join(f"{g[0]}–{g[-1]}" for g in plan.merge)
    crit = plan.params.get("criterion", "cka").upper()
    thr = plan.params.get("threshold")
    thr_s = f" ≥ {thr:.3f}" if isinstance(thr, (int, float)) else ""
    return (f"Consecutive layers whose outputs are highly similar ({crit}{thr_s}) are merged into one: "
            f"groups {groups}.")


def merge_groups(report: LayerReport, kind: str, threshold: float) -> list[tuple[int, ...]]:
    """The groups of consecutive decoder layers that sliding layer merging merges at ``threshold``, comparing
    layer outputs with ``kind`` (cosine or CKA): what the heatmaps outline and the Prune page's SLM builds."""
    return [tuple(g) for g in slm_plan(report, threshold, criterion=kind).merge]


def similar_runs(report: LayerReport, kind: str, threshold: float) -> list[tuple[int, int]]:
    """The residual-state ranges (s, e) of :func:`merge_groups` (layer i's output is state i+1)."""
    return [(g[0] + 1, g[-1] + 1) for g in merge_groups(report, kind, threshold)]


# Where the two report criteria disagree the way an attention sink makes them: a layer whose output stays
# nearly parallel to its input (cosine high) while linear CKA between the two collapses.
SINK_COSINE_MIN = 0.8
SINK_CKA_MAX = 0.5


@dataclass(frozen=True)
class CriteriaDisagreement:
    """Layers whose input->output CKA is far below their input->output cosine (``report.cka[i][i+1]``
    against ``report.cosine[i][i+1]``), and how many leading tokens the analysis already left out."""

    layers: tuple[int, ...]
    cka: tuple[float, ...]
    cosine: tuple[float, ...]
    skip_first: int = 0

    def describe(self) -> str:
        """Where the criteria disagree and why, in two plain sentences (no interface words: the fix is the
        face's to say)."""
        many = len(self.layers) > 1
        where = _and(f"{i}" for i in self.layers)
        ckas = _and(f"{v:.2f}" for v in self.cka)
        text = (f"CKA and cosine disagree at layer{'s' if many else ''} {where}: "
                f"{'each' if many else 'the'} layer's output stays nearly parallel to its input "
                f"(cosine ≥ {min(self.cosine):.2f}) yet CKA is only {ckas} "
                f"(heatmap cell{'s' if many else ''} {_and(f'h{i}–h{i + 1}' for i in self.layers)}). ")
        if self.skip_first:
            return text + (f"The first {self.skip_first} token(s) of every sample are already left out, so another "
                           "token with massive activations probably dominates CKA; read the cosine heatmap.")
        return text + ("The first token of every sample is an attention sink: its norm is many times the "
                       "others', so linear CKA measures mostly that one token and CKA's runs follow the sink, "
                       "not the layers.")


def _and(items: Any) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def criteria_disagreement(report: LayerReport) -> CriteriaDisagreement | None:
    """Where CKA and cosine disagree like an attention sink makes them (see the constants above), or None."""
    hits = []
    for i in range(report.num_layers):
        cos, cka = report.cosine[i][i + 1], report.cka[i][i + 1]
        if cos >= SINK_COSINE_MIN and cka <= SINK_CKA_MAX:  # NaN compares False: never a hit
            hits.append((i, cka, cos))
    if not hits:
        return None
    return CriteriaDisagreement(tuple(h[0] for h in hits), tuple(h[1] for h in hits), tuple(h[2] for h in hits),
                                int(report.meta.get("skip_first") or 0))
