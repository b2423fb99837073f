"""Surgery on every covered architecture, checked against independently built reference models."""

from __future__ import annotations

import copy
import hashlib
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from layerlens import adapters
from layerlens.adapters import adapter_for, decoder_layers
from layerlens.data import TextSet, calibration_tokens
from layerlens.errors import PlanError
from layerlens.loading import load_model
from layerlens.plans import PrunePlan
from layerlens.plans.probed import laco_plan, slm_output_plan
from layerlens.surgery import apply_plan, pruned


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and far faster than two threads on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


IDS = torch.tensor([[5, 17, 33, 99, 120, 7, 8, 9, 10, 11, 12, 13, 200, 201, 77, 78]])


def param_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def snapshot(model) -> dict:
    layers = decoder_layers(model)
    return {
        "params": param_hash(model),
        "layer_ids": [id(x) for x in layers],
        "list_id": id(layers),
        "layer_idx": [
            (n, m.layer_idx) for n, m in model.named_modules() if isinstance(m.__dict__.get("layer_idx"), int)
        ],
        "config": model.config.to_dict(),
    }


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def reference_model(model, plan: PrunePlan):
    """Built independently: a fresh model from a hand-edited config, loaded from a rewritten state dict."""
    ad = adapter_for(model)
    prefix = ad.layers + "."
    cfg = copy.deepcopy(model.config)
    L = plan.num_layers
    kept = [i for i in range(L) if i not in set(plan.removed_layers)]
    setattr(cfg, ad.num_layers_field, len(kept))
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    sd = model.state_dict()
    groups = {g[0]: g for g in plan.merge}
    parts = [ad.attention + "."] + [p + "." for p in ad.mlp.split(",")]
    out = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        idx, rest = key[len(prefix) :].split(".", 1)
        idx = int(idx)
        if idx not in kept:
            continue
        if idx in groups and any(rest.startswith(p) for p in parts) and "norm" not in rest:
            ts = [sd[f"{prefix}{j}.{rest}"].double() for j in groups[idx]]
            if plan.merge_formula == "task_vector":
                value = ts[0] + sum(t - ts[0] for t in ts[1:])
            elif plan.merge_formula == "mean":
                value = sum(ts) / len(ts)
            else:
                value = ts[-1]
            value = value.to(sd[key].dtype)
        out[f"{prefix}{kept.index(idx)}.{rest}"] = value
    ref = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    missing, unexpected = ref.load_state_dict(out, strict=False)
    assert not unexpected and all("lm_head" in k or "inv_freq" in k or "bias" in k for k in missing), missing
    return ref.eval()


PLANS = [
    PrunePlan(6, "remove", remove=(1, 4), strategy="bi"),
    PrunePlan(6, "remove", remove=(0, 5)),
    PrunePlan(6, "merge", merge=((1, 2, 3),), merge_formula="task_vector"),
    PrunePlan(6, "merge", merge=((0, 1), (4, 5)), merge_formula="mean"),
    PrunePlan(6, "merge", merge=((2, 3, 4),), merge_formula="keep_top"),
]


def test_apply_plan_every_architecture(tiny_arch, tmp_path):
    arch, path = tiny_arch
    model = load_model(str(path), device="cpu").model
    before = snapshot(model)
    orig_types = list(getattr(model.config, "layer_types", None) or [])
    for k, plan in enumerate(PLANS):
        new = apply_plan(model, plan)
        layers = decoder_layers(new)
        assert len(layers) == 6 - plan.n_removed
        for j, layer in enumerate(layers):
            idx = [m.layer_idx for m in layer.modules() if isinstance(m.__dict__.get("layer_idx"), int)]
            assert idx and set(idx) == {j}
        cfg = new.config
        assert cfg is not model.config and cfg.num_hidden_layers == len(layers)
        if orig_types:
            assert cfg.layer_types == [orig_types[i] for i in plan.kept_layers]
        out = logits(new)
        torch.testing.assert_close(out, logits(reference_model(model, plan)), atol=2e-5, rtol=1e-4)
        g_cache = new.generate(IDS, max_new_tokens=14, do_sample=False, use_cache=True)
        g_plain = new.generate(IDS, max_new_tokens=14, do_sample=False, use_cache=False)
        assert torch.equal(g_cache, g_plain), f"{arch} {plan.describe()}"
        if k in (0, 2):
            new.save_pretrained(tmp_path / f"out{k}")
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"out{k}").eval()
            assert torch.equal(logits(reloaded), out)
            assert reloaded.config.num_hidden_layers == len(layers)
        with pruned(model, plan) as same:
            assert same is model and len(decoder_layers(model)) == len(layers)
            assert torch.equal(logits(model), out)
            assert torch.equal(
                model.generate(IDS, max_new_tokens=6, do_sample=False), g_cache[:, : IDS.shape[1] + 6]
            )
        assert snapshot(model) == before, f"{arch}: the original changed after {plan.describe()}"


