"""layerlens.capture: the hooks record h_0..h_L as the contract says, and leave nothing behind.

Contract: h_0 = the input of decoder layer 0, h_{i+1} = the output of layer i, the last one BEFORE the
final norm (unlike transformers' ``hidden_states[-1]``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from tiny_models import LAYERS
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerlens.adapters import decoder_layers, final_norm
from layerlens.capture import ResidualCapture
from layerlens.data import batches

IDS = torch.tensor([[5, 17, 42, 99, 7, 256, 3, 64], [11, 12, 13, 300, 400, 2, 9, 10]])



def _hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every kind of forward hook on every module (transformers may keep hooks of its own)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
             "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    return {name: tuple(len(getattr(m, k, {})) for k in kinds) for name, m in model.named_modules()}


def _capture(model: nn.Module, **inputs) -> torch.Tensor:
    with ResidualCapture(model) as cap, torch.no_grad():
        model(**inputs)
        return cap.take().clone()


def test_states_match_hidden_states_except_the_last_which_is_before_the_norm(arch_model):
    arch, model = arch_model
    states = _capture(model, input_ids=IDS)
    assert states.shape == (LAYERS + 1, *IDS.shape, model.config.get_text_config().hidden_size)
    with torch.no_grad():
        hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states
    assert len(hidden) == LAYERS + 1
    for i in range(LAYERS):  # h_0 (embeddings, input of layer 0) .. h_{L-1}: identical tensors
        assert torch.equal(states[i], hidden[i]), f"{arch}: h_{i} differs from hidden_states[{i}]"
    # transformers' last entry is after the final norm; ours is the raw output of the last layer
    assert not torch.allclose(states[LAYERS], hidden[LAYERS], atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(final_norm(model)(states[LAYERS]), hidden[LAYERS], rtol=1e-5, atol=1e-5)


def test_states_match_a_manual_loop_over_the_layers(arch_model):
    """Independent of transformers' hidden_states: hook each layer by hand and record its input/output."""
    arch, model = arch_model
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append(
                (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, args, out: outputs.append(first(out).clone())))
    try:
        with torch.no_grad():
            model(input_ids=IDS)
    finally:
        for h in handles:
            h.remove()
    assert len(inputs) == len(outputs) == LAYERS
    states = _capture(model, input_ids=IDS)
    assert torch.equal(states[0], inputs[0])
    for i in range(LAYERS):
        assert torch.equal(states[i + 1], outputs[i]), f"{arch}: h_{i + 1} is not the output of layer {i}"
        if i + 1 < LAYERS:
            assert torch.equal(outputs[i], inputs[i + 1])  # a plain residual chain


def test_llama_states_match_calling_the_layers_in_a_python_loop(tiny_llama):
    """h_0 = embeddings, h_{i+1} = layer_i(h_i) computed by calling the layers ourselves (causal attention,
    rotary positions), no hooks and no final norm involved."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    inner = model.model
    with torch.no_grad():
        h = inner.embed_tokens(IDS)
        positions = torch.arange(IDS.shape[1])[None].expand(IDS.shape[0], -1)
        rotary = inner.rotary_emb(h, positions)
        ref = [h]
        for layer in inner.layers:
            out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            h = out[0] if isinstance(out, tuple) else out
            ref.append(h)
    states = _capture(model, input_ids=IDS)
    for i, expected in enumerate(ref):
        torch.testing.assert_close(states[i], expected, rtol=1e-5, atol=1e-5, msg=f"h_{i}")
    assert not torch.allclose(states[-1], inner.norm(ref[-1]), atol=1e-3)


def test_capture_keeps_the_model_dtype(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    states = _capture(model, input_ids=IDS)
    assert states.dtype == torch.bfloat16 and states.shape[:3] == (LAYERS + 1, 2, 8)


# ------------------------------------------------------------------------------------------ padding


def test_right_padded_batch_real_positions_equal_unpadded_runs(arch_model, tiny_model_factory):
    """In a right-padded batch (as ``data.batches`` makes, pads have attention_mask 0) every real token's
    states equal those of its sequence run alone; pad positions are in the block, for the mask to drop."""
    arch, model = arch_model
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory(arch))
    token_lists = [[5, 17, 42, 99, 7, 256, 3, 64, 8, 9], [11, 12, 13, 300], [20, 21, 22, 23, 24, 25, 26]]
    batch, = list(batches(tokenizer, token_lists, batch_size=3))
    assert batch.attention_mask.tolist() == [[1] * 10, [1] * 4 + [0] * 6, [1] * 7 + [0] * 3]
    assert batch.input_ids[1, 4:].eq(tokenizer.pad_token_id).all()
    padded = _capture(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert padded.shape[:3] == (LAYERS + 1, 3, 10)
    for row, toks in enumerate(token_lists):
        alone = _capture(model, input_ids=torch.tensor([toks]))
        n = len(toks)
        scale = float(alone.abs().max())
        torch.testing.assert_close(padded[:, row, :n], alone[:, 0], rtol=1e-4, atol=1e-5 * scale,
                                   msg=f"{arch}: row {row} differs from its unpadded run")


# ------------------------------------------------------------------------------------------ hook hygiene


def test_hooks_are_removed_on_exit(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    before = _hook_counts(model)
    with ResidualCapture(model) as cap:
        during = _hook_counts(model)
        assert during != before  # the capture really hooks the layers while active
        added = sum(during[n][0] + during[n][1] - before[n][0] - before[n][1] for n in before)
        assert added == LAYERS + 1  # one output hook per layer + one input hook on layer 0
        with torch.no_grad():
            model(input_ids=IDS)
        cap.take()
    assert _hook_counts(model) == before
    with torch.no_grad():
        model(input_ids=IDS)  # a forward after exit touches no capture state
    with pytest.raises(RuntimeError):
        cap.take()


def test_hooks_are_removed_when_the_body_raises(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    before = _hook_counts(model)
    with pytest.raises(KeyError, match="boom"), ResidualCapture(model):
        with torch.no_grad():
            model(input_ids=IDS)
        raise KeyError("boom")
    assert _hook_counts(model) == before


def test_hooks_are_removed_when_the_forward_raises(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    before = _hook_counts(model)

    def fail(module, args, output):
        raise ValueError("layer 3 exploded")

    bomb = decoder_layers(model)[3].register_forward_hook(fail)
    try:
        with pytest.raises(ValueError, match="exploded"), ResidualCapture(model) as cap, torch.no_grad():
            model(input_ids=IDS)
        with pytest.raises(RuntimeError):
            cap.take()  # nothing half-captured survives
    finally:
        bomb.remove()
    assert _hook_counts(model) == before


def test_a_capture_that_never_ran_a_layer_has_nothing_to_take(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with ResidualCapture(model) as cap, pytest.raises(RuntimeError, match="did not run"):
        cap.take()


def test_layer_outputs_carrying_hidden_states_as_an_attribute():
    from types import SimpleNamespace

    from layerlens.capture import _first_tensor

    t = torch.ones(2, 3)
    assert _first_tensor(SimpleNamespace(hidden_states=t)) is t  # bool(t) would raise
    assert _first_tensor(SimpleNamespace(hidden_states=None, last_hidden_state=t)) is t
