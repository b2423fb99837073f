"""Sliding layer merging (SLM, arXiv 2502.19159) from the report: instant, no forward pass.

The forward-pass variant (the reference code's functional test) is
:func:`layerlens.plans.probed.slm_output_plan`, which also holds the registry's builder for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from .plan import MERGE_FORMULAS, PrunePlan, check_ratio, check_threshold

if TYPE_CHECKING:
    from ..report import LayerReport

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