def test_pruned_restores_on_error(tiny_llama):
    model = load_model(str(tiny_llama), device="cpu").model
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), pruned(model, PLANS[3]):
        assert model.config.num_hidden_layers == 4
        raise RuntimeError("boom")
    assert snapshot(model) == before


def test_apply_plan_shares_weights_and_is_cheap(tiny_llama):
    model = load_model(str(tiny_llama), device="cpu").model
    orig = {p.data_ptr() for p in model.parameters()}
    for plan in (PLANS[0], PLANS[2]):
        t0 = time.perf_counter()
        new = apply_plan(model, plan)
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.0
        fresh = [(n, p) for n, p in new.named_parameters() if p.data_ptr() not in orig]
        if plan.method == "remove":
            assert fresh == []
        else:  # only the merged layer's attention + MLP weights are new
            assert fresh and all(
                n.startswith("model.layers.1.") and ("self_attn" in n or "mlp" in n) for n, _ in fresh
            )
            assert sum(p.numel() for _, p in fresh) == sum(
                p.numel()
                for p in [
                    *decoder_layers(model)[1].self_attn.parameters(),
                    *decoder_layers(model)[1].mlp.parameters(),
                ]
            )
        assert new.model.embed_tokens.weight is model.model.embed_tokens.weight
        assert all(m is not o for m, o in zip(new.modules(), model.modules(), strict=False))


def test_tied_weights_stay_tied(tiny_model_factory):
    model = load_model(str(tiny_model_factory("gpt2")), device="cpu").model
    assert model.lm_head.weight is model.transformer.wte.weight
    new = apply_plan(model, PLANS[2], copy_weights=True)
    assert new.lm_head.weight is new.transformer.wte.weight
    assert new.lm_head.weight is not model.lm_head.weight  # copy_weights: independent tensors
    torch.testing.assert_close(logits(new), logits(apply_plan(model, PLANS[2])))


def test_surgery_errors(tiny_llama, monkeypatch):
    model = load_model(str(tiny_llama), device="cpu").model
    with pytest.raises(PlanError, match="8-layer model but this model has 6"):
        apply_plan(model, PrunePlan(8, "remove", remove=(1,)))
    with pytest.raises(PlanError, match="do not start a merge group"):
        apply_plan(model, PLANS[2], replacements={4: decoder_layers(model)[4]})
    broken = adapters.ArchAdapter(layers="model.layers", final_norm="model.norm", attention="no_such_attn")
    monkeypatch.setitem(adapters.ADAPTERS, "llama", broken)
    with pytest.raises(PlanError, match="cannot be merged"):
        apply_plan(model, PLANS[2])
    with pytest.raises(PlanError, match="cannot be merged"), pruned(model, PLANS[2]):
        pass
    assert len(apply_plan(model, PLANS[0]).model.layers) == 4  # removal still works


