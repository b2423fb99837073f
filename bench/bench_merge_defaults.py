"""Benchmark 8 -- merge defaults: which SLM criterion, merge formula and skip-first setting give the best
model WITHOUT healing, against plain removal of the same number of layers (issue 14, items 1 and 5).

    .venv/bin/python bench/bench_merge_defaults.py [--ratios 0.1,0.2,0.25,0.3] [--runs-dir DIR]

On the bundled default model the calibration data (bundled default) is analysed twice, with
``skip_first`` 0 and 1 (the dashboard's first-open capture, 8 samples x 128 tokens, unless told
otherwise). For every target ratio (default 0.2: about 8 minutes on 2 busy cores) an SLM plan is built
(``slm_plan(report, target_ratio=r)``) for every criterion {cka, cosine} x formula {task_vector, keep_top,
mean} x skip_first {0, 1}. The removals of the same size come from the same report: ``bi``, ``magnitude``,
and "below tops", every layer of each SLM window but its top one (what ``keep_top`` gives, except that the
top layer keeps its own norms where the merge keeps the base's). Every distinct pruned model is evaluated
once (``layerlens.sweep.sweep`` with ``SweepConfig(plans=...)``: prefix reuse, no reload) for held-out
perplexity on the bundled evaluation plays (no play shared with the calibration plays) and on ``prose``
(Python docs), ``--windows`` windows of ``--seq-len`` tokens each. With ``--runs-dir`` the reports and the
evaluated points are kept there, so a longer run can be done in pieces.

``task_vector`` and ``keep_top`` give the same attention/MLP weights for a window of two layers
(theta_base + (theta_top - theta_base) = theta_top, norms from the base either way), so a plan whose windows
all have two layers is evaluated once and both rows carry the number (``same_as`` says so).

Writes ``bench/results/<name>.csv`` (one row per plan), ``<name>.md`` (the table and a summary: geometric
means, best first) and ``<name>.json`` (machine, config, rows), ``name`` = ``merge_defaults``. Numbers, not
timings, are the result here: they do not depend on the machine's load (float32 on CPU).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import common

CRITERIA = ("cka", "cosine")
FORMULAS = ("task_vector", "keep_top", "mean")
BASELINES = ("bi", "magnitude", "tops")
DATASETS = {"plays": ("default", "eval"), "prose": ("prose", "eval")}


def _groups_text(plan: Any) -> str:
    if plan.method == "merge":
        return " ".join(f"{g[0]}-{g[-1]}" for g in plan.merge)
    return ",".join(map(str, plan.remove))


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.1f}" if v < 1e5 else f"{v:.2e}"


def build_rows(reports: dict[int, Any], ratios: list[float], formulas: tuple[str, ...] = FORMULAS,
               baselines: tuple[str, ...] = BASELINES) -> list[dict[str, Any]]:
    """One row per (ratio, skip_first, criterion, formula) SLM plan and per baseline of the same size."""
    from layerlens.plans import PrunePlan, make_plan, slm_plan

    rows: list[dict[str, Any]] = []
    for ratio in ratios:
        for skip, report in reports.items():
            sizes: set[int] = set()
            for criterion in CRITERIA:
                for formula in formulas:
                    plan = slm_plan(report, target_ratio=ratio, criterion=criterion, formula=formula)
                    sizes.add(plan.n_removed)
                    rows.append({"ratio": ratio, "skip_first": skip, "method": f"slm {criterion}",
                                 "criterion": criterion, "formula": formula, "n_removed": plan.n_removed,
                                 "widest": max((len(g) for g in plan.merge), default=0),
                                 "layers": _groups_text(plan), "threshold": plan.params.get("threshold"),
                                 "plan": plan})
                if plan.merge and "tops" in baselines:  # each window's top layer alone, with its own norms (keep_top keeps the base's)
                    tops = PrunePlan(plan.num_layers, "remove", remove=[i for g in plan.merge for i in g[:-1]])
                    rows.append({"ratio": ratio, "skip_first": skip, "method": f"remove below tops ({criterion})",
                                 "criterion": criterion, "formula": "", "n_removed": tops.n_removed, "widest": 0,
                                 "layers": _groups_text(tops), "threshold": None, "plan": tops})
            for k in sorted(sizes):
                for strategy in (b for b in baselines if b != "tops"):
                    plan = make_plan(strategy, report, n=k)
                    rows.append({"ratio": ratio, "skip_first": skip, "method": f"remove {strategy}",
                                 "criterion": strategy, "formula": "", "n_removed": k, "widest": 0,
                                 "layers": _groups_text(plan), "threshold": None, "plan": plan})
    return rows


def _eval_plan(plan: Any) -> Any:
    """The plan actually evaluated: task_vector over two-layer windows is keep_top (see module docstring)."""
    from dataclasses import replace

    if plan.method == "merge" and plan.merge_formula == "task_vector" and all(len(g) == 2 for g in plan.merge):
        return replace(plan, merge_formula="keep_top")
    return plan


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0.2", help="comma-separated SLM target ratios (default 0.2)")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity window length")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows per data set")
    p.add_argument("--samples", type=int, default=8, help="analysis samples (the dashboard's first-open 8)")
    p.add_argument("--analysis-seq-len", type=int, default=128, help="analysis tokens per sample (dashboard: 128)")
    p.add_argument("--skip-first", default="0,1", help="comma-separated skip_first values to analyse with")
    p.add_argument("--formulas", default=",".join(FORMULAS), help="merge formulas to build SLM plans with")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="removals of the same size: bi, magnitude, tops (every window layer but its top)")
    p.add_argument("--datasets", default="plays,prose", help=f"perplexity sets: {', '.join(DATASETS)}")
    p.add_argument("--runs-dir", default=None,
                   help="persist reports and evaluated points here, so a rerun resumes (default: none)")
    p.add_argument("--name", default="merge_defaults", help="results file names: bench/results/<name>.{csv,md,json}")
    p.add_argument("--plans-only", action="store_true", help="print the plans and stop (analysis only)")
    args = p.parse_args()
    if args.quick:
        args.seq_len, args.windows, args.samples, args.analysis_seq_len = 64, 2, 2, 64
    common.setup_torch(args)

    from layerlens.data import load_texts
    from layerlens.metrics import CaptureConfig, analyze
    from layerlens.report import LayerReport
    from layerlens.runs import stable_key
    from layerlens.sweep import SweepConfig, effective_plan, sweep

    started = time.perf_counter()
    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    runs = Path(args.runs_dir) if args.runs_dir else None
    ratios = [float(x) for x in args.ratios.split(",")]
    skips = [int(x) for x in args.skip_first.split(",")]
    calibration = load_texts("default", role="calibration")
    reports: dict[int, Any] = {}
    for skip in skips:
        config = CaptureConfig(samples=args.samples, seq_len=args.analysis_seq_len, skip_first=skip)
        cached = runs / f"report_{args.samples}x{args.analysis_seq_len}_skip{skip}.json" if runs else None
        if cached is not None and cached.exists():
            reports[skip] = LayerReport.load(cached)
        else:
            t = time.perf_counter()
            reports[skip] = analyze(model, tok, calibration, config)
            print(f"analysis skip_first={skip}: {time.perf_counter() - t:.1f} s")
            if cached is not None:
                reports[skip].save(cached)

    rows = build_rows(reports, ratios, tuple(args.formulas.split(",")), tuple(args.baselines.split(",")))
    unique: dict[str, Any] = {}  # one evaluation per distinct pruned model (not per strategy name)
    for row in rows:
        plan = _eval_plan(row["plan"])
        row["key"] = stable_key(effective_plan(plan))
        unique.setdefault(row["key"], plan)
        if plan is not row["plan"]:
            row["same_as"] = "keep_top (two-layer windows)"
    for row in rows:
        print(f"r={row['ratio']:.2f} skip={row['skip_first']} {row['method']:<16} {row['formula']:<11} "
              f"k={row['n_removed']} widest={row['widest']} {row['layers']}")
    print(f"{len(rows)} rows, {len(unique)} distinct pruned models (+ the original)")
    if args.plans_only:
        return

    L = reports[skips[0]].num_layers
    from layerlens.plans import PrunePlan

    original = PrunePlan(num_layers=L, method="remove", strategy="manual")
    points = [("original", 0.0, original)] + [("x", 0.0, plan) for plan in unique.values()]
    ppl: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name in args.datasets.split(","):
        spec, role = DATASETS[name]
        texts = load_texts(spec, role=role)
        t = time.perf_counter()

        def progress(done: int, total: int, label: str, name: str = name, t: float = t) -> None:
            print(f"  {name} {done}/{total} {time.perf_counter() - t:.0f} s  {label}", flush=True)

        result = sweep(model, tok, None, SweepConfig(plans=tuple(points), seq_len=args.seq_len,
                                                      max_windows=args.windows),
                       ppl_texts=texts, runs_dir=runs, progress=progress)
        seconds[name] = round(time.perf_counter() - t, 1)
        values = list(result.frame["perplexity"])
        ppl[name] = {"original": values[0]} | {key: v for key, v in zip(unique, values[1:], strict=True)}
        print(f"{name}: {seconds[name]} s, original perplexity {values[0]:.2f}")

    out_rows = []
    for row in rows:
        key = row["key"]
        rec = {k: row.get(k, "") for k in ("ratio", "skip_first", "method", "criterion", "formula", "n_removed",
                                            "widest", "layers", "threshold", "same_as")}
        for name in ppl:
            rec[f"ppl_{name}"] = ppl[name][key]
        out_rows.append(rec)
    originals = {name: ppl[name]["original"] for name in ppl}
    write_outputs(args, machine, out_rows, originals, seconds, time.perf_counter() - started)


def summary(rows: list[dict[str, Any]], originals: dict[str, float]) -> list[dict[str, Any]]:
    """Per (method, skip_first, formula), best first: the geometric mean of the perplexity over the data sets at
    each ratio and over everything, and at how many ratios the model stays usable (every set under 2x the
    original, the line Prune and Summary draw)."""
    names = list(originals)
    groups: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["skip_first"], r["formula"]), {})[r["ratio"]] = [r[f"ppl_{n}"] for n in names]
    out = []
    for (method, skip, formula), by_ratio in groups.items():
        def gmean(xs: list[float]) -> float:
            return math.exp(sum(math.log(x) for x in xs) / len(xs))
        usable = sum(all(v <= 2 * originals[n] for v, n in zip(vals, names, strict=True)) for vals in by_ratio.values())
        out.append({"method": method, "skip_first": skip, "formula": formula,
                    **{f"gmean_{r:g}": gmean(v) for r, v in by_ratio.items()},
                    "gmean": gmean([x for v in by_ratio.values() for x in v]), "usable": f"{usable}/{len(by_ratio)}"})
    return sorted(out, key=lambda d: d["gmean"])


def write_outputs(args: Any, machine: dict[str, Any], rows: list[dict[str, Any]], originals: dict[str, float],
                  seconds: dict[str, float], total: float) -> None:
    stem = args.name + (".quick" if args.quick else "")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = common.RESULTS / f"{stem}.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    names = list(originals)
    lines = ["Perplexity without healing (original: "
             + ", ".join(f"{n} {originals[n]:.1f}" for n in names)
             + f"); {args.windows} windows x {args.seq_len} tokens per set; analysis {args.samples} x "
             f"{args.analysis_seq_len} tokens of the calibration plays.", "",
             "| ratio | skip_first | method | formula | layers removed | widest window | layers | "
             + " | ".join(f"ppl {n}" for n in names) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['skip_first']} | {r['method']} | {r['formula'] or '–'} | "
                     f"{r['n_removed']} | {r['widest'] or '–'} | {r['layers']} | "
                     + " | ".join(_fmt(r[f'ppl_{n}']) for n in names) + " |")
    best = summary(rows, originals)
    ratios = [k.removeprefix("gmean_") for k in best[0] if k.startswith("gmean_")]
    lines += ["", f"Summary, best first: geometric mean of the perplexity over {' and '.join(names)} at each ratio, "
              f"over everything, and at how many ratios every set stays under 2x the original.", "",
              "| method | skip_first | formula | " + " | ".join(f"ratio {r}" for r in ratios)
              + " | all | usable |", "|---|---|---|" + "---|" * (len(ratios) + 2)]
    for d in best:
        lines.append(f"| {d['method']} | {d['skip_first']} | {d['formula'] or '–'} | "
                     + " | ".join(_fmt(d.get(f'gmean_{r}', float('nan'))) for r in ratios)
                     + f" | {_fmt(d['gmean'])} | {d['usable']} |")
    md_path = common.RESULTS / f"{stem}.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {csv_path.relative_to(common.ROOT)} and {md_path.relative_to(common.ROOT)}")
    config = {k: getattr(args, k) for k in ("ratios", "seq_len", "windows", "samples", "analysis_seq_len",
                                            "skip_first", "formulas", "baselines", "datasets")}
    common.write_result(args.name, args, machine, config,
                        {"original_perplexity": originals, "seconds": seconds, "total_seconds": round(total, 1),
                         "summary": best},
                        rows)


if __name__ == "__main__":
    main()
