"""Sublayers (issue 17): plans that drop attention / MLP sublayers, their surgery, export and metrics.

References are independent of the code under test: the mid-layer residual is defined as "the output of
layer i when its MLP adds nothing" and read with a plain forward hook on the layer; metrics are computed
per token in float64; the bootstrap is re-done with a plain Python loop.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import LAYERS, param_hash

from layerlens.adapters import decoder_layers, final_norm
from layerlens.data import TextSet, calibration_tokens
from layerlens.errors import PlanError
from layerlens.export import save_pruned, skip_recorded_sublayers
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, analyze
from layerlens.plans import PrunePlan, plan_summary
from layerlens.prefix_reuse import first_affected_layer, plan_ops
from layerlens.report import LayerReport
from layerlens.surgery import SkippedAttention, apply_plan, dropped_sublayers, pruned

IDS = torch.tensor([[5, 17, 42, 99, 7, 256, 3, 64], [11, 12, 13, 300, 400, 2, 9, 10]])
CFG = CaptureConfig(samples=5, seq_len=40, batch_size=2, bootstrap=200)


@pytest.fixture
def texts(sample_texts) -> TextSet:
    return TextSet(tuple(sample_texts), "test", "test paragraphs")


# -- the plan ----------------------------------------------------------------------------------------------
def test_plan_fields_round_trip_and_old_files_stay_valid():
    p = PrunePlan(8, "remove", remove=(6, 2), drop_attn=[5, 1], drop_mlp=(7,))
    assert p.drop_attn == (1, 5) and p.drop_mlp == (7,)
    assert p.ratio == (2 * 2 + 3) / 16 and p.changes_model and p.n_sublayers_dropped == 3
    assert PrunePlan.from_json(p.to_json()) == p
    assert p.units_text() == "a1,2,a5,6,m7"
    old = PrunePlan(8, "remove", remove=(2, 6))
    assert "drop_attn" not in old.to_dict() and "drop_mlp" not in old.to_dict()  # byte-identical to before
    assert old.ratio == 2 / 8
    legacy = {"num_layers": 8, "method": "remove", "remove": [3], "strategy": "bi"}
    assert PrunePlan.from_dict(legacy).drop_attn == ()
    assert not PrunePlan(8, "remove").changes_model
    assert PrunePlan(8, "remove", drop_mlp=(0,)).changes_model
    rows = plan_summary(p)
    assert (rows[1]["attn"], rows[1]["mlp"]) == ("dropped", "kept")
    assert (rows[2]["attn"], rows[2]["status"]) == ("removed", "removed")
    assert "attn" not in plan_summary(old)[0]


@pytest.mark.parametrize("kwargs, words", [
    (dict(remove=(3,), drop_attn=(3,)), "removed whole"),
    (dict(drop_mlp=(8,)), "out of range"),
    (dict(drop_attn=(2, 2)), "twice"),
    (dict(drop_attn=tuple(range(8))), "every kept layer"),
    (dict(remove=(0, 1, 2, 3), drop_attn=(4, 5, 6, 7)), "every kept layer"),
    (dict(drop_attn="3"), "integer"),
])
def test_plan_validation(kwargs, words):
    with pytest.raises(PlanError, match=words):
        PrunePlan(8, "remove", **kwargs)


def test_merge_members_cannot_lose_sublayers():
    with pytest.raises(PlanError, match="merge group"):
        PrunePlan(8, "merge", merge=((2, 3),), drop_mlp=(2,))
    assert PrunePlan(8, "merge", merge=((2, 3),), drop_mlp=(5,)).drop_mlp == (5,)


def test_prefix_reuse_sees_sublayer_drops():
    p = PrunePlan(6, "remove", remove=(4,), drop_attn=(2,), drop_mlp=(2, 3))
    assert plan_ops(p) == (0, 0, (3, 1, 1), (3, 0, 1), 1, 0)
    assert first_affected_layer(p) == 2
    assert first_affected_layer(PrunePlan(6, "remove", drop_mlp=(5,))) == 5


# -- surgery -----------------------------------------------------------------------------------------------
PLAN = dict(remove=(1,), drop_attn=(0, 4), drop_mlp=(0, 3))


def _layer_outputs(model, ids):
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
             for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_generate_with_cache_equals_without_and_original_untouched(arch_model):
    arch, model = arch_model
    before = param_hash(model)
    config_before = model.config.to_json_string()
    plan = PrunePlan(LAYERS, "remove", **PLAN)
    small = apply_plan(model, plan)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        cached = small.generate(IDS[:1], use_cache=True, **kw)
        plain = small.generate(IDS[:1], use_cache=False, **kw)
        out = small(input_ids=IDS[:1], use_cache=True)
    assert torch.equal(cached, plain), arch
    kinds = [type(layer).__name__ for layer in out.cache.layers]
    assert kinds[0] == "DummyLayer" and kinds[3] == "DummyLayer"  # new indices of layers 0 and 4
    assert all(k != "DummyLayer" for j, k in enumerate(kinds) if j not in (0, 3))
    assert out.cache.layers[0].keys is None
    with pruned(model, plan), torch.no_grad():
        in_place = model.generate(IDS[:1], use_cache=True, **kw)
    assert torch.equal(in_place, cached)
    assert param_hash(model) == before and model.config.to_json_string() == config_before
    assert not any(isinstance(m, SkippedAttention) for m in model.modules())
    assert not hasattr(model.config, "kv_sharing_modes") or model.config.kv_sharing_modes is None


def test_a_dropped_sublayer_adds_nothing(arch_model):
    """Layer i with both sublayers dropped passes its input through (pre-norm archs: exactly)."""
    arch, model = arch_model
    if arch == "opt" and not model.config.do_layer_norm_before:
        pytest.skip("post-LN OPT norms the residual")
    plan = PrunePlan(LAYERS, "remove", drop_attn=(2,), drop_mlp=(2,))
    outs = _layer_outputs(apply_plan(model, plan), IDS)
    assert torch.equal(outs[2], outs[1]), arch
    ref = _layer_outputs(apply_plan(model, PrunePlan(LAYERS, "remove", remove=(2,))), IDS)
    torch.testing.assert_close(outs[-1], ref[-1], rtol=0, atol=0)


def test_dropped_attention_runs_no_attention_code(arch_model):
    arch, model = arch_model
    calls = []
    attn = type(decoder_layers(model)[0].get_submodule(
        {"gpt2": "attn", "gpt_neox": "attention"}.get(arch, "self_attn")))
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: calls.append(m) if isinstance(m, attn) else None)
    try:
        small = apply_plan(model, PrunePlan(LAYERS, "remove", drop_attn=tuple(range(1, LAYERS))))
        with torch.no_grad():
            small(input_ids=IDS)
    finally:
        handle.remove()
    assert len(calls) == 1  # only layer 0's attention ran


def test_export_gives_identical_logits_in_plain_transformers_and_reload_skips_again(arch_model, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, model = arch_model
    plan = PrunePlan(LAYERS, "remove", **PLAN)
    small = apply_plan(model, plan)
    save_pruned(small, None, plan, tmp_path / "out")
    assert "kv_sharing_modes" not in json.loads((tmp_path / "out" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert dropped_sublayers(plain) == ((), ())
    with torch.no_grad():
        expect = small(input_ids=IDS).logits
        assert torch.equal(plain(input_ids=IDS).logits, expect), arch
    again = skip_recorded_sublayers(plain, tmp_path / "out")
    assert dropped_sublayers(again) == ((0, 3), (0, 2))  # new indices (layer 1 removed)
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, expect)
    assert dropped_sublayers(small) == ((0, 3), (0, 2))
    assert not any(isinstance(m, SkippedAttention) for m in model.modules())


def test_load_model_skips_recorded_sublayers(tiny_llama, tmp_path):
    lm = load_model(str(tiny_llama), device="cpu")
    plan = PrunePlan(LAYERS, "remove", drop_attn=(1, 2), drop_mlp=(5,))
    save_pruned(apply_plan(lm.model, plan), lm.tokenizer, plan, tmp_path / "p")
    again = load_model(str(tmp_path / "p"), device="cpu")
    assert dropped_sublayers(again.model) == ((1, 2), (5,))


# -- metrics -----------------------------------------------------------------------------------------------
def _reference(model, tokens):
    """Per sample: h (L+1, n, D) and the mid states m (L, n, D) in float64. m_i is layer i's output when
    only its MLP is dropped (everything below i unchanged), read with a hook on layer i."""
    out = []
    L = len(decoder_layers(model))
    for toks in tokens:
        ids = torch.tensor([toks])
        hs = _layer_outputs(model, ids)
        with torch.no_grad():
            h0 = model(input_ids=ids, output_hidden_states=True).hidden_states[0][0].double()
        mids = []
        for i in range(L):
            with pruned(model, PrunePlan(L, "remove", drop_mlp=(i,))):
                mids.append(_layer_outputs(model, ids)[i][0].double())
        out.append((torch.stack([h0] + [h[0].double() for h in hs]), torch.stack(mids)))
    return out


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_sublayer_metrics_match_slow_reference(arch_model, texts, tok):
    arch, model = arch_model
    rep = analyze(model, tok, texts, CFG)
    if arch == "gpt_neox" and model.config.use_parallel_residual:
        assert rep.attn_bi is None and rep.mlp_magnitude is None and rep.attn_bi_ci_low is None
        assert rep.meta["sublayers"].startswith("none: use_parallel_residual")
        return
    ref = _reference(model, calibration_tokens(tok, texts, CFG.samples, CFG.seq_len))
    h = torch.cat([r[0] for r in ref], dim=1)
    m = torch.cat([r[1] for r in ref], dim=1)
    L = m.shape[0]
    attn_bi = [1 - float(_cos(h[i], m[i]).mean()) for i in range(L)]
    mlp_bi = [1 - float(_cos(m[i], h[i + 1]).mean()) for i in range(L)]
    attn_mag = [float(((m[i] - h[i]).norm(dim=-1) / m[i].norm(dim=-1)).mean()) for i in range(L)]
    mlp_mag = [float(((h[i + 1] - m[i]).norm(dim=-1) / h[i + 1].norm(dim=-1)).mean()) for i in range(L)]
    np.testing.assert_allclose(rep.attn_bi, attn_bi, atol=2e-5, err_msg=arch)
    np.testing.assert_allclose(rep.mlp_bi, mlp_bi, atol=2e-5, err_msg=arch)
    np.testing.assert_allclose(rep.attn_magnitude, attn_mag, rtol=1e-4, atol=1e-6, err_msg=arch)
    np.testing.assert_allclose(rep.mlp_magnitude, mlp_mag, rtol=1e-4, atol=1e-6, err_msg=arch)
    assert rep.meta["sublayers"].startswith("mid residual")


def _bootstrap_reference(samples_cos, samples_tok, resamples, seed, level, k):
    """Plain-loop percentile bootstrap over samples, with torch's generator for the same draws."""
    n, L = samples_cos.shape
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=gen).tolist()
    boots = []
    in_k = np.zeros(L)
    for draw in idx:
        cos = sum(samples_cos[j] for j in draw)
        tok = sum(samples_tok[j] for j in draw)
        bi = 1 - cos / tok
        boots.append(bi)
        for i in sorted(range(L), key=lambda i: (bi[i], i))[:k]:
            in_k[i] += 1
    boots = np.array(boots)
    lo = np.quantile(boots, (1 - level) / 2, axis=0)
    hi = np.quantile(boots, 1 - (1 - level) / 2, axis=0)
    return lo, hi, in_k / resamples


