"""layerlens.runs: atomic writes, provenance, stable keys and the runs folder."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import layerlens
from layerlens import runs
from layerlens.runs import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    default_runs_dir,
    git_commit,
    provenance,
    stable_key,
)

REPO = Path(__file__).resolve().parents[2]


def _leftovers(folder: Path) -> list[str]:
    """Hidden temp files/folders the atomic helpers may leave beside their target."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------ atomic files


def test_atomic_write_creates_parents_and_writes_exact_content(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(target, "héllo\nworld") == target
    assert target.read_bytes() == "héllo\nworld".encode()
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(target.parent) == []


def test_atomic_write_json_format(tmp_path):
    target = atomic_write_json(tmp_path / "x.json", {"b": [1, 2], "p": Path("some/where"), "a": None})
    # indent=1, key order kept, non-JSON values through str()
    assert target.read_text() == '{\n "b": [\n  1,\n  2\n ],\n "p": "some/where",\n "a": null\n}'


def test_temp_file_lives_beside_the_target(tmp_path, monkeypatch):
    """The rename is atomic only within one filesystem: the temp file must be in the target's folder."""
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", spy)
    atomic_write_text(tmp_path / "report.json", "{}")
    (src, dst), = seen
    assert dst == tmp_path / "report.json"
    assert src.parent == tmp_path and src.name.startswith(".report.json.") and src.name.endswith(".tmp")


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_at, exc):
    target = tmp_path / "report.json"
    target.write_text("old content")

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(runs.os, fail_at, boom)
    with pytest.raises(type(exc)):
        atomic_write_text(target, "new content that never lands")
    assert target.read_text() == "old content"
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_failure_on_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError("io error")

    monkeypatch.setattr(runs.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="io error"):
        atomic_write_json(tmp_path / "new.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ atomic folders


def test_atomic_dir_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "stale.bin").write_text("from the last run")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and tmp.is_dir()
        assert (out / "stale.bin").exists()  # the old folder is untouched while writing
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # replaced, not merged
    assert _leftovers(tmp_path) == []


def test_atomic_dir_creates_a_new_folder_and_parents(tmp_path):
    out = tmp_path / "deep" / "new"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("exc", [RuntimeError("save failed"), KeyboardInterrupt()])
def test_atomic_dir_error_keeps_the_old_folder_and_removes_the_temp(tmp_path, exc):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "model.safetensors").write_text("old weights")
    with pytest.raises(type(exc)), atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise exc
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "old weights"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_error_on_a_new_folder_creates_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ provenance


def test_git_commit_is_the_checkouts_head():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert git_commit() == head.stdout.strip()
    assert len(git_commit()) == 40


