"""Where the dashboard keeps its results, so a restart, a share link or another session finds them:
``<runs>/dashboard/analyze/<settings key>.json`` (reports), ``<runs>/dashboard/sweeps/<sweep key>.csv`` (+ a
``.json`` saying which model and analysis the sweep belongs to), and ``<runs>/exports/`` (saved models,
figures), ``<runs>/dashboard/timing/<model key>.json`` (how fast sweeps ran on a model, for the Evaluate
page's estimate). ``<runs>`` is :func:`layerlens.runs.default_runs_dir`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..runs import atomic_write_json, atomic_write_text, default_runs_dir, stable_key
from .settings import AnalysisSettings
from .sweeps import SweepTiming


def runs_dir() -> Path:
    """The dashboard's own part of the runs folder."""
    return default_runs_dir() / "dashboard"


def exports_dir() -> Path:
    """Where the Export page writes saved models and figures."""
    return runs_dir().parent / "exports"


def analysis_path(key: str) -> Path:
    """The persisted report of the analysis named ``key`` (:meth:`AnalysisSettings.key`)."""
    return runs_dir() / "analyze" / f"{key}.json"


def sweep_key(settings: AnalysisSettings | None, report: Any, strategies: Iterable[str], ratios: Iterable[float],
              windows: int, seq_len: int, mmlu: Any, current_plan_json: str, heal_seconds: float = 0.0,
              tasks: str = "") -> str:
    """The name of a sweep: model, analysis, strategies, ratios, evaluation settings, the current plan and
    the healing budget (only when healing: the names of sweeps without it stay as they were)."""
    return stable_key({"model": settings.model_key() if settings else None, "report": report.meta.get("created"),
                       "strategies": sorted(strategies), "ratios": sorted(float(r) for r in ratios),
                       "windows": windows, "seq_len": seq_len, "mmlu": mmlu,
                       "current": current_plan_json} | ({"heal_seconds": float(heal_seconds)} if heal_seconds else {})
                      | ({"tasks": tasks} if tasks else {}))


def sweep_csv(key: str) -> Path:
    return runs_dir() / "sweeps" / f"{key}.csv"


def load_sweep(key: str) -> pd.DataFrame | None:
    """The saved sweep ``key`` (None when there is none or it cannot be read)."""
    path = sweep_csv(key)
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path, dtype={"removed_layers": str})
    except (OSError, ValueError):
        return None
    frame["removed_layers"] = frame["removed_layers"].fillna("")
    return frame


def save_sweep(key: str, frame: pd.DataFrame, *, model_key: Sequence[Any] | None, report_created: Any,
               strategies: Iterable[str], ratios: Iterable[float]) -> None:
    """Persist a finished sweep and which model (:meth:`AnalysisSettings.model_key`) and analysis it ran on."""
    atomic_write_text(sweep_csv(key), frame.to_csv(index=False))
    atomic_write_json(sweep_csv(key).with_suffix(".json"), {
        "model_key": list(model_key) if model_key is not None else None,
        "report_created": report_created, "strategies": list(strategies),
        "ratios": [float(r) for r in ratios]})


def saved_sweeps(model_key: Sequence[Any], report_created: Any) -> list[pd.DataFrame]:
    """Every saved sweep of this model and analysis, newest first."""
    want = [list(model_key), report_created]
    folder = runs_dir() / "sweeps"
    out = []
    for meta_path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if [meta.get("model_key"), meta.get("report_created")] == want:
            frame = load_sweep(meta_path.stem)
            if frame is not None:
                out.append(frame)
    return out


def timing_path(model_key: Sequence[Any]) -> Path:
    return runs_dir() / "timing" / f"{stable_key(list(model_key))}.json"


def load_timing(model_key: Sequence[Any]) -> SweepTiming | None:
    """How fast evaluations ran on this model here (an earlier sweep or calibration); None if unknown."""
    try:
        return SweepTiming.from_dict(json.loads(timing_path(model_key).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_timing(model_key: Sequence[Any], timing: SweepTiming) -> None:
    atomic_write_json(timing_path(model_key), timing.to_dict())


def damage_path(key: str) -> Path:
    """The leave-one-out damage document (``damage.json`` contents) named ``key``."""
    return runs_dir() / "damage" / f"{key}.json"


def load_damage(key: str) -> dict[str, Any] | None:
    try:
        return json.loads(damage_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_damage(key: str, doc: dict[str, Any], *, model_key: Sequence[Any] | None, report_created: Any) -> None:
    """Persist a damage document and which model and analysis it belongs to (the Summary finds it)."""
    atomic_write_json(damage_path(key), doc | {"dashboard": {
        "model_key": list(model_key) if model_key is not None else None, "report_created": report_created}})


def latest_damage(model_key: Sequence[Any], report_created: Any) -> dict[str, Any] | None:
    """The newest damage document of this model and analysis (None when there is none)."""
    want = {"model_key": list(model_key), "report_created": report_created}
    folder = runs_dir() / "damage"
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("dashboard") == want:
            return doc
    return None


__all__ = [
    "analysis_path", "damage_path", "exports_dir", "latest_damage", "load_damage", "load_sweep", "load_timing",
    "runs_dir", "save_damage", "save_sweep", "save_timing", "saved_sweeps", "sweep_csv", "sweep_key",
    "timing_path",
]
