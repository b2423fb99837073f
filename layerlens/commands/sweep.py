"""`layerlens sweep`: perplexity and MMLU against the pruning ratio for several strategies (ShortGPT Fig. 5).

Writes DIR/sweep.csv, DIR/sweep.json (rows + provenance) and the two curves as DIR/perplexity.{html,png}
and DIR/mmlu.{html,png}, drawn by the same builders as the dashboard. Every point is also persisted in
the runs folder, so an interrupted sweep resumes and a repeated one is read back.

With several --model and/or --data (a study, :func:`layerlens.study.study`) every model is swept with every
calibration set: sweep.csv gets ``model`` and ``calibration`` columns first, and the figures are one per entry
(``perplexity-1-<model>-<data>.html`` ...). Each entry's points are those of its single sweep.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..cli import (
    add_data_args,
    add_layerwise_args,
    add_model_args,
    add_runs_arg,
    analyze_from_args,
    capture_config_from_args,
    cli_progress,
    load_from_args,
)
from ..data import calibration_tokens, load_texts
from ..errors import LayerLensError
from ..export import save_figure
from ..heal import HealConfig
from ..plans import get_strategy
from ..plans import strategies as registry_entries
from ..report import LayerReport
from ..runs import atomic_write_json, atomic_write_text, default_runs_dir, stable_key
from ..sweep import DEFAULT_MAX_WINDOWS, DEFAULT_RATIOS, DEFAULT_STRATEGIES, SweepConfig, make_plans, sweep
from .evaluate import SWEEP_DEFAULT_MMLU_LIMIT, add_eval_args, eval_inputs, task_limit


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise LayerLensError(f"--ratios must be comma-separated numbers like 0,0.1,0.2 (got '{text}').") from exc
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise LayerLensError(f"--ratios must be fractions in [0, 1), e.g. 0,0.1,0.2 (got '{text}').")
    return values


def _strategies(text: str) -> list[str]:
    allowed = _sweepable()
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in allowed]
    if not names or unknown:
        raise LayerLensError(f"Unknown strategy {', '.join(unknown) or text!r}; choose from "
                             f"{', '.join(allowed)}.")
    return names


def _sweepable() -> tuple[str, ...]:
    """Strategies a ratio alone sizes (so they have a curve against the pruning ratio)."""
    return tuple(e.name for e in registry_entries() if e.sweepable)


def _heal_config(args: argparse.Namespace) -> HealConfig | None:
    """With --heal-seconds: every pruned point is healed for that long (LoRA, --heal-loss), a healed row each."""
    if args.heal_seconds is None:
        return None
    config = HealConfig(loss=args.heal_loss, seconds=args.heal_seconds, seq_len=args.seq_len, seed=args.seed)
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    from ..plots_curves import sweep_figure  # heavy: pandas (~0.3 s), only for a sweep, not at CLI start

    strategies, ratios = _strategies(args.strategies), _floats(args.ratios)
    models, datas = args.model or ["default"], args.data or ["default"]
    if len(models) > 1 or len(datas) > 1:  # a study: every model with every calibration set
        return _run_study(args, list(dict.fromkeys(models)), list(dict.fromkeys(datas)), strategies, ratios)
    args.model, args.data = models[0], datas[0]  # one of each: the single sweep, as before
    inputs = eval_inputs(args)
    loaded = load_from_args(args)
    out = Path(args.out)
    report = None
    if args.report:
        report = LayerReport.read(args.report, num_layers=loaded.info.num_layers,
                                  model_type=loaded.info.model_type)
    elif any(get_strategy(s).uses_report() for s in strategies):
        report = analyze_from_args(args, loaded)
        report.save(out / "report.json")
    runs = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    info = loaded.info
    config = _sweep_config(args, strategies, ratios, inputs)
    if any(get_strategy(s).uses_data() for s in strategies):  # e.g. the oracle: forward passes on --data
        tokens = calibration_tokens(loaded.tokenizer, load_texts(args.data, role="calibration", field=args.text_field),
                                    args.samples, args.seq_len)
        probe = {"model": loaded.model, "tokenizer": loaded.tokenizer, "token_lists": tokens, "runs_dir": runs}
        config = replace(config, plans=tuple(make_plans(report, strategies, ratios, num_layers=info.num_layers,
                                                        seed=args.seed, probe=probe)))
    heal_texts = load_texts(args.data, role="calibration", field=args.text_field) if config.heal else None
    if args.ray is not None and getattr(loaded, "layerwise", False):
        raise LayerLensError("--ray needs every worker to hold the whole model; it cannot run layer by layer "
                             "(drop --layerwise/--max-memory, or --ray).")
    if getattr(loaded, "layerwise", False):  # weights over --max-memory: every point in one pass over the layers
        from ..layerwise import sweep as layerwise_sweep

        result = layerwise_sweep(loaded, report, config, ppl_texts=inputs["texts"], questions=inputs["questions"],
                                 dev=inputs["dev"], progress=cli_progress("sweep (layer runs)"), runs_dir=runs,
                                 model_id={"model": info.model, "revision": info.revision})
    else:
        executor = _executor(args, loaded)  # --ray: the points computed by Ray workers, persisted here
        try:
            result = sweep(loaded.model, loaded.tokenizer, report, config, ppl_texts=inputs["texts"],
                           questions=inputs["questions"], dev=inputs["dev"], runs_dir=runs,
                           model_id={"model": info.model, "revision": info.revision}, progress=cli_progress("sweep"),
                           heal_texts=heal_texts, executor=executor)
        finally:
            if executor is not None:
                executor.close()
        result.meta["execution"] = "in_memory"
    frame, meta = result.frame, dict(result.meta)
    meta.update(model=info.model, revision=info.revision, dtype=info.dtype, device=info.device,
                data=inputs["texts"].source if inputs["texts"] is not None else None,
                samples=args.samples if report is not None and not args.report else None,
                calibration=args.data if report is not None and not args.report else args.report,
                mmlu=inputs["questions"].source if inputs["questions"] is not None else None,
                strategies=strategies, ratios=ratios)
    csv = frame.to_csv(index=False)
    atomic_write_text(out / "sweep.csv", csv)
    atomic_write_json(out / "sweep.json", {"rows": frame.to_dict("records"), "meta": meta})
    key = stable_key({k: v for k, v in meta.items() if k not in ("created", "git_commit")})
    atomic_write_text(runs / "sweep" / f"{key}.csv", csv)
    atomic_write_json(runs / "sweep" / f"{key}.json", {"rows": frame.to_dict("records"), "meta": meta})
    figures = []
    name = info.model if info.model != "default" else "SmolLM2-135M (bundled)"
    if inputs["texts"] is not None:
        figures += save_figure(sweep_figure(frame, "perplexity", title=f"Perplexity vs. pruning ratio: {name}"),
                               out / "perplexity")
        figures += save_figure(sweep_figure(frame, "kl", title=f"KL to the original vs. pruning ratio: {name}"),
                               out / "kl")
    if inputs["questions"] is not None:
        figures += save_figure(sweep_figure(frame, "mmlu_accuracy", title=f"MMLU vs. pruning ratio: {name}"),
                               out / "mmlu")
    cols = [c for c in ("strategy", "ratio", "n_removed", "healed", "perplexity", "kl", "top1_agreement",
                        "mmlu_accuracy", "mmlu_prob_correct",
                        "seconds", "cached") if c in frame]
    cols += [c for c in frame.columns if "/" in c and not c.endswith("_stderr")]  # harness task/metric columns
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{int(frame.cached.sum())} of {len(frame)} points read back from {runs}; wrote {out / 'sweep.csv'}"
          + "".join(f", {p.name}" for p in figures))
    if "error" in frame and frame["error"].astype(bool).any():
        print(f"error: {int(frame['error'].astype(bool).sum())} point(s) failed on every attempt (the error column "
              "of sweep.csv says why); re-run the same command to compute them.", file=sys.stderr)
        return 1
    return 0


def _sweep_config(args: argparse.Namespace, strategies: list[str], ratios: list[float], inputs: dict) -> SweepConfig:
    return SweepConfig(strategies=strategies, ratios=ratios, seq_len=args.seq_len,
                       max_windows=inputs["max_windows"], ppl_batch_size=args.ppl_batch_size,
                       mmlu_batch_size=args.mmlu_batch_size, shots=args.shots, reuse=not args.no_reuse,
                       cache_bytes=int(args.cache_gb * 2**30), seed=args.seed, heal=_heal_config(args),
                       tasks=tuple(inputs["tasks"]), task_shots=args.task_shots,
                       task_limit=task_limit(args.task_limit), task_batch_size=args.task_batch_size)


def _slug(text: str) -> str:
    name = Path(text).stem or text
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)[:40] or "x"


def _entry_bars() -> Any:
    """A progress bar per study entry (the study's labels start with ``[i/n] model: ``)."""
    bars: dict[str, Any] = {}

    def progress(done: int, total: int, label: str = "") -> None:
        head, _, message = label.partition(": ")
        if head not in bars:
            bars[head] = cli_progress(f"sweep {head}")
        bars[head](done, total, message)

    return progress


def _run_study(args: argparse.Namespace, models: list[str], datas: list[str], strategies: list[str],
               ratios: list[float]) -> int:
    """Several --model and/or --data: one study (every model with every calibration set), one sweep.csv."""
    from ..plots_curves import sweep_figure  # heavy: pandas
    from ..study import StudyEntry, study

    if args.report:
        raise LayerLensError("--report belongs to one model and calibration set; a study with several --model or "
                             "--data analyses each itself (drop --report, or give one --model and one --data).")
    if args.layerwise or args.max_memory:
        raise LayerLensError("A study with several --model or --data runs every model whole; drop --layerwise/"
                             "--max-memory, or sweep one model at a time.")
    inputs = eval_inputs(args)
    out = Path(args.out)
    runs = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    entries = [StudyEntry(m, d, args.text_field) for m in models for d in datas]
    config = _sweep_config(args, strategies, ratios, inputs)
    executor = None
    if args.ray is not None:
        from ..distributed import executor_for  # only with --ray

        # no model yet: the study names each model to the workers (RayExecutor.use) before its sweep
        executor = executor_for(args.ray, None, workers=args.ray_workers)
    try:
        result = study(entries, config, ppl_texts=inputs["texts"], questions=inputs["questions"], dev=inputs["dev"],
                       runs_dir=runs, capture=capture_config_from_args(args), revision=args.revision,
                       dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                       executor=executor, progress=_entry_bars())
    finally:
        if executor is not None:
            executor.close()
    frame = result.frame
    meta = dict(result.meta, strategies=strategies, ratios=ratios, samples=args.samples,
                data=inputs["texts"].source if inputs["texts"] is not None else None,
                mmlu=inputs["questions"].source if inputs["questions"] is not None else None)
    csv = frame.to_csv(index=False)
    atomic_write_text(out / "sweep.csv", csv)
    atomic_write_json(out / "sweep.json", {"rows": frame.to_dict("records"), "meta": meta})
    key = stable_key({k: v for k, v in meta.items() if k != "entries"} | {
        "points": [{k: v for k, v in m.items() if k not in ("created", "git_commit")} for m in meta["entries"]]})
    atomic_write_text(runs / "sweep" / f"{key}.csv", csv)
    atomic_write_json(runs / "sweep" / f"{key}.json", {"rows": frame.to_dict("records"), "meta": meta})
    figures = []
    metrics = ([("perplexity", "Perplexity"), ("kl", "KL to the original")] if inputs["texts"] is not None else []) \
        + ([("mmlu_accuracy", "MMLU")] if inputs["questions"] is not None else [])
    for i, entry in enumerate(entries, 1):
        part = frame[(frame.model == entry.model) & (frame.calibration == entry.data)]
        name = entry.model if entry.model != "default" else "SmolLM2-135M (bundled)"
        for metric, head in metrics:
            stem = f"{metric.split('_')[0]}-{i}-{_slug(entry.model)}-{_slug(entry.data)}"
            figures += save_figure(sweep_figure(part, metric, title=f"{head} vs. pruning ratio: {name}, "
                                                                    f"calibration {entry.data}"), out / stem)
    cols = [c for c in ("model", "calibration", "strategy", "ratio", "n_removed", "healed", "perplexity", "kl",
                        "top1_agreement", "mmlu_accuracy", "seconds", "cached") if c in frame]
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{int(frame.cached.sum())} of {len(frame)} points read back from {runs}; wrote {out / 'sweep.csv'} and "
          f"{len(figures)} figure files ({len(entries)} models x calibration sets)")
    if "error" in frame and frame["error"].fillna("").astype(bool).any():
        print(f"error: {int(frame['error'].fillna('').astype(bool).sum())} point(s) failed on every attempt (the "
              "error column of sweep.csv says why); re-run the same command to compute them.", file=sys.stderr)
        return 1
    return 0


