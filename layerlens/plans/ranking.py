"""Strategies that choose which whole layers to remove: by a ranking from the report, by position, at
random, or by hand. Builders take a :class:`~layerlens.plans.registry.PlanRequest`; reasons say in one
sentence why the layers were chosen (the dashboard's Summary).

* ``bi`` -- the k layers with the smallest Block Influence (ShortGPT); ties -> lower index.
* ``magnitude`` -- the k smallest Relative Magnitude; ``reverse`` -- the last k; ``sequential`` -- the
  first k; ``random`` -- ``random.Random(seed).sample(range(L), k)`` (the ShortGPT baselines).
* ``block`` -- the n contiguous layers with the smallest ``block_distance[n-1][i]`` (Gromov et al.).
* ``streamline`` -- the n contiguous layers whose input h_i and output h_{i+n} have the highest
  ``cosine[i][i+n]`` (LLM-Streamline); see :mod:`layerlens.streamline` for the trained replacement.
* ``manual`` -- the caller's own indices (or merge groups), and sublayers to drop.
* ``attn_bi`` / ``mlp_bi`` -- drop the attention (MLP) sublayers with the smallest ``attn_bi`` (``mlp_bi``)
  (LLM-Drop's attention drop, by the sublayer's own Block Influence). Their size counts SUBLAYERS: ``ratio``
  is the fraction of the model's 2L sublayers, ``k = round(ratio * 2L)`` (so the plan's ``ratio`` equals a
  whole-layer plan's at the same number of removed sublayers), or ``n`` sublayers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from .plan import DEFAULT_MERGE_FORMULA, PrunePlan, ratio_to_count
from .registry import PlanRequest

if TYPE_CHECKING:
    from ..report import LayerReport


def _key(value: float) -> float:
    """Sort key that puts NaN last (a layer with no measurement is never the 'least important')."""
    return math.inf if value is None or math.isnan(value) else float(value)


def _key_hi(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else float(value)


def lowest_k(values: Sequence[float], k: int) -> tuple[int, ...]:
    """Indices of the k smallest values; ties -> lower index first; NaN counts as +inf."""
    order = sorted(range(len(values)), key=lambda i: (_key(values[i]), i))
    return tuple(sorted(order[:k]))


def best_block(report: LayerReport, n: int) -> int:
    """Start i of the n-layer block with the smallest block_distance[n-1][i]; ties -> lower i."""
    row = report.block_distance[n - 1]
    cands = range(report.num_layers - n + 1)
    return min(cands, key=lambda i: (_key(row[i]) if i < len(row) else math.inf, i))


def best_streamline_span(report: LayerReport, n: int) -> int:
    """Start i of the n-layer span with the highest cosine(h_i, h_{i+n}); ties -> lower i."""
    cands = range(report.num_layers - n + 1)
    return min(cands, key=lambda i: (-_key_hi(report.cosine[i][i + n]), i))


def layer_count_of(req: PlanRequest) -> tuple[int, dict[str, Any]]:
    """k from exactly one of ``ratio`` / ``n`` (refusing a count that removes every layer) and the params
    that record how it was asked for."""
    ratio, n, num_layers = req.ratio, req.n, req.num_layers
    if req.threshold is not None:
        raise PlanError(f"Strategy '{req.strategy}' takes a ratio or n, not a threshold.")
    if (ratio is None) == (n is None):
        raise PlanError(f"Strategy '{req.strategy}' needs exactly one of a ratio or a layer count n.")
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


Chooser = Callable[[PlanRequest, int, dict[str, Any]], tuple[int, ...]]


def removal(choose: Chooser) -> Callable[[PlanRequest], PrunePlan]:
    """A builder for a strategy that removes k layers, ``choose(request, k, params) -> indices`` (it may
    add to ``params``)."""

    def build(req: PlanRequest) -> PrunePlan:
        req.no_extra()
        k, params = layer_count_of(req)
        remove = choose(req, k, params)
        return PrunePlan(req.num_layers, "remove", remove=remove, strategy=req.strategy, params=params)

    return build


def _block(req: PlanRequest, k: int, params: dict[str, Any]) -> tuple[int, ...]:
    rep = req.need_report()
    start = best_block(rep, k) if k else 0
    if k:
        params["block_distance"] = rep.block_distance[k - 1][start]
    return tuple(range(start, start + k))


def _streamline(req: PlanRequest, k: int, params: dict[str, Any]) -> tuple[int, ...]:
    rep = req.need_report()
    start = best_streamline_span(rep, k) if k else 0
    if k:
        params["cosine"] = rep.cosine[start][start + k]
    return tuple(range(start, start + k))


def _random(req: PlanRequest, k: int, params: dict[str, Any]) -> tuple[int, ...]:
    params["seed"] = req.seed
    return tuple(sorted(random.Random(req.seed).sample(range(req.num_layers), k)))


build_bi = removal(lambda req, k, _: lowest_k(req.need_report().bi, k))
build_magnitude = removal(lambda req, k, _: lowest_k(req.need_report().magnitude, k))
build_reverse = removal(lambda req, k, _: tuple(range(req.num_layers - k, req.num_layers)))
build_sequential = removal(lambda req, k, _: tuple(range(k)))
build_random = removal(_random)
build_block = removal(_block)
build_streamline = removal(_streamline)


def build_manual(req: PlanRequest) -> PrunePlan:
    """Layers to remove (``layers``) or merge groups (``merge``), plus attention / MLP sublayers to drop
    (options ``drop_attn`` / ``drop_mlp``, original indices of kept layers)."""
    merge = req.option("merge")
    formula = req.option("formula", DEFAULT_MERGE_FORMULA)
    subs = {"drop_attn": tuple(req.option("drop_attn") or ()), "drop_mlp": tuple(req.option("drop_mlp") or ())}
    req.no_extra()
    if merge:
        if req.layers:
            raise PlanError("Give either layers to remove or merge groups, not both.")
        return PrunePlan(req.num_layers, "merge", merge=tuple(tuple(g) for g in merge), merge_formula=formula,
                         strategy="manual", **subs)
    if req.layers is None and not any(subs.values()):
        raise PlanError("The manual strategy needs the layers to remove, e.g. `layers=3,5,7` (or sublayers "
                        "to drop, `drop_attn=3,5`).")
    return PrunePlan(req.num_layers, "remove", remove=req.layers or (), strategy="manual", **subs)


def sublayer_count_of(req: PlanRequest, most: int) -> tuple[int, dict[str, Any]]:
    """k sublayers from exactly one of ``ratio`` (``round(ratio * 2L)``) / ``n``, at most ``most``."""
    ratio, n, two_l = req.ratio, req.n, 2 * req.num_layers
    if req.threshold is not None:
        raise PlanError(f"Strategy '{req.strategy}' takes a ratio or n, not a threshold.")
    if (ratio is None) == (n is None):
        raise PlanError(f"Strategy '{req.strategy}' needs exactly one of a ratio or a sublayer count n.")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PlanError(f"The sublayer count n={n!r} must be a non-negative integer.")
        k, params = n, {"n": n}
    else:
        from .plan import check_ratio

        k, params = round(check_ratio(ratio) * two_l), {"target_ratio": float(ratio)}  # type: ignore[arg-type]
    if k > most:
        raise PlanError(f"Strategy '{req.strategy}' can drop at most {most} of this model's {two_l} sublayers "
                        f"(asked for {k}); use a smaller `ratio` (at most {most / two_l:.2f}) or `n`.")
    return k, params


def _sublayer_values(req: PlanRequest, key: str) -> tuple[float, ...]:
    values = getattr(req.need_report(), key, None)
    if values is None:
        raise PlanError(f"The report has no {key} (it was made before LayerLens measured sublayers, or this "
                        "architecture has no residual state between attention and MLP); analyze the model "
                        "again, or use whole-layer strategies.")
    return values


def build_attn_bi(req: PlanRequest) -> PrunePlan:
    req.no_extra()
    k, params = sublayer_count_of(req, req.num_layers - 1)
    drop = lowest_k(_sublayer_values(req, "attn_bi"), k)
    return PrunePlan(req.num_layers, "remove", drop_attn=drop, strategy=req.strategy, params=params)


def build_mlp_bi(req: PlanRequest) -> PrunePlan:
    req.no_extra()
    k, params = sublayer_count_of(req, req.num_layers)
    drop = lowest_k(_sublayer_values(req, "mlp_bi"), k)
    return PrunePlan(req.num_layers, "remove", drop_mlp=drop, strategy=req.strategy, params=params)


# -- reasons (one sentence: why these layers) ----------------------------------------------------------------
def reason_bi(report: Any, plan: PrunePlan) -> str:
    removed = list(plan.removed_layers)
    vals = ", ".join(f"{i} ({report.bi[i]:.3f})" for i in removed[:8])
    return (f"They have the lowest Block Influence (1 − cosine between a layer's input and output): {vals}"
            f"{' …' if len(removed) > 8 else ''}. Low BI means the layer barely changes the hidden state.")


def _reason_sub(kind: str, key: str, label: str) -> Callable[[Any, PrunePlan], str]:
    def reason(report: Any, plan: PrunePlan) -> str:
        idx = list(getattr(plan, kind))
        values = getattr(report, key, None) if report is not None else None
        shown = ", ".join(f"{i} ({values[i]:.3f})" if values else str(i) for i in idx[:8])
        return (f"Their {label} sublayers have the lowest {label} Block Influence (1 − cosine between the residual "
                f"before and after that sublayer's add): layers {shown}{' …' if len(idx) > 8 else ''}. The layers "
                "stay; only these sublayers stop adding to the residual stream.")

    return reason


reason_attn_bi = _reason_sub("drop_attn", "attn_bi", "attention")
reason_mlp_bi = _reason_sub("drop_mlp", "mlp_bi", "MLP")


def reason_block(report: Any, plan: PrunePlan) -> str:
    removed = plan.removed_layers
    return (f"Layers {removed[0]}–{removed[-1]} form the contiguous block whose input and output states are "
            "closest in angle (smallest angular distance), so the whole block does little.")


def reason_streamline(report: Any, plan: PrunePlan) -> str:
    removed = plan.removed_layers
    return (f"Layers {removed[0]}–{removed[-1]} form the span with the most similar input and output "
            "(highest cosine), the block LLM-Streamline replaces.")


def fixed_reason(text: str) -> Callable[[Any, PrunePlan], str]:
    """A reason that does not depend on the numbers."""
    return lambda report, plan: text
