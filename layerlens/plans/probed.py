"""Strategies that probe the model with forward passes: SLM's functional criterion, LaCo and FinerCut.

Both merge candidate windows with :mod:`layerlens.surgery` and compare the candidate's final hidden states
with the original's on calibration data, so this module imports surgery and the package
``layerlens.plans`` does not import it (surgery imports the plan type).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..adapters import decoder_layers, layer_count
from ..data import batches
from ..errors import PlanError
from ..prefix_reuse import _replace_hidden, recording
from ..surgery import apply_plan, check_mergeable, private_view, pruned
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
        return self.similarity_of(lambda index, batch: self._final(candidate, batch))

    def similarity_of(self, final: Callable[[int, Any], Any]) -> float:
        """:meth:`similarity` with the candidate's final states given by ``final(batch index, batch)``."""
        sims: list[float] = []
        with torch.no_grad():
            for index, (b, ref) in enumerate(zip(self.batches, self.reference, strict=True)):
                got = final(index, b)
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




# model -> {(token fingerprint, batch size): greedy order so far}: the FinerCut order for k sublayers is
# the first k of the order for any larger k, so a sweep over ratios runs the greedy once.
_FINERCUT_ORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokens_key(token_lists: list[list[int]], batch_size: int) -> tuple[str, int]:
    h = hashlib.sha256()
    for t in token_lists:
        h.update(len(t).to_bytes(4, "little"))
        h.update(b"".join(int(x).to_bytes(4, "little", signed=True) for x in t))
    return h.hexdigest(), batch_size


def finercut_plan(
    model: Any,
    tokenizer: Any,
    token_lists: list[list[int]],
    k: int,
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
    params: dict[str, Any] | None = None,
    cache_bytes: int = 2**30,
) -> PrunePlan:
    """FinerCut-style joint greedy over all 2L sublayers (arXiv 2405.18218): k times, drop the attention or
    MLP sublayer whose removal (given the ones already dropped) keeps the model's final hidden states (after
    the final norm) most similar to the original's on the calibration texts -- the same similarity as SLM's
    output criterion (per sample, cosine of the flattened non-pad states, averaged). Ties -> the candidate
    listed first (attention before MLP, lower layer first). The attention of the last kept attention layer
    is never dropped (a plan must keep one). Costs about k x 2L forward passes over the calibration batches,
    each from the candidate's layer on (prefix reuse: the current plan's layer inputs are recorded once per
    step, on CPU, when L of them fit in ``cache_bytes``; about half the layer passes); the order is cached per
    model and calibration tokens, so plans for several k share one greedy run.
    """
    n = layer_count(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 2 * n - 1:
        raise PlanError(f"FinerCut drops 0..{2 * n - 1} sublayers of this {n}-layer model (got {k!r}).")
    cache = _FINERCUT_ORDERS.setdefault(model, {})
    order: list[dict[str, Any]] = cache.setdefault(_tokens_key(token_lists, batch_size), [])
    ref = view = None
    while len(order) < k:
        if ref is None:
            ref = _FinalStates(model, tokenizer, token_lists, batch_size)
            view = private_view(model)  # pruned in place below: never the caller's model
            per_state = sum(b.input_ids.numel() for b in ref.batches) * _hidden_size(model) * 4
            reuse = per_state * n <= cache_bytes
        attn = {u["layer"] for u in order if u["kind"] == "attn"}
        mlp = {u["layer"] for u in order if u["kind"] == "mlp"}
        cands = [("attn", i) for i in range(n) if i not in attn and len(attn) < n - 1]
        cands += [("mlp", i) for i in range(n) if i not in mlp]
        # Prefix reuse: every candidate at layer i shares the current plan's input of layer i; record them all
        # in one pass, then run each candidate from its layer only (no layer is removed, so indices agree).
        states: dict[int, list[torch.Tensor]] = {}
        if reuse:
            current = PrunePlan(n, "remove", drop_attn=tuple(attn), drop_mlp=tuple(mlp))
            with pruned(view, current), recording({i: decoder_layers(view)[i] for i in range(1, n)}, states), \
                    torch.no_grad():
                for b in ref.batches:
                    ref._final(view, b)
        best: tuple[float, str, int] | None = None
        for kind, i in cands:
            plan = PrunePlan(n, "remove", drop_attn=tuple(attn | {i}) if kind == "attn" else tuple(attn),
                             drop_mlp=tuple(mlp | {i}) if kind == "mlp" else tuple(mlp))
            with pruned(view, plan):
                s = (ref.similarity_of(_from_layer(view, i, states.get(i))) if reuse and i > 0
                     else ref.similarity(view))
            if best is None or s > best[0]:
                best = (s, kind, i)
        assert best is not None
        order.append({"kind": best[1], "layer": best[2], "similarity": best[0]})
        if progress:
            progress(len(order), k, f"FinerCut: dropped {best[1]} {best[2]} (similarity {best[0]:.4f})")
    chosen = order[:k]
    out = dict(params or {})
    out.update(samples=len(token_lists), order=[f"{u['kind']}{u['layer']}" for u in chosen],
               similarity=chosen[-1]["similarity"] if chosen else 1.0)
    return PrunePlan(n, "remove", drop_attn=tuple(u["layer"] for u in chosen if u["kind"] == "attn"),
                     drop_mlp=tuple(u["layer"] for u in chosen if u["kind"] == "mlp"), strategy="finercut",
                     params=out)


def _hidden_size(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0))


def _from_layer(model: Any, start: int, states: list[torch.Tensor] | None) -> Callable[[int, Any], Any]:
    """Final states of ``model`` (pruned in place, nothing removed) run from original layer ``start`` on,
    fed the recorded input of that layer for each batch (as :func:`layerlens.prefix_reuse.tail_forward`)."""
    if states is None:
        raise PlanError("internal: no recorded state for the candidate's layer")

    def final(index: int, batch: Any) -> Any:
        n = len(decoder_layers(model))
        with pruned(model, PrunePlan(n, "remove", remove=tuple(range(start)))):
            device = next(model.parameters()).device
            cached = states[index].to(device)
            handle = decoder_layers(model)[0].register_forward_pre_hook(
                lambda _m, args, kwargs: _replace_hidden(args, kwargs, cached), with_kwargs=True)
            try:
                return _FinalStates._final(model, batch)
            finally:
                handle.remove()

    return final


def build_finercut(req: PlanRequest) -> PrunePlan:
    from .ranking import sublayer_count_of

    k, params = sublayer_count_of(req, 2 * req.num_layers - 1)
    if req.model is None or "token_lists" not in req.options:
        raise PlanError("FinerCut probes the model with forward passes; pass model, tokenizer and token_lists "
                        "(or use finercut_plan).")
    kw = dict(req.options)
    tokenizer, tokens = kw.pop("tokenizer", None), kw.pop("token_lists")
    batch_size, progress = kw.pop("batch_size", 8), kw.pop("progress", None)
    if kw:
        raise PlanError(f"Strategy 'finercut' does not take option(s) {', '.join(sorted(kw))}.")
    return finercut_plan(req.model, tokenizer, tokens, k, batch_size=batch_size, progress=progress, params=params)


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