def test_bootstrap_intervals_and_rank_stability_match_a_plain_loop(tiny_llama, texts):
    lm = load_model(str(tiny_llama), device="cpu")
    rep = analyze(lm.model, lm.tokenizer, texts, CFG)
    # per-sample sums of cos(h_i, h_{i+1}) from transformers' own hidden states (norm removed for h_L)
    tokens = calibration_tokens(lm.tokenizer, texts, CFG.samples, CFG.seq_len)
    cos, tok = [], []
    for t in tokens:
        ids = torch.tensor([t])
        with torch.no_grad():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        states = [s[0].double() for s in hs[:-1]] + [_layer_outputs(lm.model, ids)[-1][0].double()]
        cos.append(np.array([float(_cos(states[i], states[i + 1]).sum()) for i in range(LAYERS)]))
        tok.append(len(t))
    k = rep.meta["bootstrap"]["rank_k"]
    assert k == max(1, round(LAYERS / 4))
    lo, hi, stab = _bootstrap_reference(np.array(cos), np.array(tok, dtype=float), CFG.bootstrap, CFG.seed,
                                        CFG.ci_level, k)
    np.testing.assert_allclose(rep.bi_ci_low, lo, atol=1e-5)
    np.testing.assert_allclose(rep.bi_ci_high, hi, atol=1e-5)
    np.testing.assert_allclose(rep.rank_stability, stab, atol=1e-9)
    assert all(a <= b + 1e-12 for a, b in zip(rep.bi_ci_low, rep.bi_ci_high, strict=True))
    freq = np.array(rep.bi_rank_freq)
    np.testing.assert_allclose(freq.sum(axis=0), 1.0)
    np.testing.assert_allclose(freq.sum(axis=1), 1.0)
    np.testing.assert_allclose(rep.stability(k), rep.rank_stability)
    assert all(lo_ <= b <= hi_ for lo_, b, hi_ in zip(rep.attn_bi_ci_low, rep.attn_bi, rep.attn_bi_ci_high,
                                                      strict=True))
    back = LayerReport.from_dict(json.loads(rep.to_json()))
    assert back == rep
    off = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(**{**CFG.__dict__, "bootstrap": 0}))
    assert off.bi_ci_low is None and "bi_ci_low" not in off.to_dict() and off.meta["bootstrap"] is None
    np.testing.assert_allclose(off.bi, rep.bi)


