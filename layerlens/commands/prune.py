"""`layerlens prune` (save a pruned model) and `layerlens plan` (print the plan only).

    layerlens prune --model M (--remove 3,5,7 | --merge 4-6 [--merge 9-10] | --plan FILE
                               | --strategy S (--ratio R | --n N)
                               | --drop-attn 3,5-7 [--drop-mlp 9] (alone or with --remove/--merge/--strategy)
                               | --strategy slm (--threshold T | --ratio R) [--criterion cosine|cka|output]
                               | --strategy laco --threshold T [--laco-m M] [--laco-interval I])
                    [--formula keep_top|task_vector|mean] [--report report.json] [data args] --out DIR

The output folder holds a model plain ``transformers`` loads, its tokenizer, and ``layerlens_plan.json``
(the plan, the report it came from, provenance). It is written in a temp folder and renamed, so a
failure leaves nothing half-written. Indices are 0-based.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import surgery
from ..cli import (
    add_data_args,
    add_layerwise_args,
    add_model_args,
    add_runs_arg,
    analyze_from_args,
    cli_progress,
    load_from_args,
    print_json,
)
from ..data import calibration_tokens, check_seq_len, load_texts
from ..errors import LayerLensError, PlanError
from ..export import save_pruned
from ..plans import (
    DEFAULT_MERGE_FORMULA,
    MERGE_FORMULAS,
    PLAN_FILE,
    PrunePlan,
    get_strategy,
    make_plan,
    parse_layers,
    plan_summary,
    strategies,
    strategy_names,
)
from ..plans.registry import RATIO, THRESHOLD
from ..report import LayerReport
from ..runs import atomic_write_json, default_runs_dir, provenance, stable_key
from ..streamline import apply_replacement, replacement_plan, train_replacement

# CLI destination of each strategy parameter whose flag is not simply --<name>.
PARAM_DEST = {"m": "laco_m", "interval": "laco_interval"}
# Parameters every strategy gets through make_plan's own arguments, not as options.
SIZE_PARAMS = ("ratio", "n", "threshold", "seed")

# -- argument parsing (all checks happen before the model is loaded) -----------------------------------------
def check_plan_args(args: argparse.Namespace) -> None:
    """Refuse inconsistent or out-of-range arguments with one sentence, before any work."""
    chosen = [
        f
        for f, v in (
            ("--remove", args.remove),
            ("--merge", args.merge),
            ("--plan", args.plan_file),
            ("--strategy", args.strategy),
        )
        if v
    ]
    drops = bool(getattr(args, "drop_attn", None) or getattr(args, "drop_mlp", None))
    if drops and args.plan_file:
        raise PlanError("--drop-attn/--drop-mlp cannot be combined with --plan; put drop_attn/drop_mlp in the "
                        "plan file instead.")
    if len(chosen) != 1 and not (drops and not chosen):
        raise PlanError(
            "Choose exactly one of --remove, --merge, --plan or --strategy (or only --drop-attn/--drop-mlp) "
            f"(got {', '.join(chosen) or 'none'})."
        )
    if args.ratio is not None and not RATIO.in_range(args.ratio):
        raise PlanError(
            f"--ratio {args.ratio} is outside {RATIO.range_text()}; give e.g. 0.25 to remove a quarter of the layers."
        )
    if args.threshold is not None and not THRESHOLD.in_range(args.threshold):
        raise PlanError(f"--threshold {args.threshold} is outside {THRESHOLD.range_text()}; give e.g. 0.9.")
    if args.strategy is None:
        if args.ratio is not None or args.n is not None or args.threshold is not None:
            raise PlanError("--ratio, --n and --threshold go with --strategy.")
        return
    entry = get_strategy(args.strategy)
    s = entry.name
    if entry.size == "threshold_or_ratio":
        if (args.threshold is None) == (args.ratio is None):
            raise PlanError(f"--strategy {s} needs exactly one of --threshold or --ratio (target ratio).")
        if args.criterion in entry.forward_criteria and args.threshold is None:
            raise PlanError(f"--criterion {args.criterion} needs --threshold (a target ratio needs a report "
                            "criterion).")
    elif entry.size == "threshold":
        if args.threshold is None or args.ratio is not None or args.n is not None:
            raise PlanError(f"--strategy {s} needs --threshold (and no --ratio or --n).")
    else:
        if args.threshold is not None:
            raise PlanError(f"--strategy {s} takes --ratio or --n, not --threshold.")
        if (args.ratio is None) == (args.n is None):
            raise PlanError(f"--strategy {s} needs exactly one of --ratio or --n.")
    if getattr(args, "replace", "none") != "none" and not entry.contiguous:
        spans = strategy_names(contiguous=True)
        raise PlanError(
            f"--replace trains one layer for a contiguous span; use it with --strategy {spans[-1]}"
            f"{''.join(f' (or {o})' for o in spans[:-1])}."
        )


def _strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy's own parameters (criterion, formula, keep_last, laco's m, ...) from their flags."""
    entry = get_strategy(args.strategy)
    dests = {p.name: PARAM_DEST.get(p.name, p.name) for p in entry.params if p.name not in SIZE_PARAMS}
    return {name: getattr(args, dest) for name, dest in dests.items() if hasattr(args, dest)}