def _executor(args: argparse.Namespace, loaded: Any) -> Any:
    """With --ray: a Ray executor (a local Ray, or the cluster at the address) on which every worker loads
    the same model; without it None (this process)."""
    if args.ray is None:
        return None
    from ..distributed import ModelSpec, executor_for  # only with --ray

    return executor_for(args.ray, ModelSpec.of(loaded.info, trust_remote_code=args.trust_remote_code),
                        workers=args.ray_workers)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="perplexity and MMLU against the pruning ratio, one curve per strategy")
    add_model_args(p, repeat=True)  # several --model / --data: a study (every model with every calibration set)
    add_layerwise_args(p)
    add_data_args(p, repeat=True)  # calibration data for the report (its --seq-len is also the perplexity window)
    p.add_argument("--report", default=None, help="use this report.json instead of analysing the model")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help=f"comma-separated: {', '.join(_sweepable())}")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                   help="comma-separated fractions of layers to remove, e.g. 0,0.1,0.2,0.3,0.4")
    add_eval_args(p, seq_len=False, mmlu_limit=SWEEP_DEFAULT_MMLU_LIMIT, max_windows=DEFAULT_MAX_WINDOWS)
    p.add_argument("--no-reuse", action="store_true",
                   help="evaluate every pruned model from scratch (same numbers, slower; for benchmarks)")
    p.add_argument("--cache-gb", type=float, default=1.0,
                   help="memory for reused hidden states (CPU), in GiB; 0 disables reuse")
    p.add_argument("--heal-seconds", type=float, default=None,
                   help="also heal every pruned point for this many seconds (LoRA on --data, held-out perplexity "
                        "on --ppl-data) and add a healed row after each pruned row")
    p.add_argument("--heal-loss", choices=["lm", "kd", "both"], default="kd",
                   help="healing loss: next-token, distillation from the original, or both")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="compute the points on Ray: alone, a local Ray sized to this machine; with an ADDRESS "
                        "(ray://head:10001, or auto on a node of the cluster), that cluster. Every worker loads "
                        "--model itself, so it must reach that path. Needs pip install 'layerlens[ray]'")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="Ray actors to start, each holding the model (default: one per GPU, else one per CPU)")
    add_runs_arg(p)
    p.add_argument("--out", required=True, help="output folder for sweep.csv and the figures")
    p.set_defaults(func=run)