@pytest.fixture(scope="module")
def llama8(tiny_model_factory):
    return load_model(str(tiny_model_factory("llama", num_layers=8)), device="cpu")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_surgery_property(llama8, data):
    model = llama8.model
    before = param_hash(model)
    if data.draw(st.booleans()):
        plan_kwargs = dict(method="remove", remove=tuple(data.draw(st.lists(st.integers(-1, 9), max_size=9))))
    else:
        starts = data.draw(st.lists(st.tuples(st.integers(0, 8), st.integers(1, 4)), max_size=3))
        plan_kwargs = dict(
            method="merge",
            merge=tuple(tuple(range(s, s + w)) for s, w in starts),
            merge_formula=data.draw(st.sampled_from(["task_vector", "keep_top", "mean"])),
        )
    try:
        plan = PrunePlan(num_layers=data.draw(st.sampled_from([8, 8, 8, 7])), **plan_kwargs)
        new = apply_plan(model, plan)
    except PlanError as exc:
        assert str(exc).endswith(".")
        assert param_hash(model) == before
        return
    assert len(new.model.layers) == 8 - plan.n_removed == new.config.num_hidden_layers
    assert torch.isfinite(logits(new, IDS[:, :6])).all()
    assert len(model.model.layers) == 8 and model.config.num_hidden_layers == 8
    assert param_hash(model) == before


# -- forward-pass criteria against ports of the published loops ------------------------------------------
def _ref_merge(model, low, high):
    """The published SLM/LaCo merge: deepcopy, then ``base += layer_j - base`` in place (keep_top)."""
    mc = copy.deepcopy(model)
    for cur in range(low, high + 1):
        for part, projs in (
            ("mlp", ("gate_proj", "down_proj", "up_proj")),
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ):
            for proj in projs:
                w = getattr(getattr(mc.model.layers[low], part), proj).weight.data
                w.add_(getattr(getattr(model.model.layers[cur], part), proj).weight.data - w)
    for cur in range(high, low, -1):
        del mc.model.layers[cur]
    for i, mod in enumerate(mc.model.layers):
        mod.self_attn.layer_idx = i
    mc.config.num_hidden_layers = len(mc.model.layers)
    return mc


class _RefSim:
    def __init__(self, model, toks):
        self.toks = toks
        self.refs = [self.final(model, t) for t in toks]

    @staticmethod
    def final(model, toks):
        with torch.no_grad():
            return model(torch.tensor([toks]), output_hidden_states=True).hidden_states[-1]

    def __call__(self, model2):
        sims = [
            torch.cosine_similarity(a.flatten()[None], self.final(model2, t).flatten()[None]).item()
            for t, a in zip(self.toks, self.refs, strict=True)
        ]
        return float(np.mean(sims))


def _ref_slm(model, toks, T):
    sim = _RefSim(model, toks)
    short, records = model, []
    high = len(model.model.layers) - 2
    low = high - 1
    while low >= 0:
        if sim(_ref_merge(short, low, high)) >= T:
            low -= 1
        elif low + 1 != high:
            short = _ref_merge(short, low + 1, high)
            records.append(tuple(range(low + 1, high + 1)))
            high, low = low, low - 1
        else:
            high, low = high - 1, low - 1
    if high - low >= 2 and high >= 1:
        records.append(tuple(range(low + 1, high + 1)))
    return sorted(records), short


def _ref_laco(model, toks, T, C, interval):
    sim = _RefSim(model, toks)
    cur, slots = model, [(i,) for i in range(len(model.model.layers))]
    lay = len(model.model.layers) - 1 - C
    while lay >= 0:
        k = min(C - 1, len(cur.model.layers) - lay - 1)
        tmp = _ref_merge(cur, lay, lay + k)
        if sim(tmp) >= T:
            cur = tmp
            slots = [
                *slots[:lay],
                tuple(i for s in slots[lay : lay + k + 1] for i in s),
                *slots[lay + k + 1 :],
            ]
            lay -= interval
            if lay >= len(cur.model.layers):
                lay = len(cur.model.layers) - 1 - C
        else:
            lay -= 1
    return [s for s in slots if len(s) > 1], cur


@pytest.fixture(scope="module")
def calib(llama8, sample_texts):
    return calibration_tokens(llama8.tokenizer, TextSet(tuple(sample_texts[:5]), "t", "t"), 5, 24)


