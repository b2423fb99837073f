"""Non-UI helpers for the dashboard: settings, share-URL state, path confinement, plan building.

Pure python (no streamlit): the pages read widgets, call these, and draw. Everything that decides *what*
is computed lives here or in the library, so it is unit-testable without a browser.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import LayerLensError

ENV_MODEL = "LAYERLENS_DEFAULT_MODEL"
ENV_DATA_ROOT = "LAYERLENS_DATA_ROOT"
ENV_QUICK_SAMPLES = "LAYERLENS_QUICK_SAMPLES"
MAX_UPLOAD_MB = 50  # keep in step with .streamlit/config.toml [server] maxUploadSize
UPLOAD_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet")

DTYPE_OPTIONS = ("auto", "float32", "bfloat16", "float16")
DATA_SOURCES = ("default", "prose", "upload", "path", "hub")
DATA_SOURCE_LABELS = {
    "default": "Bundled Shakespeare (default)",
    "prose": "Python docs prose (bundled)",
    "upload": "Upload a file",
    "path": "File on the server",
    "hub": "Hugging Face dataset",
}
# strategies a user picks from on the Prune page (report-based ones plus the ShortGPT baselines)
PRUNE_STRATEGIES = ("bi", "reverse", "sequential", "magnitude", "block", "streamline")
STRATEGY_LABELS = {
    "bi": "Block Influence (ShortGPT)",
    "reverse": "Reverse order (last layers)",
    "sequential": "Sequential (first layers)",
    "magnitude": "Relative Magnitude",
    "block": "Most similar block (angular distance)",
    "streamline": "LLM-Streamline span (cosine)",
    "random": "Random",
    "slm": "Sliding layer merging (SLM)",
    "manual": "Picked by hand",
}
PLAN_MODES = ("strategy", "manual", "slm")
PLAN_MODE_LABELS = {"strategy": "Strategy + ratio", "manual": "Pick layers by hand", "slm": "Sliding merge (SLM)"}


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------


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
        raise LayerLensError(f"'{raw}' does not exist under {root}; check the path.")
    if kind == "dir" and not resolved.is_dir():
        raise LayerLensError(f"'{raw}' is a file; give the model folder that holds config.json.")
    if kind == "file" and not resolved.is_file():
        raise LayerLensError(f"'{raw}' is a folder; give a .txt, .jsonl, .json, .csv or .parquet file.")
    return resolved


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


def looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", spec or ""))


# ----------------------------------------------------------------------------------------------------------
# Analysis settings
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisSettings:
    """What to load and how to analyse it; its :meth:`key` names the persisted result."""

    model: str = "default"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    data: str = "default"
    data_label: str = "default"
    text_field: str = "text"
    samples: int = 8
    seq_len: int = 128
    batch_size: int = 8
    cka_estimator: str = "minibatch"
    seed: int = 0
    skip_first: int = 0

    @classmethod
    def quick(cls, model: str | None = None) -> AnalysisSettings:
        """The first-open analysis: small and fast (real heatmaps in seconds on a CPU)."""
        samples = int(os.environ.get(ENV_QUICK_SAMPLES, "8") or 8)
        return cls(model=model or default_model_spec(), samples=samples, seq_len=128)

    def model_key(self) -> tuple[str, str | None, str, str]:
        """The cache key of the loaded model (one cached copy per key, shared by every session)."""
        return (self.model, self.revision or None, self.dtype, self.device)

    def key(self, data_fingerprint: str = "") -> str:
        from .runs import stable_key

        d = asdict(self)
        d.pop("data_label")
        if not d["skip_first"]:  # keys of analyses saved before the option existed stay valid
            d.pop("skip_first")
        d["data_fingerprint"] = data_fingerprint
        return stable_key(d)

    def validate(self) -> None:
        if self.samples < 1:
            raise LayerLensError(f"Samples must be at least 1 (got {self.samples}).")
        if self.seq_len < 8:
            raise LayerLensError(f"Sequence length must be at least 8 tokens (got {self.seq_len}).")
        if self.batch_size < 1:
            raise LayerLensError(f"Batch size must be at least 1 (got {self.batch_size}).")
        if not 0 <= self.skip_first < self.seq_len:
            raise LayerLensError(f"Skip-first tokens must be between 0 and the sequence length - 1 = "
                                 f"{self.seq_len - 1} (got {self.skip_first}).")
        if self.dtype not in DTYPE_OPTIONS:
            raise LayerLensError(f"Unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPE_OPTIONS)}.")


# ----------------------------------------------------------------------------------------------------------
# Plan settings (the Prune page's widgets) -> PrunePlan
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    mode: str = "strategy"  # strategy | manual | slm
    strategy: str = "bi"
    ratio: float = 0.25
    layers: tuple[int, ...] = ()
    slm_by: str = "threshold"  # threshold | ratio
    threshold: float = 0.9
    target_ratio: float = 0.25
    criterion: str = "cka"

    def label(self) -> str:
        if self.mode == "manual":
            return "manual"
        if self.mode == "slm":
            return "slm"
        return self.strategy


def build_plan(report: Any, ps: PlanSettings) -> Any:
    """The :class:`~layerlens.plans.PrunePlan` the Prune page's widgets describe (instant: no forward pass)."""
    from .plans import make_plan, slm_plan

    if ps.mode == "manual":
        return make_plan("manual", report, layers=tuple(sorted(set(ps.layers))))
    if ps.mode == "slm":
        if ps.slm_by == "ratio":
            return slm_plan(report, target_ratio=ps.target_ratio, criterion=ps.criterion)
        return slm_plan(report, ps.threshold, criterion=ps.criterion)
    if ps.mode != "strategy":
        raise LayerLensError(f"Unknown plan mode '{ps.mode}'; use one of {', '.join(PLAN_MODES)}.")
    return make_plan(ps.strategy, report, ratio=ps.ratio)


