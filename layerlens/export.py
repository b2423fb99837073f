"""What a user takes away: the pruned model folder, figures as HTML/PNG, a folder as a zip.

One save path for the CLI (``layerlens prune``) and the dashboard's Export page: :func:`save_pruned` writes
a folder plain ``transformers`` loads plus :data:`PLAN_FILE`, the record of how it was made (plan, layer
summary, the report it came from, provenance), atomically.

Dropped sublayers (``plan.drop_attn``/``drop_mlp``): plain ``transformers`` has no way to say "this layer has
no attention", so the folder holds the full layer with the sublayer's output projection (weight and bias)
set to zeros (:func:`layerlens.surgery.exportable`): it adds exactly zero, and the logits equal the
in-memory pruned model's. The attention and MLP still run (and fill a KV cache) in a plain reload;
:func:`layerlens.loading.load_model` reads the plan recorded in :data:`PLAN_FILE` and skips them again
(:func:`skip_recorded_sublayers`), so LayerLens gets the speed and KV-cache saving back.

PNG rendering drives a Chrome through kaleido; that process management lives here, so
:mod:`layerlens.plots` stays a module of pure figure builders.
"""

from __future__ import annotations

import atexit
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import threading
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LayerLensError
from .plans import PLAN_FILE, plan_summary
from .runs import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, provenance

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# The pruned model
# ----------------------------------------------------------------------------------------------------------


