"""Benchmark 1 -- capture overhead: ``layerlens.metrics.analyze`` (all metrics) vs bare forward passes.

Same calibration batches, three variants run interleaved, order rotated each round, after one untimed
warm-up of each:

* ``analyze``          -- the library call (tokenization + hooks + every metric: cosine, CKA, BI, block
                          distance, magnitude);
* ``backbone``         -- ``model.base_model(...)`` over the same batches (the exact call analyze makes);
* ``full``             -- ``model(...)`` over the same batches (backbone + LM head logits).

Target: analyze / backbone <= 1.15 (median of per-round ratios). Then, unless --no-profile: cProfile of
one analyze call (forward vs ``_Accumulators.update``), and the update of one real batch timed on its own
as a fraction of one backbone forward.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections import defaultdict

import common
import torch


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cka", default="minibatch", choices=["minibatch", "exact"])
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.samples, args.seq_len, args.repeats = 4, 64, 2
    common.setup_torch(args)

    from layerlens.capture import ResidualCapture
    from layerlens.data import batches, calibration_tokens, load_texts
    from layerlens.metrics import CaptureConfig, _Accumulators, analyze

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    texts = load_texts("default", role="calibration")
    cfg = CaptureConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                        cka_estimator=args.cka)
    token_lists = calibration_tokens(tok, texts, args.samples, args.seq_len)
    bl = list(batches(tok, token_lists, args.batch_size, device))
    n_tokens = sum(b.num_tokens for b in bl)
    print(f"{len(token_lists)} samples, {n_tokens} tokens, {len(bl)} batches of <= {args.batch_size} x "
          f"{args.seq_len}; {machine['torch_threads']} threads; load {machine['loadavg_start']}")

    def run_analyze():
        return analyze(model, tok, texts, cfg)

    def run_backbone():
        with torch.inference_mode():
            for b in bl:
                model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def run_full():
        with torch.inference_mode():
            for b in bl:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    variants = {"analyze": run_analyze, "backbone": run_backbone, "full": run_full}
    print("warm-up")
    for fn in variants.values():
        fn()
    print(f"timing: {args.repeats} interleaved rounds")
    times = common.interleaved(variants, args.repeats, device)
    med = {k: common.median(v) for k, v in times.items()}
    ratios = {
        "analyze/backbone": common.median(common.paired_ratios(times["analyze"], times["backbone"])),
        "analyze/full": common.median(common.paired_ratios(times["analyze"], times["full"])),
        "full/backbone": common.median(common.paired_ratios(times["full"], times["backbone"])),
    }
    rows = [{"variant": k, "median_s": med[k], "min_s": min(times[k]), "tokens_per_s": n_tokens / med[k],
             "vs_backbone": med[k] / med["backbone"]} for k in variants]
    common.print_table(rows, "capture overhead (median of interleaved rounds)")
    print("\nmedian of per-round ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    print(f"target analyze/backbone <= 1.15: {common.verdict(ratios['analyze/backbone'], 1.15)}")

    profile: dict = {}
    if not args.no_profile:
        # cProfile of one analyze call: where its wall time goes.
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        analyze(model, tok, texts, cfg)
        prof.disable()
        total = time.perf_counter() - t0
        st = pstats.Stats(prof)
        cum = defaultdict(float)
        for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            if file.endswith("layerlens/metrics.py") and func in ("update", "finish"):
                cum[f"accumulators.{func}"] += ct
            elif file.endswith("layerlens/capture.py") and func in ("hook", "_pre_hook", "take"):
                cum["capture hooks"] += ct
            elif file.endswith("layerlens/data.py") and func in ("calibration_tokens",):
                cum["tokenization"] += ct
            elif file.endswith("layerlens/data.py") and func == "batches":
                cum["batching"] += ct
        fwd = [ct for (file, _l, func), (_a, _b, _c, ct, _d) in st.stats.items()  # type: ignore[attr-defined]
               if file.endswith("modeling_llama.py") and func == "forward"]
        cum["backbone forward (incl. hooks)"] = max(fwd) if fwd else float("nan")
        profile["cprofile_analyze_s"] = total
        profile["cprofile_parts_s"] = dict(cum)
        prof_rows = [{"part": k, "seconds": v, "share_of_analyze": v / total} for k, v in cum.items()]
        common.print_table(prof_rows, f"cProfile of one analyze call ({total:.2f} s)")

        # One real batch: the backbone forward vs the update of its states, each timed on its own.
        b0 = bl[0]
        with ResidualCapture(model) as cap, torch.inference_mode():
            def forward():
                model.base_model(input_ids=b0.input_ids, attention_mask=b0.attention_mask, use_cache=False)

            fwd_times = [common.timed(forward, device)[0] for _ in range(3)]
            states = cap.take()
            acc = _Accumulators(states.shape[0], states.shape[-1], args.cka, device)
            acc.update(states, b0.attention_mask)  # warm: its work buffers now exist, as after batch 1
            upd_times = [common.timed(lambda: acc.update(states, b0.attention_mask), device)[0]
                         for _ in range(args.repeats)]
        fwd_med, upd_med = common.median(fwd_times), common.median(upd_times)
        print(f"one batch {tuple(b0.input_ids.shape)}: backbone forward {1000 * fwd_med:.0f} ms, update "
              f"{1000 * upd_med:.0f} ms ({100 * upd_med / fwd_med:.1f}% of the forward)")
        profile.update(batch_shape=list(b0.input_ids.shape), backbone_forward_s=fwd_med, update_s=upd_med)

    rows_out = [{"figure": "analyze / backbone forward", "ratio": ratios["analyze/backbone"], "target": "<= 1.15",
                 "verdict": common.verdict(ratios["analyze/backbone"], 1.15)},
                {"figure": "analyze / full-model forward", "ratio": ratios["analyze/full"], "target": "",
                 "verdict": ""}]
    common.write_result("capture", args, machine, {
        "samples": len(token_lists), "tokens": n_tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "cka_estimator": args.cka, "repeats": args.repeats, "data": "default (Shakespeare calibration)"},
        {"times_s": times, "median_s": med, "ratios": ratios, "profile": profile}, rows_out)


if __name__ == "__main__":
    main()