def plan_reason(report: Any, plan: Any) -> str:
    """One sentence saying why these layers were chosen (for the Summary page)."""
    removed = list(plan.removed_layers)
    if not removed:
        return "No layer is removed by this plan."
    s = plan.strategy
    if s == "bi":
        vals = ", ".join(f"{i} ({report.bi[i]:.3f})" for i in removed[:8])
        return (f"They have the lowest Block Influence (1 − cosine between a layer's input and output): {vals}"
                f"{' …' if len(removed) > 8 else ''}. Low BI means the layer barely changes the hidden state.")
    if s == "magnitude":
        return "They change the hidden state least relative to its size (lowest Relative Magnitude)."
    if s == "reverse":
        return "ShortGPT's 'reverse-order' baseline: the deepest layers are dropped first."
    if s == "sequential":
        return "Baseline: the first layers are dropped."
    if s == "block":
        return (f"Layers {removed[0]}–{removed[-1]} form the contiguous block whose input and output states are "
                "closest in angle (smallest angular distance), so the whole block does little.")
    if s == "streamline":
        return (f"Layers {removed[0]}–{removed[-1]} form the span with the most similar input and output "
                "(highest cosine), the block LLM-Streamline replaces.")
    if s == "slm":
        groups = ", ".join(f"{g[0]}–{g[-1]}" for g in plan.merge)
        crit = plan.params.get("criterion", "cka").upper()
        thr = plan.params.get("threshold")
        thr_s = f" ≥ {thr:.3f}" if isinstance(thr, (int, float)) else ""
        return (f"Consecutive layers whose outputs are highly similar ({crit}{thr_s}) are merged into one: "
                f"groups {groups}.")
    if s == "manual":
        return "Picked by hand on the Prune page."
    return f"Chosen by the '{s}' strategy."


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """``"3, 5-7"`` -> (3, 5, 6, 7); refuses out-of-range and malformed entries with the fix."""
    out: list[int] = []
    for part in re.split(r"[,\s]+", (text or "").strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise LayerLensError(f"'{part}' is not a layer index or range; write e.g. 3, 5-7 (0-based).")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            lo, hi = hi, lo
        for i in range(lo, hi + 1):
            if i >= num_layers:
                raise LayerLensError(f"Layer {i} is out of range; this model has layers 0..{num_layers - 1}.")
            out.append(i)
    return tuple(sorted(set(out)))


def params_after(total: int, per_layer: Sequence[int], plan: Any) -> int:
    """Parameter count of the pruned model: the removed layers' parameters are gone (merges keep one)."""
    return int(total - sum(per_layer[i] for i in plan.removed_layers))


# ----------------------------------------------------------------------------------------------------------
# Share URL: the state a stakeholder link carries
# ----------------------------------------------------------------------------------------------------------

_SHARE_KEYS = ("model", "revision", "dtype", "data", "samples", "seq_len", "mode", "strategy", "ratio",
               "layers", "slm_by", "threshold", "target_ratio", "criterion")


def to_query(settings: AnalysisSettings, ps: PlanSettings | None) -> dict[str, str]:
    """Query parameters for a share link (only non-default values, short and readable)."""
    q: dict[str, str] = {"model": settings.model}
    if settings.revision:
        q["revision"] = settings.revision
    if settings.dtype != "auto":
        q["dtype"] = settings.dtype
    if settings.data == "prose" or settings.data.startswith("hub:"):
        q["data"] = settings.data
    q["samples"] = str(settings.samples)
    q["seq_len"] = str(settings.seq_len)
    if settings.skip_first:
        q["skip_first"] = str(settings.skip_first)
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
    lies inside :func:`data_root` (checked later, when loading).
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
    for name, lo, hi in (("samples", 1, 4096), ("seq_len", 8, 8192), ("skip_first", 0, 8191)):
        v = _num(p.get(name), int, lo, hi)
        if v is not None:
            upd[name] = v
    settings = replace(s, **upd)
    if not any(k in p for k in ("mode", "strategy", "ratio", "layers", "threshold", "target_ratio")):
        return settings, base_plan
    ps = base_plan or PlanSettings()
    pu: dict[str, Any] = {}
    if p.get("mode") in PLAN_MODES:
        pu["mode"] = p["mode"]
    if p.get("strategy") in PRUNE_STRATEGIES:
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
        with contextlib.suppress(ValueError):
            pu["layers"] = tuple(sorted({int(x) for x in str(p["layers"]).split(",") if x.strip()}))
    return settings, replace(ps, **pu)


def settings_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(AnalysisSettings))


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def safe_name(text: str, default: str = "pruned-model") -> str:
    """A folder name from user text: letters, digits, ``-_.`` only (no separators, no ``..``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", (text or "").strip()).strip(".-")
    return name[:80] or default


def save_pruned_model(model: Any, tokenizer: Any, plan: Any, folder: str | Path,
                      meta: Mapping[str, Any] | None = None) -> Path:
    """Save a pruned model in plain ``transformers`` format + ``layerlens_plan.json``, atomically.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(folder)``; the plan JSON records which
    original layers were removed/merged and the provenance.
    """
    import json as _json

    from .runs import atomic_dir, provenance

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = {"plan": plan.to_dict(), "meta": provenance(**dict(meta or {}))}
        (tmp / "layerlens_plan.json").write_text(_json.dumps(doc, indent=1, default=str), encoding="utf-8")
    return folder


def zip_folder(folder: str | Path) -> bytes:
    """The folder as zip bytes (stored, not compressed: safetensors do not compress)."""
    import io
    import zipfile

    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, arcname=f"{folder.name}/{f.relative_to(folder)}")
    return buf.getvalue()


def metrics_frame(report: Any) -> Any:
    """Per-layer metrics as a DataFrame (one row per decoder layer, 0-based) for CSV export."""
    import pandas as pd

    n = report.num_layers
    return pd.DataFrame({
        "layer": range(n), "bi": report.bi, "magnitude": report.magnitude,
        "cosine_next": [report.cosine[i][i + 1] for i in range(n)],
        "cka_next": [report.cka[i][i + 1] for i in range(n)],
    })


def matrix_csv(matrix: Any) -> str:
    """An (L+1)x(L+1) state matrix as CSV with h_0..h_L headers."""
    import pandas as pd

    n = len(matrix)
    names = [f"h_{i}" for i in range(n)]
    return pd.DataFrame([list(r) for r in matrix], index=names, columns=names).to_csv(index_label="state")


def current_marker(frame: Any, plan: Any, metric: str) -> dict[str, Any] | None:
    """The ``current=`` argument of :func:`layerlens.plots.sweep_figure` for ``plan``: its ratio, and its
    value when the sweep evaluated it (a row with strategy ``current`` removing the same layers)."""
    if plan is None:
        return None
    value = None
    if frame is not None and len(frame) and metric in frame:
        layers = ",".join(map(str, plan.removed_layers))
        rows = frame[(frame["strategy"] == "current") & (frame["removed_layers"].fillna("").astype(str) == layers)]
        if len(rows) and rows[metric].notna().iloc[0]:
            value = float(rows[metric].iloc[0])
    return {"ratio": plan.ratio, "label": f"current plan ({plan.strategy})", "value": value}


# ----------------------------------------------------------------------------------------------------------
# An interrupted sweep (Evaluate page)
# ----------------------------------------------------------------------------------------------------------


class _NotFinished(Exception):
    """A read-back would have to compute a point."""


def _refuse_forward(_module: Any, _args: Any) -> None:
    raise _NotFinished


def finished_sweep_points(model: Any, tokenizer: Any, report: Any, plans: Sequence[tuple[str, float, Any]],
                          finished: set[str] | frozenset[str], *, ppl_texts: Any = None, questions: Any = None,
                          **sweep_kwargs: Any) -> Any | None:
    """The rows of an interrupted :func:`layerlens.sweep.sweep` over ``plans`` whose evaluations finished,
    read back from the persisted points without computing anything (``None``: nothing finished).

    ``finished``: the labels the sweep passed to its ``progress`` callback, one per finished (distinct model
    change, evaluation) unit: ``"<task kind> <plan.describe()>"`` of the first plan in ``plans`` making that
    change. ``ppl_texts``, ``questions`` and ``sweep_kwargs`` (seq_len, max_windows, runs_dir, model_id)
    must be the interrupted sweep's, so the same points are found. A plan whose perplexity finished but not
    its MMLU gets a row with NaN MMLU, and the other way round. Every decoder layer of the private view
    swept here refuses to run, so a wrong label costs nothing but the row (the read-back then returns None).
    """
    import pandas as pd

    from .adapters import decoder_layers
    from .evaluation import MMLUTask, PerplexityTask
    from .runs import stable_key
    from .surgery import private_view
    from .sweep import COLUMNS, effective_plan, sweep

    first: dict[str, Any] = {}
    for _, _, plan in plans:
        first.setdefault(stable_key(effective_plan(plan)), plan)

    def done(plan: Any, kind: str) -> bool:
        return f"{kind} {first[stable_key(effective_plan(plan))].describe()}" in finished

    view = private_view(model)
    for layer in decoder_layers(view):
        layer.register_forward_pre_hook(_refuse_forward)
    rows: dict[int, dict[str, Any]] = {}
    try:
        for kind, data, columns in ((PerplexityTask.kind, dict(ppl_texts=ppl_texts), ("perplexity",)),
                                    (MMLUTask.kind, dict(questions=questions), ("mmlu_accuracy", "mmlu_prob_correct"))):
            if next(iter(data.values())) is None:
                continue
            index = [i for i, (_, _, plan) in enumerate(plans) if done(plan, kind)]
            if not index:
                continue
            frame = sweep(view, tokenizer, report, plans=[plans[i] for i in index], **data, **sweep_kwargs)
            for i, record in zip(index, frame.to_dict("records"), strict=True):
                if i in rows:
                    rows[i].update({c: record[c] for c in columns})
                    rows[i]["seconds"] += record["seconds"]
                else:
                    rows[i] = record
    except _NotFinished:
        return None
    if not rows:
        return None
    return pd.DataFrame([rows[i] for i in sorted(rows)], columns=list(COLUMNS))


# ----------------------------------------------------------------------------------------------------------
# MMLU on the Summary page
# ----------------------------------------------------------------------------------------------------------

# Below this many questions an accuracy difference is noise: one question moves accuracy by >= 5 points, and
# the binomial standard error at 30 % accuracy is >= 10 points.
MIN_MMLU_QUESTIONS = 20


@dataclass(frozen=True)
class MMLUComparison:
    """MMLU accuracy of a plan and of the original model (fractions 0..1) from one sweep, and on how many
    questions (``None`` when the sweep did not record it)."""

    after: float
    before: float | None
    questions: int | None

    @property
    def meaningful(self) -> bool:
        """Enough questions for the difference to say something (see :data:`MIN_MMLU_QUESTIONS`)."""
        return self.questions is not None and self.questions >= MIN_MMLU_QUESTIONS

    def delta_text(self) -> str:
        """The metric's delta line: the difference with its question count, or why it is not shown."""
        was = f"was {self.before:.1%}" if self.before is not None else "original not measured"
        if self.questions is None:
            return f"{was}; number of questions unknown, re-run the sweep to compare"
        on = f"{self.questions} question{'s' if self.questions != 1 else ''}"
        if not self.meaningful:
            return f"{was} on {on}: too few for the difference to mean anything (need {MIN_MMLU_QUESTIONS}+)"
        if self.before is None:
            return f"on {on}"
        return f"{(self.after - self.before) * 100:+.1f} pts ({was}) on {on}"

    def standard_error_pts(self) -> float | None:
        """Binomial standard error of ``after`` in accuracy points (None without a question count)."""
        if not self.questions:
            return None
        return 100 * math.sqrt(self.after * (1 - self.after) / self.questions)


