"""LLM-Streamline layer replacement: one trained layer instead of a pruned span of n consecutive layers.

The span [i, i+n) (from ``make_plan("streamline", report, n=...)``: the span whose input h_i and output
h_{i+n} are most similar) is replaced by ONE lightweight layer trained to map h_i to h_{i+n} with an MSE
loss over the non-pad calibration tokens.

Two kinds, both initialised from the first pruned layer (layer i) and both a normal decoder layer of the
architecture, so the pruned model is saved by ``save_pretrained`` and loaded by plain
``AutoModelForCausalLM.from_pretrained`` (no LayerLens code needed):

* ``"ffn"`` (default) -- the paper's MLP. A free-standing MLP module cannot be expressed in a
  transformers config (every layer of a model has the same class), so it is realised as a decoder layer
  whose attention output projection is zeroed and frozen: the layer computes exactly
  ``h + FFN(norm(h))``, a residual MLP; only the FFN and norm parameters are trained. The attention's
  q/k/v weights are still stored and computed (wasted work, not an approximation).
* ``"layer"`` -- a whole decoder layer (attention too) trained end to end (the paper's "transformer
  layer" variant).

Training is cheap: the span's input/output states and the layer's call arguments (rotary embeddings,
masks) are captured once from one forward pass per batch, then the layer alone is trained on them (Adam),
with a time budget and a progress callback ``progress(done, total, message)``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .adapters import adapter_for, decoder_layers, get_attr, layer_count
from .data import batches
from .errors import LayerLensError, PlanError, UnsupportedArchitectureError
from .plans.plan import PrunePlan
from .surgery import apply_plan, renumber, shallow_clone

Progress = Callable[[int, int, str], None]
KINDS = ("ffn", "layer")


@dataclass
class Replacement:
    """A trained replacement for layers ``start .. start+n-1`` and how well it fits (MSE per element)."""

    start: int
    n: int
    kind: str
    layer: nn.Module = field(repr=False)
    mse_removed: float  # plain removal (identity): mean ||h_i - h_{i+n}||^2
    mse_initial: float  # the replacement before training
    mse_final: float
    steps: int
    epochs: float
    seconds: float
    stopped: str  # "done" | "time budget"
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("layer")
        return d


@dataclass
class _SpanBatch:
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def call(self, layer: nn.Module) -> torch.Tensor:
        """Run ``layer`` on this batch's input, in float32, with the captured call arguments."""
        return _first(layer(self.x.float(), *_to_float(self.args), **_to_float(self.kwargs)))


class _Stop(Exception):
    pass


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _detach(obj: Any) -> Any:
    if type(obj).__name__.endswith("Cache"):  # a KV cache is never replayed
        return None
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(x) for x in obj)
    if isinstance(obj, list):
        return [_detach(x) for x in obj]
    return obj


def _to_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_float(x) for x in obj)
    if isinstance(obj, list):
        return [_to_float(x) for x in obj]
    return obj


def span_of(plan: PrunePlan) -> tuple[int, int]:
    """(start, n) of a plan that removes one contiguous span (or merges one group)."""
    idx = list(plan.remove) if plan.method == "remove" else [i for g in plan.merge for i in g]
    if not idx or idx != list(range(idx[0], idx[0] + len(idx))):
        raise PlanError(
            "LLM-Streamline replaces one contiguous span of layers; make the plan with "
            "`strategy=streamline` (or block) so the removed layers are consecutive."
        )
    return idx[0], len(idx)


