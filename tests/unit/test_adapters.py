"""layerlens.adapters: where every covered architecture keeps its layers, final norm and mergeable parts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from tiny_models import ARCHITECTURES, LAYERS

from layerlens.adapters import (
    ADAPTERS,
    TESTED_ARCHITECTURES,
    adapter_for,
    decoder_layers,
    final_norm,
    get_attr,
    layer_count,
    mergeable_parts,
    num_layers_of,
    set_attr,
)
from layerlens.errors import LayerLensError, UnsupportedArchitectureError

# Written out by hand from the transformers model classes, independent of the adapter table:
# (layer list, final norm, layer-count config field, attention + MLP sub-modules of a layer).
EXPECTED = {
    "llama": ("model.layers", "model.norm", "num_hidden_layers", ("self_attn", "mlp")),
    "mistral": ("model.layers", "model.norm", "num_hidden_layers", ("self_attn", "mlp")),
    "qwen2": ("model.layers", "model.norm", "num_hidden_layers", ("self_attn", "mlp")),
    "qwen3": ("model.layers", "model.norm", "num_hidden_layers", ("self_attn", "mlp")),
    "gemma": ("model.layers", "model.norm", "num_hidden_layers", ("self_attn", "mlp")),
    "gemma2": ("model.layers", "model.norm", "num_hidden_layers", ("self_attn", "mlp")),
    "phi3": ("model.layers", "model.norm", "num_hidden_layers", ("self_attn", "mlp")),
    "gpt2": ("transformer.h", "transformer.ln_f", "n_layer", ("attn", "mlp")),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "num_hidden_layers", ("attention", "mlp")),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm", "num_hidden_layers",
            ("self_attn", "fc1", "fc2")),
}



def _walk(obj, path: str):
    """Follow a dotted path through registered children (not get_attr: an independent reference)."""
    for part in path.split("."):
        obj = obj._modules[part] if isinstance(obj, nn.Module) and part in obj._modules else vars(obj)[part]
    return obj


def test_every_tested_architecture_has_a_table_entry():
    assert set(TESTED_ARCHITECTURES) == set(ARCHITECTURES) == set(EXPECTED)
    assert set(TESTED_ARCHITECTURES) <= set(ADAPTERS)


def test_adapter_finds_the_decoder_layers(arch_model):
    arch, model = arch_model
    layers_path, _, _, _ = EXPECTED[arch]
    adapter = adapter_for(model)
    assert adapter.layers == layers_path and not adapter.generic
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert layers is _walk(model, layers_path)
    assert len(layers) == layer_count(model) == LAYERS == num_layers_of(model.config)


def test_adapter_layer_count_field(arch_model):
    arch, model = arch_model
    _, _, field, _ = EXPECTED[arch]
    adapter = adapter_for(model)
    assert adapter.num_layers_field == field
    assert getattr(model.config, adapter.num_layers_field) == LAYERS == len(decoder_layers(model))


def test_adapter_finds_the_final_norm(arch_model):
    """The final norm is the module the backbone applies to the last layer's output: applying it to the
    hooked output of the last layer gives the backbone's last_hidden_state."""
    arch, model = arch_model
    _, norm_path, _, _ = EXPECTED[arch]
    assert adapter_for(model).final_norm == norm_path
    norm = final_norm(model)
    assert norm is _walk(model, norm_path)
    assert "norm" in type(norm).__name__.lower()

    seen = {}
    handle = decoder_layers(model)[-1].register_forward_hook(
        lambda mod, args, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[5, 17, 42, 99, 7]]), output_hidden_states=True)
    finally:
        handle.remove()
    last = out.hidden_states[-1]
    with torch.no_grad():
        torch.testing.assert_close(norm(seen["h"]), last, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["h"], last, atol=1e-3)  # the norm really changes the state


def test_mergeable_parts(arch_model):
    arch, model = arch_model
    _, _, _, parts = EXPECTED[arch]
    for layer in decoder_layers(model):
        found = mergeable_parts(model, layer)
        assert len(found) == len(parts)
        for module, name in zip(found, parts, strict=True):
            assert module is getattr(layer, name)
            assert sum(p.numel() for p in module.parameters()) > 0


def test_unknown_model_type_falls_back_to_the_single_layer_list(arch_model, monkeypatch):
    """A model type missing from the table is handled when it has one layer list of the right length,
    and the fallback finds the same paths the table names."""
    arch, model = arch_model
    layers_path, norm_path, _, _ = EXPECTED[arch]
    monkeypatch.setattr(model.config, "model_type", f"unknown-{arch}")
    adapter = adapter_for(model)
    assert adapter.generic
    assert adapter.layers == layers_path and adapter.final_norm == norm_path
    assert decoder_layers(model) is _walk(model, layers_path)


# ------------------------------------------------------------------------------------------ hand-made models


class _Block(nn.Module):
    def __init__(self, with_parts: bool = True):
        super().__init__()
        if with_parts:
            self.self_attn = nn.Linear(4, 4)
            self.mlp = nn.Linear(4, 4)
        else:
            self.ff = nn.Linear(4, 4)


