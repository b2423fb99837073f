"""The dashboard's input boundary (layerlens.dashboard.paths): path confinement, uploads, model specs."""

from __future__ import annotations

import os

import pytest

from layerlens.dashboard.paths import check_model_spec, check_upload, confine_path
from layerlens.errors import LayerLensError


def test_confine_path_allows_inside_and_refuses_escapes(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("x")
    (tmp_path / "secret.txt").write_text("s")
    monkeypatch.setenv("LAYERLENS_DATA_ROOT", str(root))
    assert confine_path("sub/a.txt") == (root / "sub" / "a.txt").resolve()
    assert confine_path(str(root / "sub"), kind="dir") == (root / "sub").resolve()
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd", "sub/../../secret.txt"):
        with pytest.raises(LayerLensError, match="outside the allowed data folder"):
            confine_path(bad)
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    with pytest.raises(LayerLensError, match="outside"):
        confine_path("link.txt")
    with pytest.raises(LayerLensError, match="does not exist"):
        confine_path("nope.txt")
    with pytest.raises(LayerLensError, match="is a folder"):
        confine_path("sub")
    with pytest.raises(LayerLensError):
        confine_path("")


def test_check_upload_limits():
    assert check_upload("data.JSONL", 100) == ".jsonl"
    with pytest.raises(LayerLensError, match="upload limit"):
        check_upload("big.txt", 51 * 2**20)
    with pytest.raises(LayerLensError, match="not a supported"):
        check_upload("model.bin", 10)
    with pytest.raises(LayerLensError, match="empty"):
        check_upload("a.txt", 0)


def test_model_spec_is_a_default_a_hub_id_or_a_folder_under_the_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "models" / "m").mkdir(parents=True)
    monkeypatch.setenv("LAYERLENS_DATA_ROOT", str(root))
    monkeypatch.setenv("LAYERLENS_DEFAULT_MODEL", "/server/model")
    assert check_model_spec(" default ") == "default"
    assert check_model_spec("/server/model") == "/server/model"  # the server's own default
    assert check_model_spec("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert check_model_spec(str(root / "models" / "m")) == str((root / "models" / "m").resolve())
    with pytest.raises(LayerLensError, match="outside the allowed data folder"):
        check_model_spec("/etc")


def test_a_missing_folder_is_said_to_be_missing_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`models/does-not-exist` has a hub id's shape; offline it was reported as "Hugging Face Hub cannot be
    reached". A spec that looks like a path (its parent folder exists under the root, or it starts like a
    path) or that the user typed as "Local folder" is a folder, and a missing one is said to be missing."""
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    monkeypatch.setenv("LAYERLENS_DATA_ROOT", str(root))
    monkeypatch.chdir(tmp_path)  # the cwd has no models/ folder: the data root decides
    for spec in ("models/does-not-exist", "./nope", "models/../nope"):
        with pytest.raises(LayerLensError, match=r"^The folder '.+' does not exist") as err:
            check_model_spec(spec)
        assert "Hub" not in str(err.value)
    with pytest.raises(LayerLensError, match="The folder 'nobody/x' does not exist"):
        check_model_spec("nobody/x", local=True)
    assert check_model_spec("nobody/x") == "nobody/x"  # no such parent folder: a hub id
