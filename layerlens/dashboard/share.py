"""The share link: the state a stakeholder URL carries (model, data size, plan), written short and read
back defensively (a hand-edited or hostile URL falls back to the defaults, never to an error)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from ..errors import PlanError
from ..metrics import CaptureConfig
from ..plans import parse_layers, strategy_names
from .planning import PLAN_MODES, PlanSettings
from .settings import DTYPE_OPTIONS, AnalysisSettings


def to_query(settings: AnalysisSettings, ps: PlanSettings | None) -> dict[str, str]:
    """Query parameters for a share link (only non-default values, short and readable)."""
    q: dict[str, str] = {"model": settings.model}
    if settings.revision:
        q["revision"] = settings.revision
    if settings.dtype != "auto":
        q["dtype"] = settings.dtype
    if settings.data == "prose" or settings.data.startswith("hub:"):
        q["data"] = settings.data
    q["samples"] = str(settings.capture.samples)
    q["seq_len"] = str(settings.capture.seq_len)
    if settings.capture.skip_first:
        q["skip_first"] = str(settings.capture.skip_first)
    if ps is not None:
        q["mode"] = ps.mode
        if ps.mode == "strategy":
            q["strategy"] = ps.strategy
            q["ratio"] = f"{ps.ratio:g}"
        elif ps.mode == "manual":
            q["layers"] = ",".join(map(str, ps.layers))
        else:
            q["criterion"] = ps.criterion
            q["slm_by"] = ps.slm_by
            if ps.slm_by == "ratio":
                q["target_ratio"] = f"{ps.target_ratio:g}"
            else:
                q["threshold"] = f"{ps.threshold:g}"
    return q


def _num(value: Any, cast: type, lo: float, hi: float) -> Any:
    try:
        v = cast(value)
    except (TypeError, ValueError):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if lo <= v <= hi else None


def from_query(params: Mapping[str, Any], base: AnalysisSettings | None = None,
               base_plan: PlanSettings | None = None) -> tuple[AnalysisSettings, PlanSettings | None]:
    """Read share-link parameters defensively: unknown or out-of-range values fall back to the defaults.

    Only model ids/``default``/hub ids come from a URL; a local path in ``model`` is accepted only when it
    lies inside :func:`~layerlens.dashboard.paths.data_root` (checked later, when loading).
    """
    s = base or AnalysisSettings.quick()
    p = dict(params)
    upd: dict[str, Any] = {}
    if p.get("model"):
        upd["model"] = str(p["model"])[:300]
    if p.get("revision"):
        upd["revision"] = str(p["revision"])[:100]
    if p.get("dtype") in DTYPE_OPTIONS:
        upd["dtype"] = p["dtype"]
    data = str(p.get("data", "") or "")
    if data in ("default", "prose") or data.startswith("hub:"):
        upd["data"] = data
        upd["data_label"] = data
    capture: dict[str, Any] = {}
    for name, lo, hi in (("samples", 1, 4096), ("seq_len", 8, 8192), ("skip_first", 0, 8191)):
        v = _num(p.get(name), int, lo, hi)
        if v is not None:
            capture[name] = v
    settings = replace(s, **upd, capture=replace(s.capture, **capture))
    if not any(k in p for k in ("mode", "strategy", "ratio", "layers", "threshold", "target_ratio")):
        return settings, base_plan
    ps = base_plan or PlanSettings()
    pu: dict[str, Any] = {}
    if p.get("mode") in PLAN_MODES:
        pu["mode"] = p["mode"]
    if p.get("strategy") in strategy_names(on_prune_page=True):
        pu["strategy"] = p["strategy"]
    for name in ("ratio", "target_ratio"):
        v = _num(p.get(name), float, 0.0, 0.95)
        if v is not None:
            pu[name] = v
    v = _num(p.get("threshold"), float, -1.0, 1.0)
    if v is not None:
        pu["threshold"] = v
    if p.get("slm_by") in ("threshold", "ratio"):
        pu["slm_by"] = p["slm_by"]
    if p.get("criterion") in ("cka", "cosine"):
        pu["criterion"] = p["criterion"]
    if p.get("layers"):
        with contextlib.suppress(PlanError):
            pu["layers"] = parse_layers(str(p["layers"])[:2000])
    return settings, replace(ps, **pu)


def settings_fields() -> tuple[str, ...]:
    """The names of every analysis setting, the capture fields in the place of ``capture``."""
    names: list[str] = []
    for f in fields(AnalysisSettings):
        names += [c.name for c in fields(CaptureConfig)] if f.name == "capture" else [f.name]
    return tuple(names)


__all__ = ["from_query", "settings_fields", "to_query"]
