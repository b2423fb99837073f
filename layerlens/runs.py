"""Persistence: atomic writes, provenance, and the runs folder where every result is kept."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapters import layer_count


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via a temp file in the same folder + rename: a crash never leaves a half-written file."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        try:
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:  # put the old folder back: a failed save never loses what was there
        os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def git_commit() -> str | None:
    """The commit of the LayerLens checkout, when it is one (not of another repository that happens to
    hold an installed copy, e.g. a user's project with a venv inside)."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return None
    return lines[1]


def provenance(**fields: Any) -> dict[str, Any]:
    """The ``meta`` block every export carries: caller's fields + version, commit, time."""
    meta = dict(fields)
    meta.setdefault("layerlens_version", __version__)
    meta.setdefault("git_commit", git_commit())
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return meta


def stable_key(obj: Any) -> str:
    """A short hash of a JSON-able object: the identity of a computed point (model, data, plan, settings)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_runs_dir() -> Path:
    return Path(os.environ.get("LAYERLENS_RUNS", "runs"))


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """A cheap identity of a model: config, dtype and a strided sample of every parameter.

    Hashes up to 4096 values per tensor (shape included), so two models with the same config but
    different weights (another checkpoint, a fine-tune) get different keys, in milliseconds.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.device.type == "meta":  # offloaded weights: shape only
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step][:4096].to("cpu", torch.float64).numpy().tobytes())
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    param = next(model.parameters())
    return {"config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "weights": h.hexdigest()[:16], "dtype": str(param.dtype).removeprefix("torch."),
            "device": param.device.type, "num_layers": layer_count(model)}


def write_error_log(text: str, runs_dir: str | Path | None = None) -> Path | None:
    """Keep the full story of an unexpected error (a traceback) in ``<runs>/logs/layerlens-<UTC time>.log``,
    so the user sees one sentence naming this file; the temp folder when the runs folder is not writable,
    None when nothing could be written."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    name = f"layerlens-{stamp}-{os.getpid()}.log"
    base = Path(runs_dir) if runs_dir else default_runs_dir()
    for folder in (base / "logs", Path(tempfile.gettempdir()) / "layerlens-logs"):
        try:
            return atomic_write_text(folder / name, text).resolve()
        except OSError:
            continue
    return None
