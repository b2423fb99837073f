"""The steps of ``layerlens.metrics._Accumulators.update`` (minibatch CKA), timed one by one, and a
prototype of a cheaper update with the same numbers.

``current_steps`` mirrors the library's update line by line (it is checked against the real
``_Accumulators.update`` on the same states before its timings are reported), so each step's cost can be
read separately: the masking/stack copy, the finiteness check, the unit vectors, the cosine matmul, the
magnitude, and the per-sample CKA (the float32 Gram bmm, its float64 copy, the float64 HSIC terms) --
as of library commit 50b8724 (float32 Gram); an assertion in bench_capture.py fails if they drift apart.

``proposed_update`` is what bench_capture.py suggests for the library (not used by it): with
``BufferedCapture`` no copy at all (the hooks already wrote the states into one reused block), else one
copy of the states (into a buffer reused across batches) instead of two fresh ones, the finiteness check on the
norms (a NaN/inf anywhere in a token makes its norm NaN/inf), scratch reused for the unit vectors and the
layer differences, and the per-sample Grams of a padding-free batch as ONE batched matmul on a view of
the buffer (float32 by default, HSIC terms in float64), summed with three matmuls.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from layerlens.capture import ResidualCapture, _first_tensor
from layerlens.metrics import unbiased_hsic_matrix


def _tick(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def current_steps(states: list[torch.Tensor], mask: torch.Tensor, sums: dict[str, torch.Tensor],
                  times: dict[str, float]) -> None:
    """The library's minibatch update, step by step; adds seconds per step to ``times``."""
    dev = states[0].device
    t = _tick(dev)

    def lap(name: str) -> None:
        nonlocal t
        now = _tick(dev)
        times[name] += now - t
        t = now

    keep = mask.bool()
    tokens = torch.stack([h[keep] for h in states]).float()
    lap("mask + stack copy")
    if not torch.isfinite(tokens).all():
        raise RuntimeError("non-finite states")
    lap("isfinite check")
    s = tokens.shape[0]
    norms = tokens.norm(dim=2, keepdim=True).clamp_min(1e-12)
    unit = (tokens / norms).reshape(s, -1)
    lap("norms + unit vectors")
    sums["cos"] += (unit @ unit.T).double()
    lap("cosine matmul")
    delta = (tokens[1:] - tokens[:-1]).norm(dim=2) / norms[1:, :, 0]
    sums["mag"] += delta.double().sum(dim=1)
    lap("magnitude")
    lengths = keep.sum(dim=1).tolist()
    offset = 0
    for n in lengths:
        if n > 3:
            x = tokens[:, offset:offset + n]
            g = x @ x.transpose(1, 2)
            lap("CKA: Gram bmm (float32)")
            g = g.double()
            lap("CKA: Gram to float64")
            sums["hsic"] += unbiased_hsic_matrix(g)
            lap("CKA: HSIC terms")
        offset += n


