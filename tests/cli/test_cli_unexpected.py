"""An unexpected error in a command: one sentence on stderr naming the log file, the traceback in that
file under the runs folder, exit 1 (issue 14 item 11). User errors keep exit 2, Ctrl-C keeps 130."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from layerlens import cli
from layerlens.commands import analyze as analyze_command
from layerlens.errors import LayerLensError


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LAYERLENS_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def _raising(exc: BaseException):
    def run(args):
        def deep_inside_the_library():
            raise exc

        deep_inside_the_library()

    return run


def _patch(monkeypatch, exc: BaseException) -> None:
    """Make `layerlens analyze` raise ``exc`` (the parser keeps the module's run function as func)."""
    monkeypatch.setattr(analyze_command, "run", _raising(exc))


def test_unexpected_error_is_one_sentence_and_a_log_file(runs, monkeypatch, capsys):
    _patch(monkeypatch, RuntimeError("the tensor went sideways\nsecond line of detail"))
    rc = cli.main(["analyze", "--model", "default", "--out", "o"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: unexpected RuntimeError (the tensor went sideways)")
    assert "second line" not in err
    logs = list((runs / "logs").glob("layerlens-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "deep_inside_the_library" in text
    assert "RuntimeError: the tensor went sideways" in text and "command: layerlens analyze --model default --out o" in text


def test_the_log_goes_to_the_runs_dir_flag(tmp_path, runs, monkeypatch, capsys):
    _patch(monkeypatch, ValueError(""))
    rc = cli.main(["analyze", "--out", "o", "--runs-dir", str(tmp_path / "elsewhere")])
    err = capsys.readouterr().err
    assert rc == 1 and "unexpected ValueError (no message)" in err
    assert list((tmp_path / "elsewhere" / "logs").glob("*.log")) and not (runs / "logs").exists()


def test_an_unwritable_runs_folder_still_gives_one_sentence(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    monkeypatch.setenv("LAYERLENS_RUNS", str(blocker))  # logs/ cannot be made under a file
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))
    _patch(monkeypatch, KeyError("k"))
    rc = cli.main(["analyze", "--out", "o"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (log,) = (tmp_path / "system-tmp" / "layerlens-logs").glob("*.log")  # the temp folder took it
    assert "unexpected KeyError" in err and f"full log is in {log}" in err


def test_user_errors_and_interrupts_keep_their_handling(runs, monkeypatch, capsys):
    _patch(monkeypatch, LayerLensError("`seq_len` must be at least 2 (got 1)."))
    assert cli.main(["analyze", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip() == "error: --seq-len must be at least 2 (got 1)."
    _patch(monkeypatch, KeyboardInterrupt())
    assert cli.main(["analyze", "--out", "o"]) == 130
    assert capsys.readouterr().err.startswith("interrupted:")
    assert not (runs / "logs").exists()