def test_old_report_without_new_keys_loads():
    d = {"num_layers": 2, "bi": [0.1, 0.2], "cosine": [[1, 0, 0]] * 3, "cka": [[1, 0, 0]] * 3,
         "cka_estimator": "minibatch", "block_distance": [[0.1, 0.2], [0.3]], "magnitude": [0.1, 0.1]}
    rep = LayerReport.from_dict(d)
    assert rep.attn_bi is None and not rep.has_sublayers and rep.stability(1) is None


def test_post_norm_last_state_is_shortgpts_convention(tiny_llama, texts):
    lm = load_model(str(tiny_llama), device="cpu")
    cfg = CaptureConfig(samples=4, seq_len=32, batch_size=2, bootstrap=0)
    pre = analyze(lm.model, lm.tokenizer, texts, cfg)
    post = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(**{**cfg.__dict__, "last_state": "post-norm"}))
    cos = []
    for t in calibration_tokens(lm.tokenizer, texts, cfg.samples, cfg.seq_len):
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([t]), output_hidden_states=True).hidden_states
        cos.append(_cos(hs[-2][0].double(), hs[-1][0].double()))  # what ShortGPT reads
    assert abs(post.bi[-1] - (1 - float(torch.cat(cos).mean()))) < 2e-5
    assert abs(post.bi[-1] - pre.bi[-1]) > 1e-3
    np.testing.assert_allclose(post.bi[:-1], pre.bi[:-1], atol=1e-6)
    assert post.meta["last_state"] == "post-norm" and pre.meta["last_state"] == "pre-norm"
    assert final_norm(lm.model) is not None


