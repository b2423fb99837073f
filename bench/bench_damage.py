"""Benchmark -- leave-one-out damage: the ShortGPT Figure-3 table of the default model (every layer, and
every attention and MLP sublayer when plans can drop them), its time with prefix reuse, the speed-up over
evaluating each pruned model from scratch, and Kendall/Spearman of each metric against the damage.

* **prefix reuse** (what ``layerlens damage`` runs): one pass of the original records every layer's input
  and each removal runs only its tail (``layerlens.damage.leave_one_out``);
* **naive** (``reuse=False``): every pruned model from scratch. Too slow to run in full on a CPU, so it is
  measured on ``--naive-units`` units per kind spread over the depth, and its total is EXTRAPOLATED as
  (reference pass) + (units of each kind) x (median measured seconds per naive unit of that kind): a naive
  unit always runs L-1 layers (a sublayer: L layers with one sublayer skipped) plus the head, so its time
  does not depend on the layer. The measured subset is also checked to give the same numbers as the reuse
  run (max relative difference of perplexity and KL printed).

The layer-pass counts (exact, not timed) give the machine-independent speed-up; the seconds are on this
machine and under its load (recorded). Optional ``--oracle-ratios``: perplexity against the pruning ratio of
whole-layer BI removal, the greedy oracle and the attention-only strategy (when one is registered).
"""

from __future__ import annotations

import math
import time

import common


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=128, help="tokens per perplexity window")
    p.add_argument("--windows", type=int, default=2, help="held-out perplexity windows")
    p.add_argument("--samples", type=int, default=8, help="calibration samples for the metrics (report)")
    p.add_argument("--naive-units", type=int, default=3, help="units per kind evaluated from scratch")
    p.add_argument("--no-sublayers", action="store_true", help="whole layers only")
    p.add_argument("--oracle-ratios", default="", help="e.g. 0.1,0.2: also draw bi vs oracle vs attention-only")
    args = p.parse_args()
    if args.quick:
        args.seq_len, args.windows, args.samples, args.naive_units = 32, 1, 2, 1
    common.setup_torch(args)

    from layerlens.damage import Unit, leave_one_out, metric_correlations, sublayer_plans_available
    from layerlens.data import load_texts
    from layerlens.metrics import CaptureConfig, analyze

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    L = loaded.info.num_layers
    sub = sublayer_plans_available() and not args.no_sublayers
    texts = load_texts("default", role="eval")
    t_an = time.perf_counter()
    report = analyze(model, tok, load_texts("default"), CaptureConfig(samples=args.samples, seq_len=args.seq_len))
    print(f"analysis (not timed in the comparison): {time.perf_counter() - t_an:.1f} s", flush=True)

    def tick(done: int, total: int, label: str) -> None:
        if done % 10 == 0 or done == total:
            print(f"  {done}/{total} removals ({label}) {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    res = leave_one_out(model, tok, texts, sublayers=sub, seq_len=args.seq_len, max_windows=args.windows,
                        progress=tick)
    common.sync(device)
    reuse_s = time.perf_counter() - t0
    baseline_s = reuse_s - sum(u.seconds for u in res.units)
    kinds = ["layer", *(["attn", "mlp"] if sub else [])]
    k = max(1, args.naive_units)
    subset = [Unit(kind, round(i * (L - 1) / max(k - 1, 1))) for kind in kinds for i in range(k)]
    naive = leave_one_out(model, tok, texts, units=subset, reuse=False, seq_len=args.seq_len, max_windows=args.windows)
    per_kind = {kind: common.median([u.seconds for u in naive.units if u.unit.kind == kind]) for kind in kinds}
    naive_total = baseline_s + sum(per_kind[kind] * L for kind in kinds)
    got = {(u.unit.kind, u.unit.index): u for u in res.units}
    max_rel = max(max(abs(u.ppl - got[(u.unit.kind, u.unit.index)].ppl) / u.ppl,
                      abs(u.kl - got[(u.unit.kind, u.unit.index)].kl) / max(u.kl, 1e-12)) for u in naive.units)
    s = res.stats
    pass_ratio = s.layer_passes_from_scratch / s.layer_passes

    rows = []
    for i in range(L):
        row = {"layer": i, "ppl": got[("layer", i)].ppl, "+ppl": got[("layer", i)].ppl - res.baseline_ppl,
               "KL": got[("layer", i)].kl}
        if sub:
            row |= {"attn +ppl": got[("attn", i)].ppl - res.baseline_ppl, "attn KL": got[("attn", i)].kl,
                    "mlp +ppl": got[("mlp", i)].ppl - res.baseline_ppl, "mlp KL": got[("mlp", i)].kl}
        rows.append(row)
    common.print_table(rows, f"Leave-one-out damage (baseline perplexity {res.baseline_ppl:.3f}, "
                             f"{args.windows} windows x {args.seq_len} tokens)")
    corr = metric_correlations(res, report)
    corr_rows = [{"metric": name, "units": c["units"], "n": c["n"], "spearman": c["spearman"],
                  "kendall": c["kendall"], "kendall_kl": c.get("kendall_kl")} for name, c in corr.items()]
    common.print_table(corr_rows, "Rank correlation of each metric with the measured perplexity increase")
    units = len(res.units)
    print(f"\n{units} removals: prefix reuse {reuse_s:.1f} s; naive (extrapolated from {len(subset)} measured "
          f"units) {naive_total:.1f} s: {naive_total / reuse_s:.2f}x; layer passes {s.layer_passes} vs "
          f"{s.layer_passes_from_scratch} ({pass_ratio:.2f}x); max relative diff naive vs reuse {max_rel:.1e}")

    curves = {}
    if args.oracle_ratios:
        curves = oracle_curves(args, loaded, report, texts)

    common.write_result("damage", args, machine, {
        "seq_len": args.seq_len, "windows": args.windows, "report_samples": args.samples, "sublayers": sub,
        "naive_units": [f"{u.kind} {u.index}" for u in subset]},
        {"baseline_ppl": res.baseline_ppl, "units": units, "reuse_s": reuse_s, "baseline_pass_s": baseline_s,
         "naive_s_extrapolated": naive_total, "naive_unit_s_median": per_kind, "speedup": naive_total / reuse_s,
         "layer_passes": s.layer_passes, "layer_passes_from_scratch": s.layer_passes_from_scratch,
         "max_rel_diff": max_rel, "correlations": corr, "damage": res.to_dict(), "curves": curves},
        [{"figure": "naive (extrapolated) / prefix reuse time", "ratio": naive_total / reuse_s},
         {"figure": "layer passes naive / reuse (exact)", "ratio": pass_ratio},
         {"figure": "max relative diff naive vs reuse", "ratio": max_rel, "target": "<= 1e-5",
          "verdict": common.verdict(max_rel, 1e-5)}])
    assert math.isfinite(max_rel) and max_rel < 1e-4, "prefix reuse and naive disagree"


