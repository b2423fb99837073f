"""Layer-redundancy metrics, accumulated batch by batch from one forward pass (streaming).

Over all non-pad tokens of all calibration samples pooled, with states h_0..h_L:

* ``cosine[a][b]``  mean over tokens of cos(h_a, h_b)                      (LLM-Streamline, SLM)
* ``bi[i]``         1 - cosine[i][i+1]                                     (ShortGPT Block Influence)
* ``block_distance[n-1][i]`` arccos(cosine[i][i+n]) / pi                   (Gromov et al. 2024)
* ``magnitude[i]``  mean ||h_{i+1} - h_i|| / ||h_{i+1}||                   (ShortGPT Relative Magnitude)
* ``cka[a][b]``     linear CKA; ``minibatch``: unbiased HSIC summed over one minibatch per sample
                    (Nguyen, Raghu & Kornblith 2021); ``exact``: feature-space CKA in float64.

Sublayers (same pass, via the adapter's mid residual m_i between the attention add and the MLP add):

* ``attn_bi[i]``  1 - mean cos(h_i, m_i); ``mlp_bi[i]``  1 - mean cos(m_i, h_{i+1})
* ``attn_magnitude[i]`` mean ||m_i - h_i|| / ||m_i||; ``mlp_magnitude[i]`` mean ||h_{i+1} - m_i|| / ||h_{i+1}||
  (the same form as ``magnitude``: the change relative to the state AFTER the step)

They are None for an architecture without a mid residual (``meta["sublayers"]`` says why).

Confidence (from per-sample sums kept in the same pass: per calibration sample and layer, the summed
cosines and the token count -- O(samples x L) numbers): ``bi_ci_low``/``bi_ci_high`` (and ``attn_bi_ci_*``,
``mlp_bi_ci_*``) are percentile bootstrap intervals (``bootstrap`` resamples of the SAMPLES with
replacement, BI recomputed token-weighted as the point value, level ``ci_level``); ``bi_rank_freq[i][r]``
is the fraction of resamples in which layer i has rank r (0 = lowest BI) and ``rank_stability[i]`` the
fraction in which it is among the ``rank_k`` lowest (default ``round(L/4)``, at least 1).

Peer conventions (recorded in ``meta``; defaults unchanged): ``last_state="post-norm"`` takes h_L after
the final norm, as ShortGPT does (``hidden_states[-1]``); ``block_distance="last-token"`` computes the
angular block distance from each sample's last token only, as PruneMe / Gromov et al.'s code does.

Only sums are kept between batches, so memory does not grow with the number of tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .capture import LAST_STATES, ResidualCapture, reused_buffer
from .data import TextSet, batches, calibration_tokens, check_seq_len
from .errors import LayerLensError, ResourceError
from .loading import max_positions
from .report import LayerReport
from .runs import provenance
from .surgery import private_view

Progress = Callable[[int, int, str], None]

CKA_ESTIMATORS = ("minibatch", "exact")
BLOCK_DISTANCES = ("all-tokens", "last-token")
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
    sublayers: bool = True
    bootstrap: int = 1000
    ci_level: float = 0.95
    rank_k: int | None = None
    last_state: str = "pre-norm"
    block_distance: str = "all-tokens"

    def validate(self) -> None:
        if self.bootstrap < 0:
            raise LayerLensError(f"`bootstrap` must be 0 (off) or a number of resamples (got {self.bootstrap}).")
        if not 0.0 < self.ci_level < 1.0:
            raise LayerLensError(f"`ci_level` must be between 0 and 1, e.g. 0.95 (got {self.ci_level}).")
        if self.rank_k is not None and self.rank_k < 1:
            raise LayerLensError(f"`rank_k` must be at least 1 (got {self.rank_k}).")
        if self.last_state not in LAST_STATES:
            raise LayerLensError(f"Unknown `last_state` '{self.last_state}'; use {' or '.join(LAST_STATES)}.")
        if self.block_distance not in BLOCK_DISTANCES:
            raise LayerLensError(f"Unknown `block_distance` '{self.block_distance}'; use "
                                 f"{' or '.join(BLOCK_DISTANCES)}.")
        self._validate_sizes()

    def _validate_sizes(self) -> None:
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
        # per calibration sample: summed cos(h_i, h_{i+1}) over its tokens, and its token count (bootstrap)
        self.sample_cos: list[torch.Tensor] = []
        self.sample_tokens: list[torch.Tensor] = []
        # sublayers: totals and per-sample sums of the per-token numbers (rows of capture.SUBLAYER_ROWS)
        self.sub_sum = torch.zeros(4, num_states - 1, **f64)
        self.sample_sub: list[torch.Tensor] = []
        # PruneMe's convention: cosines between every pair of states on each sample's last token only
        self.last_cos_sum = torch.zeros(num_states, num_states, **f64)
        self.last_tokens = 0
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
        per_sample = unit.view(s, b, 1, w * d)  # (S-1, B) summed cos(h_i, h_{i+1}) per sample, as a bmm
        adjacent = (per_sample[:-1] @ per_sample[1:].transpose(2, 3)).view(s - 1, b)
        self.sample_cos.append(adjacent.T.double().cpu())
        self.sample_tokens.append(torch.tensor(lengths, dtype=torch.float64))
        rows = [i for i, n in enumerate(lengths) if n > 0]
        if rows:
            last = (w - 1 - keep.flip(1).float().argmax(dim=1))[rows]  # each sample's last kept position
            ends = unit[:, rows, last]  # (S, R, D), unit vectors
            self.last_cos_sum += torch.einsum("ard,brd->ab", ends, ends).double()
            self.last_tokens += len(rows)
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

    def update_sublayers(self, sub: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one batch of per-token sublayer numbers ``(4, L, B, T)`` (rows of capture.SUBLAYER_ROWS)."""
        keep = mask.to(sub.device).to(sub.dtype)
        per_sample = (sub.nan_to_num() * keep).sum(dim=3)  # (4, L, B); pads may hold anything
        self.sub_sum += per_sample.sum(dim=2).double()
        self.sample_sub.append(per_sample.permute(2, 0, 1).double().cpu())  # (B, 4, L)

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
        dist = cosine
        if self.block_convention == "last-token":
            dist = (self.last_cos_sum / max(self.last_tokens, 1)).clamp(-1.0, 1.0)
        block = [[math.acos(float(dist[i, i + n])) / math.pi for i in range(num_layers - n + 1)]
                 for n in range(1, num_layers + 1)]
        out = dict(num_layers=num_layers, bi=tuple(bi), cosine=cosine.tolist(), cka=self.cka().tolist(),
                   block_distance=tuple(tuple(r) for r in block),
                   magnitude=tuple((self.mag_sum / self.tokens).tolist()))
        if self.sample_sub:
            mean = (self.sub_sum / self.tokens).tolist()
            out.update(attn_bi=tuple(1.0 - x for x in mean[0]), attn_magnitude=tuple(mean[1]),
                       mlp_bi=tuple(1.0 - x for x in mean[2]), mlp_magnitude=tuple(mean[3]))
        return out

    block_convention = "all-tokens"

    def confidence(self, resamples: int, level: float, k: int, seed: int) -> dict[str, Any]:
        """Percentile bootstrap over calibration samples (see the module docstring): CI bounds for BI (and
        the sublayer BIs), the rank frequencies of BI and the rank stability for the ``k`` lowest."""
        if resamples == 0 or not self.sample_cos:
            return {}
        tokens = torch.cat(self.sample_tokens)  # (N,)
        cos = torch.cat(self.sample_cos)  # (N, L)
        n, num_layers = cos.shape
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (resamples, n), generator=gen)
        weights = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(resamples, n, dtype=torch.float64))  # how often each sample is drawn
        denom = (weights @ tokens).clamp_min(1.0)[:, None]  # (R, 1)
        lo_q, hi_q = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0

        def interval(sums: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
            boot = 1.0 - (weights @ sums) / denom  # (R, L) BI per resample
            q = torch.quantile(boot, torch.tensor([lo_q, hi_q], dtype=torch.float64), dim=0)
            return tuple(q[0].tolist()), tuple(q[1].tolist())

        out: dict[str, Any] = {}
        out["bi_ci_low"], out["bi_ci_high"] = interval(cos)
        boot = 1.0 - (weights @ cos) / denom
        # rank of each layer in each resample (ties -> lower index first, as lowest_k does)
        order = torch.argsort(boot + torch.arange(num_layers, dtype=torch.float64) * 1e-15, dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(num_layers).expand(resamples, -1).contiguous())
        freq = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        freq.index_put_((torch.arange(num_layers).repeat(resamples), ranks.reshape(-1)),
                        torch.ones(resamples * num_layers, dtype=torch.float64), accumulate=True)
        freq /= resamples
        out["bi_rank_freq"] = freq.tolist()
        out["rank_stability"] = tuple(freq[:, :k].sum(dim=1).tolist())
        if self.sample_sub:
            sub = torch.cat(self.sample_sub)  # (N, 4, L)
            out["attn_bi_ci_low"], out["attn_bi_ci_high"] = interval(sub[:, 0])
            out["mlp_bi_ci_low"], out["mlp_bi_ci_high"] = interval(sub[:, 2])
        return out


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
    try:
        capture = ResidualCapture(view, sublayers=config.sublayers, last_state=config.last_state)
    except ValueError as exc:
        raise LayerLensError(f"`last_state=post-norm` needs a final norm, and this model has none ({exc}).") from exc
    with capture, torch.inference_mode():
        acc = _Accumulators(len(capture.layers) + 1, hidden, config.cka_estimator, device)
        acc.block_convention = config.block_distance
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
            if capture.has_sublayers:
                acc.update_sublayers(capture.take_sublayers()[..., skip:], batch.attention_mask[:, skip:])
            if progress is not None:
                progress(step + 1, total, f"batch {step + 1}/{total}")
    fields = acc.finish()
    num_layers = fields["num_layers"]
    rank_k = min(config.rank_k or max(1, round(num_layers / 4)), num_layers)
    fields.update(acc.confidence(config.bootstrap, config.ci_level, rank_k, config.seed))
    info = dict(meta or {})
    info.update(sublayers=sublayer_note(view) if config.sublayers else "off",
                last_state=config.last_state, block_distance=config.block_distance,
                bootstrap=({"resamples": config.bootstrap, "level": config.ci_level, "rank_k": rank_k,
                            "seed": config.seed, "unit": "calibration sample"} if config.bootstrap else None))
    info.update(data=texts.source, data_description=texts.description, samples=len(token_lists),
                seq_len=config.seq_len, batch_size=config.batch_size, tokens=acc.tokens, seed=config.seed,
                cka_minibatches=acc.cka_minibatches if config.cka_estimator == "minibatch" else None,
                skip_first=config.skip_first,
                seconds=round(time.perf_counter() - started, 3))
    info.setdefault("dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
    info.setdefault("device", str(device))
    return LayerReport(cka_estimator=config.cka_estimator, meta=provenance(**info), **fields)


def sublayer_note(model: Any) -> str:
    """Where the sublayer metrics come from, or why this architecture has none (``meta["sublayers"]``)."""
    from .adapters import adapter_for, mid_residual_path

    path = mid_residual_path(model)
    if path is not None:
        return f"mid residual = input of each layer's '{path}'"
    adapter = adapter_for(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field_name, value in adapter.no_mid_residual_when:
        if getattr(config, field_name, None) == value:
            return (f"none: {field_name}={value} -- attention and MLP do not add to the residual one after the "
                    "other, so there is no state between them (attn_bi/mlp_bi are None)")
    return "none: LayerLens does not know where this architecture's mid-layer residual is (attn_bi/mlp_bi are None)"


def capture_config_dict(config: CaptureConfig) -> dict[str, Any]:
    return asdict(config)
