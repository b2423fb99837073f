"""Model surgery: apply a :class:`~layerlens.plans.PrunePlan` without mutating anyone else's model.

Two forms:

* :func:`apply_plan` returns a NEW model. Every ``nn.Module`` object of the new model is new (a shallow
  clone), but parameters and buffers are the SAME tensors as the input's (embeddings, norms, untouched
  layers); only merged layers get new tensors, for their attention and MLP weights. So it costs
  microseconds and no memory beyond the merged layers, and the input -- its layers, their ``layer_idx``,
  its config -- is never changed. Because tensors are shared, do not train the result in place; pass
  ``copy_weights=True`` (or call :func:`materialize`) first.
* :func:`pruned` is a context manager that prunes a model IN PLACE and restores it exactly on exit
  (layer list, every ``layer_idx``, config fields). For sweeps on a model no other thread is using.

After surgery the model is self-consistent: the decoder layer list is replaced, every sub-module's
``layer_idx`` is its new position, the config's layer count is patched and every per-layer config list
(``layer_types``, or any list of length L) is REINDEXED by the kept layers (layer j of the pruned model
keeps the attention type of the original layer it came from). So ``generate(use_cache=True)`` and
``save_pretrained`` + ``from_pretrained`` work. A model loaded with ``device_map`` keeps an
``hf_device_map`` that matches its layers: entries of kept layers renamed to their new index, entries of
removed layers dropped (or no map at all when it cannot be made right, see :func:`pruned_device_map`).

Merges: the merged layer sits at its group's base (lowest index). Its attention and MLP parameters
(weights and biases of the adapter's ``mergeable_parts``, norm modules inside them excepted) come from the
plan's ``merge_formula`` over the group's ORIGINAL weights; its norms are the base's.

Why one module over ~400 lines: removal, merging, config patching and the restoring context manager
all rely on the same clone/rebind rules; apart they would drift.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import types
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .adapters import ArchAdapter, adapter_for, decoder_layers, get_attr, mergeable_parts, set_attr
from .errors import PlanError, UnsupportedArchitectureError
from .plans.plan import PrunePlan

# Config lists that may happen to have length L but are not per layer.
_NOT_PER_LAYER = frozenset(
    {
        "architectures",
        "eos_token_id",
        "bos_token_id",
        "pad_token_id",
        "bad_words_ids",
        "suppress_tokens",
        "begin_suppress_tokens",
        "forced_decoder_ids",
        "label2id",
        "id2label",
        "auto_map",
        "task_specific_params",
    }
)
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")
_PLAIN_CONTAINERS = (dict, OrderedDict, set)


# -- cloning -----------------------------------------------------------------------------------------------
def _rebind(value: Any, old: nn.Module, new: nn.Module) -> Any:
    """Instance attributes bound to ``old`` (accelerate's forward wrappers) are re-bound to ``new``."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, functools.partial) and value.args and value.args[0] is old:
        bound = functools.partial(value.func, new, *value.args[1:], **value.keywords)
        with contextlib.suppress(AttributeError):
            functools.update_wrapper(bound, _rebind(value.__wrapped__, old, new))  # type: ignore[attr-defined]
        return bound
    return value


def _shallow_module(mod: nn.Module) -> nn.Module:
    new = object.__new__(type(mod))
    d = new.__dict__
    d.update(mod.__dict__)
    for key, value in d.items():
        kind = type(value)
        if kind in _PLAIN_CONTAINERS:  # _parameters, _buffers, _modules, hook dicts: own containers
            d[key] = kind(value)
        elif kind is types.MethodType or kind is functools.partial:
            d[key] = _rebind(value, mod, new)
        elif key.startswith("_") and isinstance(value, (dict, set)):
            d[key] = copy.copy(value)
    return new


def shallow_clone(module: nn.Module) -> nn.Module:
    """A copy of the module tree with new module objects that share every parameter and buffer tensor."""
    memo: dict[int, nn.Module] = {}

    def rec(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        c = _shallow_module(m)
        memo[id(m)] = c
        for name, child in m._modules.items():
            c._modules[name] = None if child is None else rec(child)
        return c

    try:
        return rec(module)
    finally:
        # `rec` refers to itself (a reference cycle) and holds `memo`: without this every clone would
        # live until Python's next full collection (the dashboard turns Streamlit's per-rerun one off).
        memo.clear()


def materialize(model: nn.Module) -> nn.Module:
    """Give ``model`` its own copy of every parameter and buffer, in place (tied weights stay tied)."""
    memo: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for m in model.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    if id(p) not in memo:
                        memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    m._parameters[name] = memo[id(p)]  # type: ignore[assignment]
            for name, b in m._buffers.items():
                if b is not None:
                    if id(b) not in memo:
                        memo[id(b)] = b.clone()
                    m._buffers[name] = memo[id(b)]
    return model


def renumber(layer: nn.Module, index: int) -> None:
    """Point every ``layer_idx`` inside ``layer`` at its new position (caches are indexed by it)."""
    for m in layer.modules():
        value = m.__dict__.get("layer_idx")
        if isinstance(value, int) and not isinstance(value, bool):
            m.layer_idx = index


# -- merging -----------------------------------------------------------------------------------------------
def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(m).__name__.lower()


def check_mergeable(model: nn.Module) -> None:
    """Raise :class:`PlanError` when the model's layers have no attention/MLP sub-modules to merge."""
    layers = decoder_layers(model)
    try:
        parts = mergeable_parts(model, layers[0]) if len(layers) else []
    except UnsupportedArchitectureError as exc:
        raise PlanError(str(exc)) from exc
    if not any(True for part in parts for _ in part.parameters()):
        raise PlanError(
            f"Layers of model type '{model.config.model_type}' have no attention or MLP weights "
            "to merge; use layer removal instead."
        )


def merge_tensors(tensors: list[torch.Tensor], formula: str) -> torch.Tensor:
    """One merged tensor from a group's tensors (base first), computed in float32, cast back.

    ``task_vector``: t_0 + sum_{j>0}(t_j - t_0); ``keep_top``: t_last; ``mean``: average.
    """
    base = tensors[0]
    with torch.no_grad():
        if formula == "keep_top":
            out = tensors[-1].detach().clone()
        elif formula == "mean":
            out = torch.stack([t.detach().float() for t in tensors]).mean(dim=0)
        elif formula == "task_vector":
            b = base.detach().float()
            out = b.clone()
            for t in tensors[1:]:
                out += t.detach().float() - b
        else:
            raise PlanError(f"Unknown merge formula '{formula}'; use task_vector, keep_top or mean.")
    return out.to(dtype=base.dtype, device=base.device)


def merged_layer(model: nn.Module, group: tuple[int, ...], formula: str) -> nn.Module:
    """A new layer: the base's (shallow clone, norms shared) with merged attention/MLP parameters."""
    layers = decoder_layers(model)
    try:
        sources = [mergeable_parts(model, layers[i]) for i in group]
        base = shallow_clone(layers[group[0]])
        targets = mergeable_parts(model, base)
    except UnsupportedArchitectureError as exc:
        raise PlanError(str(exc)) from exc
    for p_idx, target in enumerate(targets):
        for sub_name, sub in target.named_modules():
            if _is_norm(sub):
                continue
            for pname, param in list(sub._parameters.items()):
                if param is None:
                    continue
                tensors = [src[p_idx].get_submodule(sub_name)._parameters[pname] for src in sources]
                sub._parameters[pname] = nn.Parameter(
                    merge_tensors(tensors, formula),  # type: ignore
                    requires_grad=param.requires_grad,
                )
    return base


# -- config ------------------------------------------------------------------------------------------------
def _layer_count_field(config: Any, adapter: ArchAdapter) -> str:
    if isinstance(getattr(config, adapter.num_layers_field, None), int):
        return adapter.num_layers_field
    for f in _LAYER_COUNT_FIELDS:
        if isinstance(getattr(config, f, None), int):
            return f
    raise PlanError(
        f"The config of model type '{getattr(config, 'model_type', '?')}' has no layer count field to update."
    )


def config_changes(
    config: Any, adapter: ArchAdapter, kept: tuple[int, ...], num_layers: int
) -> dict[str, Any]:
    """Field -> new value: the layer count, and every per-layer list reindexed by ``kept``."""
    changes: dict[str, Any] = {_layer_count_field(config, adapter): len(kept)}
    names = [
        k
        for k, v in vars(config).items()
        if not k.startswith("_")
        and k not in _NOT_PER_LAYER
        and isinstance(v, (list, tuple))
        and len(v) == num_layers
    ]
    names += [
        k
        for k in adapter.per_layer_fields
        if k not in names
        and k in vars(config)  # a per-layer list stored on the config, not a read-only property
        and isinstance(getattr(config, k, None), (list, tuple))
        and len(getattr(config, k)) == num_layers
    ]
    for k in names:
        v = getattr(config, k)
        changes[k] = type(v)(v[i] for i in kept) if isinstance(v, tuple) else [v[i] for i in kept]
    return changes


def _configs_of(model: nn.Module) -> list[Any]:
    """Distinct config objects held by the model's modules (normally just ``model.config``)."""
    seen: dict[int, Any] = {id(model.config): model.config}
    for m in model.modules():
        c = m.__dict__.get("config")
        if c is not None and hasattr(c, "to_dict") and id(c) not in seen:
            seen[id(c)] = c
    return list(seen.values())


# -- device map ------------------------------------------------------------------------------------------
def pruned_device_map(
    device_map: Any, layers_path: str, plan: PrunePlan, replaced: dict[int, bool] | None = None
) -> dict[str, Any] | None:
    """The ``hf_device_map`` of the pruned model, or None when it cannot be made right.

    Keys naming layer i or a sub-module of it (``"model.layers.3"``, ``"model.layers.3.mlp"``) are renamed
    to the layer's new index; those of layers that disappear are dropped; every other key (embeddings,
    norm, head, the whole layer list) is kept. ``replaced`` maps the original index of a layer swapped for
    a foreign module (a trained replacement) to whether that module sits on the base layer's one device:
    its entries collapse to one whole-layer entry, and a replacement elsewhere (or a base layer split over
    several devices) gives None.
    """
    if not isinstance(device_map, dict):
        return None
    pattern = re.compile(rf"{re.escape(layers_path)}\.(\d+)((?:\..+)?)")
    layer_map = plan.layer_map
    out: dict[str, Any] = {}
    whole: dict[int, set[Any]] = {}  # replaced layer (original index) -> the devices of its entries
    for key, device in device_map.items():
        m = pattern.fullmatch(str(key))
        if m is None:
            out[key] = device
            continue
        old = int(m.group(1))
        new = layer_map.get(old)
        if new is None:
            continue
        if replaced is not None and old in replaced:
            whole.setdefault(old, set()).add(device)
            continue
        out[f"{layers_path}.{new}{m.group(2)}"] = device
    for old, same_device in (replaced or {}).items():
        devices = whole.get(old, set())
        if not same_device or len(devices) > 1:
            return None
        if devices:
            out[f"{layers_path}.{layer_map[old]}"] = devices.pop()
    return out


def _set_device_map(model: nn.Module, device_map: dict[str, Any] | None) -> None:
    """Give ``model`` its own ``hf_device_map`` (assigned, never edited in place), or none (None)."""
    if device_map is None:
        model.__dict__.pop("hf_device_map", None)
    else:
        model.__dict__["hf_device_map"] = device_map


def _single_device_as(layer: nn.Module, base: nn.Module) -> bool:
    """Whether every parameter of ``layer`` sits on the one device that all of ``base``'s sit on."""
    devices = {p.device for p in base.parameters()}
    return len(devices) == 1 and {p.device for p in layer.parameters()} <= devices


# -- the two forms -----------------------------------------------------------------------------------------
def _prepare(model: nn.Module, plan: PrunePlan) -> tuple[ArchAdapter, nn.ModuleList]:
    if not isinstance(plan, PrunePlan):
        raise PlanError(f"Expected a PrunePlan, got {type(plan).__name__}.")
    plan.validate()
    adapter = adapter_for(model)
    layers = decoder_layers(model)
    if plan.num_layers != len(layers):
        raise PlanError(
            f"The plan is for a {plan.num_layers}-layer model but this model has {len(layers)} "
            "layers; make the plan from this model's report."
        )
    if plan.merge:
        check_mergeable(model)
    return adapter, layers


def apply_plan(
    model: nn.Module,
    plan: PrunePlan,
    *,
    replacements: dict[int, nn.Module] | None = None,
    copy_weights: bool = False,
) -> nn.Module:
    """A NEW pruned model (see module docstring); the input is never mutated. Same device and dtype.

    ``replacements`` maps a merge group's base index to a ready-made layer used instead of the formula
    (LLM-Streamline's trained replacement); it is shallow-cloned, not mutated.
    """
    adapter, layers = _prepare(model, plan)
    replacements = dict(replacements or {})
    bases = plan.merge_bases
    unknown = set(replacements) - set(bases)
    if unknown:
        raise PlanError(
            f"Replacement(s) for layer(s) {sorted(unknown)} do not start a merge group of the plan."
        )
    old_configs = _configs_of(model)
    changes = config_changes(model.config, adapter, plan.kept_layers, plan.num_layers)
    new_configs = {}
    for c in old_configs:
        nc = copy.deepcopy(c)
        for k, v in changes.items():
            if hasattr(nc, k):
                setattr(nc, k, v)
        new_configs[id(c)] = nc

    new_model = shallow_clone(model)
    cloned = get_attr(new_model, adapter.layers)
    items: list[nn.Module] = []
    for j, old in enumerate(plan.kept_layers):
        if old in replacements:
            mod = shallow_clone(replacements[old])
        elif old in bases:
            mod = merged_layer(model, bases[old], plan.merge_formula)
        else:
            mod = cloned[old]  # type: ignore[index]
        renumber(mod, j)
        items.append(mod)
    set_attr(new_model, adapter.layers, nn.ModuleList(items))
    for m in new_model.modules():
        c = m.__dict__.get("config")
        if c is not None and id(c) in new_configs:
            m.__dict__["config"] = new_configs[id(c)]
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        new_model.generation_config = copy.deepcopy(gen)
    if "hf_device_map" in model.__dict__:  # shared by the shallow clone: replace, never edit in place
        replaced = {old: _single_device_as(mod, layers[old]) for old, mod in replacements.items()}
        _set_device_map(new_model, pruned_device_map(model.__dict__["hf_device_map"], adapter.layers, plan,
                                                     replaced))
    if copy_weights:
        materialize(new_model)
    return new_model


def private_view(model: nn.Module) -> nn.Module:
    """A new model object that shares every weight with ``model`` but owns its modules and config.

    Hooks, layer lists, ``layer_idx`` values and config edits made on the view never reach ``model``. Work
    that temporarily rewires a model (capture hooks, in-place pruning inside sweeps) runs on a view, so a
    model shared between dashboard sessions or threads is never seen hooked or half-pruned. Costs a few ms.
    """
    return apply_plan(model, PrunePlan(num_layers=len(decoder_layers(model)), method="remove"))


@contextlib.contextmanager
def pruned(model: nn.Module, plan: PrunePlan) -> Iterator[nn.Module]:
    """Prune ``model`` IN PLACE for the ``with`` block, then restore it exactly (even on error).

    Only merged layers are new objects; kept layers are the model's own, temporarily renumbered. Not for
    a model another thread may use meanwhile (use :func:`apply_plan` there).
    """
    adapter, layers = _prepare(model, plan)
    bases = plan.merge_bases
    new_list = nn.ModuleList(
        [
            merged_layer(model, bases[old], plan.merge_formula) if old in bases else layers[old]
            for old in plan.kept_layers
        ]
    )
    saved_idx = [
        (m, m.__dict__["layer_idx"]) for m in layers.modules() if isinstance(m.__dict__.get("layer_idx"), int)
    ]
    changes = config_changes(model.config, adapter, plan.kept_layers, plan.num_layers)
    saved_cfg = [(c, {k: getattr(c, k) for k in changes if hasattr(c, k)}) for c in _configs_of(model)]
    has_map = "hf_device_map" in model.__dict__
    saved_map = model.__dict__.get("hf_device_map")
    try:
        set_attr(model, adapter.layers, new_list)
        for j, mod in enumerate(new_list):
            renumber(mod, j)
        for c, old in saved_cfg:
            for k in old:
                setattr(c, k, changes[k])
        if has_map:
            _set_device_map(model, pruned_device_map(saved_map, adapter.layers, plan))
        yield model
    finally:
        set_attr(model, adapter.layers, layers)
        for m, idx in saved_idx:
            m.layer_idx = idx
        for c, old in saved_cfg:
            for k, v in old.items():
                setattr(c, k, v)
        if has_map:
            _set_device_map(model, saved_map)