def _hsic_summed(grams: torch.Tensor) -> torch.Tensor:
    """Sum over G samples of unbiased_hsic_matrix(grams[:, g]), grams (S, G, n, n): three matmuls in all.

    Every term of HSIC_1 is an inner product (or a product of sums), so summing it over samples of the
    same length n is one inner product over the concatenated samples.
    """
    s, g, n, _ = grams.shape
    k = grams.double()
    k.diagonal(dim1=2, dim2=3).zero_()
    flat = k.reshape(s, g * n * n)
    trace_term = flat @ flat.T
    row_sums = k.sum(dim=3)  # (S, G, n)
    totals = row_sums.sum(dim=2)  # (S, G)
    rs = row_sums.reshape(s, g * n)
    cross = rs @ rs.T
    return (trace_term + (totals @ totals.T) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _buffer(bufs: dict | None, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch buffer reused across batches (fresh pages cost page faults on every batch)."""
    if bufs is None:
        return torch.empty(numel, dtype=dtype, device=device)
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = bufs[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def proposed_update(states: list[torch.Tensor], mask: torch.Tensor, sums: dict[str, torch.Tensor],
                    gram_dtype: torch.dtype = torch.float32, times: dict[str, float] | None = None,
                    bufs: dict | None = None, gram_budget: int = 32 << 20) -> int:
    """Same sums as the library's update (cos, mag, hsic); returns the number of CKA minibatches.

    One copy of the states into a reused (S, N, D) float32 buffer (no boolean gather when the batch has no
    padding), the finiteness check on the norms, the unit vectors and the layer differences in one reused
    buffer, and the per-sample Grams of equal-length samples as one batched matmul on a VIEW of the buffer
    (chunked to ``gram_budget`` bytes), summed into HSIC with three matmuls (``_hsic_summed``).
    """
    dev = states[0].device
    t = _tick(dev)

    def lap(name: str) -> None:
        nonlocal t
        if times is not None:
            now = _tick(dev)
            times[name] += now - t
            t = now

    s = len(states)
    b, w = mask.shape
    d = states[0].shape[-1]
    keep = mask.bool()
    lengths = keep.sum(dim=1).tolist()
    n_tok = int(sum(lengths))
    block = _as_block(states) if n_tok == b * w else None
    if block is not None and block.dtype == torch.float32:  # BufferedCapture: already one block, no copy
        tokens = block
    else:
        tokens = _buffer(bufs, "tokens", s * n_tok * d, torch.float32, dev).view(s, n_tok, d)
    if tokens is block:
        pass
    elif n_tok == b * w:  # no padding: a plain copy (and dtype cast) per state
        for i, h in enumerate(states):
            tokens[i].copy_(h.reshape(-1, d))
    else:
        idx = keep.reshape(-1).nonzero().squeeze(1)
        for i, h in enumerate(states):
            tokens[i].copy_(h.reshape(-1, d).index_select(0, idx))
    lap("copy into reused buffer")
    norms = tokens.norm(dim=2, keepdim=True)
    if not torch.isfinite(norms).all():  # a NaN/inf anywhere in a token makes its norm NaN/inf
        raise RuntimeError("non-finite states")
    norms = norms.clamp_min(1e-12)
    scratch = _buffer(bufs, "scratch", s * n_tok * d, torch.float32, dev)
    unit = torch.div(tokens, norms, out=scratch.view(s, n_tok, d)).view(s, -1)
    lap("norms + check + unit")
    sums["cos"] += (unit @ unit.T).double()
    lap("cosine matmul")
    diff = torch.sub(tokens[1:], tokens[:-1], out=scratch[: (s - 1) * n_tok * d].view(s - 1, n_tok, d))
    sums["mag"] += (diff.norm(dim=2) / norms[1:, :, 0]).double().sum(dim=1)
    lap("magnitude")
    count = 0
    if n_tok == b * w and w > 3:  # equal lengths: Grams straight from a view of the buffer
        x = tokens.view(s, b, w, d)
        per_sample = s * w * w * 8
        step = max(1, min(b, gram_budget // max(per_sample, 1)))
        for c0 in range(0, b, step):
            xc = x[:, c0:c0 + step]
            xc = xc if xc.is_contiguous() else xc.contiguous()
            xc = xc.to(gram_dtype)
            g = torch.matmul(xc, xc.transpose(-1, -2))  # (S, c, n, n)
            lap("CKA: batched Gram")
            sums["hsic"] += _hsic_summed(g)
            lap("CKA: HSIC terms")
        count = b
    else:
        offset = 0
        for n in lengths:
            if n > 3:
                xs = tokens[:, offset:offset + n].to(gram_dtype)
                g = (xs @ xs.transpose(1, 2)).unsqueeze(1)
                lap("CKA: batched Gram")
                sums["hsic"] += _hsic_summed(g)
                lap("CKA: HSIC terms")
                count += 1
            offset += n
    return count


class BufferedCapture(ResidualCapture):
    """Drop-in for ``layerlens.capture.ResidualCapture`` (bench-only prototype): each hook COPIES its state
    into one (L+1, B, T, D) buffer reused across batches, so the model frees its own layer outputs as usual
    and ``take()`` returns views of one contiguous block (no stack copy needed in the update)."""

    def __init__(self, model):
        super().__init__(model)
        self._buf: torch.Tensor | None = None
        self._view: torch.Tensor | None = None

    def _pre_hook(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]
        shape = (len(self.layers) + 1, *hidden.shape)
        n = math.prod(shape)
        if self._buf is None or self._buf.numel() < n or self._buf.dtype != hidden.dtype:
            self._buf = torch.empty(n, dtype=hidden.dtype, device=hidden.device)
        self._view = self._buf[:n].view(shape)
        self._view[0].copy_(hidden)
        self.states[0] = self._view[0]

    def _make_hook(self, index):
        def hook(module, args, output):
            self._view[index + 1].copy_(_first_tensor(output))
            self.states[index + 1] = self._view[index + 1]

        return hook


def _as_block(states: list[torch.Tensor]) -> torch.Tensor | None:
    """The states as one (S, B*T, D) view when they are consecutive slices of one contiguous block."""
    base = states[0]
    if not base.is_contiguous():
        return None
    step = base.numel()
    for i, h in enumerate(states):
        if not h.is_contiguous() or h.dtype != base.dtype or h.data_ptr() != base.data_ptr() + i * step * h.element_size():
            return None
    return torch.as_strided(base, (len(states), step // base.shape[-1], base.shape[-1]),
                            (step, base.shape[-1], 1))


def new_sums(num_states: int, device: torch.device) -> dict[str, torch.Tensor]:
    f64 = dict(dtype=torch.float64, device=device)
    return {"cos": torch.zeros(num_states, num_states, **f64), "mag": torch.zeros(num_states - 1, **f64),
            "hsic": torch.zeros(num_states, num_states, **f64)}


def library_sums(states: list[torch.Tensor], mask: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    from layerlens.metrics import _Accumulators

    acc = _Accumulators(len(states), hidden, "minibatch", states[0].device)
    acc.update(states, mask)
    return {"cos": acc.cos_sum, "mag": acc.mag_sum, "hsic": acc.hsic_sum}


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    diag = hsic.diagonal().clamp_min(1e-300)
    return hsic / torch.sqrt(torch.outer(diag, diag))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for k in a:
        x, y = a[k].double().cpu(), b[k].double().cpu()
        out[k] = float(((x - y).abs() / y.abs().clamp_min(1e-30)).max())
    out["cka_abs"] = float((cka_from_hsic(a["hsic"].cpu()) - cka_from_hsic(b["hsic"].cpu())).abs().max())
    return out


def time_steps(fn: Callable[..., object], states, mask, repeats: int, **kw) -> dict[str, float]:
    """Median over ``repeats`` of each step's seconds (per call)."""
    runs = []
    for _ in range(repeats):
        times: dict[str, float] = defaultdict(float)
        fn(states, mask, new_sums(len(states), states[0].device), times=times, **kw)
        runs.append(dict(times))
    keys = list(runs[0])
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in keys}
