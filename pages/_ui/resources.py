"""What sessions share or keep: the one cached copy of each model (and its lock), this session's upload,
the quick before/after numbers (cached per model + plan + prompt, so a share link reuses them)."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import streamlit as st

from layerlens import compare, surgery
from layerlens.adapters import decoder_layers
from layerlens.dashboard.paths import check_model_spec, check_upload, confine_path
from layerlens.dashboard.settings import AnalysisSettings
from layerlens.data import load_texts
from layerlens.errors import LayerLensError
from layerlens.loading import load_model
from layerlens.plans import PrunePlan

from .keys import SS_UPLOAD
from .session import current_settings

# ----------------------------------------------------------------------------------------------------------
# The shared model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SharedModel:
    loaded: Any  # layerlens.loading.LoadedModel
    lock: threading.RLock
    per_layer_params: tuple[int, ...]

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def info(self) -> Any:
        return self.loaded.info


@st.cache_resource(max_entries=2, show_spinner=False)
def _shared_model(model: str, revision: str | None, dtype: str, device: str,
                  trust_remote_code: bool) -> SharedModel:
    """The one cached copy of a model for every session (key: id, revision, dtype, device)."""
    loaded = load_model(model, revision=revision, dtype=dtype, device=device,
                        trust_remote_code=trust_remote_code)
    per_layer = tuple(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(loaded.model))
    return SharedModel(loaded=loaded, lock=threading.RLock(), per_layer_params=per_layer)


def get_model(settings: AnalysisSettings) -> SharedModel:
    spec = check_model_spec(settings.model)
    return _shared_model(spec, settings.revision or None, settings.dtype, settings.device,
                         bool(settings.trust_remote_code))


def shared_for_report() -> SharedModel | None:
    """The shared model of the report on screen (None before the first analysis)."""
    settings = current_settings()
    if settings is None:
        return None
    return get_model(settings)


@contextlib.contextmanager
def model_lock(shared: SharedModel, note: Any = None, quiet: bool = False) -> Iterator[None]:
    """Hold the model's lock; tell the user when another session is using the model meanwhile."""
    if not shared.lock.acquire(blocking=False):
        if not quiet:
            (note or st).info("Another session is using this model; waiting for it to finish…", icon=":material/hourglass_top:")
        shared.lock.acquire()
    try:
        yield
    finally:
        shared.lock.release()


def apply_only(shared: SharedModel, plan: Any) -> Any:
    """Surgery on a NEW model for this session (shares unchanged weights; the cached original is untouched)."""
    with model_lock(shared):
        return surgery.apply_plan(shared.model, plan)  # looked up at call time: benchmarks count the calls


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def save_upload(uploaded: Any) -> dict[str, str]:
    """Keep an uploaded file for THIS session only (a private temp file), after the size/type check."""
    suffix = check_upload(uploaded.name, uploaded.size)
    data = uploaded.getvalue()
    sha = hashlib.sha256(data).hexdigest()[:16]
    prev = st.session_state.get(SS_UPLOAD)
    if prev and prev["sha"] == sha and Path(prev["path"]).exists():
        return prev
    folder = Path(tempfile.mkdtemp(prefix="layerlens-upload-"))
    path = folder / f"upload{suffix}"
    path.write_bytes(data)
    info = {"name": uploaded.name, "sha": sha, "path": str(path)}
    st.session_state[SS_UPLOAD] = info
    return info


def resolve_texts(settings: AnalysisSettings) -> tuple[Any, str]:
    """(TextSet, fingerprint) for the settings' data; local paths confined, uploads from this session."""
    data = settings.data
    if data.startswith("upload:"):
        up = st.session_state.get(SS_UPLOAD)
        if not up or up["sha"] != data.removeprefix("upload:") or not Path(up["path"]).exists():
            raise LayerLensError("The uploaded file is no longer available in this session; upload it again.")
        texts = load_texts(up["path"], role="calibration", field=settings.text_field)
        return replace_source(texts, f"upload:{up['name']}"), up["sha"]
    if data.startswith("path:"):
        path = confine_path(data.removeprefix("path:"), kind="file")
        st_ = path.stat()
        return load_texts(str(path), role="calibration", field=settings.text_field), \
            f"{path}:{st_.st_size}:{st_.st_mtime_ns}"
    if data.startswith("hub:"):
        return load_texts(data, role="calibration", field=settings.text_field), data
    if data in ("default", "prose"):
        return load_texts(data, role="calibration", field=settings.text_field), data
    raise LayerLensError(f"Unknown data source '{data}'; pick one in the Data section.")


def replace_source(texts: Any, source: str) -> Any:
    return replace(texts, source=source, description=texts.description.replace(texts.source, source))


# ----------------------------------------------------------------------------------------------------------
# Quick before/after (layerlens.compare), cached
# ----------------------------------------------------------------------------------------------------------


@st.cache_data(max_entries=16, show_spinner=False)
def _cached_ppl(_shared: SharedModel, model_key: tuple) -> float:
    """Quick perplexity of the ORIGINAL model (the same for every session and plan)."""
    with model_lock(_shared, quiet=True):
        return compare.quick_perplexity(_shared.model, _shared.tokenizer)


@st.cache_data(max_entries=64, show_spinner=False)
def cached_quick_compare(_shared: SharedModel, model_key: tuple, plan_json: str, prompt: str) -> dict[str, Any]:
    """:func:`layerlens.compare.quick_compare` of a plan as a dict (``{"original": ..., "pruned": ...}``).
    Keyed by model key + plan + prompt, so a share link reuses the numbers; nothing per user inside."""
    plan = PrunePlan.from_json(plan_json)
    ppl_before = _cached_ppl(_shared, model_key)
    with model_lock(_shared, quiet=True):
        result = compare.quick_compare(_shared.model, _shared.tokenizer, plan, prompt,
                                       perplexity_before=ppl_before)
    return result.to_dict()