def oracle_curves(args, loaded, report, texts) -> dict:
    """Held-out perplexity against the ratio for bi, the greedy oracle (on the calibration tokens) and an
    attention-only strategy when registered."""
    from layerlens.data import calibration_tokens, load_texts
    from layerlens.evaluation import perplexity
    from layerlens.plans import make_plan, strategy_names
    from layerlens.surgery import apply_plan

    model, tok = loaded.model, loaded.tokenizer
    tokens = calibration_tokens(tok, load_texts("default"), args.samples, args.seq_len)
    ratios = [float(r) for r in args.oracle_ratios.split(",") if r]
    names = ["bi", "oracle", *[n for n in strategy_names() if n.startswith("attn")][:1]]
    out: dict = {}
    rows = []
    for name in names:
        out[name] = {}
        for r in ratios:
            t0 = time.perf_counter()
            extra = {"model": model, "tokenizer": tok, "token_lists": tokens} if name == "oracle" else {}
            plan = make_plan(name, report, ratio=r, num_layers=report.num_layers, **extra)
            ppl = perplexity(apply_plan(model, plan), tok, texts, seq_len=args.seq_len,
                             max_windows=args.windows).perplexity
            out[name][r] = {"ppl": ppl, "plan": plan.describe(), "seconds": time.perf_counter() - t0}
            rows.append({"strategy": name, "ratio": r, "ppl": ppl, "plan": plan.describe()[:60]})
    common.print_table(rows, "Perplexity against the pruning ratio")
    return out


if __name__ == "__main__":
    main()