def collect_span_data(
    model: nn.Module,
    tokenizer: Any,
    token_lists: list[list[int]],
    start: int,
    n: int,
    *,
    batch_size: int = 8,
    max_tokens: int | None = 200_000,
) -> list[_SpanBatch]:
    """Input h_start and output h_{start+n} of the span, plus layer ``start``'s call arguments, per batch.

    The forward pass stops right after the span, so later layers cost nothing. At most ``max_tokens``
    non-pad tokens are kept (memory: 2 x tokens x hidden floats).
    """
    layers = decoder_layers(model)
    if not 0 <= start < start + n <= len(layers) or n < 1:
        raise PlanError(f"The span {start}..{start + n - 1} is not inside the model's {len(layers)} layers.")
    if not token_lists:
        raise PlanError("No calibration tokens were given; pass at least one text.")
    device = next(model.parameters()).device
    out: list[_SpanBatch] = []
    captured: dict[str, Any] = {}

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: _detach(v) for k, v in kwargs.items() if k != "hidden_states"}
        for key in ("past_key_values", "past_key_value", "layer_past"):
            rest.pop(key, None)
        if "use_cache" in rest:
            rest["use_cache"] = False
        captured["x"], captured["kwargs"], captured["args"] = hidden.detach(), rest, _detach(tuple(args[1:]))

    def post(_m: nn.Module, _args: tuple, output: Any) -> None:
        captured["y"] = _first(output).detach()
        raise _Stop

    tokens = 0
    h1 = layers[start].register_forward_pre_hook(pre, with_kwargs=True)
    h2 = layers[start + n - 1].register_forward_hook(post)
    try:
        with torch.no_grad():
            for b in batches(tokenizer, token_lists, batch_size, device):
                captured.clear()
                with contextlib.suppress(_Stop):
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                out.append(
                    _SpanBatch(
                        captured["x"], captured["y"], b.attention_mask, captured["args"], captured["kwargs"]
                    )
                )
                tokens += b.num_tokens
                if max_tokens is not None and tokens >= max_tokens:
                    break
    finally:
        h1.remove()
        h2.remove()
    return out


def _attention_output_projection(model: nn.Module, layer: nn.Module) -> nn.Module:
    """The attention's output projection: the last Linear/Conv1D of the attention mapping to hidden size."""
    attention = get_attr(layer, adapter_for(model).attention)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    found = None
    for m in attention.modules():  # type: ignore[union-attr]
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        out_features = w.shape[1] if type(m).__name__ == "Conv1D" else w.shape[0]
        if out_features == hidden:
            found = m
    if found is None:
        raise UnsupportedArchitectureError(
            f"Cannot find the attention output projection of model type '{model.config.model_type}'; use "
            "the 'layer' replacement instead of 'ffn'."
        )
    return found


def build_replacement(
    model: nn.Module, start: int, kind: str = "ffn"
) -> tuple[nn.Module, list[nn.Parameter]]:
    """A float32 copy of layer ``start`` ready to train, and its trainable parameters."""
    if kind not in KINDS:
        raise PlanError(f"Unknown replacement kind '{kind}'; use one of {', '.join(KINDS)}.")
    memo = {id(model.config): model.config}  # share the config, copy the weights
    layer = copy.deepcopy(decoder_layers(model)[start], memo).float()
    for p in layer.parameters():
        p.requires_grad_(True)
    if kind == "layer":
        return layer, list(layer.parameters())
    proj = _attention_output_projection(model, layer)
    with torch.no_grad():
        for p in proj.parameters(recurse=False):
            p.zero_()
    attention = get_attr(layer, adapter_for(model).attention)
    frozen = {id(p) for p in attention.parameters()}  # type: ignore[union-attr]
    for p in attention.parameters():  # type: ignore[union-attr]
        p.requires_grad_(False)
    return layer, [p for p in layer.parameters() if id(p) not in frozen]


def _check_attention_silent(model: nn.Module, layer: nn.Module, batch: _SpanBatch) -> None:
    attention = get_attr(layer, adapter_for(model).attention)
    seen: dict[str, float] = {}

    def hook(_m: nn.Module, _a: Any, output: Any) -> None:
        seen["max"] = float(_first(output).abs().max())

    h = attention.register_forward_hook(hook)  # type: ignore[union-attr]
    try:
        with torch.no_grad():
            batch.call(layer)
    finally:
        h.remove()
    if seen.get("max", 1.0) != 0.0:
        raise UnsupportedArchitectureError(
            f"Zeroing the attention output of model type '{model.config.model_type}' did not silence it; "
            "use the 'layer' replacement instead of 'ffn'."
        )


