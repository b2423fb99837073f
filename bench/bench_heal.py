"""Healing after pruning: how much of the perplexity lost by removing layers LoRA wins back, and how fast.

On the default model: BI removal of 8 of 30 layers (ShortGPT), then LoRA healing under a time budget with
distillation from the original (``kd``) and, at the same budget, with the plain next-token loss (``lm``).
Held-out perplexity (bundled evaluation plays, disjoint from the calibration plays the LoRA trains on) of
the original, the pruned and the healed model, and the fraction of the log-perplexity gap recovered at
each checkpoint against seconds:

    recovered(t) = (log ppl_pruned - log ppl(t)) / (log ppl_pruned - log ppl_original)

Target (issue 15): at least half of the gap within 10 minutes of CPU time. Run:
``python bench/bench_heal.py --seconds 600`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import math

from common import (
    base_parser,
    load,
    machine_info,
    model_dtype,
    print_table,
    setup_torch,
    verdict,
    write_result,
)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0, help="healing budget per loss")
    p.add_argument("--remove", type=int, default=8, help="layers removed by BI")
    p.add_argument("--losses", default="kd,lm")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=25)
    args = p.parse_args()
    setup_torch(args)

    from layerlens.data import load_texts
    from layerlens.evaluation import perplexity
    from layerlens.heal import HealConfig, heal_plan
    from layerlens.metrics import CaptureConfig, analyze
    from layerlens.plans import make_plan

    lm = load(args)
    seconds = 20.0 if args.quick else args.seconds
    train, held_out = load_texts("default", role="calibration"), load_texts("default", role="eval")
    report = analyze(lm.model, lm.tokenizer, train, CaptureConfig(samples=16, seq_len=128))
    plan = make_plan("bi", report, n=args.remove)
    original = float(perplexity(lm.model, lm.tokenizer, held_out, seq_len=128,
                                max_windows=args.eval_windows).perplexity)
    rows, results = [], {"plan": plan.to_dict(), "ppl_original": original, "runs": {}}
    for loss in args.losses.split(","):
        config = HealConfig(loss=loss, seconds=seconds, lr=args.lr, seq_len=128, batch_size=4,
                            eval_windows=args.eval_windows, eval_every=5 if args.quick else args.eval_every)
        r = heal_plan(lm.model, lm.tokenizer, plan, train, held_out, config)
        gap = math.log(r.ppl_before) - math.log(original)
        curve = [{"step": s, "seconds": t, "perplexity": ppl,
                  "recovered": (math.log(r.ppl_before) - math.log(ppl)) / gap if gap > 0 else float("nan")}
                 for s, ppl, t in r.evals]
        best = max(c["recovered"] for c in curve)
        results["runs"][loss] = {"ppl_pruned": r.ppl_before, "ppl_healed": r.ppl_after, "steps": r.steps,
                                 "tokens": r.tokens, "seconds": r.seconds, "best_step": r.best_step,
                                 "recovered": best, "curve": curve, "train_loss": r.curve[::10]}
        rows.append({"loss": loss, "budget s": seconds, "steps": r.steps, "tokens": r.tokens,
                     "ppl original": original, "ppl pruned": r.ppl_before, "ppl healed": r.ppl_after,
                     "gap recovered": best, "target >= 0.5": verdict(best, 0.5, higher_is_better=True)})
        print_table([{k: v for k, v in c.items()} for c in curve], f"{loss}: recovered vs seconds")
    print_table(rows, f"BI -{args.remove} of {plan.num_layers} layers, healed with LoRA for {seconds:.0f} s")
    write_result("heal", args, machine_info(args.device, model_dtype(lm.model)),
                 {"seconds": seconds, "remove": args.remove, "lr": args.lr, "lora_rank": 8, "seq_len": 128,
                  "batch_size": 4, "eval_windows": args.eval_windows}, results, rows)


if __name__ == "__main__":
    main()
