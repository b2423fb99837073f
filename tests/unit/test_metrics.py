"""Every metric against a slow, independent per-token formula on tiny models of every architecture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from layerlens.adapters import adapter_for, final_norm, set_attr
from layerlens.data import TextSet, batches, calibration_tokens
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, _Accumulators, analyze, unbiased_hsic_matrix

CFG = CaptureConfig(samples=6, seq_len=48, batch_size=3)


def reference_states(model, tokenizer, texts: TextSet, cfg: CaptureConfig) -> list[np.ndarray]:
    """Per sample, the (L+1, n, D) residual states, via output_hidden_states with the final norm removed.

    Independent of the hooks under test: transformers' own hidden_states, one sample at a time (no padding),
    with the final norm swapped for Identity so the last entry is the raw output of the last layer.
    """
    adapter = adapter_for(model)
    norm = final_norm(model)
    set_attr(model, adapter.final_norm, nn.Identity())
    try:
        out = []
        for toks in calibration_tokens(tokenizer, texts, cfg.samples, cfg.seq_len):
            with torch.no_grad():
                hs = model(input_ids=torch.tensor([toks]), output_hidden_states=True).hidden_states
            out.append(np.stack([h[0].double().numpy() for h in hs]))
        return out
    finally:
        set_attr(model, adapter.final_norm, norm)


def slow_metrics(samples: list[np.ndarray]) -> dict:
    s = samples[0].shape[0]
    tokens = np.concatenate(samples, axis=1)  # (S, N, D), all tokens pooled
    n_tok = tokens.shape[1]
    cos = np.zeros((s, s))
    for a in range(s):
        for b in range(s):
            total = 0.0
            for t in range(n_tok):
                x, y = tokens[a, t], tokens[b, t]
                total += float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
            cos[a, b] = total / n_tok
    mag = [np.mean([np.linalg.norm(tokens[i + 1, t] - tokens[i, t]) / np.linalg.norm(tokens[i + 1, t])
                    for t in range(n_tok)]) for i in range(s - 1)]

    def hsic1(k: np.ndarray, m: np.ndarray) -> float:
        n = k.shape[0]
        k, m = k.copy(), m.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(m, 0)
        one = np.ones(n)
        return (np.trace(k @ m) + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ m @ one)) / (n * (n - 3))

    hs = np.zeros((s, s))
    for x in samples:
        grams = [x[a] @ x[a].T for a in range(s)]
        for a in range(s):
            for b in range(s):
                hs[a, b] += hsic1(grams[a], grams[b])
    cka_mb = hs / np.sqrt(np.outer(np.diag(hs), np.diag(hs)))

    def exact_cka(x: np.ndarray, y: np.ndarray) -> float:
        x = x - x.mean(0)
        y = y - y.mean(0)
        return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

    cka_ex = np.array([[exact_cka(tokens[a], tokens[b]) for b in range(s)] for a in range(s)])
    return dict(cosine=cos, magnitude=np.array(mag), cka_minibatch=cka_mb, cka_exact=cka_ex, tokens=n_tok)


@pytest.fixture
def texts(sample_texts) -> TextSet:
    return TextSet(tuple(sample_texts), "test", "test paragraphs")


def test_metrics_match_slow_reference(tiny_arch, texts):
    arch, path = tiny_arch
    lm = load_model(str(path), device="cpu")
    ref = slow_metrics(reference_states(lm.model, lm.tokenizer, texts, CFG))
    rep = analyze(lm.model, lm.tokenizer, texts, CFG)
    L = rep.num_layers
    assert rep.meta["tokens"] == ref["tokens"]
    np.testing.assert_allclose(rep.array("cosine"), ref["cosine"], atol=2e-5)
    np.testing.assert_allclose(rep.bi, [1 - ref["cosine"][i, i + 1] for i in range(L)], atol=2e-5)
    np.testing.assert_allclose(rep.magnitude, ref["magnitude"], rtol=1e-4, atol=1e-6)
    for n in range(1, L + 1):
        expect = [math.acos(min(1.0, ref["cosine"][i, i + n])) / math.pi for i in range(L - n + 1)]
        np.testing.assert_allclose(rep.block_distance[n - 1], expect, atol=1e-4)
    np.testing.assert_allclose(rep.array("cka"), ref["cka_minibatch"], atol=1e-4)
    exact = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(**{**CFG.__dict__, "cka_estimator": "exact"}))
    np.testing.assert_allclose(exact.array("cka"), ref["cka_exact"], atol=1e-4)


def test_last_layer_bi_is_before_final_norm(tiny_llama, texts):
    lm = load_model(str(tiny_llama), device="cpu")
    rep = analyze(lm.model, lm.tokenizer, texts, CFG)
    toks = calibration_tokens(lm.tokenizer, texts, CFG.samples, CFG.seq_len)
    cos_normed = []
    for t in toks:
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([t]), output_hidden_states=True).hidden_states
        cos_normed.append(torch.nn.functional.cosine_similarity(hs[-2][0], hs[-1][0], dim=-1).double())
    bi_after_norm = 1 - float(torch.cat(cos_normed).mean())
    assert abs(rep.bi[-1] - bi_after_norm) > 1e-3  # hidden_states[-1] is after the norm: a different number


def test_padding_is_masked_out(tiny_model_factory, texts):
    for arch in ("llama", "gpt2"):
        lm = load_model(str(tiny_model_factory(arch)), device="cpu")
        cfg8 = CaptureConfig(samples=8, seq_len=48, batch_size=8)
        cfg1 = CaptureConfig(samples=8, seq_len=48, batch_size=1)
        a = analyze(lm.model, lm.tokenizer, texts, cfg8)
        b = analyze(lm.model, lm.tokenizer, texts, cfg1)
        assert a.meta["tokens"] == b.meta["tokens"]
        for name in ("cosine", "cka", "bi", "magnitude"):
            np.testing.assert_allclose(a.array(name), b.array(name), atol=2e-5, err_msg=name)


def test_batches_pad_and_mask(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    (batch,) = list(batches(lm.tokenizer, [[5, 6, 7], [8]], batch_size=2))
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.input_ids[1, 1] == lm.tokenizer.pad_token_id


def _random_states(seed: int, s=4, n=20, d=8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, n, d, generator=g)
    return [base + 0.7 * i * torch.randn(1, n, d, generator=g) for i in range(s)]


@pytest.mark.parametrize("estimator", ["minibatch", "exact"])
def test_cka_symmetric_unit_diagonal_and_invariant(estimator):
    states = _random_states(0)
    mask = torch.ones(1, 20, dtype=torch.long)

    def cka_of(sts):
        acc = _Accumulators(len(sts), sts[0].shape[-1], estimator, torch.device("cpu"))
        acc.update(sts, mask)
        return acc.cka().numpy()

    c = cka_of(states)
    np.testing.assert_allclose(c, c.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(c), 1.0, atol=1e-12)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    rotated = [states[0], states[1] @ q * 3.5, states[2], states[3] @ q.T * 0.2]
    np.testing.assert_allclose(cka_of(rotated), c, atol=1e-6)  # float32 states


def test_unbiased_hsic_of_independent_noise_is_near_zero():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 5, generator=g, dtype=torch.float64), torch.randn(400, 5, generator=g,
                                                                               dtype=torch.float64)
    h = unbiased_hsic_matrix(torch.stack([x @ x.T, y @ y.T]))
    assert abs(h[0, 1] / math.sqrt(h[0, 0] * h[1, 1])) < 0.05


def test_nonfinite_activations_are_reported():
    acc = _Accumulators(2, 4, "minibatch", torch.device("cpu"))
    states = [torch.ones(1, 5, 4), torch.full((1, 5, 4), float("inf"))]
    with pytest.raises(Exception, match="float16 overflow"):
        acc.update(states, torch.ones(1, 5, dtype=torch.long))


def test_report_json_round_trip(tiny_llama, texts, tmp_path):
    from layerlens.report import LayerReport

    lm = load_model(str(tiny_llama), device="cpu")
    rep = analyze(lm.model, lm.tokenizer, texts, CFG, meta={"model": "tiny"})
    path = rep.save(tmp_path)
    again = LayerReport.load(path)
    assert again == rep
    for key in ("model", "dtype", "device", "data", "samples", "seq_len", "tokens", "seed",
                "layerlens_version", "seconds"):
        assert key in again.meta


@pytest.mark.parametrize("padded", [False, True])
def test_block_update_equals_per_sample_minibatches(padded):
    """The update works on the (S, B, T, D) block in place: its sums equal the pooled formulas over the
    non-pad tokens, with pad positions holding NaN (they must never leak in)."""
    block = torch.randn(5, 4, 12, 8, generator=torch.Generator().manual_seed(3))  # (S, B, T, D)
    lengths = [12, 7, 12, 3] if padded else [12] * 4
    mask = torch.tensor([[1] * n + [0] * (12 - n) for n in lengths])
    if padded:
        block[:, ~mask.bool()] = float("nan")
    acc = _Accumulators(5, 8, "minibatch", torch.device("cpu"))
    acc.update(block, mask)
    tokens = torch.cat([block[:, i, :n] for i, n in enumerate(lengths)], dim=1).double()  # (S, N, D)
    unit = tokens / tokens.norm(dim=2, keepdim=True)
    torch.testing.assert_close(acc.cos_sum, torch.einsum("and,bnd->ab", unit, unit), rtol=1e-5, atol=1e-6)
    rel = (tokens[1:] - tokens[:-1]).norm(dim=2) / tokens[1:].norm(dim=2)
    torch.testing.assert_close(acc.mag_sum, rel.sum(dim=1), rtol=1e-5, atol=1e-6)
    expect = sum(unbiased_hsic_matrix((block[:, i, :n] @ block[:, i, :n].transpose(1, 2)).double())
                 for i, n in enumerate(lengths) if n > 3)
    assert acc.cka_minibatches == sum(n > 3 for n in lengths) and acc.tokens == sum(lengths)
    torch.testing.assert_close(acc.hsic_sum, expect, rtol=1e-5, atol=1e-7)
    if padded:
        return
    # bfloat16 states are widened into a float32 buffer: the sums of the rounded states
    low = _Accumulators(5, 8, "minibatch", torch.device("cpu"))
    low.update(block.bfloat16(), torch.ones(4, 12, dtype=torch.long))
    ref = _Accumulators(5, 8, "minibatch", torch.device("cpu"))
    ref.update(block.bfloat16().float(), torch.ones(4, 12, dtype=torch.long))
    torch.testing.assert_close(low.cos_sum, ref.cos_sum, rtol=0, atol=0)
    torch.testing.assert_close(low.hsic_sum, ref.hsic_sum, rtol=0, atol=0)


def test_hsic_does_not_modify_its_input():
    grams = torch.randn(3, 6, 6, dtype=torch.float64)
    grams = grams + grams.transpose(1, 2)
    before = grams.clone()
    unbiased_hsic_matrix(grams)
    assert torch.equal(grams, before)


def test_capture_reuses_one_block_and_detects_a_missing_layer(tiny_llama):
    from layerlens.capture import ResidualCapture

    lm = load_model(str(tiny_llama), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with ResidualCapture(lm.model) as cap, torch.inference_mode():
        lm.model(input_ids=ids)
        first = cap.take()
        assert first.shape[:3] == (len(cap.layers) + 1, 1, 4)
        ptr = first.data_ptr()
        lm.model(input_ids=ids[:, :3])  # smaller batch: the same buffer, a smaller view
        assert cap.take().data_ptr() == ptr
        with pytest.raises(RuntimeError, match="did not run"):
            cap.take()  # nothing ran since the last take


def test_skip_first_leaves_those_tokens_out_of_every_metric(tiny_llama, texts):
    """skip_first=N equals the slow reference over each sample's tokens from position N on (the skipped
    tokens still run through the model as context); both CKA estimators; padded batches too."""
    lm = load_model(str(tiny_llama), device="cpu")
    cfg = CaptureConfig(samples=6, seq_len=48, batch_size=3, skip_first=2)
    ref = slow_metrics([x[:, 2:] for x in reference_states(lm.model, lm.tokenizer, texts, cfg)])
    rep = analyze(lm.model, lm.tokenizer, texts, cfg)
    assert rep.meta["tokens"] == ref["tokens"] and rep.meta["skip_first"] == 2
    np.testing.assert_allclose(rep.array("cosine"), ref["cosine"], atol=2e-5)
    np.testing.assert_allclose(rep.magnitude, ref["magnitude"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rep.array("cka"), ref["cka_minibatch"], atol=1e-4)
    exact = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(**{**cfg.__dict__, "cka_estimator": "exact"}))
    np.testing.assert_allclose(exact.array("cka"), ref["cka_exact"], atol=1e-4)
    padded = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(samples=8, seq_len=256, batch_size=4,
                                                                  skip_first=1))
    single = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(samples=8, seq_len=256, batch_size=1,
                                                                  skip_first=1))
    assert padded.meta["tokens"] == single.meta["tokens"]
    np.testing.assert_allclose(padded.array("cka"), single.array("cka"), atol=2e-5)


@pytest.mark.parametrize("skip", [-1, 48])
def test_skip_first_out_of_range_is_refused(skip):
    with pytest.raises(Exception, match="`skip_first`"):
        CaptureConfig(seq_len=48, skip_first=skip).validate()