def _mse(layer: nn.Module | None, data: list[_SpanBatch]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in data:
            pred = b.x.float() if layer is None else b.call(layer)
            m = b.mask.to(pred.device).bool()
            diff = (pred - b.y.float())[m]
            total += float((diff**2).sum())
            count += diff.numel()
    return total / max(count, 1)


def train_replacement(
    model: nn.Module,
    tokenizer: Any,
    token_lists: list[list[int]],
    plan: PrunePlan,
    *,
    kind: str = "ffn",
    epochs: int = 5,
    lr: float = 5e-4,
    batch_size: int = 8,
    time_budget: float | None = 300.0,
    max_tokens: int | None = 200_000,
    seed: int = 0,
    progress: Progress | None = None,
) -> Replacement:
    """Train the replacement for the plan's span (MSE from h_i to h_{i+n} on non-pad tokens).

    Stops after ``epochs`` passes or when ``time_budget`` seconds (for the whole call, the capture pass
    included; None: no limit) are spent, and then ``stopped`` says so. The model is not modified.
    """
    if plan.num_layers != layer_count(model):
        raise PlanError(
            f"The plan is for a {plan.num_layers}-layer model but this model has {layer_count(model)} layers."
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise LayerLensError(f"`epochs` must be a positive integer (got {epochs!r}).")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise LayerLensError(f"The learning rate must be a positive number (got {lr!r}).")
    start, n = span_of(plan)
    t0 = time.perf_counter()
    data = collect_span_data(
        model, tokenizer, token_lists, start, n, batch_size=batch_size, max_tokens=max_tokens
    )
    dtype = next(model.parameters()).dtype
    layer, trainable = build_replacement(model, start, kind)
    if kind == "ffn":
        _check_attention_silent(model, layer, data[0])
    mse_removed, mse_initial = _mse(None, data), _mse(layer, data)
    opt = torch.optim.Adam(trainable, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    total, steps, stopped = epochs * len(data), 0, "done"
    layer.train(False)  # dropout off: fit the deterministic mapping
    with torch.enable_grad():
        for epoch in range(epochs):
            for i in torch.randperm(len(data), generator=gen).tolist():
                if time_budget is not None and time.perf_counter() - t0 > time_budget:
                    stopped = "time budget"
                    break
                b = data[i]
                pred = b.call(layer)
                m = b.mask.to(pred.device).bool()
                loss = ((pred - b.y.float())[m] ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if progress:
                    progress(steps, total, f"epoch {epoch + 1}/{epochs}, loss {loss.item():.4g}")
            if stopped != "done":
                break
    for p in layer.parameters():
        p.requires_grad_(False)
    mse_final = _mse(layer, data)
    layer = layer.to(dtype)
    if progress and stopped != "done":
        progress(total, total, "time budget reached")
    return Replacement(
        start=start,
        n=n,
        kind=kind,
        layer=layer,
        mse_removed=mse_removed,
        mse_initial=mse_initial,
        mse_final=mse_final,
        steps=steps,
        epochs=steps / max(len(data), 1),
        seconds=round(time.perf_counter() - t0, 3),
        stopped=stopped,
        tokens=int(sum(b.mask.sum() for b in data)),
    )


def replacement_plan(plan: PrunePlan, replacement: Replacement) -> PrunePlan:
    """The plan of the replaced model: the span as one merge group whose layer is the trained one.

    (Applying this plan alone with :func:`~layerlens.surgery.apply_plan` would merge by formula; the
    trained weights live in the saved model. ``params["replacement"]`` records the training.)
    """
    span = tuple(range(replacement.start, replacement.start + replacement.n))
    params = {**plan.params, "replacement": replacement.to_dict(), "removed_span": list(span)}
    if replacement.n == 1:  # one layer replaced by one layer: nothing is removed
        return PrunePlan(plan.num_layers, "remove", strategy=plan.strategy, params=params)
    return PrunePlan(
        plan.num_layers,
        "merge",
        merge=(span,),
        merge_formula="keep_top",
        strategy=plan.strategy,
        params=params,
    )


def apply_replacement(model: nn.Module, plan: PrunePlan, replacement: Replacement) -> nn.Module:
    """A NEW model with the span replaced by the trained layer (input untouched, other weights shared)."""
    rplan = replacement_plan(plan, replacement)
    if rplan.method == "remove":  # n == 1: swap the layer in a clone
        new = apply_plan(model, rplan)
        layers = decoder_layers(new)
        mod = shallow_clone(replacement.layer)
        renumber(mod, replacement.start)
        layers[replacement.start] = mod
        return new
    return apply_plan(model, rplan, replacements={replacement.start: replacement.layer})
