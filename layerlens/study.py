"""Studies: one sweep configuration over several models and/or calibration sets, in one frame.

:func:`study` takes :class:`StudyEntry` items (a model to load and the calibration data its report is
measured on) and one :class:`layerlens.sweep.SweepConfig`. For each entry it analyses the model on that
calibration set (only when a strategy needs a report: :func:`layerlens.metrics.analyze`), then sweeps it with
:func:`layerlens.sweep.sweep` itself. Each entry's points are persisted under the very keys of its single
sweep, so a study resumes entry by entry and each entry's rows equal its single sweep's.

Entries of the same model are run together and the model is loaded once. With a
:class:`layerlens.distributed.RayExecutor` the work items carry the model's spec: the actors load a model at
its first item and keep it for the next entries of that model (one actor per GPU, one model at a time).
Without an executor, the entries run one after another in this process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import load_texts
from .errors import LayerLensError
from .loading import load_model
from .metrics import CaptureConfig, analyze
from .plans import get_strategy
from .sweep import SweepConfig, SweepResult, SweepStats, make_plans, sweep

if TYPE_CHECKING:
    from .evaluation import ProgressFn

STUDY_COLUMNS = ("model", "calibration")  # the columns a study puts before the sweep's


@dataclass(frozen=True)
class StudyEntry:
    """One model (a folder, hub id or ``default``) with its calibration data (``default``, ``prose``, a file,
    or a hub dataset: :func:`layerlens.data.load_texts`, ``text_field`` its column)."""

    model: str
    data: str = "default"
    text_field: str = "text"


def _needs(config: SweepConfig, what: str) -> bool:
    """Whether a strategy of the config needs a report (``what="report"``) or forward passes on the data."""
    names = [s for s, _, _ in config.plans] if config.plans is not None else list(config.strategies)
    return any(getattr(get_strategy(s), f"uses_{what}")() for s in names)


def study(entries: Sequence[StudyEntry], config: SweepConfig, *, ppl_texts: Any = None, questions: Any = None,
          dev: Any = None, runs_dir: str | Path | None = None, capture: CaptureConfig | None = None,
          revision: str | None = None, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
          executor: Any = None, progress: ProgressFn | None = None, reports: dict | None = None) -> SweepResult:
    """Sweep every entry with ``config``: one frame with ``model`` and ``calibration`` columns first, then the
    sweep's columns, rows in entry order (each entry's rows as its single sweep gives them).

    ``capture`` sizes the analysis (default :class:`CaptureConfig` with ``seq_len``/``seed`` of the config).
    ``executor`` (a :class:`layerlens.distributed.RayExecutor`, kept open across the entries) computes the
    points; it is told each entry's model. ``progress(done, total, label)`` is called per entry's sweep, the
    label prefixed with ``[entry/entries] model: ``. ``reports``, when given a dict, receives each entry's report by
    ``(model, data)``. ``meta["entries"]`` holds each entry's sweep meta; ``stats`` sums the entries'.
    """
    import pandas as pd  # heavy (~0.3 s): only when a study runs

    entries = list(entries)
    if not entries:
        raise LayerLensError("A study needs at least one (model, calibration data) entry.")
    if len(set(entries)) != len(entries):
        raise LayerLensError("A study lists the same (model, calibration data) entry twice; give each once.")
    capture = capture or CaptureConfig(seq_len=config.seq_len, seed=config.seed)
    by_model: dict[str, list[int]] = {}  # entries of one model together: it is loaded once
    for i, entry in enumerate(entries):
        by_model.setdefault(entry.model, []).append(i)
    results: dict[int, SweepResult] = {}
    for model_source, indices in by_model.items():
        loaded = load_model(model_source, revision=revision, dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code)
        info = loaded.info
        if executor is not None and hasattr(executor, "use"):
            from .distributed import ModelSpec  # the workers load this model at its first item

            executor.use(ModelSpec.of(info, trust_remote_code=trust_remote_code))
        for i in indices:
            entry = entries[i]
            texts = load_texts(entry.data, role="calibration", field=entry.text_field)
            report = None
            if _needs(config, "report"):
                report = analyze(loaded.model, loaded.tokenizer, texts, capture,
                                 meta=dict(model=info.model, revision=info.revision, model_type=info.model_type,
                                           dtype=info.dtype, device=info.device, execution="in_memory"))
                if reports is not None:
                    reports[(entry.model, entry.data)] = report
            entry_config = config
            if config.plans is None and _needs(config, "data"):  # e.g. the oracle: forward passes on the data
                from .data import calibration_tokens

                tokens = calibration_tokens(loaded.tokenizer, texts, capture.samples, capture.seq_len)
                probe = {"model": loaded.model, "tokenizer": loaded.tokenizer, "token_lists": tokens,
                         "runs_dir": Path(runs_dir) if runs_dir is not None else None}
                entry_config = replace(config, plans=tuple(make_plans(
                    report, config.strategies, config.ratios, num_layers=info.num_layers, seed=config.seed,
                    probe=probe)))
            label = f"[{i + 1}/{len(entries)}] {Path(entry.model).name or entry.model}"

            def entry_progress(done: int, total: int, message: str = "", _label: str = label) -> None:
                if progress is not None:
                    progress(done, total, f"{_label}: {message}")

            results[i] = sweep(loaded.model, loaded.tokenizer, report, entry_config, ppl_texts=ppl_texts,
                               questions=questions, dev=dev, runs_dir=runs_dir,
                               model_id={"model": info.model, "revision": info.revision},
                               progress=entry_progress if progress is not None else None,
                               heal_texts=texts if config.heal is not None else None, executor=executor)
        del loaded
    frames = []
    for i, entry in enumerate(entries):
        frame = results[i].frame.copy()
        frame.insert(0, "calibration", entry.data)
        frame.insert(0, "model", entry.model)
        frames.append(frame)
    ordered = [results[i] for i in range(len(entries))]
    stats = SweepStats(units=sum(r.stats.units for r in ordered), computed=sum(r.stats.computed for r in ordered),
                       cached=sum(r.stats.cached for r in ordered), peak_states={},
                       layer_passes=sum(r.stats.layer_passes for r in ordered),
                       layer_passes_from_scratch=sum(r.stats.layer_passes_from_scratch for r in ordered))
    meta = {"study": [{"model": e.model, "calibration": e.data} for e in entries],
            "entries": [r.meta for r in ordered]}
    return SweepResult(pd.concat(frames, ignore_index=True), meta, stats)


__all__ = ["STUDY_COLUMNS", "StudyEntry", "study"]