def test_last_token_block_distance_is_prunemes_convention(tiny_llama, texts):
    lm = load_model(str(tiny_llama), device="cpu")
    cfg = CaptureConfig(samples=5, seq_len=32, batch_size=2, bootstrap=0, block_distance="last-token")
    rep = analyze(lm.model, lm.tokenizer, texts, cfg)
    lasts = []
    for t in calibration_tokens(lm.tokenizer, texts, cfg.samples, cfg.seq_len):
        ids = torch.tensor([t])
        with torch.no_grad():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        states = [s[0, -1].double() for s in hs[:-1]] + [_layer_outputs(lm.model, ids)[-1][0, -1].double()]
        lasts.append(torch.stack(states))
    x = torch.stack(lasts)  # (samples, L+1, D)
    for n in (1, 2, 4):
        expect = [math.acos(min(1.0, float(_cos(x[:, i], x[:, i + n]).mean()))) / math.pi
                  for i in range(LAYERS - n + 1)]
        np.testing.assert_allclose(rep.block_distance[n - 1], expect, atol=1e-5)
    assert rep.meta["block_distance"] == "last-token"
    # the other metrics keep their all-token definitions
    base = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(**{**cfg.__dict__, "block_distance": "all-tokens"}))
    np.testing.assert_allclose(rep.bi, base.bi)
    assert not np.allclose(rep.block_distance[0], base.block_distance[0])


