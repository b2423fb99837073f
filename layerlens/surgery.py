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

Sublayers (``plan.drop_attn`` / ``plan.drop_mlp``): in the pruned model the layer's attention module is
replaced by :class:`SkippedAttention` and its MLP by :class:`SkippedMLP` (OPT's ``fc1``/``fc2`` pair: an
identity and a zero), which return a zero-stride zero tensor of the input's shape without any compute; the
norms that only feed or follow that sublayer (the adapter's ``attn_norms``/``mlp_norms``) become
identities. So the layer adds nothing for that sublayer and costs an add. KV cache: the pruned config gets
``kv_sharing_modes`` with ``"reuse"`` for every layer whose attention is dropped, so transformers'
``DynamicCache(config=...)`` builds a ``DummyLayer`` there (no keys/values, skipped when the cache counts
positions); ``generate`` with cache equals generate without. ``kv_sharing_modes`` exists only on the
in-memory pruned model: :func:`layerlens.export.save_pruned` writes dropped sublayers as zeroed output
projections instead (see there).

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


# -- sublayers ---------------------------------------------------------------------------------------------
def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError("a skipped sublayer was called without its hidden states")
    return hidden


def _zeros_like(hidden: torch.Tensor) -> torch.Tensor:
    """Zeros of ``hidden``'s shape without allocating them: one element expanded (stride 0)."""
    return hidden.new_zeros(()).expand_as(hidden)


class _Skipped(nn.Module):
    """Base of the stand-ins for dropped parts: ``original`` (not a registered child, so no parameters, no
    state dict entry) is the module it stands for, used by :func:`exportable` to write zeroed weights."""

    def __init__(self, original: nn.Module | None = None):
        super().__init__()
        self.__dict__["original"] = original


class SkippedAttention(_Skipped):
    """A dropped attention sublayer: returns ``(zeros, None)`` like an attention module, computes nothing
    and never touches the KV cache."""

    def __init__(self, original: nn.Module | None = None, layer_idx: int | None = None):
        super().__init__(original)
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return _zeros_like(_hidden_arg(args, kwargs)), None


class SkippedMLP(_Skipped):
    """A dropped MLP sublayer (or the last module of one): zeros of the input's shape, no compute."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _zeros_like(_hidden_arg(args, kwargs))


class SkippedNorm(_Skipped):
    """A norm (or OPT's ``fc1``) that only fed or followed a dropped sublayer: passes its input through."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _hidden_arg(args, kwargs)


def _sublayer_swaps(layer: nn.Module, adapter: ArchAdapter, attn: bool, mlp: bool) -> list[tuple[str, nn.Module]]:
    """``(path inside the layer, new module)`` pairs that drop the layer's attention and/or MLP."""
    def part(path: str) -> nn.Module:
        try:
            return get_attr(layer, path)  # type: ignore[return-value]
        except AttributeError as exc:
            raise PlanError(f"Layers of type '{type(layer).__name__}' have no '{path}' sub-module, so their "
                            "sublayers cannot be dropped; remove whole layers instead.") from exc

    swaps: list[tuple[str, nn.Module]] = []
    if attn:
        original = part(adapter.attention)
        swaps.append((adapter.attention, SkippedAttention(original, getattr(original, "layer_idx", None))))
        swaps += [(p, SkippedNorm(part(p))) for p in adapter.attn_norms]
    if mlp:
        paths = adapter.mlp.split(",")
        swaps += [(p, SkippedNorm(part(p))) for p in paths[:-1]] + [(paths[-1], SkippedMLP(part(paths[-1])))]
        swaps += [(p, SkippedNorm(part(p))) for p in adapter.mlp_norms]
    return [(p, m) for p, m in swaps if not isinstance(part(p), _Skipped)]  # already dropped: keep as is


def dropped_sublayers(model: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(drop_attn, drop_mlp)`` of an in-memory model, as indices of ITS layers (what surgery skipped)."""
    adapter = adapter_for(model)
    attn, mlp = [], []
    for j, layer in enumerate(decoder_layers(model)):
        if isinstance(get_attr(layer, adapter.attention), SkippedAttention):
            attn.append(j)
        if isinstance(get_attr(layer, adapter.mlp.split(",")[-1]), SkippedMLP):
            mlp.append(j)
    return tuple(attn), tuple(mlp)


def _zeroed_clone(module: nn.Module, path: str | None) -> nn.Module:
    """A shallow clone of ``module`` whose sub-module at ``path`` ("" for itself) has all-zero parameters."""
    clone = shallow_clone(module)
    target = clone if not path else clone.get_submodule(path)
    for name, p in list(target._parameters.items()):
        if p is not None:
            target._parameters[name] = nn.Parameter(torch.zeros_like(p), requires_grad=p.requires_grad)
    return clone


def exportable(model: nn.Module) -> nn.Module:
    """A model plain ``transformers`` saves and reloads with the SAME outputs as ``model``, whose dropped
    sublayers are skipped: every stand-in goes back to the module it replaced, with the sublayer's output
    projection (the adapter's ``attn_out``/``mlp_out``: weight AND bias) set to zeros, and the config loses
    its in-memory ``kv_sharing_modes``. A zero output projection makes the sublayer add exactly zero, so the
    logits are identical (not just close); the attention and MLP still run (and the attention still fills
    a KV cache) in a plain reload -- LayerLens reloads such a folder with the sublayers really skipped (see
    :func:`layerlens.export.skip_recorded_sublayers`). ``model`` itself is returned when nothing was dropped.
    """
    attn, mlp = dropped_sublayers(model)
    if not attn and not mlp:
        return model
    adapter = adapter_for(model)
    new = shallow_clone(model)
    layers = decoder_layers(new)
    for j in sorted(set(attn) | set(mlp)):
        layer = layers[j]
        for path in (adapter.attention, *adapter.attn_norms, *adapter.mlp.split(","), *adapter.mlp_norms):
            stand_in = get_attr(layer, path)
            if not isinstance(stand_in, _Skipped):
                continue
            original = stand_in.original
            out = None
            if isinstance(stand_in, SkippedAttention):
                out = adapter.attn_out
            elif isinstance(stand_in, SkippedMLP):
                out = adapter.mlp_out
            if out is None and not isinstance(stand_in, SkippedNorm):
                raise PlanError(f"Model type '{model.config.model_type}' has no known output projection to zero, "
                                "so a model with dropped sublayers cannot be saved for plain transformers.")
            if out is not None:
                sub = out[len(path) + 1:] if out.startswith(path + ".") else ("" if out == path else None)
                if sub is None:
                    raise PlanError(f"The output projection '{out}' is not inside '{path}'.")
                original = _zeroed_clone(original, sub)
            else:
                original = shallow_clone(original)
            set_attr(layer, path, original)
        renumber(layer, j)
    copies: dict[int, Any] = {}
    for m in new.modules():
        c = m.__dict__.get("config")
        if c is not None and "kv_sharing_modes" in vars(c):
            if id(c) not in copies:
                copies[id(c)] = copy.deepcopy(c)
                vars(copies[id(c)]).pop("kv_sharing_modes", None)
            m.__dict__["config"] = copies[id(c)]
    return new


def kv_sharing_modes(plan: PrunePlan, existing: Any = None) -> list[str | None]:
    """Per layer of the pruned model: ``"reuse"`` (no KV cache of its own) where the attention is dropped;
    ``existing`` (the model's own list, from an earlier sublayer pruning) is kept for the other layers."""
    dropped = set(plan.drop_attn)
    before = list(existing) if existing is not None else [None] * plan.num_layers
    return ["reuse" if old in dropped else before[old] for old in plan.kept_layers]


def _check_sublayer_config(configs: list[Any], plan: PrunePlan) -> None:
    for c in configs:
        modes = vars(c).get("kv_sharing_modes")
        if plan.drop_attn and (modes is None and getattr(c, "kv_sharing_modes", None) is not None
                               or modes is not None and (len(modes) != plan.num_layers
                                                         or any(m not in (None, "reuse") for m in modes))):
            raise PlanError("This model already shares KV caches between layers (kv_sharing_modes); LayerLens "
                            "cannot drop its attention sublayers. Remove whole layers instead.")


def _layer_count_configs(configs: list[Any], adapter: ArchAdapter) -> list[Any]:
    out = []
    for c in configs:
        with contextlib.suppress(PlanError):
            _layer_count_field(c, adapter)
            out.append(c)
    return out


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
        if old in plan.drop_attn or old in plan.drop_mlp:
            for path, part in _sublayer_swaps(mod, adapter, old in plan.drop_attn, old in plan.drop_mlp):
                set_attr(mod, path, part)
        renumber(mod, j)
        items.append(mod)
    set_attr(new_model, adapter.layers, nn.ModuleList(items))
    if plan.drop_attn:
        _check_sublayer_config(old_configs, plan)
        for c in _layer_count_configs(old_configs, adapter):
            new_configs[id(c)].kv_sharing_modes = kv_sharing_modes(plan, vars(c).get("kv_sharing_modes"))
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
    swaps = [(layers[old], path, part) for old in plan.kept_layers
             if old in plan.drop_attn or old in plan.drop_mlp
             for path, part in _sublayer_swaps(layers[old], adapter, old in plan.drop_attn, old in plan.drop_mlp)]
    saved_parts = [(layer, path, get_attr(layer, path)) for layer, path, _ in swaps]
    kv_configs = []
    if plan.drop_attn:
        _check_sublayer_config(_configs_of(model), plan)
        kv_configs = [(c, "kv_sharing_modes" in vars(c), vars(c).get("kv_sharing_modes"))
                      for c in _layer_count_configs(_configs_of(model), adapter)]
    try:
        for layer, path, part in swaps:
            set_attr(layer, path, part)
        set_attr(model, adapter.layers, new_list)
        for j, mod in enumerate(new_list):
            renumber(mod, j)
        for c, old in saved_cfg:
            for k in old:
                setattr(c, k, changes[k])
        for c, _, value in kv_configs:  # after the reindexing above, which would overwrite it
            c.kv_sharing_modes = kv_sharing_modes(plan, value)
        if has_map:
            _set_device_map(model, pruned_device_map(saved_map, adapter.layers, plan))
        yield model
    finally:
        for layer, path, part in reversed(saved_parts):
            set_attr(layer, path, part)
        for c, had, value in kv_configs:
            if had:
                c.kv_sharing_modes = value
            else:
                vars(c).pop("kv_sharing_modes", None)
        set_attr(model, adapter.layers, layers)
        for m, idx in saved_idx:
            m.layer_idx = idx
        for c, old in saved_cfg:
            for k, v in old.items():
                setattr(c, k, v)
        if has_map:
            _set_device_map(model, saved_map)
