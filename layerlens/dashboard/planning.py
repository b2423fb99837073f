"""The Prune page's plan settings and what they turn into: :class:`PlanSettings` -> a
:class:`~layerlens.plans.PrunePlan` (no forward pass), the one-sentence reason, the parameter count after."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import LayerLensError
from ..plans import DEFAULT_MERGE_FORMULA, DEFAULT_SLM_CRITERION, get_strategy, make_plan, slm_plan

PLAN_MODES = ("strategy", "manual", "slm")
PLAN_MODE_LABELS = {"strategy": "Strategy + ratio", "manual": "Pick layers by hand", "slm": "Sliding merge (SLM)"}


@dataclass(frozen=True)
class PlanSettings:
    mode: str = "strategy"  # strategy | manual | slm
    strategy: str = "bi"
    ratio: float = 0.25
    layers: tuple[int, ...] = ()
    slm_by: str = "ratio"  # threshold | ratio; a fixed threshold (0.9) merges 18 of 30 layers on the default model
    threshold: float = 0.9
    target_ratio: float = 0.1  # merges without healing stayed under 2x the original perplexity only up to ~0.1
    criterion: str = DEFAULT_SLM_CRITERION  # cosine (why: next to DEFAULT_SLM_CRITERION)
    formula: str = DEFAULT_MERGE_FORMULA  # how each window's layers become one (FORMULA_NOTES says why)
    drop_attn: tuple[int, ...] = ()  # manual mode: attention sublayers dropped (layers kept)
    drop_mlp: tuple[int, ...] = ()  # manual mode: MLP sublayers dropped

    def label(self) -> str:
        if self.mode == "manual":
            return "manual"
        if self.mode == "slm":
            return "slm"
        return self.strategy


def build_plan(report: Any, ps: PlanSettings) -> Any:
    """The :class:`~layerlens.plans.PrunePlan` the Prune page's widgets describe (instant: no forward pass)."""
    if ps.mode == "manual":
        return make_plan("manual", report, layers=tuple(sorted(set(ps.layers))),
                         drop_attn=tuple(sorted(set(ps.drop_attn))), drop_mlp=tuple(sorted(set(ps.drop_mlp))))
    if ps.mode == "slm":
        if ps.slm_by == "ratio":
            return slm_plan(report, target_ratio=ps.target_ratio, criterion=ps.criterion, formula=ps.formula)
        return slm_plan(report, ps.threshold, criterion=ps.criterion, formula=ps.formula)
    if ps.mode != "strategy":
        raise LayerLensError(f"Unknown plan mode '{ps.mode}'; use one of {', '.join(PLAN_MODES)}.")
    return make_plan(ps.strategy, report, ratio=ps.ratio)


def plan_reason(report: Any, plan: Any) -> str:
    """One sentence saying why these layers were chosen (for the Summary page), from the strategy's entry."""
    if not plan.removed_layers and not getattr(plan, "has_sublayers", False):
        return "No layer is removed by this plan."
    return get_strategy(plan.strategy).reason(report, plan)


def params_after(total: int, per_layer: Sequence[int], plan: Any,
                 per_sublayer: Sequence[tuple[int, int]] | None = None) -> int:
    """Parameter count of the pruned model: the removed layers' parameters are gone (merges keep one), and
    with ``per_sublayer`` (per layer: attention, MLP parameter counts) those of dropped sublayers too."""
    gone = sum(per_layer[i] for i in plan.removed_layers)
    if per_sublayer is not None:
        gone += sum(per_sublayer[i][0] for i in getattr(plan, "drop_attn", ()))
        gone += sum(per_sublayer[i][1] for i in getattr(plan, "drop_mlp", ()))
    return int(total - gone)


__all__ = [
    "PLAN_MODES", "PLAN_MODE_LABELS", "PlanSettings", "build_plan", "params_after", "plan_reason",
]
