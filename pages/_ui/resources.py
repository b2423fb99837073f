"""What sessions share or keep: the one cached copy of each model (and its lock), this session's upload,
the quick before/after numbers (kept per model + plan + prompt, so a share link reuses them; the
original's side once per model + prompt)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import streamlit as st

from layerlens import compare, metrics, surgery
from layerlens.adapters import decoder_layers, layer_sublayer_params, sublayer_params
from layerlens.dashboard.paths import check_model_spec, check_upload, confine_path
from layerlens.dashboard.settings import AnalysisSettings
from layerlens.data import load_texts
from layerlens.errors import LayerLensError
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
    busy: str = ""  # what this process's background work is doing with the model, while it holds the lock

    @property
    def layerwise(self) -> bool:
        """The weights exceed the memory here: the model runs layer by layer (layerlens.layerwise)."""
        return bool(getattr(self.loaded, "layerwise", False))

    @property
    def model(self) -> Any:
        if self.layerwise:
            raise LayerLensError("This model is larger than the memory here, so it runs layer by layer, and this "
                                 "step needs it whole in memory; use a smaller model or `dtype=bfloat16`.")
        return self.loaded.model

    def analyze(self, texts: Any, config: Any, **kwargs: Any) -> Any:
        """The redundancy report, in memory or layer by layer (the same numbers); ``kwargs`` as
        :func:`layerlens.metrics.analyze` (progress, should_stop, meta). The caller holds :attr:`lock`."""
        if self.layerwise:
            return self.loaded.analyze(texts, config, **kwargs)
        return metrics.analyze(self.loaded.model, self.loaded.tokenizer, texts, config, **kwargs)

    def sublayer_params(self) -> tuple[tuple[int, int], ...]:
        """Per decoder layer: (attention, MLP) parameters; layer by layer, counted on the empty skeleton."""
        if not self.layerwise:
            return sublayer_params(self.model)
        return layer_sublayer_params(self.loaded.adapter, self.loaded.templates)  # meta tensors: sizes only

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
    from layerlens.layerwise import open_model, per_layer_params  # a model over the memory: layer by layer

    loaded = open_model(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if getattr(loaded, "layerwise", False):
        per_layer = per_layer_params(loaded)
    else:
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
            who = f"Waiting for the {shared.busy} to finish…" if shared.busy else \
                "Another session is using this model; waiting for it to finish…"
            (note or st).info(who, icon=":material/hourglass_top:")
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


class QuickStore:
    """Quick numbers for every session, kept in memory (a few entries of each kind, oldest dropped).

    Not ``st.cache_data``: a cached function replays the elements it drew, and the progress bar that Apply
    updates while measuring lives outside the function (a replay would fail). Entries: every comparison
    per model + plan + prompt (a share link reuses it); the original's side (perplexity, speed, text) per
    model + prompt + speed settings, measured in the background when the Prune page opens
    (:func:`prewarm_original`), else at the first Apply (interleaved with that plan's runs), not at every
    Apply; the original's :class:`~layerlens.compare.Baseline` per model (perplexity and layer inputs on the
    quick windows)."""

    KIND_LIMITS = {"baseline": 2}  # layer inputs can be large: as many as models are cached

    def __init__(self, size: int = 64) -> None:
        self._lock = threading.Lock()
        self._size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._running: dict[tuple, threading.Thread] = {}

    def start_once(self, key: tuple, work: Any) -> threading.Thread | None:
        """Run ``work()`` in a background thread unless ``key`` is stored or already being computed."""
        with self._lock:
            if key in self._items or (key in self._running and self._running[key].is_alive()):
                return None
            thread = self._running[key] = threading.Thread(target=work, daemon=True, name=f"layerlens-{key[0]}")
            thread.start()
            return thread

    def wait(self, key: tuple) -> bool:
        """Wait for the background work on ``key``; True if there was some to wait for."""
        with self._lock:
            thread = self._running.get(key)
        if thread is None or not thread.is_alive():
            return False
        thread.join()
        return True

    def get(self, key: tuple, *, frozen: bool = False) -> Any:
        """The entry or None; a copy (callers may change it, as with st.cache_data) unless ``frozen``."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key] if frozen else copy.deepcopy(self._items[key])

    def put(self, key: tuple, value: Any, *, frozen: bool = False) -> None:
        with self._lock:
            self._items[key] = value if frozen else copy.deepcopy(value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
            same_kind = [k for k in self._items if k[0] == key[0]]
            for old in same_kind[:max(0, len(same_kind) - self.KIND_LIMITS.get(key[0], self._size))]:
                del self._items[old]


@st.cache_resource(show_spinner=False)
def quick_store() -> QuickStore:
    """The one :class:`QuickStore` (cleared with ``st.cache_resource.clear()``)."""
    return QuickStore()


def _original_key(model_key: tuple, prompt: str) -> tuple:
    return ("original", model_key, prompt, compare.QUICK_SPEED.key())


def _baseline(store: QuickStore, shared: SharedModel, model_key: tuple,
              progress: compare.ProgressFn | None = None) -> compare.Baseline:
    """The original's :class:`~layerlens.compare.Baseline`, measured once per model (hold the model lock)."""
    baseline = store.get(("baseline", model_key), frozen=True)  # frozen, and its tensors are never changed
    if baseline is None:
        if progress is not None:
            progress(0, 1, f"Original model: perplexity on {compare.QUICK_WINDOWS} windows (once per model)")
        with compare.timing_threads(next(shared.model.parameters()).device):
            baseline = compare.quick_baseline(shared.model, shared.tokenizer)
        store.put(("baseline", model_key), baseline, frozen=True)
    return baseline


def prewarm_original(shared: SharedModel, model_key: tuple, prompt: str) -> None:
    """Measure the original's side of Apply (perplexity, timed generation of ``prompt``) in a background
    thread while the user is still choosing a plan, once per model + prompt, so the first Apply measures
    only the pruned model. A failure leaves nothing stored: Apply then measures the original itself."""
    store = quick_store()
    key = _original_key(model_key, prompt)

    def work() -> None:
        try:
            with shared.lock:
                shared.busy = "background measurement of the original model (for Apply)"
                try:
                    baseline = _baseline(store, shared, model_key)
                    numbers = compare.measure_original(shared.model, shared.tokenizer, prompt, baseline=baseline)
                    store.put(key, numbers)
                finally:
                    shared.busy = ""
        except Exception:  # noqa: BLE001 -- Apply measures the original itself and reports any error
            logging.getLogger(__name__).warning("measuring the original model in the background failed",
                                                exc_info=True)

    if prompt.strip() and not shared.layerwise:  # layer by layer: Apply measures both sides in one pass
        store.start_once(key, work)


def cached_quick_compare(shared: SharedModel, model_key: tuple, plan_json: str, prompt: str,
                         progress: compare.ProgressFn | None = None) -> dict[str, Any]:
    """:func:`layerlens.compare.quick_compare` of a plan as a dict (``{"original": ..., "pruned": ...}``),
    computed once per model + plan + prompt; the original's side is measured once per model + prompt.
    ``progress(done, total, label)`` follows the steps when something is measured."""
    store, speed = quick_store(), compare.QUICK_SPEED
    done_key = ("compare", model_key, plan_json, prompt, speed.key())
    result = store.get(done_key)
    if result is not None:
        return result
    plan = PrunePlan.from_json(plan_json)
    original_key = _original_key(model_key, prompt)
    wait_original(model_key, prompt, progress)
    original = store.get(original_key)
    with model_lock(shared):  # says so when another session holds the model
        baseline = _baseline(store, shared, model_key, progress)
        comparison = compare.quick_compare(shared.model, shared.tokenizer, plan, prompt, baseline=baseline,
                                           original=original, speed=speed, progress=progress)
    if original is None:
        store.put(original_key, comparison.original)
    result = comparison.to_dict()
    store.put(done_key, result)
    return result


def cached_layerwise_quick(shared: SharedModel, model_key: tuple, plan_json: str,
                           progress: compare.ProgressFn | None = None) -> dict[str, Any]:
    """Apply's numbers for a model that runs layer by layer (:func:`layerlens.compare.layerwise_quick`: the
    quick windows' perplexity of the original and the pruned model in one pass, KL, top-1; no generation),
    computed once per model + plan."""
    store = quick_store()
    done_key = ("compare", model_key, plan_json, "layerwise")
    result = store.get(done_key)
    if result is None:
        with model_lock(shared):
            result = compare.layerwise_quick(shared.loaded, PrunePlan.from_json(plan_json), progress=progress)
        store.put(done_key, result)
    return result


def wait_original(model_key: tuple, prompt: str, progress: compare.ProgressFn | None = None) -> None:
    """Let :func:`prewarm_original`'s measurement finish (before Apply takes the model)."""
    store, key = quick_store(), _original_key(model_key, prompt)
    if progress is not None and store.get(key, frozen=True) is None:
        progress(0, 1, "Original model: finishing its measurement, started when this page opened")
    store.wait(key)


@contextlib.contextmanager
def quick_progress(label: str) -> Iterator[compare.ProgressFn]:
    """A progress bar that follows :func:`cached_quick_compare` step by step; removed when done."""
    bar = st.progress(0.0, text=label)

    def progress(done: int, total: int, step: str) -> None:
        bar.progress(min(1.0, done / total) if total else 0.0, text=f"{label}: {step}…")

    try:
        yield progress
    finally:
        bar.empty()