@pytest.mark.parametrize("threshold", [0.9, 0.75, 0.55, 0.35])
def test_slm_output_matches_reference_script(llama8, calib, threshold):
    model = llama8.model
    before = param_hash(model)
    records, ref_model = _ref_slm(model, calib, threshold)
    plan = slm_output_plan(model, llama8.tokenizer, calib, threshold, formula="keep_top", batch_size=2)
    assert list(plan.merge) == records and plan.strategy == "slm" and plan.params["criterion"] == "output"
    torch.testing.assert_close(logits(apply_plan(model, plan)), logits(ref_model), atol=1e-5, rtol=1e-4)
    assert param_hash(model) == before


@pytest.mark.parametrize("threshold, C, interval", [(0.75, 2, 1), (0.55, 3, 1), (0.35, 3, 2), (0.1, 2, 1)])
def test_laco_matches_reference_script(llama8, calib, threshold, C, interval):
    model = llama8.model
    groups, ref_model = _ref_laco(model, calib, threshold, C, interval)
    plan = laco_plan(
        model, llama8.tokenizer, calib, threshold, m=C - 1, interval=interval, formula="keep_top"
    )
    assert [list(g) for g in plan.merge] == [list(g) for g in groups] and plan.strategy == "laco"
    torch.testing.assert_close(logits(apply_plan(model, plan)), logits(ref_model), atol=1e-5, rtol=1e-4)


def test_functional_criteria_refuse_bad_input(llama8, calib):
    with pytest.raises(PlanError, match=r"outside \[-1, 1\]"):
        slm_output_plan(llama8.model, llama8.tokenizer, calib, 1.2)
    with pytest.raises(PlanError, match="positive integer"):
        laco_plan(llama8.model, llama8.tokenizer, calib, 0.5, m=0)
    with pytest.raises(PlanError, match="No calibration tokens"):
        laco_plan(llama8.model, llama8.tokenizer, [], 0.5)


# -- LLM-Streamline replacement -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ffn", "layer"])
def test_streamline_replacement_every_architecture(tiny_arch, sample_texts, kind, tmp_path):
    from layerlens.streamline import apply_replacement, replacement_plan, train_replacement

    arch, path = tiny_arch
    loaded = load_model(str(path), device="cpu")
    model = loaded.model
    before = snapshot(model)
    toks = calibration_tokens(loaded.tokenizer, TextSet(tuple(sample_texts[:8]), "t", "t"), 8, 24)
    plan = PrunePlan(6, "remove", remove=(2, 3, 4), strategy="streamline")
    calls = []
    rep = train_replacement(
        model,
        loaded.tokenizer,
        toks,
        plan,
        kind=kind,
        epochs=6,
        lr=2e-3,
        batch_size=4,
        progress=lambda d, t, m: calls.append((d, t)),
    )
    assert rep.steps == 12 and calls[-1] == (12, 12) and rep.stopped == "done" and rep.tokens > 0
    assert rep.mse_final < rep.mse_initial and rep.mse_final < rep.mse_removed
    new = apply_replacement(model, plan, rep)
    rplan = replacement_plan(plan, rep)
    assert rplan.merge == ((2, 3, 4),) and rplan.params["replacement"]["kind"] == kind
    layers = decoder_layers(new)
    assert len(layers) == 4 and new.config.num_hidden_layers == 4
    # inside the new model, the replacement maps h_2 to the trained prediction of h_5
    seen = {}

    def keep(name):
        def hook(_m, _a, o):
            seen[name] = o[0] if isinstance(o, tuple) else o

        return hook

    handle = layers[2].register_forward_hook(keep("y"))
    handle2 = decoder_layers(model)[4].register_forward_hook(keep("target"))
    ids = torch.tensor([toks[0]])
    with torch.no_grad():
        new(ids)
        model(ids)
    handle.remove()
    handle2.remove()
    mse = float(((seen["y"] - seen["target"]) ** 2).mean())
    assert mse < rep.mse_removed
    if kind == "ffn":
        attn = adapters.get_attr(layers[2], adapter_for(model).attention)
        h = attn.register_forward_hook(keep("attention"))
        with torch.no_grad():
            new(ids)
        h.remove()
        assert float(seen["attention"].abs().max()) == 0.0
    new.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(reloaded, ids), logits(new, ids))
    assert torch.equal(
        new.generate(IDS, max_new_tokens=8, do_sample=False),
        new.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=False),
    )
    assert snapshot(model) == before


