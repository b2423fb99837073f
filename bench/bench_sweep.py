"""Benchmark 3 -- sweep: a BI sweep over 9 ratios (perplexity + MMLU subset) vs evaluating each pruned
model from scratch, measured two ways in one run:

* **in process** (the strict comparison): ``layerlens.sweep.sweep`` vs ``apply_plan`` + ``perplexity`` +
  ``mmlu`` per ratio on the already loaded model: only the evaluation work differs;
* **CLI** (the issue's wording: "vs evaluating each pruned model from scratch with ``layerlens eval``"):
  one ``layerlens sweep`` process vs one ``layerlens eval --plan`` process per ratio (each loads the model
  and the data again; ``eval --plan`` prunes in memory, cheaper than ``layerlens prune`` + save + eval).

All paths get the same report (a small analysis, not timed), the same plans, texts, questions, sequence
length, windows and batch sizes. The sweep runs with no runs folder (nothing persisted, nothing read
back: a fresh temporary runs folder each time, whose point files give the per-question results), so
every point is computed. With --repeats > 1 the two paths alternate (order rotated).

Checks: every perplexity, MMLU accuracy and mean probability of the correct answer equal within 1e-6
relative (max diff printed), and the per-question MMLU choices identical, in process; the CLI outputs
(sweep.csv vs each eval.json) equal as well. Target: scratch / sweep >= 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4",
                   help="comma-separated BI ratios (default: 9 ratios)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=8, help="perplexity windows (max_windows)")
    p.add_argument("--mmlu-per-subject", type=int, default=1, help="questions per subject (57 subjects)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--samples", type=int, default=8, help="analysis samples for the BI report (not timed)")
    p.add_argument("--no-cli", action="store_true", help="skip the CLI comparison (layerlens sweep vs eval)")
    args = p.parse_args()
    if args.quick:
        args.ratios, args.seq_len, args.windows, args.samples = "0,0.1,0.2", 64, 2, 2
    common.setup_torch(args)

    from layerlens.data import load_texts
    from layerlens.evaluation import mmlu, perplexity
    from layerlens.metrics import CaptureConfig, analyze
    from layerlens.plans import make_plan
    from layerlens.questions import load_questions
    from layerlens.surgery import apply_plan
    from layerlens.sweep import SweepConfig, sweep

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    ratios = [float(x) for x in args.ratios.split(",")]
    report = analyze(model, tok, load_texts("default", role="calibration"),
                     CaptureConfig(samples=args.samples, seq_len=128, batch_size=8))
    ppl_texts = load_texts("default", role="eval")
    subjects = None
    if args.quick:
        subjects = ",".join(list(dict.fromkeys(q.subject for q in load_questions("default", limit=1).questions))[:8])
    questions = load_questions("default", subjects=subjects, limit=args.mmlu_per_subject)
    n_q = len(getattr(questions, "questions", questions))
    L = report.num_layers
    plans = [make_plan("bi", report, ratio=r, num_layers=L) for r in ratios]
    for r, plan in zip(ratios, plans, strict=True):
        print(f"ratio {r:.2f}: {plan.describe()}")
    print(f"{n_q} MMLU questions, perplexity {args.windows} windows x {args.seq_len}; "
          f"load {machine['loadavg_start']}")

    def run_sweep():
        config = SweepConfig(strategies=("bi",), ratios=ratios, seq_len=args.seq_len, max_windows=args.windows)
        with tempfile.TemporaryDirectory(prefix="bench-sweep-") as runs:
            result = sweep(model, tok, report, config, ppl_texts=ppl_texts, questions=questions, runs_dir=runs)
            points = [json.loads(f.read_text()) for f in sorted(Path(runs).rglob("points/*.json"))]
        mmlu_points = {tuple(pt["plan"]["removed_layers"]): pt["result"] for pt in points if pt["kind"] == "mmlu"}
        return result.frame, result.stats, mmlu_points

    def run_scratch():
        out = []
        for plan in plans:
            t = time.perf_counter()
            pruned_model = apply_plan(model, plan)
            ppl = perplexity(pruned_model, tok, ppl_texts, seq_len=args.seq_len, max_windows=args.windows)
            mm = mmlu(pruned_model, tok, questions)
            out.append({"perplexity": ppl.perplexity, "mmlu_accuracy": mm.accuracy,
                        "mmlu_prob_correct": mm.mean_prob_correct, "choices": mm.choices,
                        "loglikelihoods": mm.loglikelihoods,
                        "seconds": time.perf_counter() - t})
            del pruned_model
        return out

    variants = {"sweep": run_sweep, "scratch": run_scratch}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict = {}
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            dt, out = common.timed(variants[name], device)
            times[name].append(dt)
            outputs[name] = out
            print(f"  round {r + 1}/{args.repeats} {name}: {dt:.1f} s")
    frame, stats, mmlu_points = outputs["sweep"]
    scratch = outputs["scratch"]

    # Equality: every number, every ratio.
    max_rel = {"perplexity": 0.0, "mmlu_accuracy": 0.0, "mmlu_prob_correct": 0.0, "mmlu_loglikelihood": 0.0}
    rows = []
    choices_equal = True
    n_choices = 0
    for i, (r, plan) in enumerate(zip(ratios, plans, strict=True)):
        row = frame.iloc[i]
        assert abs(float(row["ratio"]) - r) < 1e-12
        assert row["removed_layers"] == ",".join(str(x) for x in plan.removed_layers)
        s = scratch[i]
        point = mmlu_points[tuple(plan.removed_layers)]
        choices_equal &= tuple(point["choices"]) == tuple(s["choices"])
        n_choices += len(s["choices"])
        for ll_a, ll_b in zip(point["loglikelihoods"], s["loglikelihoods"], strict=True):
            for a, b in zip(ll_a, ll_b, strict=True):
                max_rel["mmlu_loglikelihood"] = max(max_rel["mmlu_loglikelihood"], abs(a - b) / max(abs(b), 1e-300))
        for k in ("perplexity", "mmlu_accuracy", "mmlu_prob_correct"):
            a, b = float(row[k]), float(s[k])
            max_rel[k] = max(max_rel[k], abs(a - b) / max(abs(b), 1e-300))
        rows.append({"ratio": plan.ratio, "removed": plan.n_removed, "ppl_sweep": float(row["perplexity"]),
                     "ppl_scratch": s["perplexity"], "mmlu_sweep": float(row["mmlu_accuracy"]),
                     "mmlu_scratch": s["mmlu_accuracy"], "sweep_s": float(row["seconds"]),
                     "scratch_s": s["seconds"]})
    common.print_table(rows, "BI sweep vs from-scratch evaluation (per point)")
    med = {k: common.median(v) for k, v in times.items()}
    speedup = common.median(common.paired_ratios(times["scratch"], times["sweep"]))
    worst = max(max_rel.values())
    print("\nmax relative diff: " + ", ".join(f"{k} {v:.2e}" for k, v in max_rel.items()))
    print(f"sweep {med['sweep']:.1f} s, scratch {med['scratch']:.1f} s: scratch / sweep = {speedup:.2f}x "
          f"(target >= 2: {common.verdict(speedup, 2.0, higher_is_better=True)})")
    print(f"sweep stats: {stats}")
    print(f"layer passes: {stats.layer_passes} vs {stats.layer_passes_from_scratch} from scratch "
          f"({stats.layer_passes_from_scratch / max(stats.layer_passes, 1):.2f}x fewer)")
    assert worst <= 1e-6, f"sweep numbers differ from scratch: {max_rel}"
    print(f"per-question MMLU choices identical: {choices_equal} ({n_choices} question x point pairs)")
    assert choices_equal, "per-question MMLU choices differ between the sweep and scratch"
    cli: dict = {}
    if not args.no_cli:
        cli = cli_comparison(args, report, plans, subjects, frame)
    common.write_result("sweep", args, machine, {
        "ratios": ratios, "seq_len": args.seq_len, "windows": args.windows, "mmlu_questions": n_q,
        "repeats": args.repeats, "report_samples": args.samples},
        {"times_s": times, "median_s": med, "speedup": speedup, "max_rel_diff": max_rel,
         "choices_identical": choices_equal,
         "stats": {k: getattr(stats, k) for k in stats.__dataclass_fields__}, "points": rows, "cli": cli},
        [{"figure": "in process: scratch / sweep time", "ratio": speedup, "target": ">= 2",
          "verdict": common.verdict(speedup, 2.0, higher_is_better=True)}]
        + ([{"figure": "CLI: N x `layerlens eval --plan` / one `layerlens sweep`", "ratio": cli["speedup"],
             "target": ">= 2", "verdict": common.verdict(cli["speedup"], 2.0, higher_is_better=True)}] if cli else [])
        + [
         {"figure": "max relative diff (ppl, acc, p_correct)", "ratio": worst, "target": "<= 1e-6",
          "verdict": common.verdict(worst, 1e-6)}])


def _layerlens(argv: list[str], env: dict[str, str]) -> float:
    """Run ``python -m layerlens ARGV`` in a fresh process; its wall time (start-up, loading, work)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "layerlens", *argv], cwd=common.ROOT, env=env,
                          capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"layerlens {argv[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return dt