def test_padding_does_not_change_sublayer_metrics(tiny_llama, texts):
    lm = load_model(str(tiny_llama), device="cpu")
    a = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(samples=6, seq_len=40, batch_size=6, bootstrap=50))
    b = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(samples=6, seq_len=40, batch_size=1, bootstrap=50))
    for name in ("attn_bi", "mlp_bi", "attn_magnitude", "mlp_magnitude", "bi_ci_low", "rank_stability"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=2e-5, err_msg=name)


# -- strategies and sweeps -----------------------------------------------------------------------------------
def _report(L=6, attn=None, mlp=None):
    bi = [0.1 * (i + 1) for i in range(L)]
    eye = [[1.0] * (L + 1) for _ in range(L + 1)]
    return LayerReport(L, bi, eye, eye, "minibatch", [[0.1] * (L - n) for n in range(L)], bi,
                       attn_bi=attn, mlp_bi=mlp)


def test_attention_and_mlp_strategies_count_sublayers():
    from layerlens.plans import get_strategy, make_plan

    rep = _report(attn=[0.5, 0.1, 0.3, 0.05, 0.2, 0.2], mlp=[0.4, 0.3, 0.2, 0.1, 0.6, 0.05])
    p = make_plan("attn_bi", rep, ratio=0.25)  # round(0.25 * 12) = 3 sublayers
    assert p.drop_attn == (1, 3, 4) and p.drop_mlp == () and p.remove == ()
    assert p.ratio == 0.25 and p.params["target_ratio"] == 0.25
    assert make_plan("mlp_bi", rep, n=2).drop_mlp == (3, 5)
    assert make_plan("attn_bi", rep, n=0).changes_model is False
    with pytest.raises(PlanError, match="at most 5"):
        make_plan("attn_bi", rep, n=6)
    assert make_plan("mlp_bi", rep, n=6).drop_mlp == tuple(range(6))
    with pytest.raises(PlanError, match="no attn_bi"):
        make_plan("attn_bi", _report(), ratio=0.2)
    assert "attention" in get_strategy("attn_bi").reason(rep, p)
    assert get_strategy("attn_bi").sweepable and get_strategy("finercut").uses_data()


def _final_states_reference(model, tokens):
    """hidden_states[-1] (after the final norm) per sample, unpadded."""
    out = []
    for t in tokens:
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([t]), output_hidden_states=True).hidden_states[-1][0].double())
    return out


def test_finercut_equals_a_naive_greedy(tiny_llama, texts):
    from layerlens.plans import make_plan
    from layerlens.plans.probed import _FINERCUT_ORDERS

    lm = load_model(str(tiny_llama), device="cpu")
    before = param_hash(lm.model)
    tokens = calibration_tokens(lm.tokenizer, texts, 3, 24)
    ref = _final_states_reference(lm.model, tokens)
    attn, mlp, order = set(), set(), []
    for _ in range(3):
        scores = []
        for kind in ("attn", "mlp"):
            for i in range(LAYERS):
                if i in (attn if kind == "attn" else mlp):
                    continue
                a = attn | {i} if kind == "attn" else attn
                m = mlp | {i} if kind == "mlp" else mlp
                with pruned(lm.model, PrunePlan(LAYERS, "remove", drop_attn=tuple(a), drop_mlp=tuple(m))):
                    got = _final_states_reference(lm.model, tokens)
                sim = np.mean([float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))
                               for x, y in zip(ref, got, strict=True)])
                scores.append((-sim, 0 if kind == "attn" else 1, i, kind))
        _, _, i, kind = min(scores)
        (attn if kind == "attn" else mlp).add(i)
        order.append(f"{kind}{i}")
    _FINERCUT_ORDERS.clear()
    plan = make_plan("finercut", None, n=3, num_layers=LAYERS, model=lm.model, tokenizer=lm.tokenizer,
                     token_lists=tokens, batch_size=2)
    assert plan.params["order"] == order
    assert set(plan.drop_attn) == attn and set(plan.drop_mlp) == mlp
    # a smaller k reuses the cached greedy order: no forward pass (the reference states are never rebuilt)
    import layerlens.plans.probed as probed

    real = probed._FinalStates
    probed._FinalStates = None  # calling it would raise
    try:
        small = make_plan("finercut", None, ratio=2 / 12, num_layers=LAYERS, model=lm.model,
                          tokenizer=lm.tokenizer, token_lists=tokens, batch_size=2)
    finally:
        probed._FinalStates = real
    assert small.params["order"] == order[:2]
    # without prefix reuse (no room for the recorded states): the same order
    _FINERCUT_ORDERS.clear()
    plain = probed.finercut_plan(lm.model, lm.tokenizer, tokens, 3, batch_size=2, cache_bytes=0)
    assert plain.params["order"] == order
    assert param_hash(lm.model) == before


