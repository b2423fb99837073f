"""Per-architecture layer adapters: one declarative table, no name checks elsewhere.

An adapter says where the decoder layers live, where the final norm is, which config
field holds the layer count, and which sub-modules of a layer hold the attention and MLP
weights (for merging). Surgery and capture only talk to models through this module.

Sublayers: ``mid_residual`` names the sub-module of a layer whose INPUT is the residual stream between
the attention add and the MLP add (llama-likes: ``post_attention_layernorm``; Gemma 2/3:
``pre_feedforward_layernorm``; GPT-2: ``ln_2``; OLMo 2: ``mlp``); ``no_mid_residual_when`` lists config
``(field, value)`` pairs under which the layer has no such state (GPT-NeoX with
``use_parallel_residual``: attention and MLP read the same input and add to it together; OPT with
``do_layer_norm_before=False``: the state between the adds is normed). ``attn_norms`` / ``mlp_norms``
are norms that only feed (or only follow) that sublayer, skipped with it when it is dropped; ``attn_out``
/ ``mlp_out`` are its output projections (zeroed by the plain-transformers export of a dropped sublayer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchAdapter:
    """Where things live in one family of Hugging Face causal LMs (dotted attribute paths)."""

    layers: str
    final_norm: str | None
    num_layers_field: str = "num_hidden_layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    # Config fields whose value is a per-layer list (trimmed/reindexed by surgery). Any other
    # list of length L found in the config is treated the same way; these are just documented.
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    generic: bool = False
    mid_residual: str | None = None
    no_mid_residual_when: tuple[tuple[str, object], ...] = ()
    attn_norms: tuple[str, ...] = ()
    mlp_norms: tuple[str, ...] = ()
    attn_out: str | None = None
    mlp_out: str | None = None


_LLAMA_LIKE = ArchAdapter(layers="model.layers", final_norm="model.norm",
                          mid_residual="post_attention_layernorm", attn_norms=("input_layernorm",),
                          mlp_norms=("post_attention_layernorm",), attn_out="self_attn.o_proj",
                          mlp_out="mlp.down_proj")
# Gemma 2/3: sandwich norms; post_attention_layernorm normalises the attention OUTPUT before the add.
_GEMMA2_LIKE = ArchAdapter(layers="model.layers", final_norm="model.norm",
                           mid_residual="pre_feedforward_layernorm",
                           attn_norms=("input_layernorm", "post_attention_layernorm"),
                           mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
                           attn_out="self_attn.o_proj", mlp_out="mlp.down_proj")

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "phi3": ArchAdapter(layers="model.layers", final_norm="model.norm", mid_residual="post_attention_layernorm",
                        attn_norms=("input_layernorm",), mlp_norms=("post_attention_layernorm",),
                        attn_out="self_attn.o_proj", mlp_out="mlp.down_proj"),
    "granite": _LLAMA_LIKE,
    # OLMo 2 norms the sublayer OUTPUTS (post_attention_layernorm / post_feedforward_layernorm); the MLP
    # reads the residual itself.
    "olmo2": ArchAdapter(layers="model.layers", final_norm="model.norm", mid_residual="mlp",
                         attn_norms=("post_attention_layernorm",), mlp_norms=("post_feedforward_layernorm",),
                         attn_out="self_attn.o_proj", mlp_out="mlp.down_proj"),
    "gpt2": ArchAdapter(layers="transformer.h", final_norm="transformer.ln_f",
                        num_layers_field="n_layer", attention="attn", mlp="mlp", mid_residual="ln_2",
                        attn_norms=("ln_1",), mlp_norms=("ln_2",), attn_out="attn.c_proj", mlp_out="mlp.c_proj"),
    "gpt_neox": ArchAdapter(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
                            attention="attention", mlp="mlp", mid_residual="post_attention_layernorm",
                            no_mid_residual_when=(("use_parallel_residual", True),),
                            attn_norms=("input_layernorm",), mlp_norms=("post_attention_layernorm",),
                            attn_out="attention.dense", mlp_out="mlp.dense_4h_to_h"),
    # OPT's MLP is fc1 -> activation -> fc2 inside the layer (no module of its own); its input is 2-D.
    "opt": ArchAdapter(layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
                       attention="self_attn", mlp="fc1,fc2", mid_residual="final_layer_norm",
                       no_mid_residual_when=(("do_layer_norm_before", False),),
                       attn_out="self_attn.out_proj", mlp_out="fc2"),
}

TESTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3",
                        "gpt2", "gpt_neox", "opt")


def get_attr(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(obj: object, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def num_layers_of(config: object) -> int:
    for field in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value
    raise UnsupportedArchitectureError(
        f"The config of model type '{getattr(config, 'model_type', '?')}' has no layer count "
        f"(num_hidden_layers); LayerLens supports {', '.join(TESTED_ARCHITECTURES)}.")


def _generic_adapter(model: nn.Module) -> ArchAdapter | None:
    """Fallback: the single ModuleList whose length equals the config's layer count."""
    n = num_layers_of(model.config)
    found = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == n and name]
    if len(found) != 1:
        return None
    layers = found[0]
    parent = layers.rsplit(".", 1)[0] if "." in layers else ""
    norm = None
    for cand in ("norm", "final_layer_norm", "ln_f", "final_layernorm"):
        path = f"{parent}.{cand}" if parent else cand
        try:
            get_attr(model, path)
        except AttributeError:
            continue
        norm = path
        break
    return ArchAdapter(layers=layers, final_norm=norm, generic=True)


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter of a loaded model; a generic fallback for unknown types, else a clear error."""
    model_type = getattr(model.config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is not None:
        return adapter
    generic = _generic_adapter(model)
    if generic is not None:
        return generic
    raise UnsupportedArchitectureError(
        f"Cannot find the decoder layers of model type '{model_type}'. Supported architectures: "
        f"{', '.join(TESTED_ARCHITECTURES)} (others work when the model has exactly one layer list "
        "of length num_hidden_layers).")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_attr(model, adapter_for(model).layers)  # type: ignore[return-value]


def final_norm(model: nn.Module) -> nn.Module | None:
    path = adapter_for(model).final_norm
    return None if path is None else get_attr(model, path)  # type: ignore[return-value]


def layer_count(model: nn.Module) -> int:
    return len(decoder_layers(model))


def mid_residual_path(model: nn.Module) -> str | None:
    """The sub-module (of every decoder layer) whose input is the residual between the attention add and
    the MLP add, or None when the architecture has no such state (parallel residual, unknown layout)."""
    adapter = adapter_for(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if adapter.mid_residual is None:
        return None
    for field, value in adapter.no_mid_residual_when:
        if getattr(config, field, None) == value:
            return None
    return adapter.mid_residual


def sublayer_params(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Per decoder layer: (attention parameters, MLP parameters) -- what dropping each sublayer removes."""
    return layer_sublayer_params(adapter_for(model), decoder_layers(model))


def layer_sublayer_params(adapter: ArchAdapter, layers: Iterable[nn.Module]) -> tuple[tuple[int, int], ...]:
    """:func:`sublayer_params` of these decoder ``layers`` (meta tensors count too: only sizes are read)."""
    out = []
    for layer in layers:
        counts = []
        for paths in ((adapter.attention,), tuple(adapter.mlp.split(","))):
            total = 0
            for path in paths:
                with contextlib.suppress(AttributeError):
                    total += sum(p.numel() for p in get_attr(layer, path).parameters())  # type: ignore[union-attr]
            counts.append(total)
        out.append((counts[0], counts[1]))
    return tuple(out)


def mergeable_parts(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """Sub-modules of a decoder layer whose weights sliding merging combines (attention, MLP)."""
    adapter = adapter_for(model)
    parts: list[nn.Module] = []
    for path in (adapter.attention, *adapter.mlp.split(",")):
        try:
            parts.append(get_attr(layer, path))  # type: ignore[arg-type]
        except AttributeError as exc:
            raise UnsupportedArchitectureError(
                f"Layers of model type '{model.config.model_type}' have no '{path}' sub-module, so "
                "they cannot be merged; use layer removal instead.") from exc
    return parts
