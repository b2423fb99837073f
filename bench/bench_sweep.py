"""Benchmark 3 -- sweep: ``layerlens.sweep.sweep`` (BI, 9 ratios, perplexity + MMLU subset) vs evaluating
each pruned model from scratch with the eval path (``apply_plan`` + ``perplexity`` + ``mmlu``).

Both paths get the same report (a small analysis, not timed), the same plans, texts, questions, sequence
length, windows and batch sizes. The sweep runs with no runs folder (nothing persisted, nothing read
back: a fresh temporary runs folder each time, whose point files give the per-question results), so
every point is computed. With --repeats > 1 the two paths alternate (order rotated).

Checks: every perplexity, MMLU accuracy and mean probability of the correct answer equal within 1e-6
relative (max diff printed), and the per-question MMLU choices identical. Target: scratch / sweep >= 2.
"""

from __future__ import annotations

import json
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
    from layerlens.sweep import sweep

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    ratios = [float(x) for x in args.ratios.split(",")]
    report = analyze(model, tok, load_texts("default", role="calibration"),
                     CaptureConfig(samples=args.samples, seq_len=128, batch_size=8))
    ppl_texts = load_texts("default", role="eval")
    questions = load_questions("default", limit=args.mmlu_per_subject)
    if args.quick:
        questions = questions.questions[:8]
    n_q = len(getattr(questions, "questions", questions))
    L = report.num_layers
    plans = [make_plan("bi", report, ratio=r, num_layers=L) for r in ratios]
    for r, plan in zip(ratios, plans, strict=True):
        print(f"ratio {r:.2f}: {plan.describe()}")
    print(f"{n_q} MMLU questions, perplexity {args.windows} windows x {args.seq_len}; "
          f"load {machine['loadavg_start']}")

    def run_sweep():
        stats: dict = {}
        with tempfile.TemporaryDirectory(prefix="bench-sweep-") as runs:
            frame = sweep(model, tok, report, strategies=("bi",), ratios=ratios, ppl_texts=ppl_texts,
                          questions=questions, seq_len=args.seq_len, max_windows=args.windows, runs_dir=runs,
                          stats=stats)
            points = [json.loads(f.read_text()) for f in sorted(Path(runs).rglob("points/*.json"))]
        mmlu_points = {tuple(pt["plan"]["removed_layers"]): pt["result"] for pt in points if pt["kind"] == "mmlu"}
        return frame, stats["stats"], mmlu_points

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
        assert abs(float(row["target_ratio"]) - r) < 1e-12
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
    common.write_result("sweep", args, machine, {
        "ratios": ratios, "seq_len": args.seq_len, "windows": args.windows, "mmlu_questions": n_q,
        "repeats": args.repeats, "report_samples": args.samples},
        {"times_s": times, "median_s": med, "speedup": speedup, "max_rel_diff": max_rel,
         "choices_identical": choices_equal,
         "stats": {k: getattr(stats, k) for k in stats.__dataclass_fields__}, "points": rows},
        [{"figure": "scratch / sweep time", "ratio": speedup, "target": ">= 2",
          "verdict": common.verdict(speedup, 2.0, higher_is_better=True)},
         {"figure": "max relative diff (ppl, acc, p_correct)", "ratio": worst, "target": "<= 1e-6",
          "verdict": common.verdict(worst, 1e-6)}])


if __name__ == "__main__":
    main()