class _Toy(nn.Module):
    """A non-transformers model with a ``config``, built from the given sub-modules."""

    def __init__(self, model_type: str = "toy", num_hidden_layers: int | None = 3, **modules: nn.Module):
        super().__init__()
        fields = {"model_type": model_type}
        if num_hidden_layers is not None:
            fields["num_hidden_layers"] = num_hidden_layers
        self.config = SimpleNamespace(**fields)
        for name, module in modules.items():
            setattr(self, name, module)


def _stack(n: int = 3, with_parts: bool = True) -> nn.ModuleList:
    return nn.ModuleList(_Block(with_parts) for _ in range(n))


def _backbone(**modules: nn.Module) -> nn.Module:
    m = nn.Module()
    for name, module in modules.items():
        setattr(m, name, module)
    return m


def test_generic_adapter_on_a_hand_made_model():
    toy = _Toy(backbone=_backbone(blocks=_stack(), final_layer_norm=nn.LayerNorm(4), other=_stack(2)))
    adapter = adapter_for(toy)
    assert adapter.generic and adapter.layers == "backbone.blocks"
    assert adapter.final_norm == "backbone.final_layer_norm"
    assert decoder_layers(toy) is toy.backbone.blocks and final_norm(toy) is toy.backbone.final_layer_norm
    assert layer_count(toy) == 3
    layer = toy.backbone.blocks[1]
    assert mergeable_parts(toy, layer) == [layer.self_attn, layer.mlp]


def test_generic_adapter_without_a_final_norm():
    toy = _Toy(blocks=_stack())
    assert adapter_for(toy).layers == "blocks"
    assert final_norm(toy) is None


def _assert_names_supported(message: str) -> None:
    assert "\n" not in message and message.endswith(".")
    for arch in TESTED_ARCHITECTURES:
        assert arch in message


@pytest.mark.parametrize("modules", [
    {"encoder": nn.Linear(4, 4)},  # no layer list at all
    {"a": _stack(3), "b": _stack(3)},  # two layer lists of the layer count: ambiguous
    {"blocks": _stack(2)},  # a layer list of the wrong length
], ids=["no-layer-list", "two-layer-lists", "wrong-length"])
def test_unsupported_model_is_refused_naming_the_supported_ones(modules):
    toy = _Toy(model_type="mystery", **modules)
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for(toy)
    assert isinstance(err.value, LayerLensError)
    assert "'mystery'" in str(err.value)
    _assert_names_supported(str(err.value))
    with pytest.raises(UnsupportedArchitectureError):
        decoder_layers(toy)


def test_plain_module_with_no_layer_list():
    """A torch module with a config but nothing resembling decoder layers (and no known model type)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.config = SimpleNamespace(model_type=None, num_hidden_layers=2)
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for(model)
    _assert_names_supported(str(err.value))


def test_config_without_a_layer_count_is_refused():
    toy = _Toy(model_type="mystery", num_hidden_layers=None, blocks=_stack())
    with pytest.raises(UnsupportedArchitectureError, match="no layer count") as err:
        adapter_for(toy)
    _assert_names_supported(str(err.value))


@pytest.mark.parametrize("field", ["num_hidden_layers", "n_layer", "num_layers"])
def test_num_layers_of_reads_every_known_field(field):
    assert num_layers_of(SimpleNamespace(**{field: 7})) == 7
    assert num_layers_of(SimpleNamespace(**{field: "7", "num_layers": 5})) == 5  # only ints count


def test_layers_without_mergeable_parts_are_refused():
    toy = _Toy(blocks=_stack(with_parts=False))
    with pytest.raises(UnsupportedArchitectureError, match="cannot be merged") as err:
        mergeable_parts(toy, toy.blocks[0])
    assert "'self_attn'" in str(err.value) and "layer removal" in str(err.value)


# ------------------------------------------------------------------------------------------ dotted paths


def test_get_attr_follows_dotted_paths():
    layers = _stack()
    root = _Toy(model=_backbone(layers=layers))
    assert get_attr(root, "model") is root.model
    assert get_attr(root, "model.layers") is layers
    assert get_attr(root, "model.layers.2") is layers[2]  # ModuleList children by index
    assert get_attr(root, "model.layers.2.mlp.weight") is layers[2].mlp.weight
    ns = SimpleNamespace(a=SimpleNamespace(b=SimpleNamespace(c=5)))
    assert get_attr(ns, "a.b.c") == 5
    with pytest.raises(AttributeError):
        get_attr(root, "model.nope")
    with pytest.raises(AttributeError):
        get_attr(ns, "a.x.c")


def test_set_attr_replaces_only_the_named_attribute():
    layers = _stack()
    root = _Toy(model=_backbone(layers=layers, norm=nn.LayerNorm(4)))
    new_norm = nn.Identity()
    set_attr(root, "model.norm", new_norm)
    assert root.model.norm is new_norm and root.model.layers is layers
    assert "norm" in root.model._modules and root.model._modules["norm"] is new_norm  # registered as a child
    new_layers = _stack(2)
    set_attr(root, "model.layers", new_layers)
    assert root.model.layers is new_layers and root.model._modules["layers"] is new_layers
    ns = SimpleNamespace(a=SimpleNamespace(b=1))
    set_attr(ns, "a.b", 2)
    set_attr(ns, "top", 3)
    assert ns.a.b == 2 and ns.top == 3
    with pytest.raises(AttributeError):
        set_attr(ns, "missing.b", 1)
