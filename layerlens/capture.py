"""Residual-stream capture through forward hooks (never ``output_hidden_states``).

``ResidualCapture`` records h_0 (the input of decoder layer 0) and h_{i+1} (the output of layer i)
for one forward pass at a time. The last state is taken before any final norm, unlike
``hidden_states[-1]`` of transformers, which is after it.

Each hook copies its state into one ``(L+1, B, T, D)`` block that is reused across batches: the model
frees its own layer outputs as usual, the metrics read one contiguous block (no gather, no stack), and
no fresh pages are touched per batch (on a VM a fresh page costs microseconds: a new 150 MB temporary
per batch cost more than the arithmetic done on it).

Sublayers (``sublayers=True``): a forward pre-hook on each layer's mid-residual module (the adapter's
``mid_residual``: the residual after the attention add, before the MLP add) computes, per token, the
cosine and the relative change of the attention step (h_i -> m_i) and of the MLP step (m_i -> h_{i+1},
when layer i's output arrives), in float32. Only these per-token numbers are kept (``(4, L, B, T)``,
:meth:`ResidualCapture.take_sublayers`) plus ONE reused ``(B, T, D)`` buffer for the current m_i, never
the mid states of all layers. Architectures without a mid residual (GPT-NeoX with
``use_parallel_residual``) have ``has_sublayers == False``.

``last_state="post-norm"`` (ShortGPT's convention) stores the FINAL NORM's output as h_L instead of the
last layer's raw output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .adapters import decoder_layers, final_norm, get_attr, mid_residual_path

LAST_STATES = ("pre-norm", "post-norm")
# Rows of take_sublayers(): per-token cosine / relative change of the attention and the MLP step.
SUBLAYER_ROWS = ("attn_cos", "attn_rel", "mlp_cos", "mlp_rel")


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

    def __init__(self, model: nn.Module, *, sublayers: bool = False, last_state: str = "pre-norm"):
        if last_state not in LAST_STATES:
            raise ValueError(f"last_state must be one of {LAST_STATES} (got {last_state!r})")
        self.layers = decoder_layers(model)
        self._buffers: dict[str, torch.Tensor] = {}
        self._block: torch.Tensor | None = None
        self._filled = [False] * (len(self.layers) + 1)
        self._handles: list[Any] = []
        self.mid_path = mid_residual_path(model) if sublayers else None
        self.has_sublayers = self.mid_path is not None
        self._sub: torch.Tensor | None = None
        self._mid_done = [False] * len(self.layers)
        self.last_state = last_state
        self._norm = final_norm(model) if last_state == "post-norm" else None
        if last_state == "post-norm" and self._norm is None:
            raise ValueError("this model has no final norm, so there is no post-norm last state")

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
            hidden = _first_tensor(output)
            if self.has_sublayers:
                self._step(index, 2, self._mid(), hidden)
            if index + 1 == len(self.layers) and self._norm is not None:
                return  # h_L comes from the final norm's hook
            self._store(index + 1, hidden)

        return hook

    def _norm_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._store(len(self.layers), _first_tensor(output))

    # -- sublayers ---------------------------------------------------------------------------------------
    def _mid(self) -> torch.Tensor:
        shape = self._block.shape[1:]  # type: ignore[union-attr]
        return self._buffers["mid"][: math.prod(shape)].view(shape)

    def _step(self, index: int, row: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """Per-token cosine and ||after - before|| / ||after|| of one sublayer step, into ``_sub[row]``."""
        if not self._mid_done[index]:
            raise RuntimeError(f"layer {index} ran without its mid-residual module (sublayer capture)")
        a = before.float()
        b = after.float()
        na = a.norm(dim=-1).clamp_min(1e-12)
        nb = b.norm(dim=-1).clamp_min(1e-12)
        self._sub[row, index].copy_((a * b).sum(dim=-1) / (na * nb))  # type: ignore[index]
        self._sub[row + 1, index].copy_((b - a).norm(dim=-1) / nb)  # type: ignore[index]

    def _make_mid_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mid = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if self._block is None or not self._filled[index]:
                raise RuntimeError("the mid-residual module ran before its layer's input was recorded")
            before = self._block[index]
            mid = mid.reshape(before.shape)  # OPT flattens (B, T, D) to (B*T, D) around its MLP
            if index == 0:
                shape = (len(SUBLAYER_ROWS), len(self.layers), *before.shape[:-1])
                self._sub = reused_buffer(self._buffers, "sub", math.prod(shape), torch.float32,
                                          before.device).view(shape)
                self._mid_done = [False] * len(self.layers)
            reused_buffer(self._buffers, "mid", before.numel(), before.dtype, before.device).copy_(
                mid.detach().reshape(-1))
            self._mid_done[index] = True
            self._step(index, 0, before, self._mid())

        return hook

    def __enter__(self) -> ResidualCapture:
        self._handles.append(self.layers[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(i)))
            if self.has_sublayers:
                mid = get_attr(layer, self.mid_path)  # type: ignore[arg-type]
                self._handles.append(mid.register_forward_pre_hook(self._make_mid_hook(i), with_kwargs=True))
        if self._norm is not None:
            self._handles.append(self._norm.register_forward_hook(self._norm_hook))
        return self

    def take_sublayers(self) -> torch.Tensor:
        """Per-token sublayer numbers of the last forward, ``(4, L, B, T)`` float32 (rows
        :data:`SUBLAYER_ROWS`); valid until the next forward."""
        if self._sub is None or not all(self._mid_done):
            raise RuntimeError("no sublayer numbers: the model has no mid residual or did not run fully")
        self._mid_done = [False] * len(self._mid_done)
        return self._sub

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
        self._sub = None
