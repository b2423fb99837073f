"""Issue 9 (library side): memory refusal with numbers, OOM messages, safety of loading, soak."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from layerlens import loading
from layerlens.data import TextSet
from layerlens.errors import LayerLensError, ResourceError
from layerlens.metrics import CaptureConfig, analyze


def test_refuses_before_loading_when_memory_is_short(tiny_llama, monkeypatch):
    monkeypatch.setattr(loading, "available_bytes", lambda device: 1000)
    with pytest.raises(ResourceError, match=r"needs about .* GiB but only .* GiB is free"):
        loading.load_model(str(tiny_llama), device="cpu")


def test_memory_estimate_is_close_to_real_size(tiny_llama):
    lm = loading.load_model(str(tiny_llama), device="cpu")
    real = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    est = loading.estimate_bytes(lm.model.config, torch.float32)
    assert 0.7 < est / real < 1.3


def test_out_of_memory_during_analysis_names_the_fix(tiny_llama, sample_texts, monkeypatch):
    lm = loading.load_model(str(tiny_llama), device="cpu")

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lm.model.base_model, "forward", boom)
    with pytest.raises(ResourceError, match="lower `batch_size` or `seq_len`"):
        analyze(lm.model, lm.tokenizer, TextSet(tuple(sample_texts), "t", "t"), CaptureConfig(samples=2))


def test_cuda_requested_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LayerLensError, match="CUDA is not available"):
        loading.resolve_device("cuda")


def test_remote_code_needs_explicit_opt_in(tiny_llama, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_llama, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg.update(model_type="totally_custom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                      "AutoModelForCausalLM": "modeling_x.XModel"})
    (custom / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "executed"
    (custom / "configuration_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(LayerLensError, match="`trust_remote_code`"):
        loading.load_model(str(custom), device="cpu")
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickled_weights_cannot_execute_code(tiny_llama, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_llama, evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Payload(str(marker))}, f)
    with pytest.raises(LayerLensError, match="could not be read"):
        loading.load_model(str(evil), device="cpu")
    assert not marker.exists()


def _param_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_soak_analyze_prune_eval_cycles_do_not_grow_memory(tiny_model_factory, sample_texts):
    """Repeated analyze -> plan -> apply/merge -> perplexity cycles: RSS flat, original bit-for-bit intact."""
    import gc

    from layerlens.evaluation import perplexity
    from layerlens.plans import make_plan, slm_plan
    from layerlens.surgery import apply_plan

    lm = loading.load_model(str(tiny_model_factory("llama", num_layers=8)), device="cpu")
    digest = _param_digest(lm.model)
    texts = TextSet(tuple(sample_texts), "t", "t")
    rss = []
    for _cycle in range(8):
        rep = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(samples=8, seq_len=48, batch_size=4))
        for plan in (make_plan("bi", rep, ratio=0.25), slm_plan(rep, threshold=0.2, criterion="cosine")):
            small = apply_plan(lm.model, plan)
            ppl = perplexity(small, lm.tokenizer, texts, seq_len=32, max_windows=4)
            assert ppl.perplexity > 1
            del small
        gc.collect()
        rss.append(_rss_bytes())
    assert _param_digest(lm.model) == digest
    growth = rss[-1] - rss[2]  # after warm-up
    assert growth < 20 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 5 cycles: {rss}"


def _untouched(model, num_layers: int) -> bool:
    from layerlens.adapters import decoder_layers

    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return not hooked and len(decoder_layers(model)) == num_layers and model.config.num_hidden_layers == num_layers


def test_shared_model_is_never_seen_hooked_or_half_pruned(tiny_llama, sample_texts):
    """Another user of the same model object (a second dashboard session) must see it intact mid-work."""
    from layerlens.sweep import SweepConfig, sweep

    lm = loading.load_model(str(tiny_llama), device="cpu")
    texts = TextSet(tuple(sample_texts), "t", "t")
    seen: list[bool] = []
    rep = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(samples=4, seq_len=32, batch_size=2),
                  progress=lambda *a: seen.append(_untouched(lm.model, 6)))
    sweep(lm.model, lm.tokenizer, rep, SweepConfig(["bi", "reverse"], [0.0, 0.34], seq_len=32, max_windows=2),
          ppl_texts=texts, progress=lambda *a: seen.append(_untouched(lm.model, 6)))
    assert seen and all(seen)


def test_concurrent_analyses_on_one_model_give_sequential_numbers(tiny_llama, sample_texts):
    import threading

    lm = loading.load_model(str(tiny_llama), device="cpu")
    a = TextSet(tuple(sample_texts[:6]), "a", "a")
    b = TextSet(tuple(sample_texts[6:12]), "b", "b")
    cfg = CaptureConfig(samples=6, seq_len=32, batch_size=1)
    expected = {k: analyze(lm.model, lm.tokenizer, t, cfg).bi for k, t in (("a", a), ("b", b))}
    got: dict[str, tuple] = {}

    def work(key, texts):
        got[key] = analyze(lm.model, lm.tokenizer, texts, cfg).bi

    threads = [threading.Thread(target=work, args=(k, t)) for k, t in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in ("a", "b"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6)