def plan_record(plan: Any, *, report: Any = None, meta: Mapping[str, Any] | None = None,
                heal: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The :data:`PLAN_FILE` document: the plan, its per-layer summary, the report it was chosen from (or
    None), ``meta`` with provenance (version, commit, time) added where the caller did not set them, and
    for a healed model its ``heal`` record (:meth:`layerlens.heal.HealResult.record`)."""
    record = {
        "plan": plan.to_dict(),
        "summary": plan_summary(plan),
        "report": report.to_dict() if report is not None else None,
        "meta": provenance(**dict(meta or {})),
    }
    if heal is not None:
        record["heal"] = dict(heal)
    return record


def save_pruned(model: Any, tokenizer: Any, plan: Any, folder: str | Path, *, report: Any = None,
                meta: Mapping[str, Any] | None = None, heal: Mapping[str, Any] | None = None,
                dtype: str | None = None) -> dict[str, Any]:
    """Save a pruned model in plain ``transformers`` format (+ tokenizer) and :data:`PLAN_FILE`, atomically.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(folder)``; a failure leaves nothing
    half-written. ``dtype`` (``"bfloat16"``, ...; None: as loaded) is the dtype the floating-point weights
    are written in -- a bf16 checkpoint analysed in float32 on a CPU goes back to bf16 rather than doubling in
    size; ``model`` itself is never cast. Returns the record written to :data:`PLAN_FILE` (see
    :func:`plan_record`), so a caller can keep the same record elsewhere (the CLI's runs folder).
    """
    record = plan_record(plan, report=report, meta=meta, heal=heal)
    if getattr(plan, "has_sublayers", False):
        from .surgery import exportable  # torch-heavy: only when there is something to convert

        model = exportable(model)  # dropped sublayers -> zeroed output projections (module docstring)
    state, written = _cast_state(model, dtype)
    record["meta"]["export_dtype"] = written
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
        if state is not None:  # the config says what the files hold
            config_file = tmp / "config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["dtype"] = written
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PLAN_FILE, record)
    return record


def _cast_state(model: Any, dtype: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """``(state dict with floating tensors in dtype, dtype name)``, or ``(None, the model's dtype)`` when the
    weights already are in it. New tensors: the model (maybe shared with other users) keeps its own."""
    import torch  # (not through .loading, which imports this module)

    params = getattr(model, "parameters", None)
    current = next((p.dtype for p in params() if p.is_floating_point()), None) if params is not None else None
    target = getattr(torch, dtype, None) if dtype is not None else None
    if dtype is not None and not isinstance(target, torch.dtype):
        raise LayerLensError(f"Unknown dtype '{dtype}' to save in; use float32, bfloat16 or float16.")
    if target is None or target == current:
        return None, str(current).removeprefix("torch.") if current is not None else dtype
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return state, dtype


def skip_recorded_sublayers(model: Any, folder: str | Path) -> Any:
    """``model`` (loaded from ``folder``) with the sublayers its :data:`PLAN_FILE` says were dropped really
    skipped (:func:`layerlens.surgery.apply_plan`, a new model sharing the weights); ``model`` itself when
    the folder has no such record. The recorded indices are the ORIGINAL model's; they are mapped to the
    saved model's layers through the recorded plan."""
    import json

    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return model
    from .plans import PrunePlan
    from .surgery import apply_plan

    try:
        plan = PrunePlan.from_dict(json.loads(path.read_text(encoding="utf-8"))["plan"])
    except Exception:  # noqa: BLE001 - an unreadable record: the folder still loads as plain transformers
        log.warning("Could not read the plan in %s; dropped sublayers (if any) run as zeroed layers.", path)
        return model
    if not plan.has_sublayers:
        return model
    from .adapters import layer_count

    lmap = plan.layer_map
    n = layer_count(model)
    if plan.num_layers_after != n:
        log.warning("%s records a %d-layer model but the folder has %d layers; sublayers not skipped.",
                    path, plan.num_layers_after, n)
        return model
    local = PrunePlan(n, "remove", drop_attn=tuple(lmap[i] for i in plan.drop_attn),
                      drop_mlp=tuple(lmap[i] for i in plan.drop_mlp), strategy="manual")
    return apply_plan(model, local)


def safe_name(text: str, default: str = "pruned-model") -> str:
    """A folder name from user text: letters, digits, ``-_.`` only (no separators, no ``..``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", (text or "").strip()).strip(".-")
    return name[:80] or default


def zip_folder(folder: str | Path) -> bytes:
    """The folder as zip bytes (stored, not compressed: safetensors do not compress)."""
    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, arcname=f"{folder.name}/{f.relative_to(folder)}")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------


def _chromium_for_kaleido() -> None:
    """Kaleido 1.x drives a Chrome; point it at a system Chromium when none is configured."""
    if os.environ.get("BROWSER_PATH"):
        return
    for candidate in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(candidate)
        if found:
            os.environ["BROWSER_PATH"] = found
            return


PNG_HINT = ("PNG export needs kaleido>=1 and a Chrome/Chromium: `pip install kaleido` and install "
            "chromium (or set BROWSER_PATH to a Chrome binary); the HTML file was written.")


def png_available() -> bool:
    """Cheap check (no rendering): kaleido installed and a Chrome/Chromium to drive."""
    _chromium_for_kaleido()
    return importlib.util.find_spec("kaleido") is not None and bool(os.environ.get("BROWSER_PATH"))


_PNG_LOCK = threading.Lock()
_png_server_started = False


def _start_png_server() -> None:
    """One kaleido browser for the whole process: without it every figure starts (and stops) its own
    Chromium, 2-6 s each. Kaleido's server answers callers in queue order and is not safe for two at
    once, so callers hold :data:`_PNG_LOCK` (dashboard sessions export from several threads)."""
    global _png_server_started
    if not _png_server_started:
        import kaleido  # optional (the app extra): only PNG export needs it

        kaleido.start_sync_server(silence_warnings=True)
        atexit.register(kaleido.stop_sync_server, silence_warnings=True)
        _png_server_started = True


def figure_png_bytes(fig: go.Figure, width: int = 1100, height: int = 650, scale: float = 2.0) -> bytes | None:
    """The figure as PNG bytes via kaleido, or ``None`` (and a logged hint) when it cannot be rendered."""
    _chromium_for_kaleido()
    with _PNG_LOCK:
        try:
            _start_png_server()
            with warnings.catch_warnings():  # plotly passes kaleido options the server already has
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                return fig.to_image(format="png", width=width, height=height, scale=scale)
        except Exception as exc:  # kaleido missing, no Chrome, sandbox problems: all mean "no PNG"
            log.warning("%s (%s: %s)", PNG_HINT, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            return None


def save_figure(fig: go.Figure, path: str | Path, png: bool = True, width: int = 1100,
                height: int = 650) -> list[Path]:
    """Write ``<path>.html`` (always, self-contained) and ``<path>.png`` (when kaleido can render).

    ``path`` is taken without suffix (a ``.html``/``.png`` suffix is stripped). Returns the files
    written; a missing PNG is logged with :data:`PNG_HINT`. Files are written atomically.
    """
    path = Path(path)
    if path.suffix.lower() in (".html", ".png"):
        path = path.with_suffix("")
    written = [atomic_write_text(path.with_name(path.name + ".html"),
                                 fig.to_html(include_plotlyjs=True, full_html=True))]
    if png:
        data = figure_png_bytes(fig, width=width, height=height)
        if data is not None:
            written.append(atomic_write_bytes(path.with_name(path.name + ".png"), data))
    return written


__all__ = [
    "PNG_HINT", "figure_png_bytes", "plan_record", "png_available", "safe_name", "save_figure",
    "save_pruned", "skip_recorded_sublayers", "zip_folder",
]
