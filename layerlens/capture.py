"""Residual-stream capture through forward hooks (never ``output_hidden_states``).

``ResidualCapture`` records h_0 (the input of decoder layer 0) and h_{i+1} (the output of layer i)
for one forward pass at a time. The last state is taken before any final norm, unlike
``hidden_states[-1]`` of transformers, which is after it.

Each hook copies its state into one ``(L+1, B, T, D)`` block that is reused across batches: the model
frees its own layer outputs as usual, the metrics read one contiguous block (no gather, no stack), and
no fresh pages are touched per batch (on a VM a fresh page costs microseconds: a new 150 MB temporary
per batch cost more than the arithmetic done on it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .adapters import decoder_layers


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    for name in ("hidden_states", "last_hidden_state"):  # never `a or b`: bool() of a tensor raises
        hidden = getattr(x, name, None)
        if isinstance(hidden, torch.Tensor):
            return hidden
    raise TypeError(f"cannot find the hidden states in a layer output of type {type(x).__name__}")


def reused_buffer(store: dict[str, torch.Tensor], name: str, numel: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A flat buffer of ``numel`` elements kept in ``store`` across batches; a larger or different one is
    allocated only when needed, after the old one is dropped (no two alive at once)."""
    buf = store.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        store.pop(name, None)
        buf = store[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


class ResidualCapture:
    """Context manager: after each forward, :meth:`take` returns the L+1 residual states of that pass as
    one ``(L+1, B, T, D)`` tensor (a view of a buffer that the next forward overwrites)."""

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self._buffers: dict[str, torch.Tensor] = {}
        self._block: torch.Tensor | None = None
        self._filled = [False] * (len(self.layers) + 1)
        self._handles: list[Any] = []

    def _store(self, index: int, hidden: torch.Tensor) -> None:
        if index == 0:
            shape = (len(self.layers) + 1, *hidden.shape)
            self._block = reused_buffer(self._buffers, "states", math.prod(shape), hidden.dtype,
                                        hidden.device).view(shape)
            self._filled = [False] * shape[0]
        elif self._block is None or hidden.shape != self._block.shape[1:]:
            raise RuntimeError("decoder layers ran without the first one, or changed the state's shape")
        self._block[index].copy_(hidden.detach())
        self._filled[index] = True

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._store(0, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._store(index + 1, _first_tensor(output))

        return hook

    def __enter__(self) -> ResidualCapture:
        self._handles.append(self.layers[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(i)))
        return self

    def take(self) -> torch.Tensor:
        """The states of the last forward pass, ``(L+1, B, T, D)``; valid until the next forward."""
        if self._block is None or not all(self._filled):
            raise RuntimeError("a decoder layer did not run; was the forward pass complete?")
        self._filled = [False] * len(self._filled)
        return self._block

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._buffers.clear()
        self._block = None