def test_git_commit_is_none_without_git_or_outside_a_checkout(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runs.subprocess, "run", missing)
    assert git_commit() is None

    def no_repo(*args, **kwargs):
        return subprocess.CompletedProcess(args, 128, stdout="", stderr="fatal: not a git repository")

    monkeypatch.setattr(runs.subprocess, "run", no_repo)
    assert git_commit() is None

    def slow(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", 5)

    monkeypatch.setattr(runs.subprocess, "run", slow)
    assert git_commit() is None


def test_provenance_adds_version_commit_and_time(monkeypatch):
    monkeypatch.setattr(runs, "git_commit", lambda: "abc123")
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    fields = {"model": "org/name", "revision": None, "samples": 8}
    meta = provenance(**fields)
    after = dt.datetime.now(dt.timezone.utc)
    assert set(meta) == {"model", "revision", "samples", "layerlens_version", "git_commit", "created"}
    assert meta["model"] == "org/name" and meta["revision"] is None and meta["samples"] == 8
    assert meta["layerlens_version"] == layerlens.__version__ == "0.1.0"
    assert meta["git_commit"] == "abc123"
    created = dt.datetime.fromisoformat(meta["created"])
    assert created.utcoffset() == dt.timedelta(0) and created.microsecond == 0
    assert before <= created <= after
    assert fields == {"model": "org/name", "revision": None, "samples": 8}  # caller's dict untouched


def test_provenance_keeps_fields_the_caller_gives(monkeypatch):
    monkeypatch.setattr(runs, "git_commit", lambda: "from-git")
    meta = provenance(created="2020-01-01T00:00:00+00:00", git_commit=None, layerlens_version="9")
    assert meta == {"created": "2020-01-01T00:00:00+00:00", "git_commit": None, "layerlens_version": "9"}


def test_analysis_meta_records_the_run(tiny_llama, sample_texts):
    """An analysis carries every provenance field: model, revision, dtype, device, data, samples, seed,
    version and commit (the model/revision come from the caller, as the CLI passes them)."""
    from layerlens import CaptureConfig, TextSet, analyze, load_model

    lm = load_model(str(tiny_llama), dtype="float32", device="cpu")
    texts = TextSet(tuple(sample_texts[:5]), "unit-test-texts", "5 test texts")
    report = analyze(lm.model, lm.tokenizer, texts,
                     CaptureConfig(samples=3, seq_len=16, batch_size=2, seed=7),
                     meta={"model": lm.info.model, "revision": lm.info.revision})
    meta = report.meta
    assert meta["model"] == str(tiny_llama) and meta["revision"] is None
    assert meta["dtype"] == "float32" and meta["device"] == "cpu"
    assert meta["data"] == "unit-test-texts" and meta["data_description"] == "5 test texts"
    assert meta["samples"] == 3 and meta["seq_len"] == 16 and meta["batch_size"] == 2 and meta["seed"] == 7
    assert meta["layerlens_version"] == layerlens.__version__
    assert meta["git_commit"] == git_commit()
    dt.datetime.fromisoformat(meta["created"])
    json.loads(report.to_json())  # the meta block is JSON-able as written


# ------------------------------------------------------------------------------------------ stable_key

KEY_LITERAL = "3ffe410c7f914111"  # stable_key(_KEY_OBJ), computed once; must never change (cached runs)
_KEY_OBJ = {"model": "org/name", "revision": None, "plan": {"remove": [3, 5], "strategy": "bi"}}


def test_stable_key_is_sha256_of_sorted_json():
    # independent reference: the sha256 of the canonical JSON text, written out by hand
    assert stable_key({"b": [1, 2], "a": 1}) == "e6f20bdc3757e5e7"
    assert stable_key(_KEY_OBJ) == KEY_LITERAL
    assert stable_key([1, 2.5, "x", None, True]) == "97c3ee625cedad2a"


def test_stable_key_ignores_dict_order_at_every_depth():
    reordered = {"plan": {"strategy": "bi", "remove": [3, 5]}, "revision": None, "model": "org/name"}
    assert stable_key(reordered) == stable_key(_KEY_OBJ) == KEY_LITERAL


@pytest.mark.parametrize("other", [
    {"model": "org/name", "revision": "main", "plan": {"remove": [3, 5], "strategy": "bi"}},
    {"model": "org/name", "revision": None, "plan": {"remove": [5, 3], "strategy": "bi"}},  # order counts
    {"model": "org/name", "revision": None, "plan": {"remove": [3, 5], "strategy": "BI"}},
    {"model": "org/name", "revision": None, "plan": {"remove": [3.0, 5], "strategy": "bi"}},
    {"model": "org/name", "revision": None, "plan": {"remove": ["3", 5], "strategy": "bi"}},
    {"model": "org/name", "plan": {"remove": [3, 5], "strategy": "bi"}},
])
def test_stable_key_differs_for_different_inputs(other):
    key = stable_key(other)
    assert key != KEY_LITERAL
    assert len(key) == 16 and all(c in "0123456789abcdef" for c in key)


def test_stable_key_of_non_json_values_uses_str():
    assert stable_key({"p": Path("a/b")}) == stable_key({"p": "a/b"})


def test_stable_key_is_the_same_in_another_process():
    code = ("import json,sys; from layerlens.runs import stable_key; "
            "print(stable_key(json.loads(sys.argv[1])))")
    shuffled = {"plan": {"strategy": "bi", "remove": [3, 5]}, "model": "org/name", "revision": None}
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(shuffled)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == KEY_LITERAL


# ------------------------------------------------------------------------------------------ runs folder


def test_runs_dir_defaults_to_runs_in_the_working_folder(monkeypatch):
    monkeypatch.delenv("LAYERLENS_RUNS", raising=False)
    assert default_runs_dir() == Path("runs")
    assert not default_runs_dir().is_absolute()


def test_runs_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERLENS_RUNS", str(tmp_path / "elsewhere"))
    assert default_runs_dir() == tmp_path / "elsewhere"
    assert not (tmp_path / "elsewhere").exists()  # asking for the folder creates nothing


def test_git_commit_ignores_a_repository_that_merely_holds_an_installed_copy(monkeypatch, tmp_path):
    def other_repo(args, **kw):
        return subprocess.CompletedProcess(args, 0, stdout=f"{tmp_path}\n{'a' * 40}\n", stderr="")

    monkeypatch.setattr(runs.subprocess, "run", other_repo)
    assert git_commit() is None


def test_atomic_dir_keeps_the_old_folder_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(runs.os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"), runs.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