def test_streamline_budget_and_errors(tiny_llama, sample_texts):
    from layerlens.streamline import train_replacement

    loaded = load_model(str(tiny_llama), device="cpu")
    toks = calibration_tokens(loaded.tokenizer, TextSet(tuple(sample_texts[:4]), "t", "t"), 4, 16)
    plan = PrunePlan(6, "remove", remove=(3, 4))
    rep = train_replacement(loaded.model, loaded.tokenizer, toks, plan, time_budget=0.0)
    assert rep.steps == 0 and rep.stopped == "time budget" and rep.mse_final == rep.mse_initial
    with pytest.raises(PlanError, match="contiguous"):
        train_replacement(loaded.model, loaded.tokenizer, toks, PrunePlan(6, "remove", remove=(1, 3)))
    with pytest.raises(PlanError, match="Unknown replacement kind"):
        train_replacement(loaded.model, loaded.tokenizer, toks, plan, kind="mlp2")


def test_accelerate_hooks_follow_the_clone(tiny_llama):
    """Models dispatched by accelerate carry forward wrappers bound to each module; clones must re-bind."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = load_model(str(tiny_llama), device="cpu").model
    seen = []

    class Record(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(module)
            return args, kwargs

    for layer in decoder_layers(model):
        add_hook_to_module(layer, Record())
    expected = logits(model)
    seen.clear()
    new = apply_plan(model, PrunePlan(6, "remove", remove=(0,)))
    out = logits(new)
    assert seen == list(decoder_layers(new))  # the hooks ran on the new model's own layers
    torch.testing.assert_close(out, logits(reference_model(model, PrunePlan(6, "remove", remove=(0,)))))
    seen.clear()
    assert torch.equal(logits(model), expected) and seen == list(decoder_layers(model))


def test_dtype_kept_and_every_per_layer_list_reindexed(tiny_model_factory):
    loaded = load_model(str(tiny_model_factory("qwen3")), device="cpu", dtype="bfloat16")
    model = loaded.model
    model.config.my_per_layer_scale = [
        0.0,
        1.0,
        2.0,
        3.0,
        4.0,
        5.0,
    ]  # any list of length L follows the layers
    plan = PrunePlan(6, "merge", merge=((1, 2), (3, 4, 5)), merge_formula="task_vector")
    new = apply_plan(model, plan)
    assert new.config.my_per_layer_scale == [0.0, 1.0, 3.0] and model.config.my_per_layer_scale[3] == 3.0
    assert {p.dtype for p in new.parameters()} == {torch.bfloat16}
    src = [decoder_layers(model)[i].self_attn.q_proj.weight.double() for i in (3, 4, 5)]
    expect = (src[0] + (src[1] - src[0]) + (src[2] - src[0])).to(torch.bfloat16)
    assert torch.equal(decoder_layers(new)[2].self_attn.q_proj.weight, expect)
    # q_norm / k_norm are norms inside the attention: they keep the base's
    assert decoder_layers(new)[2].self_attn.q_norm.weight is decoder_layers(model)[3].self_attn.q_norm.weight
    assert torch.isfinite(logits(new)).all()


def _hand_set_device_map(model) -> dict:
    """A device map as accelerate's ``dispatch_model`` records it, with a layer split into sub-modules."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu"}
    for i in range(6):
        if i == 4:
            device_map.update({"model.layers.4.self_attn": "cpu", "model.layers.4.mlp": "cpu",
                               "model.layers.4.input_layernorm": "cpu",
                               "model.layers.4.post_attention_layernorm": "cpu"})
        else:
            device_map[f"model.layers.{i}"] = "cpu"
    device_map.update({"model.norm": "cpu", "lm_head": "cpu"})
    model.hf_device_map = device_map
    return copy.deepcopy(device_map)


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
def test_device_map_follows_the_kept_layers(tiny_llama, tmp_path):
    model = load_model(str(tiny_llama), device="cpu").model
    original = _hand_set_device_map(model)
    plan = PrunePlan(6, "merge", merge=((1, 2),), merge_formula="mean")  # kept: 0, 1(merged), 3, 4, 5
    new = apply_plan(model, plan)
    assert new.hf_device_map == {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
        "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "cpu",
        "model.layers.3.self_attn": "cpu", "model.layers.3.mlp": "cpu",
        "model.layers.3.input_layernorm": "cpu", "model.layers.3.post_attention_layernorm": "cpu",
        "model.layers.4": "cpu", "model.norm": "cpu", "lm_head": "cpu",
    }
    # every key names a module of the new model, every layer is covered: accelerate can follow it
    names = dict(new.named_modules())
    assert all(k in names for k in new.hf_device_map)
    assert model.hf_device_map == original and model.hf_device_map is not new.hf_device_map
    removed = apply_plan(model, PrunePlan(6, "remove", remove=(0, 4)))
    assert [k for k in removed.hf_device_map if k.startswith("model.layers")] == [
        "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3"]
    assert model.hf_device_map == original
    removed.save_pretrained(tmp_path / "saved")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config.num_hidden_layers == 4
    with pruned(model, PrunePlan(6, "remove", remove=(0, 4))) as inplace:
        assert inplace.hf_device_map == removed.hf_device_map
    assert model.hf_device_map == original


