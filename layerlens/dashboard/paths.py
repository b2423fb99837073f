"""Where the dashboard may read user input from: the server's default model, the data root (every typed
local path must resolve inside it, links included), and the size/type limits of uploads."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LayerLensError
from ..loading import is_hub_id, looks_like_path, missing_folder

ENV_MODEL = "LAYERLENS_DEFAULT_MODEL"
ENV_DATA_ROOT = "LAYERLENS_DATA_ROOT"
MAX_UPLOAD_MB = 50  # keep in step with .streamlit/config.toml [server] maxUploadSize
UPLOAD_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet")


def default_model_spec() -> str:
    """The model the dashboard opens on: ``$LAYERLENS_DEFAULT_MODEL`` (tests point it at a tiny model)."""
    return os.environ.get(ENV_MODEL, "").strip() or "default"


def data_root() -> Path:
    """The only folder under which the dashboard reads user-typed local paths (default: the cwd)."""
    return Path(os.environ.get(ENV_DATA_ROOT, "").strip() or os.getcwd()).expanduser().resolve()


def confine_path(text: str, *, kind: str = "file", root: Path | None = None) -> Path:
    """Resolve a user-typed path and refuse it unless it exists inside :func:`data_root` (no escapes).

    ``kind``: ``"file"`` or ``"dir"``. Symlinks are resolved before the check, so a link pointing out of
    the root is refused too.
    """
    root = (root or data_root()).resolve()
    raw = (text or "").strip()
    if not raw:
        raise LayerLensError(f"Enter a {'folder' if kind == 'dir' else 'file'} path under {root}.")
    if "\x00" in raw:
        raise LayerLensError("The path contains a NUL character; type a plain path.")
    p = Path(raw).expanduser()
    if not p.is_absolute():
        p = root / p
    try:
        resolved = p.resolve(strict=False)
    except (OSError, RuntimeError) as exc:
        raise LayerLensError(f"The path '{raw}' cannot be resolved ({exc}); type a plain path.") from exc
    if resolved != root and root not in resolved.parents:
        raise LayerLensError(f"'{raw}' is outside the allowed data folder {root}; copy it there, or start the "
                             f"dashboard with {ENV_DATA_ROOT} set to a folder that contains it.")
    if not resolved.exists():
        if kind == "dir":
            raise missing_folder(raw, f" under {root}")
        raise LayerLensError(f"The file '{raw}' does not exist under {root}; check the path.")
    if kind == "dir" and not resolved.is_dir():
        raise LayerLensError(f"'{raw}' is a file; give the model folder that holds config.json.")
    if kind == "file" and not resolved.is_file():
        raise LayerLensError(f"'{raw}' is a folder; give a .txt, .jsonl, .json, .csv or .parquet file.")
    return resolved


def check_model_spec(spec: str, *, local: bool = False) -> str:
    """Only the bundled default, the server's configured default, hub ids and folders under the data root.

    ``local``: the user chose "Local folder", so the spec is a folder even if it has a hub id's shape; a
    spec that looks like a path (:func:`layerlens.loading.looks_like_path`, relative to the data root) is
    one too. A folder that is not there is said to be missing, never looked up on the hub.
    """
    spec = (spec or "").strip()
    if spec in ("default", default_model_spec()):
        return spec
    root = data_root()
    if not local and is_hub_id(spec) and not looks_like_path(spec, root) \
            and not Path(spec).exists() and not (root / spec).exists():
        return spec
    return str(confine_path(spec, kind="dir", root=root))


def check_upload(name: str, size: int, limit_mb: int = MAX_UPLOAD_MB) -> str:
    """Refuse uploads that are too large or of an unknown type; returns the safe file suffix."""
    suffix = Path(name or "").suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise LayerLensError(f"'{name}' is not a supported data file; upload {', '.join(UPLOAD_SUFFIXES)}.")
    if size > limit_mb * 1024 * 1024:
        raise LayerLensError(f"'{name}' is {size / 2**20:.1f} MB, above the {limit_mb} MB upload limit; "
                             "upload a smaller sample of the data.")
    if size == 0:
        raise LayerLensError(f"'{name}' is empty; upload a file with at least one text.")
    return suffix


__all__ = [
    "ENV_DATA_ROOT", "ENV_MODEL", "MAX_UPLOAD_MB", "UPLOAD_SUFFIXES", "check_model_spec", "check_upload",
    "confine_path", "data_root", "default_model_spec",
]
