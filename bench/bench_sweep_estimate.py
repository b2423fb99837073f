"""Benchmark -- the Evaluate page's time estimate against the real sweep (issue 14, item 7).

The page promised "about a minute" for its defaults; a small sweep took 397 s under load. Now it shows
an estimate from measured time (``layerlens.dashboard.sweeps``): before the first sweep, one short
perplexity window timed on the original model (the calibration); after it, the speed that sweep measured.
This runs the issue's small sweep (2 strategies x 3 ratios, 1 window, 57 MMLU questions) and one more
with other settings, each estimated first from the calibration and then from the previous sweep's
measured speed, and prints estimate / actual (1.0 = exact; the page rounds the estimate anyway).
No runs folder: every point is computed.
"""

from __future__ import annotations

import time

import common


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    common.setup_torch(args)
    from layerlens.adapters import decoder_layers
    from layerlens.dashboard import sweeps
    from layerlens.data import load_texts
    from layerlens.metrics import CaptureConfig, analyze
    from layerlens.questions import load_questions
    from layerlens.sweep import SweepConfig, make_plans, sweep

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    n = loaded.info.num_layers
    texts = load_texts("default", role="eval")
    report = analyze(model, tok, load_texts("default", role="calibration"), CaptureConfig(samples=8, seq_len=64))
    per_layer = [sum(q.numel() for q in layer.parameters()) for layer in decoder_layers(model)]
    head = sweeps.head_layers(loaded.info.hidden_size, model.config.vocab_size, per_layer)
    t0 = time.perf_counter()
    timing = sweeps.calibrate(model, tok, texts, num_layers=n, head=head)
    calibration_s = time.perf_counter() - t0
    cases = [("issue: bi+reverse x 0/.2/.4, 1 window, 57 MMLU", ["bi", "reverse"], [0.0, 0.2, 0.4], 1, 1),
             ("bi x 0/.1/.2/.3, 2 windows, no MMLU", ["bi"], [0.0, 0.1, 0.2, 0.3], 2, 0)]
    if args.quick:
        cases = [("quick: bi x 0/.2, 1 window, no MMLU", ["bi"], [0.0, 0.2], 1, 0)]
    rows = []
    for label, strategies, ratios, windows, per_subject in cases:
        plans = make_plans(report, strategies, ratios, num_layers=n)
        questions = load_questions("default", limit=per_subject) if per_subject else None
        tokens = sweeps.mmlu_tokens(model, tok, questions) if questions is not None else 0
        est = sweeps.estimate(timing, [pl for _, _, pl in plans], windows=windows, seq_len=256, mmlu_tokens=tokens)
        t0 = time.perf_counter()
        result = sweep(model, tok, report, SweepConfig(plans=plans, seq_len=256, max_windows=windows),
                       ppl_texts=texts, questions=questions)
        actual = time.perf_counter() - t0
        rows.append({"sweep": label, "timing from": timing.source, "estimate_s": est.seconds, "actual_s": actual,
                     "estimate/actual": est.seconds / actual})
        timing = sweeps.measured(est, actual, result.stats.computed) or timing  # what the page persists
    common.print_table(rows, f"sweep time estimate (calibration took {calibration_s:.1f} s)")
    common.write_result("sweep_estimate", args, common.machine_info(args.device, common.model_dtype(model)),
                        {"calibration_s": calibration_s, "head_layers": head}, {}, rows)


if __name__ == "__main__":
    main()