def test_device_map_reindex_values_and_unfixable_maps(tiny_llama):
    from layerlens.surgery import pruned_device_map

    dm = {"": 0} | {f"model.layers.{i}": i for i in range(6)} | {"model.layers.5.mlp": "disk"}
    plan = PrunePlan(6, "remove", remove=(1, 2))
    assert pruned_device_map(dm, "model.layers", plan) == {
        "": 0, "model.layers.0": 0, "model.layers.1": 3, "model.layers.2": 4, "model.layers.3": 5,
        "model.layers.3.mlp": "disk",
    }
    assert pruned_device_map({"model.layers.10": 1}, "model.layers", plan) == {}  # unknown, not layer 1
    assert pruned_device_map(None, "model.layers", plan) is None
    merge = PrunePlan(6, "merge", merge=((2, 3, 4),))
    assert pruned_device_map(dm, "model.layers", merge, {2: True})["model.layers.2"] == 2
    assert pruned_device_map(dm, "model.layers", merge, {2: False}) is None  # replacement elsewhere
    split = {"model.layers.2.self_attn": 0, "model.layers.2.mlp": 1}
    assert pruned_device_map(split, "model.layers", merge, {2: True}) is None
    # a model whose map cannot be made right loses it (the original keeps its own)
    model = load_model(str(tiny_llama), device="cpu").model
    model.hf_device_map = "balanced"
    assert not hasattr(apply_plan(model, plan), "hf_device_map") and model.hf_device_map == "balanced"


@pytest.mark.parametrize("method", ["remove", "merge"])
def test_a_dropped_pruned_model_is_freed_without_a_garbage_collection(tiny_llama, method):
    """The dashboard turns Streamlit's per-rerun gc.collect off: a pruned model the user replaces must be
    freed by reference counting alone (no reference cycle may keep its modules or merged tensors)."""
    import gc
    import weakref

    lm = load_model(str(tiny_llama), device="cpu")
    n = len(decoder_layers(lm.model))
    plan = (PrunePlan(n, "remove", remove=(1,)) if method == "remove"
            else PrunePlan(n, "merge", merge=((1, 2),)))
    gc.collect()
    gc.disable()
    try:
        small = apply_plan(lm.model, plan)
        refs = [weakref.ref(small), weakref.ref(decoder_layers(small)[1])]
        del small
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
