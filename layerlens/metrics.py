"""Layer-redundancy metrics, accumulated batch by batch from one forward pass (streaming).

Over all non-pad tokens of all calibration samples pooled, with states h_0..h_L:

* ``cosine[a][b]``  mean over tokens of cos(h_a, h_b)                      (LLM-Streamline, SLM)
* ``bi[i]``         1 - cosine[i][i+1]                                     (ShortGPT Block Influence)
* ``block_distance[n-1][i]`` arccos(cosine[i][i+n]) / pi                   (Gromov et al. 2024)
* ``magnitude[i]``  mean ||h_{i+1} - h_i|| / ||h_{i+1}||                   (ShortGPT Relative Magnitude)
* ``cka[a][b]``     linear CKA; ``minibatch``: unbiased HSIC summed over one minibatch per sample
                    (Nguyen, Raghu & Kornblith 2021); ``exact``: feature-space CKA in float64.

Only sums are kept between batches, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .capture import ResidualCapture, reused_buffer
from .data import TextSet, batches, calibration_tokens, check_seq_len
from .errors import LayerLensError, ResourceError
from .loading import max_positions
from .report import LayerReport
from .runs import provenance
from .surgery import private_view

Progress = Callable[[int, int, str], None]

CKA_ESTIMATORS = ("minibatch", "exact")
EXACT_CKA_MAX_ELEMENTS = 64_000_000  # (L+1)^2 * D^2 float64 cross-covariances


class Cancelled(LayerLensError):
    """The caller asked to stop (dashboard Cancel button); nothing partial is returned."""


@dataclass(frozen=True)
class CaptureConfig:
    """How to run the calibration pass. ``samples`` texts, each truncated to ``seq_len`` tokens.

    ``skip_first`` tokens at the start of every sample still run through the model (they are context
    for the rest) but are left out of every metric: the first token of a model without a BOS often
    becomes an attention sink whose norm is 10-200x the others', and linear CKA (a variance measure)
    is then about that one token.
    """

    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    cka_estimator: str = "minibatch"
    seed: int = 0
    skip_first: int = 0

    def validate(self) -> None:
        if self.samples < 1:
            raise LayerLensError(f"`samples` must be at least 1 (got {self.samples}).")
        if self.batch_size < 1:
            raise LayerLensError(f"`batch_size` must be at least 1 (got {self.batch_size}).")
        if self.skip_first < 0 or self.skip_first >= self.seq_len:
            raise LayerLensError(f"`skip_first` must be between 0 and `seq_len` - 1 = {self.seq_len - 1} "
                                 f"(got {self.skip_first}).")
        if self.cka_estimator not in CKA_ESTIMATORS:
            raise LayerLensError(f"Unknown CKA estimator '{self.cka_estimator}'; use minibatch or exact.")


def unbiased_hsic_matrix(grams: torch.Tensor) -> torch.Tensor:
    """HSIC_1 (Song et al. 2012) between every pair of n x n Gram matrices, as an (S, S) float64 matrix.

    grams: (S, n, n), n > 3. HSIC_1(K, L) = [tr(K~L~) + 1'K~1 1'L~1/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),
    K~ = K with a zero diagonal. Every pairwise term is an inner product, so all pairs cost one matmul.
    """
    s, n, _ = grams.shape
    k = grams.to(torch.float64, copy=True)  # cancellations in float64; never zero the caller's diagonal
    k.diagonal(dim1=1, dim2=2).zero_()
    flat = k.reshape(s, n * n)
    trace_term = flat @ flat.T
    row_sums = k.sum(dim=2)  # (S, n): K~ 1
    totals = row_sums.sum(dim=1)  # (S,): 1'K~1
    cross = row_sums @ row_sums.T  # 1'K~ L~ 1 (K~ symmetric)
    return (trace_term + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


class _Accumulators:
    """Running sums for every metric; ``update`` takes one batch's states (L+1, B, T, D) and mask.

    Work buffers are reused across batches (fresh pages per batch cost more than the arithmetic).
    """

    def __init__(self, num_states: int, hidden: int, estimator: str, device: torch.device):
        self.s = num_states
        self.estimator = estimator
        f64 = dict(dtype=torch.float64, device=device)
        self.tokens = 0
        self.cos_sum = torch.zeros(num_states, num_states, **f64)
        self.mag_sum = torch.zeros(num_states - 1, **f64)
        self.hsic_sum = torch.zeros(num_states, num_states, **f64)
        self.cka_minibatches = 0
        self._buffers: dict[str, torch.Tensor] = {}
        if estimator == "exact":
            if num_states**2 * hidden**2 > EXACT_CKA_MAX_ELEMENTS:
                raise ResourceError(
                    f"Exact CKA needs {num_states}^2 x {hidden}^2 float64 cross-covariances (too large for "
                    "this model); use the default `cka_estimator=minibatch` estimator.")
            self.feat_sum = torch.zeros(num_states, hidden, **f64)
            self.cross = torch.zeros(num_states, num_states, hidden, hidden, **f64)

    def _buffer(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return reused_buffer(self._buffers, name, math.prod(shape), torch.float32, device).view(shape)

    def update(self, states: torch.Tensor | Sequence[torch.Tensor], mask: torch.Tensor) -> None:
        """Add one batch. Works on the (S, B, T, D) block in place, padded or not: pad positions are zeroed
        or dropped from the small per-token results, so the working memory is the same for every batch
        (the block, one scratch block of its size, one sample's Grams): flat in the data size."""
        block = states if isinstance(states, torch.Tensor) else torch.stack(list(states))
        s, b, w, d = block.shape
        keep = mask.to(block.device).bool()
        lengths = keep.sum(dim=1).tolist()
        n_tok = int(sum(lengths))
        padded = n_tok != b * w
        x = block
        if block.dtype != torch.float32 or not block.is_contiguous():  # e.g. bfloat16 states: widen once
            x = self._buffer("states", (s, b, w, d), block.device)
            x.copy_(block)
        norms = x.norm(dim=3, keepdim=True)  # (S, B, T, 1)
        token_norms = norms[:, keep] if padded else norms  # pad positions may hold anything (even NaN)
        # A NaN/inf anywhere in a token makes its norm NaN/inf: the check costs no pass of its own.
        finite = torch.isfinite(token_norms.reshape(s, -1)).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise LayerLensError(
                f"Non-finite activations (NaN/inf) in residual state h_{bad[0]} (states {bad[:6]}); this is "
                "usually float16 overflow: re-run with `dtype=float32` or bfloat16.")
        norms.clamp_min_(1e-12)
        self.tokens += n_tok
        scratch = self._buffer("scratch", (s, b, w, d), block.device)
        unit = torch.div(x, norms, out=scratch)
        if padded:
            unit.masked_fill_(~keep[None, :, :, None], 0.0)  # pads add nothing to the cosine sums
        flat = unit.view(s, -1)
        self.cos_sum += (flat @ flat.T).double()
        delta = torch.sub(x[1:], x[:-1], out=scratch[: s - 1])
        relative = delta.norm(dim=3) / norms[1:, ..., 0]  # (S-1, B, T)
        relative = relative[:, keep] if padded else relative.view(s - 1, -1)
        self.mag_sum += relative.double().sum(dim=1)
        if self.estimator == "exact":
            t64 = (x[:, keep] if padded else x.view(s, -1, d)).double()
            self.feat_sum += t64.sum(dim=1)
            self.cross += torch.einsum("and,bne->abde", t64, t64)
            return
        # One minibatch per calibration sample: its own tokens, as a view of the block when they come
        # first in the row (right padding, as data.batches makes); Gram in float32 (4x faster than float64,
        # CKA differs by < 1e-7 even with a 200x outlier token), the HSIC sums in float64.
        for i, n in enumerate(lengths):
            if n > 3:
                row = keep[i]
                xs = x[:, i, :n] if bool(row[:n].all()) else x[:, i][:, row]
                self.hsic_sum += unbiased_hsic_matrix(xs @ xs.transpose(1, 2))
                self.cka_minibatches += 1

    def cka(self) -> torch.Tensor:
        if self.estimator == "exact":
            n = self.tokens
            mean = self.feat_sum / n
            cov = self.cross - n * torch.einsum("ad,be->abde", mean, mean)  # centred cross-products
            hsic = cov.pow(2).sum(dim=(2, 3))
        else:
            if self.cka_minibatches == 0:
                raise LayerLensError("Minibatch CKA needs samples of at least 4 tokens; use longer texts.")
            hsic = self.hsic_sum
        diag = hsic.diagonal().clamp_min(1e-300)
        return hsic / torch.sqrt(torch.outer(diag, diag))

    def finish(self) -> dict[str, Any]:
        if self.tokens == 0:
            raise LayerLensError("No tokens were left to measure (texts shorter than `skip_first`?); use "
                                 "longer texts or a smaller `skip_first`.")
        cosine = (self.cos_sum / self.tokens).clamp(-1.0, 1.0)
        num_layers = self.s - 1
        bi = [1.0 - float(cosine[i, i + 1]) for i in range(num_layers)]
        block = [[math.acos(float(cosine[i, i + n])) / math.pi for i in range(num_layers - n + 1)]
                 for n in range(1, num_layers + 1)]
        return dict(num_layers=num_layers, bi=tuple(bi), cosine=cosine.tolist(), cka=self.cka().tolist(),
                    block_distance=tuple(tuple(r) for r in block),
                    magnitude=tuple((self.mag_sum / self.tokens).tolist()))


def analyze(model: Any, tokenizer: Any, texts: TextSet, config: CaptureConfig = CaptureConfig(), *,
            progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
            meta: dict[str, Any] | None = None) -> LayerReport:
    """Run the calibration texts through ``model`` once and return every redundancy metric."""
    config.validate()
    check_seq_len(config.seq_len, max_positions(model.config))
    token_lists = calibration_tokens(tokenizer, texts, config.samples, config.seq_len)
    device = next(model.parameters()).device
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
        else model.config.hidden_size
    started = time.perf_counter()
    total = math.ceil(len(token_lists) / config.batch_size)
    # Hooks go on a private view (shared weights, own modules): a model shared with other threads or
    # dashboard sessions never carries them. The backbone alone runs: the LM head's matmul is skipped.
    view = private_view(model)
    backbone = getattr(view, "base_model", view)
    with ResidualCapture(view) as capture, torch.inference_mode():
        acc = _Accumulators(len(capture.layers) + 1, hidden, config.cka_estimator, device)
        for step, batch in enumerate(batches(tokenizer, token_lists, config.batch_size, device)):
            if should_stop is not None and should_stop():
                raise Cancelled("Analysis cancelled; nothing was saved. Press Analyze to start again.")
            try:
                backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            except torch.OutOfMemoryError as exc:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                raise ResourceError(f"Out of memory on {device} at batch size {config.batch_size} and "
                                    f"seq-len {config.seq_len}; lower `batch_size` or `seq_len`, or use "
                                    "`dtype=bfloat16`.") from exc
            skip = config.skip_first  # a slice: samples without padding keep the fast, padding-free path
            acc.update(capture.take()[:, :, skip:], batch.attention_mask[:, skip:])
            if progress is not None:
                progress(step + 1, total, f"batch {step + 1}/{total}")
    fields = acc.finish()
    info = dict(meta or {})
    info.update(data=texts.source, data_description=texts.description, samples=len(token_lists),
                seq_len=config.seq_len, batch_size=config.batch_size, tokens=acc.tokens, seed=config.seed,
                cka_minibatches=acc.cka_minibatches if config.cka_estimator == "minibatch" else None,
                skip_first=config.skip_first,
                seconds=round(time.perf_counter() - started, 3))
    info.setdefault("dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
    info.setdefault("device", str(device))
    return LayerReport(cka_estimator=config.cka_estimator, meta=provenance(**info), **fields)


def capture_config_dict(config: CaptureConfig) -> dict[str, Any]:
    return asdict(config)
