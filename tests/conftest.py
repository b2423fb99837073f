from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, build_tiny_model, train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: threading overhead dominates, and CI shares 2 cores

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer_dir):
    """``factory(arch, num_layers=6, seed=0) -> Path`` of a saved tiny model (built once per key)."""
    built: dict[tuple, Path] = {}

    def factory(arch: str = "llama", num_layers: int = 6, seed: int = 0) -> Path:
        key = (arch, num_layers, seed)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{arch}-{num_layers}-{seed}")
            built[key] = build_tiny_model(arch, out, tokenizer_dir, seed=seed, num_layers=num_layers)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


_LOADED: dict[str, torch.nn.Module] = {}


@pytest.fixture
def arch_model(tiny_arch):
    """(arch, the tiny model loaded in float32, eval mode); loaded once per architecture per session.
    Shared: a test must leave it as it found it (hooks removed, weights untouched)."""
    from transformers import AutoModelForCausalLM

    arch, path = tiny_arch
    if arch not in _LOADED:
        _LOADED[arch] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return arch, _LOADED[arch]


@pytest.fixture(params=ARCHITECTURES)
def tiny_arch(request, tiny_model_factory) -> tuple[str, Path]:
    return request.param, tiny_model_factory(request.param)


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    from tiny_models import training_text

    paras = [p.strip() for p in training_text().split("\n\n") if len(p.strip()) > 80]
    return paras[:40]


APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def app_env(tiny_llama, tmp_path, monkeypatch) -> Path:
    """The dashboard on the tiny model, with a private runs folder and clean Streamlit caches."""
    import streamlit as st

    monkeypatch.setenv("LAYERLENS_DEFAULT_MODEL", str(tiny_llama))
    monkeypatch.setenv("LAYERLENS_RUNS", str(tmp_path / "runs"))
    st.cache_data.clear()
    st.cache_resource.clear()
    yield tmp_path
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def open_app(app_env):
    """``open_app(page=None, timeout=180) -> AppTest`` of app.py, switched to ``page`` when given."""
    from streamlit.testing.v1 import AppTest

    def factory(page: str | None = None, timeout: int = 180) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=timeout)
        if page:
            at.switch_page(page)
        return at

    return factory


@pytest.fixture
def toy_strategy():
    """A strategy registered for the test only: the k highest even-indexed layers (no built-in does this).
    Registering it is all it takes to appear in the CLI, the dashboard and sweeps."""
    from layerlens.plans import Strategy, register, unregister
    from layerlens.plans.ranking import removal
    from layerlens.plans.registry import RATIO

    def highest_even(req, k, params):
        return tuple(sorted(range(0, req.num_layers, 2))[::-1][:k])

    entry = register(Strategy("every_other_top", "Every other layer, from the top (toy)", "#123456",
                              "the k highest even layers (a test strategy)", removal(highest_even),
                              lambda report, plan: "Toy rule.", params=(RATIO,)))
    yield entry
    unregister(entry.name)


@pytest.fixture(scope="session")
def letter_tokenizer(tmp_path_factory):
    """A 512-token byte-level BPE (same vocab size as the tiny models) where " A".." D" are single tokens."""
    from tiny_models import training_text
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = training_text().splitlines() + [f"Answer: {x}" for x in "ABCD"] * 2000
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")
    return fast


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for one test module (2 CPUs, small object store); skips the module without ray."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
