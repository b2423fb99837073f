"""Residual-stream capture through forward hooks (never ``output_hidden_states``).

``ResidualCapture`` records h_0 (the input of decoder layer 0) and h_{i+1} (the output of layer i)
for one forward pass at a time. The last state is taken before any final norm, unlike
``hidden_states[-1]`` of transformers, which is after it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .adapters import decoder_layers


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    hidden = getattr(x, "hidden_states", None) or getattr(x, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden states in a layer output of type {type(x).__name__}")


class ResidualCapture:
    """Context manager: after each forward, ``states`` holds the L+1 residual states of that pass."""

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self.states: list[torch.Tensor | None] = [None] * (len(self.layers) + 1)
        self._handles: list[Any] = []

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]
        self.states[0] = hidden.detach()

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.states[index + 1] = _first_tensor(output).detach()

        return hook

    def __enter__(self) -> ResidualCapture:
        self._handles.append(self.layers[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(i)))
        return self

    def take(self) -> list[torch.Tensor]:
        """The states of the last forward pass (and forget them, so memory does not accumulate)."""
        if any(s is None for s in self.states):
            raise RuntimeError("a decoder layer did not run; was the forward pass complete?")
        out = [s for s in self.states if s is not None]
        self.states = [None] * len(self.states)
        return out

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
