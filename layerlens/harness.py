"""lm-evaluation-harness tasks on a live model object (the pruned private view: no save/reload round trip).

:func:`run_tasks` wraps the model in the harness's own ``HFLM(pretrained=model, tokenizer=tokenizer)`` and
runs ``lm_eval.simple_evaluate`` on harness task names (``hellaswag``, ``arc_easy``, ...) or local task
YAML files (a ``.yaml``/``.yml`` path: its folder is added to the harness's task search path and its
``task:`` name is run). Results keep the harness's metric names and standard errors, with the default
filter suffix dropped (``"acc,none"`` -> ``"acc"``, ``"acc_stderr,none"`` -> ``"acc_stderr"``; other
filters stay, e.g. ``"exact_match,strict-match"``); the harness version and task versions go to ``meta``.

Task data comes from wherever the harness finds it (the datasets cache, or a local YAML's data files).
When a task's data cannot be loaded (offline and not cached) the error names the task and how to make it
available. The sweep's prefix reuse cannot apply inside the harness (it owns the forward passes): each
pruned model runs every harness request from its embeddings.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, LayerLensError

DEFAULT_BATCH = 8
DEFAULT_BOOTSTRAP = 1000
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class HarnessResult:
    """``tasks``: ``{task: {metric: value, metric_stderr: value, ..., "n": samples}}`` (harness names)."""

    tasks: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "meta": self.meta, "seconds": self.seconds}


def harness_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def parse_tasks(value: str | Sequence[str] | None) -> list[str]:
    """``"hellaswag,arc_easy"`` or a list -> task specs (names or YAML paths), blanks dropped."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(s).strip() for s in items if str(s).strip()]


def _yaml_task_name(path: Path) -> str:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"Task file '{path}' could not be read as YAML ({type(exc).__name__}); fix it.") from exc
    name = doc.get("task") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(f"Task file '{path}' has no `task:` name; an lm-eval task YAML names its task.")
    return name


