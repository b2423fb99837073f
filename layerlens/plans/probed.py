"""Strategies that probe the model with forward passes: SLM's functional criterion and LaCo.

Both merge candidate windows with :mod:`layerlens.surgery` and compare the candidate's final hidden states
with the original's on calibration data, so this module imports surgery and the package
``layerlens.plans`` does not import it (surgery imports the plan type).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..adapters import layer_count
from ..data import batches
from ..errors import PlanError
from ..surgery import apply_plan, check_mergeable
from .plan import DEFAULT_MERGE_FORMULA, MERGE_FORMULAS, PrunePlan, check_threshold
from .registry import PlanRequest
from .slm import DEFAULT_SLM_CRITERION, slm_plan

Progress = Callable[[int, int, str], None]


class _FinalStates:
    """The original model's final hidden states (after the final norm) on the calibration batches."""

    def __init__(self, model: Any, tokenizer: Any, token_lists: list[list[int]], batch_size: int):
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
    formula: str = DEFAULT_MERGE_FORMULA,
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
    t = check_threshold(threshold)
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
    formula: str = DEFAULT_MERGE_FORMULA,
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
    t = check_threshold(threshold)
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




def probed_plan(plan_fn: Callable[..., PrunePlan], what: str, req: PlanRequest, **options: Any) -> PrunePlan:
    """``plan_fn(model, tokenizer, token_lists, threshold, ...)`` for a forward-pass criterion (SLM output,
    LaCo), refusing a request that lacks the threshold or the model and data to probe."""
    if req.threshold is None:
        raise PlanError(f"{what} needs a similarity threshold (e.g. 0.9).")
    if req.model is None or "token_lists" not in req.options:
        raise PlanError(
            f"{what} probes the model with forward passes; pass model, tokenizer and token_lists "
            f"(or use {plan_fn.__name__})."
        )
    kw = dict(req.options)
    return plan_fn(req.model, kw.pop("tokenizer", None), kw.pop("token_lists"), req.threshold, **options, **kw)


def build_laco(req: PlanRequest) -> PrunePlan:
    return probed_plan(laco_plan, "LaCo", req)


def build_slm(req: PlanRequest) -> PrunePlan:
    """``slm`` from the registry: ``cka``/``cosine`` read the report (instant); ``output`` probes the model."""
    criterion = req.option("criterion", DEFAULT_SLM_CRITERION)
    keep_last = req.option("keep_last", True)
    formula = req.option("formula", DEFAULT_MERGE_FORMULA)
    if req.n is not None:
        raise PlanError("SLM takes a threshold or a target ratio, not a layer count.")
    if criterion == "output":
        return probed_plan(slm_output_plan, "SLM with the output criterion", req, keep_last=keep_last,
                           formula=formula)
    req.no_extra()
    return slm_plan(req.need_report(), req.threshold, target_ratio=req.ratio, criterion=criterion,
                    keep_last=keep_last, formula=formula)
