"""`layerlens eval`: perplexity and MMLU of a model (optionally pruned by a plan) to DIR/eval.json."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .. import surgery
from ..cli import add_layerwise_args, add_model_args, add_runs_arg, cli_progress, load_from_args
from ..data import load_texts
from ..errors import LayerLensError
from ..evaluation import DEFAULT_MMLU_BATCH, DEFAULT_PPL_BATCH, DEFAULT_SEQ_LEN, mmlu, perplexity
from ..harness import parse_tasks, run_tasks
from ..plans import PrunePlan
from ..questions import load_dev, load_questions
from ..runs import atomic_write_json, default_runs_dir, provenance, stable_key

SWEEP_DEFAULT_MMLU_LIMIT = 2
"""Questions per subject of the bundled set in a sweep when no --mmlu-limit is given (114 questions), so a
point takes seconds on a CPU. `eval` uses the whole default subset (570). The same on every device."""


def add_eval_args(p: argparse.ArgumentParser, *, seq_len: bool = True, mmlu_limit: int | None = None,
                  max_windows: int = 0) -> None:
    """Perplexity and MMLU options shared by ``eval`` and ``sweep`` (same defaults, same numbers)."""
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl-data", default="default",
                   help="'default' (bundled Shakespeare evaluation plays, disjoint from the calibration plays), "
                        "'prose', a .txt/.jsonl/.json/.csv/.parquet file, a hub dataset, or 'none' to skip")
    if seq_len:
        g.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per perplexity window")
        g.add_argument("--text-field", default="text", help="field/column holding the text")
    g.add_argument("--max-windows", type=int, default=max_windows,
                   help="evaluate at most this many windows (0 = all; default: "
                        + ("all" if not max_windows else str(max_windows)) + ")")
    g.add_argument("--ppl-batch-size", type=int, default=DEFAULT_PPL_BATCH, help="windows per forward pass")
    g = p.add_argument_group("MMLU")
    g.add_argument("--mmlu", default="default",
                   help="'default' (bundled subset, 10 questions per subject = 570), 'full' (14,042), a "
                        ".jsonl/.csv/.parquet file, a hub dataset (e.g. cais/mmlu), or 'none' to skip")
    g.add_argument("--mmlu-subjects", "--subjects", dest="mmlu_subjects", default=None,
                   help="comma-separated subjects, e.g. astronomy,virology")
    g.add_argument("--mmlu-limit", "--limit", dest="mmlu_limit", type=int, default=mmlu_limit,
                   help="at most N questions per subject (default: " + (
                       "all" if mmlu_limit is None else f"{mmlu_limit} per subject = {57 * mmlu_limit} of the "
                       "bundled set, so a point takes seconds on a CPU; 10 gives all 570") + ")")
    g.add_argument("--shots", type=int, default=0, help="few-shot examples per question (harness: first k)")
    g.add_argument("--mmlu-dev", default=None,
                   help="where few-shot examples come from: the first N questions of each subject (default: the "
                        "hub dev split; for the bundled set, which has no dev split, its test set, and those "
                        "questions are then not scored)")
    g.add_argument("--mmlu-batch-size", type=int, default=DEFAULT_MMLU_BATCH, help="questions per forward pass")
    g = p.add_argument_group("lm-evaluation-harness tasks")
    g.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task names (hellaswag,arc_easy,...) and/or local task .yaml files, "
                        "run by the harness on the live pruned model (results under `tasks`)")
    g.add_argument("--task-shots", type=int, default=None, help="few-shot examples for --tasks (default: each task's)")
    g.add_argument("--task-limit", type=float, default=None,
                   help="at most N documents per --tasks task (a fraction below 1: that share)")
    g.add_argument("--task-batch-size", type=int, default=8, help="harness batch size for --tasks")


def _off(value: str | None) -> bool:
    return value is None or value.lower() in ("none", "off", "")


def eval_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Texts, questions and dev examples named by the eval args (None where switched off)."""
    texts = None if _off(args.ppl_data) else load_texts(args.ppl_data, role="eval", field=args.text_field)
    questions = dev = None
    if not _off(args.mmlu):
        questions = load_questions(args.mmlu, subjects=args.mmlu_subjects, limit=args.mmlu_limit,
                                   seed=getattr(args, "seed", 0))
        if args.shots > 0:
            dev = load_dev(args.mmlu_dev or args.mmlu, subjects=args.mmlu_subjects)
    tasks = parse_tasks(getattr(args, "tasks", None))
    if texts is None and questions is None and not tasks:
        raise LayerLensError("Both --ppl-data and --mmlu are 'none' and no --tasks; there is nothing to evaluate.")
    return {"texts": texts, "questions": questions, "dev": dev, "tasks": tasks,
            "max_windows": args.max_windows if args.max_windows and args.max_windows > 0 else None}


def task_limit(value: float | None) -> int | float | None:
    """--task-limit: a whole number is a document count, a fraction below 1 a share (the harness's rule)."""
    if value is None:
        return None
    if value <= 0:
        raise LayerLensError(f"--task-limit must be positive (got {value:g}).")
    return int(value) if value >= 1 else value