def _calibration(args: argparse.Namespace, loaded: Any) -> tuple[list[list[int]], dict[str, Any]]:
    """The calibration token lists the data args give, and their provenance (what was actually used)."""
    check_seq_len(args.seq_len, loaded.info.max_positions)
    texts = load_texts(args.data, role="calibration", field=args.text_field)
    tokens = calibration_tokens(loaded.tokenizer, texts, args.samples, args.seq_len)
    used = {
        "data": texts.source,
        "data_description": texts.description,
        "samples": len(tokens),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    return tokens, used


def _load_report(args: argparse.Namespace, loaded: Any):
    if args.report:
        return LayerReport.read(args.report, num_layers=loaded.info.num_layers,
                                model_type=loaded.info.model_type)
    return analyze_from_args(args, loaded)


def build_plan(args: argparse.Namespace, loaded: Any) -> tuple[PrunePlan, Any, dict[str, Any] | None]:
    """The plan the arguments describe, the report it came from (or None), and the calibration data it used.

    The data is a provenance dict (``data``, ``samples``, ``seq_len``, ...) of what was actually used: the
    report's own settings when the plan came from a report, the data args when forward passes probed the
    model, and None when no data was used (explicit layers, a plan file, reverse/sequential/random).
    """
    plan, report, data = _build_plan(args, loaded)
    subs = {k: parse_layers(getattr(args, k, None) or "", plan.num_layers) for k in ("drop_attn", "drop_mlp")}
    if any(subs.values()):
        plan = dataclasses.replace(plan, drop_attn=tuple(sorted(set(plan.drop_attn) | set(subs["drop_attn"]))),
                                   drop_mlp=tuple(sorted(set(plan.drop_mlp) | set(subs["drop_mlp"]))))
    return plan, report, data


def _build_plan(args: argparse.Namespace, loaded: Any) -> tuple[PrunePlan, Any, dict[str, Any] | None]:
    L = loaded.info.num_layers
    if not (args.plan_file or args.remove or args.merge or args.strategy):  # only --drop-attn/--drop-mlp
        return make_plan("manual", None, layers=(), num_layers=L), None, None
    if args.plan_file:
        plan = PrunePlan.read(args.plan_file, num_layers=L)
        return plan, None, None
    if args.remove:
        return make_plan("manual", None, layers=parse_layers(args.remove), num_layers=L), None, None
    if args.merge:
        groups = [parse_layers(g) for g in args.merge]
        return make_plan("manual", None, merge=groups, formula=args.formula, num_layers=L), None, None
    s = args.strategy
    options = _strategy_options(args)
    entry = get_strategy(s)
    if entry.uses_data(options.get("criterion")):  # forward passes on the calibration data
        if getattr(loaded, "layerwise", False):
            raise PlanError(f"Strategy '{s}' probes the model with forward passes, which needs it in memory; "
                            "in layer-wise mode use a report-based strategy (or raise `max_memory`).")
        tokens, data = _calibration(args, loaded)
        size = {"ratio": args.ratio, "n": args.n} if entry.size == "count" else {}  # e.g. the greedy oracle
        plan = make_plan(s, None, threshold=args.threshold, model=loaded.model, tokenizer=loaded.tokenizer,
                         token_lists=tokens, batch_size=args.batch_size, progress=cli_progress(s), **size, **options)
        return plan, None, data
    report = _load_report(args, loaded) if entry.uses_report(options.get("criterion")) else None
    plan = make_plan(s, report, ratio=args.ratio, n=args.n, threshold=args.threshold, seed=args.seed,
                     num_layers=L, **options)
    return plan, report, report.data_provenance() if report is not None else None


def format_plan(plan: PrunePlan) -> str:
    lines = [plan.describe()]
    marks = {"kept": ".", "removed": "x", "merged": "m"}
    rows = plan_summary(plan)
    strip = "".join(marks[r["status"]] for r in rows)
    lines.append(f"layers 0..{plan.num_layers - 1}: {strip}   (. kept, x removed, m merged)")
    if plan.has_sublayers:
        for kind in ("attn", "mlp"):
            sub = "".join("-" if r[kind] == "dropped" else marks[r[kind]] for r in rows)
            lines.append(f"{kind:>4} 0..{plan.num_layers - 1}: {sub}   (- sublayer dropped)")
    if plan.params:
        shown = {k: v for k, v in plan.params.items() if k != "trace"}
        lines.append("params: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


# -- commands ------------------------------------------------------------------------------------------
def _check_out(out: Path, loaded: Any) -> None:
    if out.exists() and not out.is_dir():
        raise LayerLensError(f"--out '{out}' is a file; give a folder for the pruned model.")
    src = Path(loaded.info.source_path)
    if src.exists() and out.exists() and out.resolve() == src.resolve():
        raise LayerLensError(
            f"--out '{out}' is the model's own folder; write the pruned model somewhere else."
        )
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN_FILE).exists():
        raise LayerLensError(
            f"--out '{out}' exists and is not a LayerLens prune output; choose a new folder or delete it."
        )


def run_plan(args: argparse.Namespace) -> int:
    check_plan_args(args)
    loaded = load_from_args(args)
    plan, _, _ = build_plan(args, loaded)
    if args.json:
        print_json({**plan.to_dict(), "summary": plan_summary(plan)})
    else:
        print(format_plan(plan))
    return 0


def load_and_plan(args: argparse.Namespace, what: str,
                  check: Callable[[], None] | None = None) -> tuple[Path, Any, PrunePlan, Any, dict[str, Any] | None]:
    """The output folder (checked), the loaded model and the plan with its report and data, for a command
    that saves ``what`` (e.g. "pruned model"); ``check`` runs extra argument checks before any loading."""
    check_plan_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LayerLensError(f"--out '{out}' is a file; give a folder for the {what}.")
    if check is not None:
        check()
    loaded = load_from_args(args)
    _check_out(out, loaded)
    return (out, loaded, *build_plan(args, loaded))


def run_prune(args: argparse.Namespace) -> int:
    out, loaded, plan, report, data = load_and_plan(args, "pruned model")
    replacement = None
    replacement_data = None
    layerwise = getattr(loaded, "layerwise", False)  # weights over --max-memory: written tensor by tensor
    if layerwise and args.replace != "none":
        raise PlanError("Training a replacement layer needs the model in memory; drop --replace in layer-wise "
                        "mode (or raise `max_memory`).")
    if layerwise:
        model = None
    elif args.replace != "none":
        tokens, replacement_data = _calibration(args, loaded)
        replacement_data["seed"] = args.seed
        replacement = train_replacement(
            loaded.model,
            loaded.tokenizer,
            tokens,
            plan,
            kind=args.replace,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            time_budget=args.train_seconds,
            seed=args.seed,
            progress=cli_progress("streamline"),
        )
        model = apply_replacement(loaded.model, plan, replacement)
        plan = replacement_plan(plan, replacement)
    else:
        model = surgery.apply_plan(loaded.model, plan)
    # Provenance records only what was used: no calibration fields for a plan made without data.
    meta = provenance(
        model=loaded.info.model,
        revision=loaded.info.revision,
        model_type=loaded.info.model_type,
        dtype=loaded.info.dtype,
        device=loaded.info.device,
        num_layers=loaded.info.num_layers,
        num_layers_after=plan.num_layers_after,
        plan_file=str(args.plan_file) if args.plan_file else None,
        report_file=str(args.report) if args.report and report is not None else None,
        **(data if data is not None else {"data": None}),
        execution="layerwise" if layerwise else "in_memory",
    )
    if replacement_data is not None:
        meta["replacement_data"] = replacement_data
    if layerwise:
        from ..layerwise_export import export_pruned

        record = export_pruned(loaded, plan, out, report=report, meta=meta, dtype=save_dtype(args, loaded))
    else:
        record = save_pruned(model, loaded.tokenizer, plan, out, report=report, meta=meta,
                             dtype=save_dtype(args, loaded))
    runs = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    key = stable_key({"model": loaded.info.model, "revision": loaded.info.revision, "plan": plan.to_dict()})
    atomic_write_json(runs / "prune" / f"{key}.json", {**record, "out": str(out)})
    print(format_plan(plan))
    if replacement is not None:
        print(
            f"replacement ({replacement.kind}) for layers "
            f"{replacement.start}..{replacement.start + replacement.n - 1}:"
            f" MSE {replacement.mse_final:.4g} (plain removal {replacement.mse_removed:.4g}), "
            f"{replacement.steps} steps in {replacement.seconds} s ({replacement.stopped})"
        )
    print(f"wrote {out} ({plan.num_layers_after} layers)")
    return 0


SAVE_DTYPES = ("checkpoint", "loaded", "float32", "bfloat16", "float16")


def add_save_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="checkpoint",
                   help="dtype of the written weights: checkpoint (default: the source's own, so a bf16 model "
                        "analysed in float32 on a CPU is saved in bf16 again), loaded (--dtype), or a dtype")


