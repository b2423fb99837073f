"""The share link: the state a stakeholder URL carries (model, data size, plan, the Evaluate page's sweep
settings), written short and read back defensively (a hand-edited or hostile URL falls back to the
defaults, never to an error)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from ..errors import PlanError
from ..metrics import CaptureConfig
from ..plans import MERGE_FORMULAS, parse_layers, strategy_names
from .planning import PLAN_MODES, PlanSettings
from .settings import DTYPE_OPTIONS, AnalysisSettings
from .sweeps import RATIO_CHOICES, SweepSettings

SWEEP_PARAMS = ("ev_strategies", "ev_ratios", "ev_windows", "ev_seq_len", "ev_mmlu", "ev_subjects", "ev_current",
                "ev_heal", "ev_tasks")


def to_query(settings: AnalysisSettings, ps: PlanSettings | None,
             sweep: SweepSettings | None = None) -> dict[str, str]:
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
            for name in ("drop_attn", "drop_mlp"):
                if getattr(ps, name, ()):
                    q[name] = ",".join(map(str, getattr(ps, name)))
        else:
            q["criterion"] = ps.criterion
            if ps.formula != PlanSettings.formula:
                q["formula"] = ps.formula
            q["slm_by"] = ps.slm_by
            if ps.slm_by == "ratio":
                q["target_ratio"] = f"{ps.target_ratio:g}"
            else:
                q["threshold"] = f"{ps.threshold:g}"
    if sweep is not None:
        q |= sweep_query(sweep)
    return q


def sweep_query(sweep: SweepSettings) -> dict[str, str]:
    """The ``ev_*`` parameters of the Evaluate page's settings that differ from its defaults."""
    d, q = SweepSettings(), {}
    if sweep.strategies != d.strategies:
        q["ev_strategies"] = ",".join(sweep.strategies)
    if sweep.ratios != d.ratios:
        q["ev_ratios"] = ",".join(f"{r:g}" for r in sweep.ratios)
    if sweep.windows != d.windows:
        q["ev_windows"] = str(sweep.windows)
    if sweep.seq_len != d.seq_len:
        q["ev_seq_len"] = str(sweep.seq_len)
    if (sweep.mmlu, sweep.mmlu_per_subject) != (d.mmlu, d.mmlu_per_subject):
        q["ev_mmlu"] = str(sweep.mmlu_per_subject) if sweep.mmlu else "off"
    if sweep.subjects != d.subjects:
        q["ev_subjects"] = ",".join(sweep.subjects)
    if sweep.include_current != d.include_current:
        q["ev_current"] = "1" if sweep.include_current else "0"
    if sweep.heal_seconds != d.heal_seconds:
        q["ev_heal"] = f"{sweep.heal_seconds:g}"
    if _task_names(sweep.tasks):
        q["ev_tasks"] = ",".join(_task_names(sweep.tasks))
    return q


def _task_names(value: str) -> list[str]:
    """The lm-eval task NAMES of a tasks field: a link never carries a local file path (a task YAML can run
    code from its folder), so paths stay on the machine that typed them."""
    return [x for x in (t.strip() for t in str(value or "")[:500].split(","))
            if x and all(c.isalnum() or c in "_-" for c in x)]


def sweep_from_query(params: Mapping[str, Any], strategies: tuple[str, ...],
                     subjects: tuple[str, ...]) -> SweepSettings | None:
    """The Evaluate settings of a share link (None when it has none); ``strategies`` and ``subjects`` are
    the choices the page offers: anything else, and out-of-range numbers, fall back to the defaults."""
    p = dict(params)
    if not any(k in p for k in SWEEP_PARAMS):
        return None
    d, upd = SweepSettings(), {}
    names = [x for x in str(p.get("ev_strategies", "") or "")[:500].split(",") if x in strategies]
    if names:
        upd["strategies"] = tuple(dict.fromkeys(names))
    ratios = [_num(x, float, 0.0, 1.0) for x in str(p.get("ev_ratios", "") or "")[:500].split(",")]
    ratios = [c for c in RATIO_CHOICES if any(r is not None and abs(r - c) < 1e-9 for r in ratios)]
    if ratios:
        upd["ratios"] = tuple(ratios)
    for name, field, lo, hi in (("ev_windows", "windows", 1, 256), ("ev_seq_len", "seq_len", 16, 4096)):
        v = _num(p.get(name), int, lo, hi)
        if v is not None:
            upd[field] = v
    mmlu = str(p.get("ev_mmlu", "") or "")
    if mmlu == "off":
        upd["mmlu"] = False
    elif (n := _num(mmlu, int, 1, 100)) is not None:
        upd["mmlu"], upd["mmlu_per_subject"] = True, n
    chosen = [x for x in str(p.get("ev_subjects", "") or "")[:3000].split(",") if x in subjects]
    if chosen:
        upd["subjects"] = tuple(dict.fromkeys(chosen))
    if p.get("ev_current") in ("0", "1"):
        upd["include_current"] = p["ev_current"] == "1"
    if (heal := _num(p.get("ev_heal"), int, 0, 3600)) is not None:
        upd["heal_seconds"] = float(heal)
    if tasks := _task_names(p.get("ev_tasks", "")):
        upd["tasks"] = ",".join(tasks)
    return replace(d, **upd)


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
    if not any(k in p for k in ("mode", "strategy", "ratio", "layers", "threshold", "target_ratio", "drop_attn",
                                "drop_mlp")):
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
    if p.get("formula") in MERGE_FORMULAS:
        pu["formula"] = p["formula"]
    if p.get("layers"):
        with contextlib.suppress(PlanError):
            pu["layers"] = parse_layers(str(p["layers"])[:2000])
    for name in ("drop_attn", "drop_mlp"):
        if p.get(name):
            with contextlib.suppress(PlanError):
                pu[name] = parse_layers(str(p[name])[:2000])
    return settings, replace(ps, **pu)


def settings_fields() -> tuple[str, ...]:
    """The names of every analysis setting, the capture fields in the place of ``capture``."""
    names: list[str] = []
    for f in fields(AnalysisSettings):
        names += [c.name for c in fields(CaptureConfig)] if f.name == "capture" else [f.name]
    return tuple(names)


__all__ = ["SWEEP_PARAMS", "from_query", "settings_fields", "sweep_from_query", "sweep_query", "to_query"]