def fewshot_meta(shots: int, dev: Any, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where few-shot examples came from and how many scored questions they displaced (for ``meta``)."""
    if shots <= 0 or dev is None:
        return None
    return {"shots": shots, "source": getattr(dev, "source", None),
            "rule": f"the first {shots} questions of each subject in the source (lm-eval's first_n sampler); "
                    "a question that is one of its subject's examples is not scored",
            "excluded": (result or {}).get("fewshot_excluded")}


def run(args: argparse.Namespace) -> int:
    inputs = eval_inputs(args)
    loaded = load_from_args(args)
    layerwise = getattr(loaded, "layerwise", False)  # weights over --max-memory, or --layerwise
    model, plan = (None if layerwise else loaded.model), None
    if args.plan:
        plan = PrunePlan.read(args.plan, num_layers=loaded.info.num_layers)
        model = None if layerwise else surgery.apply_plan(model, plan)
    out: dict[str, Any] = {"perplexity": None, "perplexity_details": None, "kl": None, "top1_agreement": None,
                           "mmlu": None,
                           "plan": plan.to_dict() if plan else None}
    t0 = time.perf_counter()
    if layerwise:  # one pass over the layers for both tasks (and the original's, for KL, with a plan)
        from ..layerwise import evaluate_plan

        lw = evaluate_plan(loaded, plan, progress=cli_progress("layer runs"), texts=inputs["texts"],
                           questions=inputs["questions"], dev=inputs["dev"], seq_len=args.seq_len,
                           ppl_batch_size=args.ppl_batch_size, max_windows=inputs["max_windows"],
                           shots=args.shots, mmlu_batch_size=args.mmlu_batch_size, kl=plan is not None)
        if lw["perplexity"] is not None:
            out["perplexity"], out["perplexity_details"] = lw["perplexity"].perplexity, lw["perplexity"].to_dict()
            out["kl"], out["top1_agreement"] = lw["perplexity"].kl, lw["perplexity"].top1_agreement
        if lw["mmlu"] is not None:
            out["mmlu"] = lw["mmlu"].to_dict()
    if not layerwise and inputs["texts"] is not None:
        ppl = perplexity(model, loaded.tokenizer, inputs["texts"], seq_len=args.seq_len,
                         batch_size=args.ppl_batch_size, max_windows=inputs["max_windows"],
                         progress=cli_progress("perplexity"), original=loaded.model if plan else None)
        out["perplexity"], out["perplexity_details"] = ppl.perplexity, ppl.to_dict()
        out["kl"], out["top1_agreement"] = ppl.kl, ppl.top1_agreement
    if not layerwise and inputs["questions"] is not None:
        res = mmlu(model, loaded.tokenizer, inputs["questions"], shots=args.shots, dev=inputs["dev"],
                   batch_size=args.mmlu_batch_size, progress=cli_progress("mmlu"))
        out["mmlu"] = res.to_dict()
    harness = None
    if inputs["tasks"]:
        if layerwise:
            raise LayerLensError("--tasks runs the harness on a model in memory; leave out the layer-wise option.")
        harness = run_tasks(model, loaded.tokenizer, inputs["tasks"], num_fewshot=args.task_shots,
                            limit=task_limit(args.task_limit), batch_size=args.task_batch_size, seed=args.seed)
        out["tasks"] = harness.tasks
    info = loaded.info
    out["meta"] = provenance(
        model=info.model, revision=info.revision, dtype=info.dtype, device=info.device,
        data=inputs["texts"].source if inputs["texts"] is not None else None,
        samples=(out["perplexity_details"] or {}).get("n_windows"), seq_len=args.seq_len, seed=args.seed,
        max_windows=inputs["max_windows"],
        mmlu=inputs["questions"].source if inputs["questions"] is not None else None,
        mmlu_subjects=args.mmlu_subjects, mmlu_n=(out["mmlu"] or {}).get("n"), shots=args.shots,
        fewshot=fewshot_meta(args.shots, inputs["dev"], out["mmlu"]),
        plan=args.plan, model_info=info.to_dict(), seconds=round(time.perf_counter() - t0, 3),
        execution="layerwise" if layerwise else "in_memory", harness=harness.meta if harness is not None else None)
    if layerwise:
        out["meta"]["layerwise"] = loaded.stats.to_dict()
    path = atomic_write_json(Path(args.out) / "eval.json", out)
    runs = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    key = stable_key({k: v for k, v in out["meta"].items() if k not in ("created", "seconds", "git_commit")})
    atomic_write_json(runs / "eval" / f"{key}.json", out)
    if out["perplexity"] is not None:
        d = out["perplexity_details"]
        print(f"perplexity {out['perplexity']:.4f}  ({d['n_windows']} windows x {d['seq_len']} tokens, "
              f"{d['n_tokens']} predicted)")
        if out["kl"] is not None:
            print(f"KL(original || pruned) {out['kl']:.4f} nats/token, top-1 agreement with the original "
                  f"{100 * out['top1_agreement']:.2f}%")
    if out["mmlu"] is not None:
        m = out["mmlu"]
        print(f"MMLU accuracy {100 * m['accuracy']:.2f}% on {m['n']} questions ({m['shots']}-shot), mean "
              f"P(correct letter) {m['mean_prob_correct']:.4f} (chance: 25%)")
    for task, metrics in (out.get("tasks") or {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and not k.endswith("_stderr"))
        print(f"{task}: {shown} (n={metrics.get('n')}, lm-eval {harness.meta['lm_eval']})")
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and MMLU (lm-evaluation-harness template) of a model")
    add_model_args(p)
    add_layerwise_args(p)
    p.add_argument("--plan", default=None, help="evaluate the model pruned by this plan (a plan JSON or a prune output folder)")
    add_eval_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the bundled MMLU subset")
    add_runs_arg(p)
    p.add_argument("--out", required=True, help="output folder for eval.json")
    p.set_defaults(func=run)
