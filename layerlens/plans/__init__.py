"""Pruning plans: the plan type, the strategy registry and the strategies that run without a model.

* :mod:`~layerlens.plans.plan` -- :class:`PrunePlan` (frozen, JSON round trip) and the layer-list parser;
* :mod:`~layerlens.plans.registry` -- the strategy table's types, :func:`register`, :func:`make_plan`;
* :mod:`~layerlens.plans.strategies` -- the built-in entries (label, colour, needs, parameters, builder);
* :mod:`~layerlens.plans.ranking` -- removal by a ranking, by position, at random or by hand;
* :mod:`~layerlens.plans.slm` -- sliding layer merging from the report;
* :mod:`~layerlens.plans.probed` -- SLM's output criterion and LaCo (forward passes; imports surgery, so
  it is imported on use, never from here).
"""

from . import strategies as _strategies  # noqa: F401  (registers the built-in entries)
from .plan import (
    DEFAULT_MERGE_FORMULA,
    FORMULA_NOTES,
    MERGE_FORMULAS,
    METHODS,
    PLAN_FILE,
    PrunePlan,
    parse_layers,
    plan_summary,
    ratio_to_count,
)
from .ranking import lowest_k
from .registry import (
    Param,
    PlanRequest,
    Strategy,
    get_strategy,
    label_of,
    make_plan,
    register,
    strategies,
    strategy_names,
    unregister,
)
from .slm import DEFAULT_SLM_CRITERION, slm_plan

__all__ = [
    "DEFAULT_MERGE_FORMULA", "DEFAULT_SLM_CRITERION", "FORMULA_NOTES", "MERGE_FORMULAS", "METHODS", "PLAN_FILE",
    "Param", "PlanRequest", "PrunePlan", "Strategy", "get_strategy", "label_of", "lowest_k", "make_plan",
    "parse_layers", "plan_summary", "ratio_to_count", "register", "slm_plan", "strategies", "strategy_names",
    "unregister",
]