def mmlu_comparison(frames: Sequence[Any], removed_layers: Sequence[int]) -> MMLUComparison | None:
    """The plan removing ``removed_layers`` vs the original (the ``removed_layers == ""`` row) in the first
    sweep frame that measured MMLU for the plan; ``None`` when none did. The question count comes from the
    frame's ``mmlu_questions`` column (written by the dashboard's sweeps; older saved sweeps lack it)."""
    removed = ",".join(map(str, removed_layers))
    for frame in frames:
        if "mmlu_accuracy" not in frame:
            continue
        ok = frame[frame["mmlu_accuracy"].notna()]
        layers = ok["removed_layers"].fillna("").astype(str)
        after, before = ok[layers == removed], ok[layers == ""]
        if not len(after):
            continue
        n = after["mmlu_questions"].iloc[0] if "mmlu_questions" in after else None
        return MMLUComparison(after=float(after["mmlu_accuracy"].iloc[0]),
                              before=float(before["mmlu_accuracy"].iloc[0]) if len(before) else None,
                              questions=None if n is None or n != n else int(n))
    return None


__all__ = [
    "AnalysisSettings", "PlanSettings", "build_plan", "current_marker", "MMLUComparison", "MIN_MMLU_QUESTIONS",
    "mmlu_comparison", "finished_sweep_points", "check_upload", "confine_path", "data_root",
    "default_model_spec", "from_query", "params_after", "parse_layers", "plan_reason", "to_query",
    "metrics_frame", "matrix_csv", "safe_name", "save_pruned_model", "zip_folder", "MAX_UPLOAD_MB", "PRUNE_STRATEGIES", "STRATEGY_LABELS", "PLAN_MODES", "PLAN_MODE_LABELS",
]