def test_sweep_of_sublayer_strategies_equals_each_plan_from_scratch(tiny_llama, sample_texts):
    from layerlens.evaluation import perplexity
    from layerlens.sweep import SweepConfig, sweep

    lm = load_model(str(tiny_llama), device="cpu")
    report = analyze(lm.model, lm.tokenizer, TextSet(tuple(sample_texts[:6]), "t", "t"),
                     CaptureConfig(samples=6, seq_len=32, batch_size=3, bootstrap=0))
    mixed = PrunePlan(LAYERS, "remove", remove=(4,), drop_attn=(1,), drop_mlp=(2,))
    plans = [("manual", mixed.ratio, mixed)]
    cfg = SweepConfig(["attn_bi", "mlp_bi", "bi"], [0.0, 0.2, 0.4], seq_len=32, max_windows=4,
                      ppl_batch_size=2)
    result = sweep(lm.model, lm.tokenizer, report, cfg, ppl_texts=sample_texts)
    frame = result.frame
    extra = sweep(lm.model, lm.tokenizer, report, SweepConfig(plans=plans, seq_len=32, max_windows=4,
                                                              ppl_batch_size=2), ppl_texts=sample_texts).frame
    from layerlens.plans import make_plan

    for _, row in frame.iterrows():
        plan = make_plan(row.strategy, report, ratio=row.ratio)
        ref = perplexity(apply_plan(lm.model, plan), lm.tokenizer, sample_texts, seq_len=32, max_windows=4)
        assert row.perplexity == pytest.approx(ref.perplexity, rel=1e-5), (row.strategy, row.ratio)
        assert row.actual_ratio == pytest.approx(plan.ratio)
    attn_rows = frame[(frame.strategy == "attn_bi") & (frame.ratio > 0)]
    assert all(r.startswith("a") for s in attn_rows.removed_layers for r in s.split(","))
    ref = perplexity(apply_plan(lm.model, mixed), lm.tokenizer, sample_texts, seq_len=32, max_windows=4)
    assert extra.perplexity.iloc[0] == pytest.approx(ref.perplexity, rel=1e-5)
    assert extra.removed_layers.iloc[0] == "a1,m2,4"


# -- plots -----------------------------------------------------------------------------------------------------
def _full_report(L=8):
    rng = np.random.default_rng(0)
    bi = rng.uniform(0.05, 0.5, L).tolist()
    eye = [[1.0] * (L + 1) for _ in range(L + 1)]
    freq = np.full((L, L), 1.0 / L).tolist()
    return LayerReport(L, bi, eye, eye, "minibatch", [[0.1] * (L - n) for n in range(L)], bi,
                       meta={"bootstrap": {"resamples": 100, "rank_k": 2, "level": 0.95}},
                       attn_bi=[b / 2 for b in bi], mlp_bi=[b / 3 for b in bi], attn_magnitude=bi, mlp_magnitude=bi,
                       bi_ci_low=[b - 0.01 for b in bi], bi_ci_high=[b + 0.02 for b in bi],
                       attn_bi_ci_low=[b / 2 - 0.01 for b in bi], attn_bi_ci_high=[b / 2 + 0.01 for b in bi],
                       mlp_bi_ci_low=[b / 3 - 0.01 for b in bi], mlp_bi_ci_high=[b / 3 + 0.01 for b in bi],
                       rank_stability=[0.25] * L, bi_rank_freq=freq)


def _figures():
    from layerlens.plots import bi_bar, layer_strip, rank_stability_bar, sublayer_bars

    rep = _full_report()
    summary = plan_summary(PrunePlan(8, "remove", remove=(6,), drop_attn=(1, 2), drop_mlp=(3,)))
    yield bi_bar(rep)
    yield bi_bar(rep, "attn_bi", highlight=(1, 2))
    yield bi_bar(rep, "mlp_magnitude")
    yield sublayer_bars(rep, highlight=summary)
    yield rank_stability_bar(rep)
    yield layer_strip(summary)