def cli_comparison(args, report, plans, subjects, frame) -> dict:
    """One `layerlens sweep` process vs one `layerlens eval --plan` process per ratio; same settings."""
    import csv

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    common_args = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
                   "--seq-len", str(args.seq_len), "--max-windows", str(args.windows),
                   "--mmlu-limit", str(args.mmlu_per_subject)]
    common_args += ["--mmlu-subjects", subjects] if subjects else []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-cli-") as tmp_dir:
        tmp = Path(tmp_dir)
        report.save(tmp / "report.json")
        for i, plan in enumerate(plans):
            (tmp / f"plan{i}.json").write_text(plan.to_json(), encoding="utf-8")

        def run_sweep_cli() -> float:
            out = tmp / "sweep-out"
            return _layerlens(["sweep", *common_args, "--report", str(tmp / "report.json"), "--strategies", "bi",
                               "--ratios", args.ratios, "--runs-dir", str(tmp / f"runs-{time.time_ns()}"),
                               "--out", str(out)], env)

        def run_eval_cli() -> list[float]:
            return [_layerlens(["eval", *common_args, "--plan", str(tmp / f"plan{i}.json"),
                                "--runs-dir", str(tmp / "runs-eval"), "--out", str(tmp / f"eval{i}")], env)
                    for i in range(len(plans))]

        times: dict[str, list[float]] = {"sweep_cli": [], "eval_cli": []}
        per_point: list[float] = []
        for r in range(args.repeats):
            for name in (["sweep_cli", "eval_cli"] if r % 2 == 0 else ["eval_cli", "sweep_cli"]):
                if name == "sweep_cli":
                    times[name].append(run_sweep_cli())
                else:
                    per_point = run_eval_cli()
                    times[name].append(sum(per_point))
                print(f"  CLI round {r + 1}/{args.repeats} {name}: {times[name][-1]:.1f} s")
        with open(tmp / "sweep-out" / "sweep.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        evals = [json.loads((tmp / f"eval{i}" / "eval.json").read_text()) for i in range(len(plans))]
    max_rel = 0.0
    for i, (row, ev) in enumerate(zip(rows, evals, strict=True)):
        pairs = [(float(row["perplexity"]), ev["perplexity"]), (float(row["mmlu_accuracy"]), ev["mmlu"]["accuracy"]),
                 (float(row["mmlu_prob_correct"]), ev["mmlu"]["mean_prob_correct"]),
                 (float(row["perplexity"]), float(frame.iloc[i]["perplexity"]))]  # CLI == in-process sweep
        max_rel = max([max_rel] + [abs(a - b) / max(abs(b), 1e-300) for a, b in pairs])
    speedup = common.median(common.paired_ratios(times["eval_cli"], times["sweep_cli"]))
    print(f"CLI: {len(plans)} x layerlens eval --plan {common.median(times['eval_cli']):.1f} s "
          f"(per process {', '.join(f'{t:.1f}' for t in per_point)} s) vs one layerlens sweep "
          f"{common.median(times['sweep_cli']):.1f} s: {speedup:.2f}x; max relative diff {max_rel:.2e}")
    # sweep.csv holds numbers printed with repr precision: equal to the eval.json floats
    assert max_rel <= 1e-9, f"CLI sweep and CLI eval numbers differ (max rel {max_rel})"
    return {"times_s": times, "eval_per_process_s": per_point, "speedup": speedup, "max_rel_diff": max_rel}


if __name__ == "__main__":
    main()