def save_dtype(args: argparse.Namespace, loaded: Any) -> str | None:
    """The dtype name ``--save-dtype`` asks for (None: write each tensor as it is)."""
    choice = getattr(args, "save_dtype", "checkpoint")
    if choice == "checkpoint":
        if getattr(loaded, "layerwise", False):
            return None  # layer by layer the checkpoint's own tensors are copied
        return getattr(loaded, "checkpoint_dtype", None)
    if choice == "loaded":
        return loaded.info.dtype
    return choice


def add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan (0-based layer indices)")
    g.add_argument("--remove", default=None, help="layers to remove, e.g. 3,5,7 or 4-6 (inclusive)")
    g.add_argument(
        "--merge",
        action="append",
        default=None,
        help="a group of consecutive layers to merge into one, e.g. 4-6; repeat for more groups",
    )
    g.add_argument(
        "--plan",
        dest="plan_file",
        default=None,
        help="a plan JSON (from `layerlens plan --json` or a layerlens_plan.json)",
    )
    g.add_argument("--drop-attn", default=None,
                   help="attention sublayers to drop (the layer stays, its attention adds nothing and keeps no "
                        "KV cache), e.g. 3,5-7; alone or with --remove/--merge/--strategy")
    g.add_argument("--drop-mlp", default=None, help="MLP sublayers to drop, e.g. 9 (as --drop-attn)")
    g.add_argument("--strategy", choices=[e.name for e in strategies() if e.size != "layers"], default=None,
                   help="; ".join(f"{e.name}: {e.summary}" for e in strategies() if e.size != "layers"))
    g.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="fraction of layers to remove, in [0, 1): k = round(ratio * L); for slm a target ratio",
    )
    g.add_argument("--n", type=int, default=None, help="number of layers to remove (instead of --ratio)")
    g.add_argument(
        "--threshold", type=float, default=None, help="similarity threshold in [-1, 1] (slm, laco)"
    )
    criterion = get_strategy("slm").param("criterion")
    g.add_argument(
        "--criterion",
        choices=criterion.choices,
        default=criterion.default,
        help=f"slm similarity (default {criterion.default}): cka/cosine from the report (instant) or output "
             "(forward passes); on the default model only cosine windows stayed usable without healing",
    )
    g.add_argument(
        "--formula",
        choices=MERGE_FORMULAS,
        default=DEFAULT_MERGE_FORMULA,
        help=f"merge formula (default {DEFAULT_MERGE_FORMULA}): keep_top makes each window its top layer (what "
             "the published SLM/LaCo code computes); task_vector is the papers' formula and degrades windows of "
             "three or more layers; mean averages the window",
    )
    g.add_argument(
        "--keep-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="slm: never merge the last layer (default on, as the reference code)",
    )
    g.add_argument("--laco-m", type=int, default=3, help="laco: layers merged into each base layer")
    g.add_argument("--laco-interval", type=int, default=1, help="laco: step down after a merge")
    g.add_argument(
        "--report",
        default=None,
        help="reuse a report.json from `layerlens analyze` instead of analysing again",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove or merge layers and save a model plain transformers loads")
    add_model_args(p)
    add_layerwise_args(p)
    add_data_args(p)
    add_runs_arg(p)
    add_plan_args(p)
    g = p.add_argument_group("LLM-Streamline replacement (with --strategy streamline)")
    g.add_argument(
        "--replace",
        choices=["none", "ffn", "layer"],
        default="none",
        help="train one layer to replace the span: ffn (an MLP, as a layer with silent attention) "
        "or layer (a full decoder layer); both initialised from the span's first layer",
    )
    g.add_argument("--train-seconds", type=float, default=300.0, help="time budget for the replacement")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--out", required=True, help="output folder for the pruned model")
    add_save_dtype_arg(p)
    p.set_defaults(func=run_prune)

    q = sub.add_parser("plan", help="print the pruning plan a strategy gives, without saving a model")
    add_model_args(q)
    add_data_args(q)
    add_plan_args(q)
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.set_defaults(func=run_plan, replace="none")