@pytest.mark.parametrize("index", range(6))
def test_sublayer_figures_pass_plotly_validation_and_titles_fit(index):
    import plotly.graph_objects as go
    import plotly.io as pio

    from layerlens.plots import TITLE_LINE_MAX

    fig = list(_figures())[index]
    checked = go.Figure(fig.to_dict())
    assert json.loads(pio.to_json(checked, validate=False)) == json.loads(pio.to_json(fig, validate=False))
    import re

    for line in fig.layout.title.text.split("<br>"):
        assert len(re.sub(r"<[^>]+>", "", line)) <= TITLE_LINE_MAX


def test_error_bars_are_the_bootstrap_interval_and_strip_rows_show_drops():
    from layerlens.plots import bi_bar, layer_strip, sublayer_bars

    rep = _full_report()
    bar = bi_bar(rep).data[0]
    np.testing.assert_allclose(bar.error_y.array, [h - b for b, h in zip(rep.bi, rep.bi_ci_high, strict=True)])
    np.testing.assert_allclose(bar.error_y.arrayminus, [b - lo for b, lo in zip(rep.bi, rep.bi_ci_low, strict=True)])
    assert bi_bar(_report()).data[0].error_y.array is None  # no interval measured: no error bars
    fig = sublayer_bars(rep)
    assert [t.name for t in fig.data] == ["whole layer", "attention", "MLP"]
    np.testing.assert_allclose(fig.data[1].y, rep.attn_bi)
    with pytest.raises(ValueError, match="no attention/MLP BI"):
        sublayer_bars(_report())
    strip = layer_strip(plan_summary(PrunePlan(8, "remove", remove=(6,), drop_attn=(1, 2), drop_mlp=(3,))))
    dropped = {(t.base[0] // 1, tuple(t.x)) for t in strip.data if t.name.endswith("dropped (2)")
               or t.name.endswith("dropped (1)")}
    assert dropped == {(1.0, (1, 2)), (0.0, (3,))}
    assert "2 attention, 1 MLP sublayers dropped" in strip.layout.title.text


def test_skip_first_leaves_those_tokens_out_of_the_sublayer_metrics(tiny_llama, texts):
    """With skip_first=1 the sublayer means are over tokens 1.. only: equal to the reference without them."""
    lm = load_model(str(tiny_llama), device="cpu")
    cfg = CaptureConfig(samples=3, seq_len=24, batch_size=3, bootstrap=0, skip_first=1)
    rep = analyze(lm.model, lm.tokenizer, texts, cfg)
    ref = _reference(lm.model, calibration_tokens(lm.tokenizer, texts, cfg.samples, cfg.seq_len))
    h = torch.cat([r[0][:, 1:] for r in ref], dim=1)
    m = torch.cat([r[1][:, 1:] for r in ref], dim=1)
    np.testing.assert_allclose(rep.attn_bi, [1 - float(_cos(h[i], m[i]).mean()) for i in range(LAYERS)], atol=2e-5)
    np.testing.assert_allclose(rep.mlp_bi, [1 - float(_cos(m[i], h[i + 1]).mean()) for i in range(LAYERS)],
                               atol=2e-5)


def test_sublayers_off_and_an_analysis_of_a_sublayer_pruned_model(tiny_llama, texts):
    lm = load_model(str(tiny_llama), device="cpu")
    off = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(samples=3, seq_len=24, sublayers=False, bootstrap=0))
    assert off.attn_bi is None and off.meta["sublayers"] == "off"
    small = apply_plan(lm.model, PrunePlan(LAYERS, "remove", drop_attn=(2,), drop_mlp=(4,)))
    rep = analyze(small, lm.tokenizer, texts, CaptureConfig(samples=3, seq_len=24, bootstrap=0))
    assert rep.attn_bi[2] == pytest.approx(0.0, abs=1e-6) and rep.mlp_bi[4] == pytest.approx(0.0, abs=1e-6)
    assert rep.attn_magnitude[2] == pytest.approx(0.0, abs=1e-6)