def resolve_tasks(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Task names to run and the folders of local YAML files to add to the harness's search path."""
    names, folders = [], []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.suffix.lower() in YAML_SUFFIXES:
            if not path.is_file():
                raise DataError(f"Task file '{spec}' does not exist; check the path.")
            names.append(_yaml_task_name(path))
            folder = str(path.resolve().parent)
            if folder not in folders:
                folders.append(folder)
        else:
            names.append(spec)
    return names, folders


def _import_harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError as exc:
        raise LayerLensError("Harness tasks need lm-evaluation-harness: `pip install lm-eval==0.4.13` (it is in "
                             "requirements.txt).") from exc
    return lm_eval, HFLM, TaskManager, get_task_dict


def load_tasks(specs: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The harness task objects (data loaded) for ``specs``, one clear error per task that cannot load."""
    _, _, TaskManager, get_task_dict = _import_harness()
    names, folders = resolve_tasks(specs)
    if not names:
        raise LayerLensError("No harness task given; name one or more, e.g. `tasks=hellaswag,arc_easy`.")
    local_only = len(folders) > 0 and all(Path(s).suffix.lower() in YAML_SUFFIXES for s in specs)
    with _quiet():
        manager = TaskManager(include_path=folders or None, include_defaults=not local_only)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"Unknown lm-eval task {', '.join(repr(u) for u in unknown)}; use a harness task name "
                        "(`lm-eval ls tasks` lists them) or a local task .yaml file.")
    loaded: dict[str, Any] = {}
    for name in names:
        try:
            with _quiet():
                loaded.update(get_task_dict([name], manager))
        except Exception as exc:  # noqa: BLE001 - datasets/harness raise many network and file errors
            raise DataError(
                f"lm-eval task '{name}' could not load its data ({type(exc).__name__}: {str(exc)[:160]}). "
                "Offline? Run it once with network access so the datasets cache holds it (or copy that cache "
                "here and set HF_DATASETS_CACHE), or write a local task .yaml with `dataset_path: json` and "
                "`dataset_kwargs: {data_files: ...}` and pass its path.") from exc
    return loaded, names


@contextlib.contextmanager
def _quiet():
    """The harness's progress bars and notices off the terminal (errors still raise)."""
    levels = {n: logging.getLogger(n).level for n in ("lm_eval", "lm-eval")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def _metrics(raw: dict[str, Any], n: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("alias", "name", "sample_len", "sample_count"):
            continue
        metric = key.removesuffix(",none")
        if isinstance(value, str):  # "N/A" standard errors
            value = None
        out[metric] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if n is not None:
        out["n"] = n
    return out


def run_tasks(model: torch.nn.Module, tokenizer: Any, tasks: str | Sequence[str], *, num_fewshot: int | None = None,
              limit: int | float | None = None, batch_size: int = DEFAULT_BATCH,
              bootstrap_iters: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> HarnessResult:
    """Run lm-eval ``tasks`` (names or local YAML paths, a list or ``"a,b"``) on the live ``model``.

    ``num_fewshot`` None keeps each task's own default; ``limit`` caps the documents per task (the
    harness's meaning: a count, or a fraction below 1). The model is only read (eval mode, no grads).
    """
    lm_eval, HFLM, _, _ = _import_harness()
    specs = parse_tasks(tasks)
    task_dict, names = load_tasks(specs)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with _quiet():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(task_dict.values()), num_fewshot=num_fewshot,
                                          limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False,
                                          random_seed=seed, numpy_random_seed=seed + 1234,
                                          torch_random_seed=seed + 1234, fewshot_random_seed=seed + 1234,
                                          verbosity="ERROR")
    finally:
        model.train(was_training)
    if out is None:
        raise LayerLensError("lm-eval returned no results (a distributed rank other than 0?).")
    n_samples = out.get("n-samples", {})
    results = {task: _metrics(raw, (n_samples.get(task) or {}).get("effective"))
               for task, raw in out.get("results", {}).items()}
    meta = {"lm_eval": harness_version(), "tasks": specs, "task_names": names, "num_fewshot": num_fewshot,
            "limit": limit, "batch_size": batch_size, "bootstrap_iters": bootstrap_iters, "seed": seed,
            "versions": {k: v for k, v in (out.get("versions") or {}).items()},
            "n_shot": dict(out.get("n-shot") or {}),
            "higher_is_better": {k: dict(v) for k, v in (out.get("higher_is_better") or {}).items()}}
    return HarnessResult(results, meta, time.perf_counter() - t0)


__all__ = ["HarnessResult", "harness_version", "load_tasks", "parse_tasks", "resolve_tasks", "run_tasks"]


class HarnessTask:
    """Harness tasks as one sweep evaluation: :meth:`run` takes a forward from
    :func:`layerlens.evaluation.plain_forward` and evaluates the model it drives, as it is at that moment
    (in a sweep: pruned in place). It has no token batches of its own (``batches`` is empty), so the
    sweep's prefix reuse never applies: the harness owns its forward passes."""

    kind = "harness"
    batches: tuple = ()

    def __init__(self, tokenizer: Any, tasks: str | Sequence[str], *, num_fewshot: int | None = None,
                 limit: int | float | None = None, batch_size: int = DEFAULT_BATCH, seed: int = 0):
        self.tokenizer, self.specs = tokenizer, parse_tasks(tasks)
        self.num_fewshot, self.limit, self.batch_size, self.seed = num_fewshot, limit, batch_size, seed
        resolve_tasks(self.specs)  # a missing file or nameless YAML fails before any work

    def identity(self) -> dict[str, Any]:
        """The task names, local task files' contents (hashed), the shots/limit/seed and the harness version."""
        import hashlib

        files = {}
        for spec in self.specs:
            path = Path(spec).expanduser()
            if path.suffix.lower() in YAML_SUFFIXES and path.is_file():
                files[spec] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return {"kind": self.kind, "tasks": list(self.specs), "files": files, "num_fewshot": self.num_fewshot,
                "limit": self.limit, "seed": self.seed, "lm_eval": harness_version()}

    def run(self, forward: Any, progress: Any = None) -> HarnessResult:
        model = getattr(forward, "model", None)
        if model is None:
            raise LayerLensError("Harness tasks need the model itself: run them with plain_forward(model).")
        result = run_tasks(model, self.tokenizer, self.specs, num_fewshot=self.num_fewshot, limit=self.limit,
                           batch_size=self.batch_size, seed=self.seed)
        if progress is not None:
            progress(1, 1, "harness")
        return result


def result_columns(result: HarnessResult) -> dict[str, float]:
    """Flat ``{"task/metric": value}`` of every numeric metric (stderr included) for a sweep row."""
    return {f"{task}/{metric}": float(value) for task, metrics in result.tasks.items()
            for metric, value in metrics.items()
            if metric != "n" and isinstance(value, (int, float)) and not isinstance(value, bool)}


__all__ += ["HarnessTask", "result_columns"]
